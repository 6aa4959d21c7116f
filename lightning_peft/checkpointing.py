"""Switchable per-block activation checkpointing and a memory-budget planner (pure torch).

Wrapping
--------
:func:`wrap_blocks` installs a :class:`SwitchableBlock` as the *instance* ``forward`` of every
repeated block (the module tree, parameter names and state-dict keys do not change, so adapter
files and checkpoints are unaffected). A shared :class:`BlockSchedule` says, per block, how its
activations are kept for backward:

``"none"``        plain forward: the block's saved activations stay in memory;
``"checkpoint"``  ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: only the block
                  inputs are kept and the forward is recomputed inside backward;
``"selective"``   selective checkpointing: outputs of matmul/attention/conv ops are kept, cheap
                  element-wise/normalization ops are recomputed (CUDA allocator sources only);
``"offload"``     (CUDA) saved tensors are copied to pinned host memory on a side stream during
                  forward and prefetched back one block ahead during backward.

Non-reentrant checkpointing gives gradients to parameters inside a block whether or not its
inputs require grad (frozen base + LoRA), is called once per parameter per backward (DDP without
``find_unused_parameters``) and composes with FSDP2 (the block's forward hooks, where FSDP2
unshards, run outside the checkpoint; its pre-backward hook unshards before recomputation).

Profiling
---------
When ``schedule.profiling`` is set, each block's forward is first run once more (RNG state
forked, output discarded) under a :class:`~lightning_peft.memory.SavedTensorMeter` and an op
profiler, giving a :class:`BlockProfile`: activation bytes ``a`` (bytes saved for backward, split
into the input bytes ``c`` and the rest ``e``), forward FLOPs and time, and the bytes/time of the
"expensive" ops that selective checkpointing would keep.

Planner
-------
Blocks run forward in order ``0..L-1`` and backward in reverse. With held bytes ``h_i`` per block
(``c+e`` none, ``c`` checkpoint, ``c+s`` selective, about ``c`` offload), the predicted activation
peak of a plan is::

    peak = max( pre + post + sum_i h_i,                        # end of forward
                max_{j recomputed} pre + sum_{i<=j} h_i + t_j )  # recomputing block j in backward

where ``pre``/``post`` are the bytes saved before/after the blocks and ``t_j`` the transient of
re-materialising block ``j`` (about ``e_j``; blocks after ``j`` are already freed). :func:`plan_blocks`
finds the plan of least recompute cost with ``peak <= budget`` exactly (up to a byte quantum
rounded up) by dynamic programming over blocks with the running held bytes as state.
"""

from __future__ import annotations

import contextlib
import math
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from lightning_peft.memory import (
    SavedTensorMeter,
    tensor_leaves,
    current_meter,
    format_bytes,
)

__all__ = [
    "MODES",
    "BlockProfile",
    "BlockSchedule",
    "SwitchableBlock",
    "Plan",
    "BudgetTooSmallError",
    "wrap_blocks",
    "unwrap_blocks",
    "predict_peak",
    "plan_blocks",
    "static_modes",
    "recompute_cost",
    "min_peak",
]

Mode = Literal["none", "checkpoint", "selective", "offload"]
MODES: tuple[str, ...] = ("none", "checkpoint", "selective", "offload")


# --------------------------------------------------------------------------------------------
# Profiles and the cost model
# --------------------------------------------------------------------------------------------


@dataclass
class BlockProfile:
    """Measured costs of one block for one input shape.

    Attributes:
        act_bytes: ``a``, bytes autograd saves for backward in the block (storage-deduplicated,
            parameters excluded) when it is not checkpointed.
        input_bytes: ``c``, bytes of the block's tensor inputs: what a checkpoint keeps.
        extra_bytes: ``e``, the part of ``a`` that is not an input storage.
        flops: forward FLOPs (matmul, attention, convolution), the default recompute cost on CPU.
        time: forward seconds (CUDA events on GPU), the default recompute cost on CUDA.
        sel_bytes: bytes of outputs of expensive ops (kept by selective checkpointing).
        sel_time: seconds of the other (cheap) ops, recomputed by selective checkpointing.
        recompute_peak: largest observed transient while recomputing the block (0: unknown).
        offload_bandwidth: measured device-to-host bytes/s (0: offloading frees nothing).
    """

    act_bytes: int
    input_bytes: int
    extra_bytes: int
    flops: float = 0.0
    time: float = 0.0
    sel_bytes: int = 0
    sel_time: float = 0.0
    recompute_peak: int = 0
    offload_bandwidth: float = 0.0

    def to_list(self) -> list[float]:
        return [float(v) for v in asdict(self).values()]

    @classmethod
    def from_list(cls, values: Sequence[float]) -> "BlockProfile":
        names = list(cls.__dataclass_fields__)
        kwargs = dict(zip(names, values))
        for name in ("act_bytes", "input_bytes", "extra_bytes", "sel_bytes", "recompute_peak"):
            kwargs[name] = int(kwargs[name])
        return cls(**kwargs)

    @classmethod
    def uniform(cls, n: int, act_bytes: int, input_bytes: int, flops: float = 1.0) -> list["BlockProfile"]:
        return [cls(act_bytes, input_bytes, act_bytes - input_bytes, flops, flops) for _ in range(n)]


def _offloaded_in_time(p: BlockProfile) -> int:
    """Bytes of a block's activations copied to the host while the next block computes.

    The device memory of an offloaded tensor is only free once its copy has finished; a copy
    engine moving ``bandwidth`` B/s behind about one block's forward time frees at most
    ``offload_bandwidth * time`` bytes before the activations pile up (measured on an H200: ViT-B and
    Llama blocks produce activations several times faster than PCIe moves them).
    """
    return int(min(p.extra_bytes, p.offload_bandwidth * p.time))


def held_bytes(p: BlockProfile, mode: str) -> int:
    """Bytes block ``p`` keeps on the device between its forward and its backward."""
    if mode == "none":
        return p.act_bytes
    if mode == "checkpoint":
        return p.input_bytes
    if mode == "selective":
        return p.input_bytes + min(p.sel_bytes, p.extra_bytes)
    if mode == "offload":
        return p.input_bytes + p.extra_bytes - _offloaded_in_time(p)
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def transient_bytes(p: BlockProfile, mode: str) -> int:
    """Extra bytes while the block's activations are re-materialised in backward."""
    if mode == "none":
        return 0
    if mode == "checkpoint":
        return max(p.extra_bytes, p.recompute_peak)
    if mode == "selective":
        return max(p.extra_bytes - min(p.sel_bytes, p.extra_bytes), 0)
    if mode == "offload":
        return 2 * p.extra_bytes  # its own reload plus the prefetch of the previous block
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def recompute_cost(
    p: BlockProfile,
    mode: str,
    kind: Literal["flops", "time"] = "flops",
    *,
    offload_bandwidth: float = 0.0,
    next_time: float = 0.0,
) -> float:
    """Cost of ``mode`` for block ``p`` in units of ``kind`` (FLOPs or seconds).

    ``checkpoint`` costs one block forward; ``selective`` costs the cheap ops' share of it;
    ``offload`` costs the transfer time not hidden behind the next block's forward (device to
    host) and backward (host to device, about twice the forward) at ``offload_bandwidth`` B/s.
    """
    full = p.flops if kind == "flops" else p.time
    if mode == "none":
        return 0.0
    if mode == "checkpoint":
        return full
    if mode == "selective":
        frac = (p.sel_time / p.time) if p.time > 0 else 0.25
        return full * min(max(frac, 0.0), 1.0)
    if mode == "offload":
        if offload_bandwidth <= 0:
            return math.inf
        transfer = p.extra_bytes / offload_bandwidth
        stall = max(0.0, transfer - next_time) + max(0.0, transfer - 2 * next_time)
        if kind == "time":
            return stall
        return stall * (p.flops / p.time if p.time > 0 else 0.0)
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def predict_peak(profiles: Sequence[BlockProfile], modes: Sequence[str], pre: int = 0, post: int = 0) -> int:
    """Predicted activation peak (bytes) of ``modes`` (see the module docstring)."""
    if len(profiles) != len(modes):
        raise ValueError(f"{len(modes)} modes for {len(profiles)} blocks")
    held = 0
    peak = 0
    for p, m in zip(profiles, modes):
        held += held_bytes(p, m)
        t = transient_bytes(p, m)
        if t:
            peak = max(peak, pre + held + t)
    return max(peak, pre + post + held)


def static_modes(kind: str, n: int, k: int = 1) -> tuple[str, ...]:
    """Static plans for comparison: ``none``, ``all``, ``every_k`` (blocks ``0, k, 2k, ..``),
    ``first_k`` (blocks ``0..k-1``), ``offload_first_k``."""
    if kind == "none":
        return ("none",) * n
    if kind == "all":
        return ("checkpoint",) * n
    if kind == "every_k":
        if k < 1:
            raise ValueError(f"every_k needs k >= 1, got {k}")
        return tuple("checkpoint" if i % k == 0 else "none" for i in range(n))
    if kind == "first_k":
        if k < 0:
            raise ValueError(f"first_k needs k >= 0, got {k}")
        return tuple("checkpoint" if i < k else "none" for i in range(n))
    if kind == "offload_first_k":
        return tuple("offload" if i < k else "none" for i in range(n))
    raise ValueError(f"unknown static plan {kind!r}; expected none, all, every_k, first_k")


@dataclass
class Plan:
    """A choice of mode per block, with its predicted activation peak and recompute cost."""

    modes: tuple[str, ...]
    predicted_peak: int
    cost: float
    full_cost: float

    @property
    def checkpointed(self) -> list[int]:
        return [i for i, m in enumerate(self.modes) if m == "checkpoint"]

    @property
    def selective(self) -> list[int]:
        return [i for i, m in enumerate(self.modes) if m == "selective"]

    @property
    def offloaded(self) -> list[int]:
        return [i for i, m in enumerate(self.modes) if m == "offload"]

    @property
    def recompute_fraction(self) -> float:
        """Recompute cost as a fraction of checkpointing every block."""
        return self.cost / self.full_cost if self.full_cost > 0 else 0.0

    def describe(self) -> str:
        parts = [f"{len(self.checkpointed)}/{len(self.modes)} checkpointed {self.checkpointed}"]
        if self.selective:
            parts.append(f"selective {self.selective}")
        if self.offloaded:
            parts.append(f"offloaded {self.offloaded}")
        parts.append(f"predicted activation peak {format_bytes(self.predicted_peak)}")
        parts.append(f"recompute {100 * self.recompute_fraction:.0f}%")
        return ", ".join(parts)


class BudgetTooSmallError(ValueError):
    """The budget is below the smallest peak any plan can reach (every block checkpointed)."""

    def __init__(self, budget: int, floor: int, detail: str = "") -> None:
        self.budget = budget
        self.floor = floor
        super().__init__(
            f"memory budget {format_bytes(budget)} is below the all-checkpointed floor "
            f"{format_bytes(floor)} (the predicted peak with every block checkpointed{detail}); "
            f"raise the budget to at least {format_bytes(floor)} or use a smaller batch "
            f"(activation memory scales about linearly with batch size)."
        )


def min_peak(
    profiles: Sequence[BlockProfile],
    pre: int = 0,
    post: int = 0,
    allowed: Iterable[str] = ("none", "checkpoint"),
    quantum_count: int = 4096,
) -> int:
    """The floor: the lowest predicted peak any plan of the allowed modes reaches.

    Usually "checkpoint everything" (or everything but the last block, whose recompute transient
    equals keeping it). Found by a min-max dynamic program over the running held bytes (rounded
    up to a quantum, so the returned floor is never below the true one by more than a quantum
    per block, and plans at this budget are feasible).
    """
    import numpy as np

    allowed = tuple(dict.fromkeys(("none", *allowed)))
    if not profiles:
        return pre + post
    total = pre + post + sum(max(held_bytes(p, m) + transient_bytes(p, m) for m in allowed) for p in profiles)
    unit = max(1, math.ceil(total / quantum_count))
    hmax = total // unit + 1
    inf = math.inf
    best = np.full(hmax + 1, inf)  # minimal peak so far for each running held amount
    best[0] = 0.0
    idx = np.arange(hmax + 1)
    for p in profiles:
        nxt = np.full(hmax + 1, inf)
        for m in allowed:
            hu = -(-held_bytes(p, m) // unit)
            tu = -(-transient_bytes(p, m) // unit)
            if hu > hmax:
                continue
            src = best[: hmax + 1 - hu]
            h_new = idx[: hmax + 1 - hu] + hu
            event = (pre / unit + h_new + tu) if tu else np.zeros_like(src)
            cand = np.maximum(src, event)
            cur = nxt[hu:]
            np.minimum(cur, cand, out=cur)
        best = nxt
    final = np.maximum(best, pre / unit + idx + post / unit)
    return int(math.ceil(float(final.min()) * unit))


def plan_blocks(
    profiles: Sequence[BlockProfile],
    budget: int,
    *,
    pre: int = 0,
    post: int = 0,
    allowed: Iterable[str] = ("none", "checkpoint"),
    cost: Literal["flops", "time"] = "flops",
    offload_bandwidth: float = 0.0,
    quantum_count: int = 4096,
) -> Plan:
    """Least-cost plan whose :func:`predict_peak` is at most ``budget``.

    Dynamic programming over blocks in forward order; the state is the running held bytes
    ``H = sum_{i<j} h_i`` in quanta of ``(budget - pre) / quantum_count`` (every block's bytes
    rounded *up*, so the true peak of the returned plan is never above the budget). Choosing
    mode ``m`` for block ``j`` moves ``H -> H + h_j(m)`` at cost ``cost_j(m)`` and is allowed
    only if ``pre + H + h_j(m) + t_j(m) <= budget``; at the end ``pre + post + H <= budget``.
    Among equal costs the plan with the smaller held bytes wins.

    Raises:
        BudgetTooSmallError: no plan fits (the message names the all-checkpointed floor).
    """
    import numpy as np

    allowed = tuple(dict.fromkeys(allowed))
    for m in allowed:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; expected a subset of {MODES}")
    if "none" not in allowed:
        allowed = ("none", *allowed)
    n = len(profiles)
    full_cost = sum(recompute_cost(p, "checkpoint", cost) for p in profiles)
    cap = budget - pre
    final_cap = budget - pre - post
    if n == 0:
        if final_cap < 0:
            raise BudgetTooSmallError(budget, pre + post)
        return Plan((), pre + post, 0.0, 0.0)
    if final_cap < 0:
        raise BudgetTooSmallError(budget, min_peak(profiles, pre, post, allowed))
    unit = max(1, math.ceil(cap / quantum_count))
    hmax = cap // unit
    hfinal = final_cap // unit
    inf = math.inf
    best = np.full(hmax + 1, inf)
    best[0] = 0.0
    choice = np.full((n, hmax + 1), -1, dtype=np.int8)
    for j, p in enumerate(profiles):
        nxt = np.full(hmax + 1, inf)
        next_time = profiles[j + 1].time if j + 1 < n else p.time
        for mi, m in enumerate(allowed):
            c = recompute_cost(p, m, cost, offload_bandwidth=offload_bandwidth, next_time=next_time)
            if not math.isfinite(c):
                continue
            hu = -(-held_bytes(p, m) // unit)
            tu = -(-transient_bytes(p, m) // unit)
            limit = hmax - hu - tu  # largest H before this block
            if limit < 0:
                continue
            cand = best[: limit + 1] + c
            cur = nxt[hu : hu + limit + 1]
            better = cand * (1 + 1e-12) < cur
            cur[better] = cand[better]
            choice[j, hu : hu + limit + 1][better] = mi
        best = nxt
    final = best[: hfinal + 1]
    if not np.isfinite(final).any():
        raise BudgetTooSmallError(budget, max(min_peak(profiles, pre, post, allowed), budget + 1))
    min_cost = final.min()
    h = int(np.flatnonzero(final <= min_cost + 1e-9 * max(1.0, abs(min_cost)))[0])
    modes: list[str] = []
    for j in range(n - 1, -1, -1):
        mi = int(choice[j, h])
        m = allowed[mi]
        modes.append(m)
        h -= -(-held_bytes(profiles[j], m) // unit)
    modes.reverse()
    total = sum(
        recompute_cost(
            p, m, cost, offload_bandwidth=offload_bandwidth,
            next_time=profiles[j + 1].time if j + 1 < n else p.time,
        )
        for j, (p, m) in enumerate(zip(profiles, modes))
    )
    return Plan(tuple(modes), predict_peak(profiles, modes, pre, post), total, full_cost)


# --------------------------------------------------------------------------------------------
# Op profiler (FLOPs, time, bytes of expensive-op outputs)
# --------------------------------------------------------------------------------------------


def _expensive_ops() -> set:
    names = [
        "mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "convolution", "_convolution",
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
        "_flash_attention_forward", "_efficient_attention_forward", "_scaled_dot_product_fused_attention_overrideable",
    ]
    ops = set()
    for name in names:
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None:
            ops.add(packet)
    return ops


_EXPENSIVE: set | None = None


def expensive_ops() -> set:
    """Op packets whose outputs selective checkpointing keeps (matmul, attention, conv)."""
    global _EXPENSIVE
    if _EXPENSIVE is None:
        _EXPENSIVE = _expensive_ops()
    return _EXPENSIVE


def _kept_by_selective(op: Any) -> bool:
    """Whether selective checkpointing keeps ``op``'s output (see :func:`_selective_policy`)."""
    if op.overloadpacket in expensive_ops():
        return True
    schema = getattr(op, "_schema", None)
    return schema is not None and schema.is_mutable


def _op_flops(registry: dict, func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    packet = func.overloadpacket
    try:
        if packet in registry:
            return float(registry[packet](*args, **kwargs, out_val=out))
        name = str(packet)
        if name in ("aten.addmm_", "aten.baddbmm_") and len(args) >= 3:
            a, b = args[1], args[2]
            return 2.0 * a.numel() * b.shape[-1]
        if name == "aten._scaled_dot_product_flash_attention_for_cpu":
            q, k = args[0], args[1]  # [B, H, L, E], [B, H, S, E]
            return 4.0 * q.numel() * k.shape[-2]
    except Exception:  # a formula that does not accept these arguments: count nothing
        return 0.0
    return 0.0


class _OpProfiler(TorchDispatchMode):
    """Counts forward FLOPs, per-op time (cheap vs expensive) and expensive-op output bytes."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.registry = flop_registry
        self.cuda = device.type == "cuda"
        self.flops = 0.0
        self.sel_bytes = 0
        self._sel_keys: set[int] = set()
        self.cheap_time = 0.0
        self.total_time = 0.0
        self._events: list[tuple[Any, Any, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        expensive = _kept_by_selective(func)  # not recomputed by selective checkpointing
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            out = func(*args, **kwargs)
            end.record()
            self._events.append((start, end, expensive))
        else:
            t0 = time.perf_counter()
            out = func(*args, **kwargs)
            dt = time.perf_counter() - t0
            self.total_time += dt
            if not expensive:
                self.cheap_time += dt
        self.flops += _op_flops(self.registry, func, args, kwargs, out)
        if func.overloadpacket in expensive_ops():
            for t in tensor_leaves(out):
                try:
                    st = t.untyped_storage()
                except (RuntimeError, NotImplementedError):
                    continue
                if st.data_ptr() not in self._sel_keys:
                    self._sel_keys.add(st.data_ptr())
                    self.sel_bytes += st.nbytes()
        return out

    def finalize(self) -> None:
        """Resolve CUDA event timings (synchronizes; profile steps only)."""
        if not self._events:
            return
        self._events[-1][1].synchronize()
        for start, end, expensive in self._events:
            dt = start.elapsed_time(end) / 1000.0
            self.total_time += dt
            if not expensive:
                self.cheap_time += dt
        self._events.clear()


# --------------------------------------------------------------------------------------------
# Offloading (CUDA)
# --------------------------------------------------------------------------------------------


class _OffloadHandle:
    __slots__ = ("host", "device", "dev", "event", "group", "__weakref__")

    def __init__(self, tensor: torch.Tensor, stream: "torch.cuda.Stream", group: int) -> None:
        self.device = tensor.device
        self.group = group
        self.dev: torch.Tensor | None = None
        self.event = None
        self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(stream):
            self.host.copy_(tensor, non_blocking=True)
        tensor.record_stream(stream)  # the allocator keeps the memory until the copy is done

    def load(self, stream: "torch.cuda.Stream") -> None:
        if self.dev is not None:
            return
        with torch.cuda.stream(stream):
            self.dev = self.host.to(self.device, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(stream)

    def get(self, stream: "torch.cuda.Stream") -> torch.Tensor:
        self.load(stream)
        current = torch.cuda.current_stream(self.device)
        current.wait_event(self.event)
        tensor = self.dev
        tensor.record_stream(current)
        self.dev = None
        return tensor


class _Offloader:
    """Saved-tensor hooks that move a block's saved activations to pinned host memory.

    Device-to-host copies run on a side stream while the next blocks compute; in backward the
    first unpack of block ``g`` loads all of ``g`` and prefetches the previous offloaded block,
    so its host-to-device copy overlaps ``g``'s backward.
    """

    min_bytes = 1 << 20

    def __init__(self) -> None:
        self.stream: torch.cuda.Stream | None = None
        self.groups: dict[int, list[weakref.ref]] = {}

    def reset(self) -> None:
        self.groups = {}

    def hooks(self, group: int) -> torch.autograd.graph.saved_tensors_hooks:
        if self.stream is None:
            self.stream = torch.cuda.Stream()

        def pack(t: torch.Tensor) -> Any:
            if (
                not t.is_cuda
                or isinstance(t, nn.Parameter)
                or t.numel() * t.element_size() < self.min_bytes
            ):
                return t
            handle = _OffloadHandle(t, self.stream, group)
            self.groups.setdefault(group, []).append(weakref.ref(handle))
            return handle

        def unpack(h: Any) -> torch.Tensor:
            if not isinstance(h, _OffloadHandle):
                return h
            self._load_group(h.group)
            earlier = [g for g in self.groups if g < h.group]
            if earlier:
                self._load_group(max(earlier))
            return h.get(self.stream)

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    def _load_group(self, group: int) -> None:
        refs = self.groups.pop(group, None)
        if not refs:
            return
        for ref in refs:
            handle = ref()
            if handle is not None:
                handle.load(self.stream)


# --------------------------------------------------------------------------------------------
# Schedule and the switchable block
# --------------------------------------------------------------------------------------------


class _RecomputeObserver:
    """Entered around a block's recomputation: counts it and measures its transient."""

    def __init__(self, schedule: "BlockSchedule", index: int, meter: SavedTensorMeter | None, inner: Any = None):
        self.schedule = schedule
        self.index = index
        self.tracker = meter.recompute_context() if meter is not None else None
        self.inner = inner
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> "_RecomputeObserver":
        self._stack = contextlib.ExitStack()
        if self.inner is not None:
            self._stack.enter_context(self.inner)
        if self.tracker is not None:
            self._stack.enter_context(self.tracker)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stack is not None
        self._stack.__exit__(*exc)
        self.schedule.recomputed[self.index] += 1
        if self.tracker is not None:
            peak = self.tracker.peak_delta
            prev = self.schedule.observed_transient[self.index]
            self.schedule.observed_transient[self.index] = max(prev, peak)


@dataclass
class BlockSchedule:
    """Shared, mutable state of the wrapped blocks: the plan and the profiling switch.

    ``modes[i]`` is read by block ``i`` at each forward call, so assigning a new plan between
    steps takes effect at the next step without touching the model.
    """

    num_blocks: int
    modes: list[str] = field(default_factory=list)
    profiling: bool = False
    use_reentrant: bool = False
    active: bool = True
    # filled while profiling
    profiles: list[BlockProfile | None] = field(default_factory=list)
    pre_bytes: int = 0
    last_exit_live: int = 0
    # per step observations
    recomputed: list[int] = field(default_factory=list)
    observed_transient: list[int] = field(default_factory=list)
    forward_calls: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.modes:
            self.modes = ["none"] * self.num_blocks
        self._offloader = _Offloader()
        self._profilers: list[_OpProfiler | None] = []
        self.begin_step(profiling=False)

    def set_modes(self, modes: Sequence[str]) -> None:
        if len(modes) != self.num_blocks:
            raise ValueError(f"plan has {len(modes)} entries for {self.num_blocks} blocks")
        for m in modes:
            if m not in MODES:
                raise ValueError(f"unknown mode {m!r}; expected one of {MODES}")
        self.modes = list(modes)

    def begin_step(self, profiling: bool) -> None:
        """Reset per-step state; with ``profiling`` every block is profiled in this step."""
        self.profiling = profiling
        n = self.num_blocks
        self.profiles = [None] * n
        self._profilers = [None] * n
        self.pre_bytes = 0
        self.last_exit_live = 0
        self.recomputed = [0] * n
        self.observed_transient = [0] * n
        self.forward_calls = [0] * n
        self._offloader.reset()

    def finish_profiles(self) -> list[BlockProfile] | None:
        """The profiles collected in this step (``None`` if some block did not run)."""
        for prof, op in zip(self.profiles, self._profilers):
            if prof is not None and op is not None:
                op.finalize()
                prof.time = op.total_time
                prof.sel_time = op.cheap_time
                prof.flops = op.flops
                prof.sel_bytes = op.sel_bytes
        for i, prof in enumerate(self.profiles):
            if prof is not None:
                prof.recompute_peak = max(prof.recompute_peak, self.observed_transient[i])
        self._profilers = [None] * self.num_blocks
        if any(p is None for p in self.profiles):
            return None
        return list(self.profiles)  # type: ignore[arg-type]

    # called by SwitchableBlock ---------------------------------------------------------------
    def _profile(self, index: int, module: nn.Module, fwd: Callable, args: tuple, kwargs: dict) -> None:
        inputs = list(tensor_leaves((args, kwargs)))
        device = inputs[0].device if inputs else torch.device("cpu")
        input_keys: dict[int, int] = {}
        for t in inputs:
            if isinstance(t, nn.Parameter):
                continue
            try:
                st = t.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            input_keys[st.data_ptr()] = st.nbytes()
        fork_devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork_devices, device_type=device.type if device.type == "cuda" else "cuda"):
            meter = SavedTensorMeter(module, detach=True)  # the graph is discarded: no cycles
            profiler = _OpProfiler(device)
            with meter, profiler:
                out = fwd(*args, **kwargs)
            # input storages the block itself saves (still alive: the graph is held by `out`)
            saved_inputs = sum(nb for key, nb in input_keys.items() if key in meter._counts)
            del out
        profile = BlockProfile(
            act_bytes=meter.bytes,
            input_bytes=sum(input_keys.values()),
            extra_bytes=max(meter.bytes - saved_inputs, 0),
        )
        self.profiles[index] = profile
        self._profilers[index] = profiler

    def _context_fn(self, index: int, mode: str) -> Callable[[], tuple[Any, Any]]:
        meter = current_meter()

        def fn() -> tuple[Any, Any]:
            if mode == "selective":
                fwd_ctx, rec_ctx = create_selective_checkpoint_contexts(
                    _selective_policy, allow_cache_entry_mutation=True
                )
                return fwd_ctx, _RecomputeObserver(self, index, None, rec_ctx)
            return contextlib.nullcontext(), _RecomputeObserver(self, index, meter)

        return fn


def _selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    """Keep matmul/attention/conv outputs; recompute the rest, except in-place ops.

    In-place ops are "kept" too (their output is the mutated tensor itself, no extra memory
    when it is already cached): replaying them in backward would mutate a cached tensor a
    second time (LoRA's fused ``out.addmm_(u, B^T)`` right after the base matmul is the common
    case). This assumes no op reads a tensor between its creation and a later in-place update
    of it, which holds for the library's adapters and the usual transformer blocks.
    """
    return CheckpointPolicy.MUST_SAVE if _kept_by_selective(op) else CheckpointPolicy.PREFER_RECOMPUTE


class SwitchableBlock:
    """Installed as a block's instance ``forward``; runs it according to ``schedule.modes``.

    Not an ``nn.Module`` (so parameter names are unchanged). ``copy.deepcopy`` of the model
    copies it along with its block.
    """

    def __init__(self, module: nn.Module, index: int, schedule: BlockSchedule, previous: Callable | None) -> None:
        self.module = module
        self.index = index
        self.schedule = schedule
        self.previous = previous  # an instance forward that was there before us, if any

    def _forward(self) -> Callable:
        if self.previous is not None:
            return self.previous
        return type(self.module).forward.__get__(self.module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fwd = self._forward()
        s = self.schedule
        if not s.active or not torch.is_grad_enabled():
            return fwd(*args, **kwargs)
        i = self.index
        s.forward_calls[i] += 1
        meter = current_meter()
        if i == 0 and meter is not None:
            s.pre_bytes = meter.live_bytes
        if s.profiling:
            s._profile(i, self.module, fwd, args, kwargs)
        mode = s.modes[i]
        if mode == "none":
            out = fwd(*args, **kwargs)
        elif mode in ("checkpoint", "selective"):
            if s.use_reentrant:
                if kwargs:
                    raise ValueError(
                        f"reentrant checkpointing cannot pass keyword arguments ({sorted(kwargs)}) to block "
                        f"{i}; use use_reentrant=False"
                    )
                out = checkpoint(fwd, *args, use_reentrant=True)
            else:
                out = checkpoint(fwd, *args, use_reentrant=False, context_fn=s._context_fn(i, mode), **kwargs)
        elif mode == "offload":
            if not any(t.is_cuda for t in tensor_leaves((args, kwargs))):
                out = fwd(*args, **kwargs)  # offloading is a CUDA feature: plain forward elsewhere
            else:
                with s._offloader.hooks(i):
                    out = fwd(*args, **kwargs)
        else:
            raise ValueError(f"unknown mode {mode!r} for block {i}")
        if i == s.num_blocks - 1 and meter is not None:
            s.last_exit_live = meter.live_bytes
        return out


def wrap_blocks(blocks: Sequence[nn.Module], schedule: BlockSchedule | None = None) -> BlockSchedule:
    """Make each block switchable (in place); returns the shared schedule (all ``"none"``)."""
    blocks = list(blocks)
    if schedule is None:
        schedule = BlockSchedule(len(blocks))
    for i, block in enumerate(blocks):
        current = block.__dict__.get("forward")
        if isinstance(current, SwitchableBlock):
            raise ValueError(
                f"block {i} ({type(block).__name__}) is already wrapped for adaptive checkpointing; "
                "use one AdaptiveCheckpointCallback per model"
            )
        block.forward = SwitchableBlock(block, i, schedule, current)  # type: ignore[method-assign]
    return schedule


def unwrap_blocks(blocks: Iterable[nn.Module]) -> None:
    """Undo :func:`wrap_blocks`."""
    for block in blocks:
        current = block.__dict__.get("forward")
        if isinstance(current, SwitchableBlock):
            if current.previous is not None:
                block.forward = current.previous  # type: ignore[method-assign]
            else:
                del block.__dict__["forward"]
