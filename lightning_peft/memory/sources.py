"""Memory sources: what measures the peak of one training step.

* :class:`CudaMemorySource` - ``torch.cuda.max_memory_allocated`` (reset per step) and
  ``torch.cuda.mem_get_info`` for the device total/free memory;
* :class:`SavedTensorSource` - the saved-activation meter (any device, deterministic);
* :class:`SimulatedMemorySource` - the meter plus a capacity: it raises
  ``torch.OutOfMemoryError`` when live activation bytes would exceed it (tests of the
  out-of-memory path on CPU), or on chosen steps.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lightning_peft.memory.meters import SavedTensorMeter
from lightning_peft.memory.sizes import format_bytes

__all__ = ["MemorySource", "SavedTensorSource", "SimulatedMemorySource", "CudaMemorySource"]


class MemorySource:
    """Measures the peak memory of one training step. Subclass to inject your own.

    The callback calls ``start(model)`` before the step (and again before a retried step),
    ``stop()`` after it, then reads ``peak_bytes()``. ``total_bytes()`` resolves fractional
    budgets (``None`` when the source has no notion of device capacity).
    """

    #: ``True`` when ``peak_bytes`` counts only saved activations (then the planner's model is
    #: in the same units and needs no static offset).
    activation_only: bool = False

    def start(self, model: nn.Module | None = None) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def peak_bytes(self) -> int:
        raise NotImplementedError

    def total_bytes(self) -> int | None:
        return None

    def free_bytes(self) -> int | None:
        return None

    def meter(self) -> SavedTensorMeter | None:
        """The saved-tensor meter active during the step, if this source uses one."""
        return None


class SavedTensorSource(MemorySource):
    """Peak of live saved-activation bytes (forward + backward + recomputation transients)."""

    activation_only = True

    def __init__(self) -> None:
        self._meter: SavedTensorMeter | None = None

    def _make_meter(self, model: nn.Module | None) -> SavedTensorMeter:
        return SavedTensorMeter(model)

    def start(self, model: nn.Module | None = None) -> None:
        self.stop()
        self._meter = self._make_meter(model)
        self._meter.__enter__()

    def stop(self) -> None:
        if self._meter is not None:
            self._meter.__exit__(None, None, None)

    def peak_bytes(self) -> int:
        return 0 if self._meter is None else self._meter.peak_bytes

    def meter(self) -> SavedTensorMeter | None:
        return self._meter


class SimulatedMemorySource(SavedTensorSource):
    """The saved-activation meter on a pretend device of ``capacity`` bytes.

    ``torch.OutOfMemoryError`` is raised from inside forward or backward (recomputation
    included) as soon as live activation bytes would exceed ``capacity``, and additionally on
    the ``start()`` calls whose 0-based index is in ``oom_on_starts`` (raised at the first
    saved tensor of that attempt, or with ``oom_phase="backward"`` at the first allocation of a
    checkpoint recomputation in backward). Use it to test out-of-memory handling on CPU.
    """

    def __init__(
        self,
        capacity: int | None = None,
        oom_on_starts: Iterable[int] = (),
        oom_phase: str = "forward",
    ) -> None:
        super().__init__()
        if oom_phase not in ("forward", "backward"):
            raise ValueError(f"oom_phase must be 'forward' or 'backward', got {oom_phase!r}")
        self.capacity = capacity
        self.oom_on_starts = set(oom_on_starts)
        self.oom_phase = oom_phase
        self.starts = 0
        self.ooms = 0

    def _make_meter(self, model: nn.Module | None) -> SavedTensorMeter:
        forced = self.starts in self.oom_on_starts
        self.starts += 1
        state: dict[str, Any] = {"forced": forced}

        def on_alloc(live: int, new: int) -> None:
            in_backward = torch._C._current_graph_task_id() != -1
            force = state["forced"] and (self.oom_phase == "forward" or in_backward)
            if force or (self.capacity is not None and live + new > self.capacity):
                state["forced"] = False
                self.ooms += 1
                raise torch.OutOfMemoryError(
                    f"simulated out of memory: tried to allocate {format_bytes(new)} with "
                    f"{format_bytes(live)} in use (capacity {format_bytes(self.capacity or 0)})"
                )

        return SavedTensorMeter(model, on_alloc=on_alloc)

    def total_bytes(self) -> int | None:
        return self.capacity


class CudaMemorySource(MemorySource):
    """CUDA caching-allocator peak (``max_memory_allocated``, reset at each step start).

    ``total_bytes``/``free_bytes`` come from ``torch.cuda.mem_get_info``. Neither call
    synchronizes the device: allocation statistics are kept on the host.
    """

    def __init__(self, device: torch.device | int | str | None = None) -> None:
        self.device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)

    def start(self, model: nn.Module | None = None) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def stop(self) -> None:
        pass

    def peak_bytes(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.device))

    def total_bytes(self) -> int | None:
        return int(torch.cuda.mem_get_info(self.device)[1])

    def free_bytes(self) -> int | None:
        return int(torch.cuda.mem_get_info(self.device)[0])
