"""Stand-ins for the GPU-only parts of the efficiency metrics, so their CUDA paths run on CPU:
a pynvml-like module (``FakeNvml``), a ``torch.cuda``-like allocator (``FakeCuda``) and a clock
that moves only when read (``StepClock``)."""

from __future__ import annotations


class StepClock:
    """``clock()`` returns 0, step, 2*step, ...: every interval is a known number of reads."""

    def __init__(self, step: float = 1.0) -> None:
        self.step, self.reads = step, 0

    def __call__(self) -> float:
        value = self.reads * self.step
        self.reads += 1
        return value


class FakeNvmlError(Exception):
    pass


class FakeNvml:
    """What ``NvmlEnergySource`` calls of pynvml. ``energy_mj``: successive counter values
    (``None``: the counter is not supported); ``power_mw``: successive power readings."""

    NVMLError = FakeNvmlError

    def __init__(self, energy_mj: list[int] | None = None, power_mw: list[float] | None = None, init_error: bool = False) -> None:
        self.energy_mj = list(energy_mj) if energy_mj is not None else None
        self.power_mw = list(power_mw or [])
        self.init_error = init_error
        self.inits = self.shutdowns = 0
        self.handles: list[tuple[str, object]] = []

    def nvmlInit(self) -> None:
        if self.init_error:
            raise FakeNvmlError("Driver Not Loaded")
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> tuple[str, int]:
        self.handles.append(("index", index))
        return ("gpu", index)

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> tuple[str, str]:
        self.handles.append(("uuid", uuid))
        return ("uuid", uuid)

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle: object) -> tuple[str, object]:
        self.handles.append(("mig-parent", handle))
        return ("parent", handle)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: object) -> int:
        if self.energy_mj is None:
            raise FakeNvmlError("Not Supported")
        return self.energy_mj.pop(0) if len(self.energy_mj) > 1 else self.energy_mj[0]

    def nvmlDeviceGetPowerUsage(self, handle: object) -> float:
        if not self.power_mw:
            raise FakeNvmlError("Not Supported")
        return self.power_mw.pop(0) if len(self.power_mw) > 1 else self.power_mw[0]


class FakeCuda:
    """``reset_peak_memory_stats``/``max_memory_allocated`` of ``torch.cuda``, recorded."""

    def __init__(self, peak_bytes: int) -> None:
        self.peak_bytes, self.resets = peak_bytes, []

    def reset_peak_memory_stats(self, device: object) -> None:
        self.resets.append(device)

    def max_memory_allocated(self, device: object) -> int:
        return self.peak_bytes
