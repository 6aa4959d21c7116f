"""Shape buckets: one plan per input shape (rounded), and the per-bucket controller state (pure torch).

A batch's *shape* is the list of its tensors' shapes, in a fixed order (dict keys sorted, then
sequence order). With ``shape_bucket=q`` every non-batch dimension is rounded up to a multiple of
``q``, so all shapes in ``(q*(n-1), q*n]`` share one plan; a profile measured on a smaller shape
in the bucket is scaled up linearly to the ceiling (:attr:`Bucket.scale`).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

from lightning_peft.memory.profiles import BlockProfile, Plan

__all__ = ["Bucket", "tensor_shapes", "round_shape", "shape_key", "largest_numel", "dominates"]

Shape = list[list[int]]


@dataclass
class Bucket:
    """What the controller knows about one shape bucket.

    Attributes:
        shape: the bucket's (rounded) shape.
        profiles, pre, post: the block profiles and bytes saved before/after the blocks.
        scale: profile bytes -> bucket ceiling (``shape_bucket`` rounding).
        offset: measured bytes outside the blocks' activations (static memory on a whole-device source).
        oom_scale: sticky factor on the usable budget after out-of-memory errors.
        plan: the plan in force (``None``: plan before the next step).
        calibrating: one all-checkpointed step without profiling to measure the offset.
        calm: consecutive steps well below the limit (hysteresis).
        pending_relax: relax at the next optimizer-step boundary.
        recent_offsets: the offsets observed in the last steps (the relaxed offset is their max).
    """

    shape: Shape
    profiles: list[BlockProfile] | None = None
    pre: int = 0
    post: int = 0
    scale: float = 1.0
    offset: float = 0.0
    oom_scale: float = 1.0
    plan: Plan | None = None
    calibrating: bool = False
    calm: int = 0
    pending_relax: bool = False
    recent_offsets: deque = field(default_factory=lambda: deque(maxlen=64))

    def state_dict(self) -> dict[str, Any]:
        return {
            "shape": [list(s) for s in self.shape],
            "profiles": None if self.profiles is None else [p.to_list() for p in self.profiles],
            "pre": self.pre,
            "post": self.post,
            "scale": self.scale,
            "offset": self.offset,
            "oom_scale": self.oom_scale,
            "plan": None if self.plan is None else list(self.plan.modes),
            "calm": self.calm,
            "calibrating": self.calibrating,
            "recent_offsets": list(self.recent_offsets),
        }

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> Bucket:
        """A bucket from :meth:`state_dict` (its plan is rebuilt by the controller)."""
        b = cls(shape=[list(s) for s in d["shape"]])
        if d.get("profiles") is not None:
            b.profiles = [BlockProfile.from_list(v) for v in d["profiles"]]
        b.pre, b.post = int(d.get("pre", 0)), int(d.get("post", 0))
        b.scale = float(d.get("scale", 1.0))
        b.offset = float(d.get("offset", 0.0))
        b.oom_scale = float(d.get("oom_scale", 1.0))
        b.calm = int(d.get("calm", 0))
        b.calibrating = bool(d.get("calibrating", False))
        b.recent_offsets.extend(d.get("recent_offsets", []))
        return b


def tensor_shapes(batch: Any) -> Shape:
    """The shapes of the tensors in ``batch``: dict keys sorted (as strings), sequences and
    namedtuples in order, depth first (the tree walk is ``torch.utils._pytree``'s)."""
    leaves, _ = pytree.tree_flatten_with_path(batch)
    first: dict[tuple, int] = {}  # path prefix -> flatten position of its first leaf
    for i, (path, _) in enumerate(leaves):
        for d in range(len(path)):
            first.setdefault(path[: d + 1], i)

    def order(path: tuple) -> tuple:
        # siblings share a container: dict keys compare as strings, other entries keep their order
        return tuple(str(k.key) if isinstance(k, pytree.MappingKey) else first[path[: d + 1]] for d, k in enumerate(path))

    tensors = sorted(((path, leaf) for path, leaf in leaves if isinstance(leaf, torch.Tensor)), key=lambda item: order(item[0]))
    return [list(t.shape) for _, t in tensors]


def round_shape(shape: Shape, quantum: int | None) -> Shape:
    """Every non-batch dimension rounded up to a multiple of ``quantum`` (``None``: unchanged)."""
    if not quantum:
        return shape
    return [[s[0], *[-(-d // quantum) * quantum for d in s[1:]]] if s else s for s in shape]


def shape_key(shape: Shape) -> str:
    """The plan-cache key of a shape: ``"4x32|4"`` (``"-"`` for a batch without tensors)."""
    return "|".join("x".join(str(d) for d in s) for s in shape) or "-"


def largest_numel(shape: Shape) -> int:
    """Elements of the largest tensor of a shape (the bucket's size measure)."""
    return max((math.prod(s) for s in shape), default=0)


def dominates(big: Shape, small: Shape) -> bool:
    """Whether every dimension of ``big`` is at least that of ``small`` (same structure)."""
    if len(big) != len(small):
        return False
    return all(len(a) == len(b) and all(x >= y for x, y in zip(a, b)) for a, b in zip(big, small))
