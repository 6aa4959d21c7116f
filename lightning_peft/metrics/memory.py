"""Peak memory of a training or inference phase, for NS-M / NS# and the efficiency report.

Two probes behind one interface (``begin_phase``, ``begin_step``, ``after_backward``,
``end_step``, ``end_phase``):

* ``CudaMemoryProbe`` (``"cuda-allocator"``): ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats`` at the phase start: every tensor the caching allocator handed out
  (parameters, gradients, optimizer state, activations, workspaces), not the reserved cache.
  ``cuda`` is injectable (an object with those two functions) so the path is tested on CPU.
* ``CpuMemoryProbe`` (``"cpu-estimate"``): an estimate, labelled as such, since the CPU
  allocator keeps no peak. Training: ``parameters + buffers + gradients + optimizer state +
  peak saved activations``, with gradients = the bytes of every trainable parameter, the
  optimizer state measured from the optimizers at the phase end, and the activations from the
  saved-tensor meter (``memory.meters.SavedTensorMeter``, per step, maximum over steps).
  Inference (no autograd graph, so nothing is saved): ``parameters + buffers + peak live
  tensors`` of one forward per distinct batch shape, run after the timed loop under
  ``LiveTensorTracker`` (a dispatch mode). Neither counts the batch itself, allocator slack or
  kernel scratch space.

Pure torch (no Lightning).
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_peft.memory.meters import SavedTensorMeter, current_meter, tensor_leaves

__all__ = [
    "MemoryPeak",
    "MemoryProbe",
    "CudaMemoryProbe",
    "CpuMemoryProbe",
    "LiveTensorTracker",
    "memory_probe_for",
    "model_bytes",
    "gradient_bytes",
    "optimizer_state_bytes",
    "MIB",
]

MIB = 1024**2
Optimizers = Iterable[torch.optim.Optimizer]


@dataclass(frozen=True)
class MemoryPeak:
    """A phase's peak in bytes, what measured it (``source``) and, for the CPU estimate, its
    parts (``breakdown``: parameters, buffers, gradients, optimizer_state, activations)."""

    bytes: int
    source: str
    estimated: bool
    breakdown: dict[str, int] = field(default_factory=dict)

    @property
    def mib(self) -> float:
        return self.bytes / MIB


def _storage_key(tensor: torch.Tensor) -> int:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return id(tensor)


def _nbytes(tensor: torch.Tensor) -> int:
    try:
        return tensor.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return tensor.numel() * tensor.element_size()


def _distinct_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for tensor in tensors:
        seen.setdefault(_storage_key(tensor), _nbytes(tensor))
    return sum(seen.values())


def model_bytes(model: nn.Module) -> tuple[int, int]:
    """``(parameter bytes, buffer bytes)`` of ``model``, shared storages counted once."""
    return _distinct_bytes(model.parameters()), _distinct_bytes(model.buffers())


def gradient_bytes(model: nn.Module) -> int:
    """Bytes the gradients of the trainable parameters take (one gradient per parameter, the
    parameter's dtype and size; frozen parameters have none)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def optimizer_state_bytes(optimizers: Iterable[torch.optim.Optimizer]) -> int:
    """Bytes of the tensors in the optimizers' ``state`` (Adam: two moments per parameter)."""
    tensors = [t for opt in optimizers for state in opt.state.values() for t in tensor_leaves(state)]
    return _distinct_bytes(tensors)


class LiveTensorTracker(TorchDispatchMode):
    """Dispatch mode: ``peak_bytes`` = the most bytes alive at once among storages created by
    operators while it is active (outputs that reuse an input's storage, i.e. views and
    in-place results, add nothing); a storage stops counting when Python frees it."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        self.live_bytes = 0
        self.peak_bytes = 0

    def _release(self, key: int) -> None:
        nbytes = self._live.pop(key, None)
        if nbytes is not None:
            self.live_bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_key(t) for t in tensor_leaves((args, kwargs or {}))}
        for tensor in tensor_leaves(out):
            if tensor.device.type == "meta":
                continue
            try:
                storage = tensor.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            key = storage.data_ptr()
            if key in inputs or key in self._live or storage.nbytes() == 0:
                continue
            self._live[key] = storage.nbytes()
            self.live_bytes += storage.nbytes()
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            weakref.finalize(storage, self._release, key)
        return out


class MemoryProbe:
    """Peak memory over a phase. The caller calls ``begin_phase(model, training)``, then per
    step ``begin_step(model, key)`` (``key``: the batch's shapes), ``after_backward()``
    (training), ``end_step()``, and finally ``end_phase(model, optimizers, forward_inputs)``
    (``forward_inputs``: one model input per distinct batch shape of an inference phase, for
    probes that measure inference outside the timed loop)."""

    source: str = "memory"
    estimated: bool = False

    def begin_phase(self, model: nn.Module, training: bool) -> None:
        pass

    def begin_step(self, model: nn.Module, key: Hashable = None) -> None:
        pass

    def after_backward(self) -> None:
        pass

    def end_step(self) -> None:
        pass

    def end_phase(self, model: nn.Module, optimizers: Optimizers = (), forward_inputs: Iterable[Any] = ()) -> MemoryPeak:
        raise NotImplementedError


class CudaMemoryProbe(MemoryProbe):
    """CUDA caching-allocator peak over the phase (see the module doc); the allocator keeps
    its statistics on the host, so reading them costs the timed loop nothing."""

    source = "cuda-allocator"

    def __init__(self, device: torch.device | str = "cuda", cuda: Any = None) -> None:
        self.device = torch.device(device)
        self._cuda = cuda if cuda is not None else torch.cuda

    def begin_phase(self, model: nn.Module, training: bool) -> None:
        self._cuda.reset_peak_memory_stats(self.device)

    def end_phase(self, model: nn.Module, optimizers: Optimizers = (), forward_inputs: Iterable[Any] = ()) -> MemoryPeak:
        return MemoryPeak(int(self._cuda.max_memory_allocated(self.device)), self.source, False)


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


class CpuMemoryProbe(MemoryProbe):
    """The labelled CPU estimate (see the module doc).

    Training: the saved-tensor meter is opened on the first step of each batch shape only (its
    pack hook costs time per saved tensor; later steps of a shape save the same bytes, except in
    models whose activations depend on the data, e.g. MoE routing: ``every_step=True``). Where
    another saved-tensor meter is active (the adaptive-checkpointing callback's), the probe opens
    none, which would shadow it (the innermost hooks see the tensors), and reads the innermost
    meter's peak after every backward instead. Inference: nothing runs in the timed loop (a
    dispatch mode would double a small model's inference time); ``end_phase`` runs one
    ``model(inputs)`` per given input under ``LiveTensorTracker`` and no grad, after the timing.
    """

    source = "cpu-estimate"
    estimated = True

    def __init__(self, every_step: bool = False) -> None:
        self.every_step = every_step
        self._training = True
        self._meter: SavedTensorMeter | None = None
        self._seen: set[Hashable] = set()
        self.activation_peak = 0

    def begin_phase(self, model: nn.Module, training: bool) -> None:
        self._training = training
        self.activation_peak = 0
        self._seen = set()

    def begin_step(self, model: nn.Module, key: Hashable = None) -> None:
        self.end_step()  # a step that raised may not have ended
        if not self._training or current_meter() is not None:  # never shadow another meter
            return
        if self.every_step or key not in self._seen:
            self._seen.add(key)
            self._meter = SavedTensorMeter(model).__enter__()

    def after_backward(self) -> None:
        meter = current_meter()
        if meter is not None:
            self.activation_peak = max(self.activation_peak, meter.peak_bytes)

    def end_step(self) -> None:
        if self._meter is not None:
            self.activation_peak = max(self.activation_peak, self._meter.peak_bytes)
            self._meter.__exit__(None, None, None)
            self._meter = None

    def measure_forward(self, model: nn.Module, inputs: Any) -> int:
        """Peak live bytes of one ``model(inputs)`` without grad (recorded as an activation peak)."""
        with torch.no_grad(), LiveTensorTracker() as tracker:
            output = _call(model, inputs)
            del output
        self.activation_peak = max(self.activation_peak, tracker.peak_bytes)
        return tracker.peak_bytes

    def end_phase(self, model: nn.Module, optimizers: Optimizers = (), forward_inputs: Iterable[Any] = ()) -> MemoryPeak:
        self.end_step()
        if not self._training:
            for inputs in forward_inputs:
                self.measure_forward(model, inputs)
        parameters, buffers = model_bytes(model)
        parts = {"parameters": parameters, "buffers": buffers, "activations": self.activation_peak}
        if self._training:
            parts["gradients"] = gradient_bytes(model)
            parts["optimizer_state"] = optimizer_state_bytes(optimizers)
        return MemoryPeak(sum(parts.values()), self.source, True, parts)


def memory_probe_for(device: torch.device | str) -> MemoryProbe:
    """``CudaMemoryProbe`` on a CUDA device, else the ``CpuMemoryProbe`` estimate."""
    device = torch.device(device)
    return CudaMemoryProbe(device) if device.type == "cuda" else CpuMemoryProbe()
