"""Block profiles and the cost model of the checkpointing planner (pure torch).

A :class:`BlockProfile` holds the measured costs of one block for one input shape. Per mode, a
block *holds* ``h`` bytes on the device between its forward and its backward (``c+e`` none, ``c``
checkpoint, ``c+s`` selective, about ``c`` offload) and needs a *transient* ``t`` while it is
re-materialised in backward. The predicted activation peak of a plan is::

    peak = max( pre + post + sum_i h_i,                        # end of forward
                max_{j recomputed} pre + sum_{i<=j} h_i + t_j )  # recomputing block j in backward

where ``pre``/``post`` are the bytes saved before/after the blocks. :func:`plan_cost` is the one
place that prices a whole plan (an offloaded block hides its copy behind the *next* block's
forward), used by the planner and by the read-outs alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

from lightning_peft.memory.sizes import format_bytes

__all__ = [
    "MODES",
    "Mode",
    "StaticPlan",
    "BlockProfile",
    "Plan",
    "BudgetTooSmallError",
    "held_bytes",
    "transient_bytes",
    "recompute_cost",
    "plan_cost",
    "make_plan",
    "predict_peak",
    "static_modes",
    "STATIC_PLANS",
]

Mode = Literal["none", "checkpoint", "selective", "offload"]
MODES: tuple[str, ...] = ("none", "checkpoint", "selective", "offload")
#: the static plans of :func:`static_modes` (for comparison with the adaptive planner)
StaticPlan = Literal["none", "all", "every_k", "first_k", "offload_first_k"]
STATIC_PLANS: tuple[str, ...] = ("none", "all", "every_k", "first_k", "offload_first_k")


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
    def from_list(cls, values: Sequence[float]) -> BlockProfile:
        names = list(cls.__dataclass_fields__)
        kwargs = dict(zip(names, values))
        for name in ("act_bytes", "input_bytes", "extra_bytes", "sel_bytes", "recompute_peak"):
            kwargs[name] = int(kwargs[name])
        return cls(**kwargs)

    def scaled(self, s: float) -> BlockProfile:
        """This profile with every byte, FLOP and second multiplied by ``s`` (a shape bucket's
        ceiling over the profiled shape; bandwidth is a property of the device, unchanged)."""
        return BlockProfile(
            act_bytes=int(self.act_bytes * s),
            input_bytes=int(self.input_bytes * s),
            extra_bytes=int(self.extra_bytes * s),
            flops=self.flops * s,
            time=self.time * s,
            sel_bytes=int(self.sel_bytes * s),
            sel_time=self.sel_time * s,
            recompute_peak=int(self.recompute_peak * s),
            offload_bandwidth=self.offload_bandwidth,
        )

    @classmethod
    def uniform(cls, n: int, act_bytes: int, input_bytes: int, flops: float = 1.0) -> list[BlockProfile]:
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


def plan_cost(
    profiles: Sequence[BlockProfile],
    modes: Sequence[str],
    kind: Literal["flops", "time"] = "flops",
    offload_bandwidth: float = 0.0,
) -> float:
    """Total :func:`recompute_cost` of ``modes``: block ``j``'s offload copy hides behind block
    ``j+1``'s forward (the last block behind its own), as the planner optimises it."""
    return sum(
        recompute_cost(p, m, kind, offload_bandwidth=offload_bandwidth, next_time=_next_time(profiles, j))
        for j, (p, m) in enumerate(zip(profiles, modes))
    )


def _next_time(profiles: Sequence[BlockProfile], j: int) -> float:
    """Forward seconds of the block after ``j`` (block ``j``'s own for the last block)."""
    return profiles[j + 1].time if j + 1 < len(profiles) else profiles[j].time


def make_plan(
    profiles: Sequence[BlockProfile],
    modes: Sequence[str],
    pre: int = 0,
    post: int = 0,
    kind: Literal["flops", "time"] = "flops",
    offload_bandwidth: float = 0.0,
) -> Plan:
    """``modes`` as a :class:`Plan`: its predicted peak, :func:`plan_cost` and the all-checkpointed cost."""
    full = sum(recompute_cost(p, "checkpoint", kind) for p in profiles)
    spent = plan_cost(profiles, modes, kind, offload_bandwidth)
    return Plan(tuple(modes), predict_peak(profiles, modes, pre, post), spent, full)


def static_modes(kind: StaticPlan, n: int, k: int = 1) -> tuple[str, ...]:
    """Static plans for comparison: ``none``, ``all``, ``every_k`` (blocks ``0, k, 2k, ..``),
    ``first_k`` (blocks ``0..k-1``), ``offload_first_k`` (blocks ``0..k-1`` offloaded)."""
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
        if k < 0:
            raise ValueError(f"offload_first_k needs k >= 0, got {k}")
        return tuple("offload" if i < k else "none" for i in range(n))
    raise ValueError(f"unknown static plan {kind!r}; expected one of {', '.join(STATIC_PLANS)}")


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
