"""GPU energy from NVML (the ``nvidia-ml-py`` package, module ``pynvml``; the ``energy`` extra).

Two modes, chosen once per source:

* ``"nvml-counter"``: ``nvmlDeviceGetTotalEnergyConsumption`` (millijoules since the driver
  loaded; Volta and newer): ``E = (c1 - c0) / 1000`` J. Exact and free of sampling error.
* ``"nvml-sampled"``: where the counter is not supported, ``nvmlDeviceGetPowerUsage``
  (milliwatts) sampled every ``sample_interval`` seconds on a daemon thread, plus one sample at
  ``start``, each ``poll()`` and ``stop``; the energy is the samples' time-weighted mean power
  (trapezoid rule, ``energy.integrate_power`` over the samples' span) times the interval. The
  board's power reading is itself averaged by the driver, so short intervals are approximate.

Both read the whole board (other processes on the GPU included). The NVML index of
``cuda:N`` follows ``CUDA_VISIBLE_DEVICES`` (integers or ``GPU-``/``MIG-`` UUIDs); a MIG
instance reports its parent GPU's energy, noted in the reading. ``nvml`` is injectable (any
object with pynvml's functions and ``NVMLError``) so tests need no GPU.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import torch

from lightning_peft.metrics.energy import EnergySource, integrate_power

__all__ = ["NvmlEnergySource", "nvml_unavailable_reason", "import_pynvml"]


def import_pynvml() -> Any:
    """The ``pynvml`` module, or an ``ImportError`` naming the package to install."""
    try:
        import pynvml
    except ImportError as error:
        raise ImportError("NVML energy needs nvidia-ml-py: pip install 'lightning-peft[energy]' (or nvidia-ml-py)") from error
    return pynvml


def _handle(nvml: Any, device: torch.device) -> tuple[Any, str | None]:
    """NVML handle of ``device`` and a note (MIG: the parent GPU is read)."""
    index = device.index if device.index is not None else (torch.cuda.current_device() if torch.cuda.is_available() else 0)
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    entry = visible[index] if index < len(visible) else None
    if entry is None or entry.isdigit():
        return nvml.nvmlDeviceGetHandleByIndex(int(entry) if entry else index), None
    handle = nvml.nvmlDeviceGetHandleByUUID(entry)
    if entry.startswith("MIG-"):
        parent = nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
        return parent, f"MIG instance {entry}: the parent GPU's energy (all its instances) is read"
    return handle, None


def _supported(nvml: Any, call: Callable[[Any], Any], handle: Any) -> bool:
    try:
        call(handle)
    except nvml.NVMLError:
        return False
    return True


def nvml_unavailable_reason(device: torch.device | str, nvml: Any = None) -> str | None:
    """``None`` if NVML can measure ``device``'s energy, else why not."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"device {device} is not a CUDA device"
    try:
        nvml = nvml or import_pynvml()
    except ImportError as error:
        return str(error)
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as error:
        return f"nvmlInit failed ({error})"
    try:
        handle, _ = _handle(nvml, device)
        if not (
            _supported(nvml, nvml.nvmlDeviceGetTotalEnergyConsumption, handle) or _supported(nvml, nvml.nvmlDeviceGetPowerUsage, handle)
        ):
            return "the GPU supports neither the energy counter nor power readings"
    except (nvml.NVMLError, IndexError, ValueError) as error:
        return f"no NVML handle for {device} ({error})"
    finally:
        nvml.nvmlShutdown()
    return None


class NvmlEnergySource(EnergySource):
    """Energy of the GPU behind ``device`` between ``start`` and ``stop`` (see module doc).

    ``sample_interval``: seconds between background power samples in sampled mode (``None``:
    no thread; samples only at ``start``/``poll``/``stop``, which is what tests use).
    """

    def __init__(
        self,
        device: torch.device | str = "cuda",
        nvml: Any = None,
        sample_interval: float | None = 0.1,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if sample_interval is not None and not sample_interval > 0:
            raise ValueError(f"sample_interval must be > 0 seconds or None, got {sample_interval!r}")
        super().__init__(clock)
        self._nvml = nvml or import_pynvml()
        self._nvml.nvmlInit()
        self._open = True
        self._handle, self._note = _handle(self._nvml, torch.device(device))
        counter = _supported(self._nvml, self._nvml.nvmlDeviceGetTotalEnergyConsumption, self._handle)
        self.mode = "counter" if counter else "sampled"
        self.name = f"nvml-{self.mode}"
        self.sample_interval = sample_interval
        self._samples: list[tuple[float, float]] = []
        self._error: str | None = None
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._counter_start = 0

    def _sample(self) -> None:
        try:
            watts = self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0
        except self._nvml.NVMLError as error:
            self._error = f"power reading failed: {error}"
            return
        with self._lock:
            self._samples.append((self._clock(), watts))

    def _run(self) -> None:
        while not self._halt.wait(self.sample_interval):
            self._sample()

    def _begin(self) -> None:
        self._error = None
        if self.mode == "counter":
            self._counter_start = self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
            return
        self._samples = []
        self._sample()
        if self.sample_interval is not None:
            self._halt.clear()
            self._thread = threading.Thread(target=self._run, name="nvml-power-sampler", daemon=True)
            self._thread.start()

    def poll(self) -> None:
        if self.running and self.mode == "sampled":
            self._sample()

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._halt.set()
            self._thread.join()
            self._thread = None

    def _end(self, seconds: float) -> tuple[float | None, str | None]:
        if self.mode == "counter":
            try:
                end = self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
            except self._nvml.NVMLError as error:
                return None, f"energy counter read failed: {error}"
            return (end - self._counter_start) / 1000.0, self._join_notes("NVML total-energy counter; whole board")
        self._stop_thread()
        self._sample()
        with self._lock:
            samples = sorted(self._samples)
        if self._error is not None:
            return None, self._error
        span = samples[-1][0] - samples[0][0] if len(samples) >= 2 else 0.0
        if span <= 0:
            return None, "fewer than two power samples at distinct times"
        # the samples start just before and end just after the interval: their time-weighted
        # mean power times the interval's length is the energy of exactly that interval
        watts = integrate_power(samples) / span
        return watts * seconds, self._join_notes(f"NVML power sampled {len(samples)} times, trapezoid mean; whole board")

    def _join_notes(self, text: str) -> str:
        return text + (f"; {self._note}" if self._note else "")

    def close(self) -> None:
        self._stop_thread()
        if self._open:
            self._open = False
            self._nvml.nvmlShutdown()

    def __del__(self) -> None:  # a dropped source must not leave its sampler running
        try:
            self._stop_thread()
        except Exception:
            pass
