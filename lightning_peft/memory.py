"""Memory meters, memory sources and block discovery.

Meters
------
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
activation bytes). :mod:`lightning_peft.checkpointing` enters it automatically.

Memory sources
--------------
A :class:`MemorySource` measures the peak of one training step:

* :class:`CudaMemorySource` - ``torch.cuda.max_memory_allocated`` (reset per step) and
  ``torch.cuda.mem_get_info`` for the device total/free memory;
* :class:`SavedTensorSource` - the saved-activation meter above (any device, deterministic);
* :class:`SimulatedMemorySource` - the meter plus a capacity: it raises
  ``torch.OutOfMemoryError`` when live activation bytes would exceed it (tests of the
  out-of-memory path on CPU), or on chosen steps.

Block discovery
---------------
:func:`find_blocks` finds the repeated blocks of a model (timm ``blocks``, transformers
``layers``/``layer``/``h``, or a dotted path given by the user).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "SavedTensorMeter",
    "MemorySource",
    "SavedTensorSource",
    "CudaMemorySource",
    "SimulatedMemorySource",
    "current_meter",
    "find_blocks",
    "block_candidates",
    "BlockDiscoveryError",
    "parse_bytes",
    "format_bytes",
]


# --------------------------------------------------------------------------------------------
# Saved-tensor meter
# --------------------------------------------------------------------------------------------

_ACTIVE_METERS: list["SavedTensorMeter"] = []


def current_meter() -> "SavedTensorMeter | None":
    """The innermost active :class:`SavedTensorMeter` (or ``None``)."""
    return _ACTIVE_METERS[-1] if _ACTIVE_METERS else None


class _Packed:
    """What the meter's pack hook returns: the tensor plus a release callback on deletion.

    Autograd drops the packed object when the node that saved it has run its backward (or when
    the graph is freed), which is exactly when the activation stops costing memory.
    """

    __slots__ = ("tensor", "key", "meter")

    def __init__(self, tensor: torch.Tensor, key: int, meter: "SavedTensorMeter") -> None:
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

    def __enter__(self) -> "SavedTensorMeter":
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


def tensor_leaves(obj: Any) -> Iterator[torch.Tensor]:
    """The tensors in ``obj`` (a tensor, or tensors nested in tuples, lists and dict values)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from tensor_leaves(value)
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from tensor_leaves(item)


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


# --------------------------------------------------------------------------------------------
# Memory sources
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Byte sizes
# --------------------------------------------------------------------------------------------

_UNITS = {
    "b": 1, "": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}


def parse_bytes(text: str) -> int:
    """``"2GiB"`` -> 2147483648; ``"512 MB"`` -> 512000000; ``"1e9"`` -> 1000000000."""
    s = text.strip().lower().replace(" ", "").replace("_", "")
    i = len(s)
    while i > 0 and s[i - 1].isalpha():
        i -= 1
    number, unit = s[:i], s[i:]
    if unit not in _UNITS or not number:
        raise ValueError(
            f"cannot read {text!r} as a size in bytes: use a number with an optional unit "
            f"(B, KB, KiB, MB, MiB, GB, GiB, TB, TiB), e.g. '2GiB'"
        )
    try:
        value = float(number)
    except ValueError as err:
        raise ValueError(f"cannot read {text!r} as a size in bytes, e.g. '2GiB'") from err
    return int(value * _UNITS[unit])


def format_bytes(n: float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"  # pragma: no cover


# --------------------------------------------------------------------------------------------
# Block discovery
# --------------------------------------------------------------------------------------------


class BlockDiscoveryError(ValueError):
    """No repeated blocks could be found (or a given path does not name a list of blocks)."""


_PREFERRED_NAMES = ("blocks", "layers", "layer", "h", "block", "resblocks")


def block_candidates(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """All ``ModuleList``/``Sequential`` containers: ``(path, container, description)``."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 0:
            classes = [type(child).__name__ for child in module]
            uniq = list(dict.fromkeys(classes))
            desc = f"{len(module)} x {uniq[0]}" if len(uniq) == 1 else f"{', '.join(uniq[:4])}"
            found.append((name, module, desc))
    return found


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _is_repeated(container: nn.Module) -> bool:
    children = list(container)
    if len(children) < 2:
        return False
    first = type(children[0])
    if any(type(c) is not first for c in children):
        return False
    # blocks are composite modules with parameters (not a list of bare Linear/activation layers)
    return all(len(list(c.children())) > 0 and any(True for _ in c.parameters()) for c in children)


def find_blocks(model: nn.Module, paths: str | Iterable[str] | None = None) -> list[tuple[str, nn.Module]]:
    """Find the repeated blocks of ``model``.

    Args:
        model: any module (a LightningModule works: its submodules are searched).
        paths: dotted attribute paths of block lists (``"model.layers"``), or ``None`` to search:
            every ``nn.ModuleList``/``nn.Sequential`` of two or more composite children of one
            class is a candidate; the one holding the most parameters is chosen, plus any other
            candidate outside it with at least a quarter of its parameters (encoder *and*
            decoder stacks). Ties prefer the names ``blocks``, ``layers``, ``layer``, ``h``.

    Returns:
        ``[(path, container), ...]``; the blocks are ``list(container)`` in forward order.

    Raises:
        BlockDiscoveryError: nothing found; the message lists the candidate module lists.
    """
    if paths is not None:
        if isinstance(paths, str):
            paths = [paths]
        result = []
        for path in paths:
            try:
                container = model.get_submodule(path)
            except AttributeError as err:
                raise BlockDiscoveryError(
                    f"blocks path {path!r} does not exist in {type(model).__name__}; candidate module "
                    f"lists: {_describe_candidates(model)}"
                ) from err
            if not isinstance(container, (nn.ModuleList, nn.Sequential)) or len(container) == 0:
                raise BlockDiscoveryError(
                    f"blocks path {path!r} is a {type(container).__name__}, not a non-empty nn.ModuleList/"
                    f"nn.Sequential of blocks; candidate module lists: {_describe_candidates(model)}"
                )
            result.append((path, container))
        return result

    candidates = [(name, mod) for name, mod, _ in block_candidates(model) if _is_repeated(mod)]
    if not candidates:
        raise BlockDiscoveryError(
            f"no repeated blocks found in {type(model).__name__} (looked for an nn.ModuleList/nn.Sequential "
            f"of two or more blocks of one class); candidate module lists: {_describe_candidates(model)}. "
            "Pass blocks='dotted.path.to.list' to choose one."
        )

    def score(item: tuple[str, nn.Module]) -> tuple[int, int, int]:
        name, mod = item
        leaf = name.rsplit(".", 1)[-1]
        return (_numel(mod), int(leaf in _PREFERRED_NAMES), -name.count("."))

    candidates.sort(key=score, reverse=True)
    best_numel = _numel(candidates[0][1])
    chosen: list[tuple[str, nn.Module]] = []
    for name, mod in candidates:
        if chosen and _numel(mod) * 4 < best_numel:
            continue
        if any(_nested(name, other) or _nested(other, name) for other, _ in chosen):
            continue
        chosen.append((name, mod))
    # forward order of the stacks: registration order in the model
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    chosen.sort(key=lambda item: order.get(item[0], 0))
    return chosen


def _nested(inner: str, outer: str) -> bool:
    return outer == "" or inner == outer or inner.startswith(outer + ".")


def _describe_candidates(model: nn.Module) -> str:
    found = block_candidates(model)
    if not found:
        return "none (the model has no nn.ModuleList or nn.Sequential)"
    return ", ".join(f"'{name or '<root>'}' ({desc})" for name, _, desc in found[:12]) + (
        f", ... ({len(found) - 12} more)" if len(found) > 12 else ""
    )
