"""The saved-tensor meter: deterministic activation bytes on any device.

``SavedTensorMeter`` counts the bytes autograd keeps for backward while it is active, using
``torch.autograd.graph.saved_tensors_hooks``. Tensors are deduplicated by storage (a view of an
already-saved tensor costs nothing) and parameters/buffers are excluded, so the figure is exact
and deterministic on any device, CPU included.

Besides the cumulative ``bytes`` it tracks ``live_bytes`` (saved storages not yet released by
autograd: a saved tensor is released when the backward node that saved it has run) and their
maximum ``peak_bytes``, so one context around forward *and* backward gives the activation peak
of a training step. Non-reentrant activation checkpointing recomputes a block's forward inside
backward; those recomputed tensors go to the checkpoint's own hooks, not ours, so the meter
offers :meth:`SavedTensorMeter.recompute_context` (a ``TorchDispatchMode``) that counts every
storage created during a recomputation until it is freed (its transient, about the block's
activation bytes). :mod:`lightning_peft.memory.switchable` enters it automatically.

The memory sources that use it are in :mod:`lightning_peft.memory.sources`; block discovery is
in :mod:`lightning_peft.memory.blocks`.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SavedTensorMeter", "current_meter", "tensor_leaves"]


# --------------------------------------------------------------------------------------------
# Saved-tensor meter
# --------------------------------------------------------------------------------------------

_ACTIVE_METERS: list[SavedTensorMeter] = []


def current_meter() -> SavedTensorMeter | None:
    """The innermost active :class:`SavedTensorMeter` (or ``None``)."""
    return _ACTIVE_METERS[-1] if _ACTIVE_METERS else None


class _Packed:
    """What the meter's pack hook returns: the tensor plus a release callback on deletion.

    Autograd drops the packed object when the node that saved it has run its backward (or when
    the graph is freed), which is exactly when the activation stops costing memory.
    """

    __slots__ = ("tensor", "key", "meter")

    def __init__(self, tensor: torch.Tensor, key: int, meter: SavedTensorMeter) -> None:
        self.tensor = tensor
        self.key = key
        self.meter = meter

    def __del__(self) -> None:
        meter = self.meter
        if meter is not None:
            meter._release(self.key)


class SavedTensorMeter:
    """Context manager: ``bytes`` = activation bytes saved for backward inside the context.

    ``detach=True`` stores detached aliases (same storage): use it when the graph will be
    discarded without a backward pass.

    Example::

        with SavedTensorMeter(model) as meter:
            loss = model(x).sum()
        print(meter.bytes)          # activations kept for backward
        loss.backward()
        print(meter.peak_bytes)     # peak of live saved (and recomputed) activation bytes

    Attributes:
        bytes: cumulative bytes of distinct storages saved inside the context.
        live_bytes: bytes of saved storages not yet released, plus storages alive that were
            created by a checkpoint recomputation (see :meth:`recompute_context`).
        peak_bytes: maximum of ``live_bytes`` since construction or :meth:`reset_peak`.
        forward_peak_bytes: maximum of ``live_bytes`` before the first unpack (end of forward).
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        on_alloc: Callable[[int, int], None] | None = None,
        detach: bool = False,
    ) -> None:
        self._excluded: set[int] = set()
        if model is not None:
            for tensor in (*model.parameters(), *model.buffers()):
                self._excluded.add(_storage_key(tensor))
        self._counts: dict[int, list[int]] = {}  # key -> [refcount, nbytes]
        self.bytes = 0
        self.live_bytes = 0
        self.peak_bytes = 0
        self.forward_peak_bytes = 0
        self.unpacked = False
        # on_alloc(live_bytes_before, new_bytes) may raise (simulated out-of-memory)
        self.on_alloc = on_alloc
        # Keep a detached alias instead of the tensor itself. Needed when the graph is thrown
        # away without backward: a node that saves its own output would otherwise form a cycle
        # (node -> saved object -> tensor -> grad_fn -> node) through C++ that the garbage
        # collector cannot see, leaking the whole graph. Not the default because the unpacked
        # tensor then carries no history (double backward through it would differentiate
        # nothing).
        self.detach = detach

        # Plain functions (not bound methods) so they can carry the marker below.
        def pack(tensor: torch.Tensor) -> Any:
            return self._pack(tensor)

        def unpack(packed: Any) -> torch.Tensor:
            return self._unpack(packed)

        # The meter hands back the very tensor that was saved, so code that reads a producer's
        # saved tensors during forward (LoRA's input recomputation) may treat it as absent.
        pack._lightning_peft_transparent = True  # type: ignore[attr-defined]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, unpack)
        self._entered = False

    # -- hooks -----------------------------------------------------------------------------
    def _pack(self, tensor: torch.Tensor) -> Any:
        if isinstance(tensor, nn.Parameter) or isinstance(tensor._base, nn.Parameter):
            return tensor  # a parameter or a view of one (``weight.t()`` saved by a linear)
        key = _storage_key(tensor)
        if key in self._excluded:
            return tensor
        entry = self._counts.get(key)
        if entry is None:
            nbytes = _storage_nbytes(tensor)
            self._grow(nbytes)
            self._counts[key] = [1, nbytes]
            self.bytes += nbytes
        else:
            entry[0] += 1
        return _Packed(tensor.detach() if self.detach else tensor, key, self)

    def _unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, _Packed):
            if not self.unpacked and torch._C._current_graph_task_id() != -1:
                self.unpacked = True  # backward has started: the forward peak is final
            return packed.tensor
        return packed

    def _release(self, key: int) -> None:
        entry = self._counts.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] <= 0:
            del self._counts[key]
            self.live_bytes -= entry[1]

    def _grow(self, nbytes: int) -> None:
        if self.on_alloc is not None:
            self.on_alloc(self.live_bytes, nbytes)  # may raise before anything is recorded
        self.live_bytes += nbytes
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
        if not self.unpacked and self.live_bytes > self.forward_peak_bytes:
            self.forward_peak_bytes = self.live_bytes

    # -- recomputation ---------------------------------------------------------------------
    def recompute_context(self) -> contextlib.AbstractContextManager:
        """A dispatch mode that counts storages created during a checkpoint recomputation.

        Each new output storage adds its bytes to ``live_bytes`` until Python frees it (a
        weak reference callback), so the transient of recomputing a block in backward shows
        in ``peak_bytes``. Views and in-place results (storage shared with an input) add
        nothing.
        """
        return _RecomputeTracker(self)

    def _track_storage(self, storage: torch.UntypedStorage) -> int:
        nbytes = storage.nbytes()
        key = storage.data_ptr()
        if key in self._counts or key in self._excluded or nbytes == 0:
            return 0
        self._grow(nbytes)
        self._counts[key] = [1, nbytes]
        weakref.finalize(storage, self._release, key)
        return nbytes

    # -- context ---------------------------------------------------------------------------
    def reset_peak(self) -> None:
        self.peak_bytes = self.live_bytes
        self.forward_peak_bytes = self.live_bytes
        self.unpacked = False

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        _ACTIVE_METERS.append(self)
        self._entered = True
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._entered:
            return
        self._entered = False
        if self in _ACTIVE_METERS:
            _ACTIVE_METERS.remove(self)
        self._hooks.__exit__(*exc)


class _RecomputeTracker(TorchDispatchMode):
    def __init__(self, meter: SavedTensorMeter) -> None:
        super().__init__()
        self.meter = meter
        self.start_live = 0
        self.peak_delta = 0

    def __enter__(self):  # noqa: D105
        self.start_live = self.meter.live_bytes
        self.peak_delta = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_key(t) for t in tensor_leaves(args) if t.device.type != "meta"}
        if kwargs:
            inputs |= {_storage_key(t) for t in tensor_leaves(kwargs)}
        for t in tensor_leaves(out):
            if t.device.type == "meta":
                continue
            try:
                storage = t.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            if storage.data_ptr() in inputs:
                continue
            self.meter._track_storage(storage)
        delta = self.meter.live_bytes - self.start_live
        if delta > self.peak_delta:
            self.peak_delta = delta
        return out


def tensor_leaves(obj: Any) -> list[torch.Tensor]:
    """The tensors in ``obj`` (a tensor, or tensors nested in any container ``torch.utils._pytree``
    flattens: tuples, lists, dicts, namedtuples). The one tensor-tree walk of the package."""
    if isinstance(obj, torch.Tensor):  # most ops return one tensor: skip pytree's per-call cost
        return [obj]
    return [leaf for leaf in pytree.tree_leaves(obj) if isinstance(leaf, torch.Tensor)]


def _storage_key(tensor: torch.Tensor) -> int:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
        return id(tensor)


def _storage_nbytes(tensor: torch.Tensor) -> int:
    try:
        return tensor.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return tensor.numel() * tensor.element_size()
