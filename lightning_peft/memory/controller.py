"""The adaptive-checkpointing controller: plan per shape bucket, tighten/relax with hysteresis (pure torch).

No Lightning here: :class:`~lightning_peft.callbacks.adaptive_checkpoint.AdaptiveCheckpointCallback`
feeds it one step at a time and applies the modes it returns. Per step:

1. :meth:`CheckpointController.start_step` gets the batch's (rounded) shape and returns the modes
   to run: a new bucket is *profiled* under the plan of a profiled larger shape or with every
   block checkpointed; a known bucket runs its plan (re-planned first when it is stale or a
   relaxation is due at an optimizer-step boundary).
2. :meth:`CheckpointController.end_step` gets the measured peak (and a profile on profile steps).
   With ``limit = budget * (1 - headroom) * oom_scale`` and the planner's prediction ``p`` of the
   plan that ran, the offset ``measured - p`` is static memory the activation model does not see.
   Above ``limit`` the offset is raised to what was seen (plus 1% of the budget) and the plan
   tightened at once; after ``relax_after`` steps below ``(1 - hysteresis) * limit`` a relaxation
   is scheduled: the offset drops to the largest recently seen and the plan is rebuilt.
3. :meth:`CheckpointController.after_oom` answers an out-of-memory error inside a step with a
   tighter plan (sticky ``oom_scale *= oom_backoff``), or every block checkpointed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from lightning_peft.memory.buckets import Bucket, Shape, dominates, largest_numel, shape_key
from lightning_peft.memory.planner import min_peak, plan_blocks
from lightning_peft.memory.profiles import MODES, BlockProfile, BudgetTooSmallError, Plan, make_plan, predict_peak, static_modes
from lightning_peft.memory.sizes import format_bytes

__all__ = ["CheckpointController", "ControllerConfig", "StepOutcome"]


@dataclass
class ControllerConfig:
    """The controller's settings (validated by the callback; see its docstring for each)."""

    num_blocks: int
    budget_bytes: int | None
    mode: str = "adaptive"
    k: int = 2
    headroom: float = 0.05
    hysteresis: float = 0.1
    relax_after: int = 20
    shape_bucket: int | None = None
    oom_backoff: float = 0.85
    allowed: tuple[str, ...] = ("none", "checkpoint")
    cost_kind: Literal["flops", "time"] = "flops"
    bandwidth: float = 0.0
    activation_only: bool = True
    verbose: bool = False


@dataclass
class StepOutcome:
    """What one step did: the modes that ran, the predicted peak (NaN before a profile), the
    recompute fraction and the events (``oom-retry``, ``profile``, ``calibrate``, ``tighten``)."""

    modes: tuple[str, ...]
    predicted: float
    fraction: float
    events: list[str] = field(default_factory=list)


def _no_op(message: str) -> None:
    pass


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


class CheckpointController:
    """The decision logic of adaptive checkpointing over shape buckets (see the module docstring).

    Args:
        config: the settings.
        counters: a dict updated in place (``steps``, ``profiles``, ``tightenings``,
            ``relaxations``, ``oom_retries``); a new one if ``None``.
        info, warn: where plan changes and warnings go (the callback passes Lightning's rank-zero
            printers); by default nothing and :func:`warnings.warn`.
    """

    def __init__(
        self,
        config: ControllerConfig,
        counters: dict[str, int] | None = None,
        info: Callable[[str], None] = _no_op,
        warn: Callable[[str], None] = _warn,
    ) -> None:
        self.config = config
        self.counters = counters if counters is not None else {}
        for name in ("steps", "profiles", "tightenings", "relaxations", "oom_retries"):
            self.counters.setdefault(name, 0)
        self.info = info
        self.warn = warn
        self.buckets: dict[str, Bucket] = {}
        self.key: str | None = None
        self.profiling = False
        self.plan_used: tuple[str, ...] = ()
        self.offset_used = 0.0
        self.oom_in_step = False
        self.batch_size = 0
        self._warned_floor = False

    @property
    def bucket(self) -> Bucket | None:
        """The bucket of the current step."""
        return self.buckets.get(self.key) if self.key is not None else None

    @property
    def limit(self) -> float:
        assert self.config.budget_bytes is not None
        return self.config.budget_bytes * (1 - self.config.headroom) * self.bucket.oom_scale

    # ------------------------------------------------------------------------------------------
    # a step
    # ------------------------------------------------------------------------------------------
    def start_step(self, shape: Shape, actual: Shape, at_boundary: bool = True) -> tuple[str, ...]:
        """The modes for a batch of bucket shape ``shape`` (tensor shapes ``actual``)."""
        cfg = self.config
        self.batch_size = actual[0][0] if actual and actual[0] else 0
        self.key = key = shape_key(shape)
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = Bucket(shape=shape)
            ceiling, real = largest_numel(shape), largest_numel(actual)
            bucket.scale = ceiling / real if cfg.shape_bucket and real else 1.0
        self.profiling = False
        if cfg.mode != "adaptive":
            modes = static_modes(cfg.mode, cfg.num_blocks, cfg.k)  # type: ignore[arg-type]
        elif bucket.profiles is None:
            # first visit: profile; run the plan of a profiled larger shape, else checkpoint all
            self.profiling = True
            modes = ("checkpoint",) * cfg.num_blocks
            donors = [b for b in self.buckets.values() if b.plan is not None and dominates(b.shape, shape)]
            if donors:
                modes = min(donors, key=lambda b: largest_numel(b.shape)).plan.modes  # type: ignore[union-attr]
        else:
            if bucket.pending_relax and at_boundary:
                self._relax(bucket)
            if bucket.plan is None:
                bucket.plan = self.plan_for(bucket)
            modes = bucket.plan.modes
        self.plan_used = tuple(modes)
        self.offset_used = bucket.offset
        self.oom_in_step = False
        return self.plan_used

    def end_step(
        self,
        measured: float,
        oom: bool,
        profiled: tuple[Sequence[BlockProfile], int, int] | None = None,
        observed_transient: Sequence[int] = (),
    ) -> StepOutcome:
        """Feed one step's measured peak; ``profiled``: ``(profiles, pre, post)`` on a profile step
        (identical on all ranks), ``observed_transient``: per-block recompute transients seen."""
        bucket = self.bucket
        assert bucket is not None, "end_step before start_step"
        self.counters["steps"] += 1
        events = ["oom-retry"] if oom else []
        if self.profiling:
            if profiled is not None:
                self._store_profiles(bucket, *profiled)
                events.append("profile")
        elif bucket.profiles is not None and self.config.activation_only:
            self._observe_transients(bucket, observed_transient)
        modes = self.plan_used
        predicted = float("nan")
        fraction = sum(m != "none" for m in modes) / max(len(modes), 1)
        if bucket.profiles is not None:
            used = self.make_plan(bucket, modes)
            predicted = used.predicted_peak + self.offset_used
            if used.full_cost > 0:
                fraction = used.recompute_fraction
            observed_offset = measured - used.predicted_peak
            bucket.recent_offsets.append(observed_offset)
            if self.config.mode == "adaptive":
                events += self._decide(bucket, measured, observed_offset, first=("profile" in events))
        return StepOutcome(modes, predicted, fraction, events)

    def _store_profiles(self, bucket: Bucket, profiles: Sequence[BlockProfile], pre: int, post: int) -> None:
        profiles = list(profiles)
        for p in profiles:
            p.offload_bandwidth = self.config.bandwidth
        if bucket.scale != 1.0:
            profiles = [p.scaled(bucket.scale) for p in profiles]
            pre, post = int(pre * bucket.scale), int(post * bucket.scale)
        bucket.profiles, bucket.pre, bucket.post = profiles, pre, post
        self.counters["profiles"] += 1

    def _observe_transients(self, bucket: Bucket, observed: Sequence[int]) -> None:
        # the meter also observes recomputation transients; keep the largest seen
        assert bucket.profiles is not None
        changed = False
        for i, seen in enumerate(observed):
            if seen > bucket.profiles[i].recompute_peak:
                bucket.profiles[i].recompute_peak = seen
                changed = True
        if changed and self.config.mode == "adaptive":
            bucket.plan = None  # re-plan with the larger transients before the next step

    # ------------------------------------------------------------------------------------------
    # tighten / relax
    # ------------------------------------------------------------------------------------------
    def _decide(self, bucket: Bucket, measured: float, observed_offset: float, first: bool) -> list[str]:
        """Update the bucket's offset and plan from one measured peak (identical on all ranks)."""
        events: list[str] = []
        limit = self.limit
        old = bucket.plan.modes if bucket.plan is not None else None
        if first or bucket.calibrating:
            events += self._calibrate(bucket, observed_offset, first)
        elif measured > limit:
            self._tighten(bucket, measured, observed_offset, limit)
            events.append("tighten")
        elif measured < limit * (1 - self.config.hysteresis):
            bucket.calm += 1
            if bucket.calm >= self.config.relax_after:
                bucket.pending_relax = True
        else:
            bucket.calm = 0
        if bucket.plan is not None and old != bucket.plan.modes and self.config.verbose:
            self.info(f"AdaptiveCheckpointCallback[{self.key}]: {bucket.plan.describe()}")
        return events

    def _calibrate(self, bucket: Bucket, observed_offset: float, first: bool) -> list[str]:
        # activation-only meters are exact up to recomputation temporaries: never go below 0
        bucket.offset = max(observed_offset, 0.0)
        calibrate = first and not self.config.activation_only
        try:
            bucket.plan = self.plan_for(bucket, strict=True)
            bucket.calibrating = False
        except BudgetTooSmallError:
            if not calibrate:
                raise
            # A whole-device source measured the profile step, whose side forwards and meters
            # may cost a little extra: confirm with one plain all-checkpointed step before
            # declaring the budget infeasible.
            bucket.calibrating = True
            bucket.plan = self.make_plan(bucket, ("checkpoint",) * len(bucket.profiles or []))
            return ["calibrate"]
        return []

    def _tighten(self, bucket: Bucket, measured: float, observed_offset: float, limit: float) -> None:
        assert self.config.budget_bytes is not None
        floor_plan = bucket.plan is not None and all(m == "checkpoint" for m in bucket.plan.modes)
        if floor_plan and not self._warned_floor:
            self._warned_floor = True
            self.warn(
                f"AdaptiveCheckpointCallback[{self.key}]: measured peak {format_bytes(measured)} exceeds the "
                f"budget's limit {format_bytes(limit)} with every block checkpointed; use a smaller batch."
            )
        bucket.offset = max(bucket.offset, observed_offset) + 0.01 * self.config.budget_bytes
        bucket.plan = self.plan_for(bucket)
        bucket.calm = 0
        self.counters["tightenings"] += 1

    def _relax(self, bucket: Bucket) -> None:
        bucket.pending_relax = False
        bucket.calm = 0
        recent = list(bucket.recent_offsets)[-self.config.relax_after :]
        if not recent:
            return
        new_offset = max(max(recent), 0.0)
        if new_offset >= bucket.offset:
            return
        old = bucket.plan
        bucket.offset = new_offset
        bucket.plan = self.plan_for(bucket)
        if old is None or bucket.plan.modes != old.modes:
            self.counters["relaxations"] += 1
            if self.config.verbose:
                self.info(f"AdaptiveCheckpointCallback[{self.key}] relaxed: {bucket.plan.describe()}")

    # ------------------------------------------------------------------------------------------
    # plans
    # ------------------------------------------------------------------------------------------
    def plan_for(self, bucket: Bucket, strict: bool = False) -> Plan:
        """The cheapest plan under the bucket's usable budget. Infeasible: ``strict`` raises
        :class:`BudgetTooSmallError` (with the floor in the budget's units), otherwise the
        all-checkpointed plan is returned (after an overshoot or an out-of-memory error)."""
        cfg = self.config
        assert bucket.profiles is not None and cfg.budget_bytes is not None
        usable = cfg.budget_bytes * (1 - cfg.headroom) * bucket.oom_scale - bucket.offset
        try:
            return plan_blocks(
                bucket.profiles,
                int(usable),
                pre=bucket.pre,
                post=bucket.post,
                allowed=cfg.allowed,
                cost=cfg.cost_kind,
                offload_bandwidth=cfg.bandwidth,
            )
        except BudgetTooSmallError:
            if strict:
                raise self._too_small(bucket) from None
            # tightened below the floor after an overshoot/out-of-memory: do the most we can
            return self.make_plan(bucket, ("checkpoint",) * len(bucket.profiles))

    def _too_small(self, bucket: Bucket) -> BudgetTooSmallError:
        """The error for a budget below the bucket's floor, in the budget's units."""
        cfg = self.config
        assert bucket.profiles is not None and cfg.budget_bytes is not None
        floor_act = min_peak(bucket.profiles, bucket.pre, bucket.post, cfg.allowed)
        needed = int((floor_act + bucket.offset) / (1 - cfg.headroom)) + 1
        detail = ""
        if self.batch_size:
            fits = int(self.batch_size * cfg.budget_bytes / needed)
            detail = f" at batch size {self.batch_size}; about {max(fits, 0)} would fit"
        if bucket.offset > 0:
            detail += f", including {format_bytes(bucket.offset)} measured outside the blocks' activations"
        if cfg.headroom:
            detail += f" and {cfg.headroom:.0%} headroom"
        return BudgetTooSmallError(cfg.budget_bytes, needed, detail)

    def make_plan(self, bucket: Bucket, modes: Sequence[str]) -> Plan:
        """``modes`` priced on the bucket's profiles (the planner's own cost: see ``plan_cost``)."""
        assert bucket.profiles is not None
        cfg = self.config
        return make_plan(bucket.profiles, modes, bucket.pre, bucket.post, cfg.cost_kind, cfg.bandwidth)

    # ------------------------------------------------------------------------------------------
    # out of memory
    # ------------------------------------------------------------------------------------------
    def after_oom(self, current: Sequence[str], message: str = "") -> tuple[str, ...]:
        """The modes to retry a step with after an out-of-memory error under ``current``.

        Raises:
            torch.OutOfMemoryError: every block is already checkpointed (nothing left to try).
        """
        self.counters["oom_retries"] += 1
        self.oom_in_step = True
        current = tuple(current)
        floor = ("checkpoint",) * len(current)
        new = current
        bucket = self.bucket
        if self.config.mode != "adaptive":
            new = floor  # a static plan that ran out of memory: fall back to checkpointing everything
        elif bucket is not None:
            bucket.oom_scale *= self.config.oom_backoff
            if bucket.profiles is None:
                new = floor
            else:
                bucket.plan = self.plan_for(bucket)  # not strict: the floor plan when nothing fits
                new = bucket.plan.modes
                # a plan that would not lower the predicted peak cannot help: checkpoint everything
                peak = lambda modes: predict_peak(bucket.profiles, modes, bucket.pre, bucket.post)  # noqa: E731
                if peak(new) >= peak(current):
                    new = floor
                if new == floor:
                    bucket.plan = self.make_plan(bucket, floor)
        if new == current:
            raise torch.OutOfMemoryError(
                f"AdaptiveCheckpointCallback: out of memory with every block already checkpointed ({message}). "
                "Use a smaller batch or sequence length."
            )
        self.plan_used = new
        return new

    # ------------------------------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "num_blocks": self.config.num_blocks,
            "budget_bytes": self.config.budget_bytes,
            "buckets": {key: b.state_dict() for key, b in self.buckets.items()},
            "counters": dict(self.counters),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = state.get("num_blocks")
        if n is not None and n != self.config.num_blocks:
            raise ValueError(
                f"AdaptiveCheckpointCallback state is for {n} blocks but the model has {self.config.num_blocks}; "
                "it was saved for a different model"
            )
        self.counters.update(state.get("counters", {}))
        self.buckets = {}
        for key, d in state.get("buckets", {}).items():
            b = Bucket.from_state_dict(d)
            if d.get("plan") is not None and b.profiles is not None:
                modes = tuple(d["plan"])
                if all(m in MODES for m in modes) and len(modes) == len(b.profiles):
                    b.plan = self.make_plan(b, modes) if self.config.num_blocks else None
            self.buckets[key] = b
