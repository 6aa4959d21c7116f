"""AdaptiveCheckpointCallback: fit a memory budget with the least recomputation.

See ``docs/adaptive_checkpointing.md`` for the method and measurements. In short:

1. At ``fit`` start the repeated blocks of the LightningModule are found
   (:func:`~lightning_peft.memory.find_blocks`) and made switchable
   (:func:`~lightning_peft.checkpointing.wrap_blocks`, non-reentrant checkpointing).
2. The first step of every input-shape bucket is a *profile* step: every block is checkpointed
   (the safest plan) or runs the plan of an already profiled larger shape, and each block's
   forward is run once more on the side to measure its activation bytes and recompute cost.
3. :func:`~lightning_peft.checkpointing.plan_blocks` picks the cheapest plan whose predicted
   peak, plus a measured offset (static memory: weights, gradients, optimizer state, workspace;
   ~0 for the saved-activation meter), fits ``budget * (1 - headroom)``.
4. After every step the measured peak is compared with the limit: above it the offset is raised
   and the plan tightened at once; after ``relax_after`` steps below ``(1 - hysteresis)`` of it
   the offset is lowered to what was observed and the plan relaxed.
5. An out-of-memory error inside a training step is caught, the plan tightened, and the *same*
   batch run again (see :meth:`AdaptiveCheckpointCallback._install_retry`).
"""

from __future__ import annotations

import gc
import math
import numbers
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_peft.checkpointing import (
    MODES,
    BlockProfile,
    BlockSchedule,
    BudgetTooSmallError,
    Plan,
    min_peak,
    plan_blocks,
    predict_peak,
    recompute_cost,
    static_modes,
    unwrap_blocks,
    wrap_blocks,
)
from lightning_peft.memory import (
    CudaMemorySource,
    MemorySource,
    SavedTensorMeter,
    SavedTensorSource,
    find_blocks,
    format_bytes,
    parse_bytes,
)
from lightning_peft.validation import (
    InvalidArgumentError,
    InvalidArgumentTypeError,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_str,
    check_str_list,
)

__all__ = ["AdaptiveCheckpointCallback"]

StaticMode = Literal["adaptive", "none", "all", "every_k", "first_k"]


@dataclass
class _Bucket:
    shape: list[list[int]]
    profiles: list[BlockProfile] | None = None
    pre: int = 0
    post: int = 0
    scale: float = 1.0  # profile bytes -> bucket ceiling (shape_bucket rounding)
    offset: float = 0.0
    oom_scale: float = 1.0
    plan: Plan | None = None
    calibrating: bool = False  # one all-checkpointed step without profiling to measure the offset
    calm: int = 0
    pending_relax: bool = False
    recent_offsets: deque = field(default_factory=lambda: deque(maxlen=64))


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    if isinstance(err, RuntimeError):
        msg = str(err).lower()
        return "out of memory" in msg or "can't allocate memory" in msg
    return False


def _tensor_shapes(batch: Any) -> list[list[int]]:
    out: list[list[int]] = []

    def visit(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            out.append(list(obj.shape))
        elif isinstance(obj, dict):
            for key in sorted(obj, key=str):
                visit(obj[key])
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v)

    visit(batch)
    return out


def _numel(shape: list[list[int]]) -> int:
    return max((math.prod(s) for s in shape), default=0)


def _dominates(big: list[list[int]], small: list[list[int]]) -> bool:
    if len(big) != len(small):
        return False
    return all(len(a) == len(b) and all(x >= y for x, y in zip(a, b)) for a, b in zip(big, small))


_BUDGET_FORMS = (
    "bytes (an int >= 1 or a string with a unit: '2GiB', '512MB'), a fraction of device memory "
    "(a float in (0, 1], e.g. 0.5, or the same as a string, '0.5'), or a percentage string ('40%')"
)


def parse_budget(budget: int | float | str | None) -> tuple[Literal["bytes", "fraction"], float] | None:
    """``("bytes", n)`` or ``("fraction", f)`` for a budget, ``None`` for none. Accepted: an int
    (bytes), a float in ``(0, 1]`` (fraction of device memory) or ``>= 1024`` (bytes), a string
    with a unit (``"2GiB"``), a percentage (``"40%"``), or a unit-less number string read as
    the number it spells (``"0.5"``: a fraction, as the float; ``"1e9"``: bytes). NaN and infinities are refused."""
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (numbers.Real, str)):
        raise InvalidArgumentTypeError("budget", f"budget must be {_BUDGET_FORMS}; got {budget!r} ({type(budget).__name__})")
    if isinstance(budget, numbers.Real) and not isinstance(budget, str):  # numpy scalars too
        budget = int(budget) if isinstance(budget, numbers.Integral) else float(budget)
    if isinstance(budget, str):
        text = budget.strip()
        if text.endswith("%"):
            try:
                percent = float(text[:-1])
            except ValueError:
                percent = math.nan
            if not 0 < percent <= 100:  # False for NaN too
                raise InvalidArgumentError("budget", f"a percentage budget must be in (0, 100]%, got {budget!r}; budget must be {_BUDGET_FORMS}")
            return "fraction", percent / 100.0
        try:
            number = float(text)
        except ValueError:
            number = None
        if number is not None and not math.isfinite(number):
            raise InvalidArgumentError("budget", f"budget must be {_BUDGET_FORMS}; got {budget!r}")
        if number is not None and 0 < number <= 1 and not text.isdigit():  # "0.5", "1.0": as the float
            return "fraction", number
        try:
            size = parse_bytes(text)
        except ValueError:
            raise InvalidArgumentError("budget", f"budget must be {_BUDGET_FORMS}; cannot read {budget!r}") from None
        if not size >= 1:
            raise InvalidArgumentError("budget", f"got budget={budget!r}, not a positive size; budget must be {_BUDGET_FORMS}")
        return "bytes", float(size)
    if isinstance(budget, float):
        if math.isfinite(budget) and 0.0 < budget <= 1.0:
            return "fraction", budget
        if math.isfinite(budget) and budget >= 1024:
            return "bytes", float(int(budget))
        raise InvalidArgumentError(
            "budget", f"got budget={budget!r}: a float budget is a fraction of the device's total memory in (0, 1]; budget must be {_BUDGET_FORMS}"
        )
    if budget < 1:
        raise InvalidArgumentError("budget", f"got budget={budget!r}, not a positive size; budget must be {_BUDGET_FORMS}")
    return "bytes", float(budget)


class AdaptiveCheckpointCallback(Callback):
    """Checkpoint (or offload) the fewest, cheapest blocks that keep the peak under a budget.

    Args:
        budget: the memory budget: bytes (``int``), a fraction of the device's total memory
            (``float`` in ``(0, 1]``, needs a source that knows the total, e.g. CUDA), or a string
            (``"2GiB"``, ``"512MB"``, ``"40%"``, or a fraction written as a string, ``"0.5"``).
            NaN, infinities and non-positive sizes are refused (see ``parse_budget``). With the saved-activation meter (CPU) the
            budget is in activation bytes. Required for ``mode="adaptive"``.
        mode: ``"adaptive"`` (plan for the budget) or a static plan for comparison: ``"none"``,
            ``"all"``, ``"every_k"`` (blocks ``0, k, 2k, ...``), ``"first_k"`` (blocks ``0..k-1``).
        k: the ``k`` of the static plans.
        blocks: dotted path(s) of the block list(s) (``"model.model.layers"``); ``None`` finds
            them (timm ``blocks``, transformers ``layers``/``layer``/``h``).
        memory_source: ``"auto"`` (CUDA allocator on GPU, saved-activation meter elsewhere),
            ``"cuda"``, ``"saved_tensors"``, or a :class:`~lightning_peft.memory.MemorySource`.
        headroom: plan for ``budget * (1 - headroom)``.
        hysteresis: relax only after peaks below ``(1 - hysteresis)`` of that limit ...
        relax_after: ... for this many consecutive steps.
        shape_bucket: round every non-batch dimension of the batch tensors up to a multiple of
            this for the plan cache key (``None``: one plan per exact shape). Profiles measured on
            a smaller shape in a bucket are scaled up linearly to the bucket's ceiling.
        cost: recompute cost: ``"flops"`` (deterministic), ``"time"`` (measured forward time),
            ``"auto"``: time on CUDA, FLOPs elsewhere.
        selective: allow selective checkpointing (keep matmul/attention outputs, recompute the
            cheap ops) per block; ``"auto"``: on when the memory source measures the whole device
            (CUDA). Not with the saved-activation meter, which does not see its cache.
        offload: allow offloading blocks' activations to pinned host memory (CUDA only).
        max_retries: out-of-memory retries of one batch before giving up.
        oom_backoff: after an out-of-memory error the bucket's usable budget is multiplied by
            this (sticky: relaxing never undoes it).
        use_reentrant: use reentrant checkpointing (refused with a frozen base, see below).
        log_every_n_steps: log the per-step metrics every this many steps (through the trainer's
            loggers, as ``adaptive_ckpt/*``); ``0``: never.
        verbose: print plan changes (rank zero).

    Attributes:
        plan: the current :class:`~lightning_peft.checkpointing.Plan` (modes per block).
        history: per-step records (bucket, modes, predicted and measured peak, recompute
            fraction, events).
    """

    def __init__(
        self,
        budget: int | float | str | None = None,
        mode: StaticMode = "adaptive",
        k: int = 2,
        blocks: str | list[str] | None = None,
        memory_source: Literal["auto", "cuda", "saved_tensors"] | MemorySource = "auto",
        headroom: float = 0.05,
        hysteresis: float = 0.1,
        relax_after: int = 20,
        shape_bucket: int | None = None,
        cost: Literal["auto", "flops", "time"] = "auto",
        selective: bool | Literal["auto"] = "auto",
        offload: bool = False,
        max_retries: int = 3,
        oom_backoff: float = 0.85,
        use_reentrant: bool = False,
        log_every_n_steps: int = 1,
        verbose: bool = True,
    ) -> None:
        self._budget_value = parse_budget(budget)
        check_choice("mode", mode, ("adaptive", "none", "all", "every_k", "first_k"))
        if mode == "adaptive" and budget is None:
            raise InvalidArgumentError("budget", "mode='adaptive' needs a budget, e.g. budget='8GiB' or budget=0.5 (of device memory)")
        check_int("k", k, low=1 if mode == "every_k" else 0)
        if blocks is not None and not isinstance(blocks, str):
            check_str_list("blocks", blocks)
        elif isinstance(blocks, str):
            check_str("blocks", blocks)
        check_float("headroom", headroom, 0.0, 1.0, high_open=True)
        check_float("hysteresis", hysteresis, 0.0, 1.0, high_open=True)
        check_int("relax_after", relax_after, low=1)
        check_int("shape_bucket", shape_bucket, low=1, allow_none=True)
        check_choice("cost", cost, ("auto", "flops", "time"))
        if selective != "auto":
            check_bool("selective", selective)
        check_bool("offload", offload)
        check_int("max_retries", max_retries, low=0)
        check_float("oom_backoff", oom_backoff, 0.0, 1.0, low_open=True, high_open=True)
        check_bool("use_reentrant", use_reentrant)
        check_int("log_every_n_steps", log_every_n_steps, low=0)  # 0: never
        check_bool("verbose", verbose)
        if not (isinstance(memory_source, MemorySource) or (isinstance(memory_source, str) and memory_source in ("auto", "cuda", "saved_tensors"))):
            raise InvalidArgumentTypeError(
                "memory_source", f"memory_source must be 'auto', 'cuda', 'saved_tensors' or a MemorySource, got {memory_source!r}"
            )
        self.budget = budget
        self.mode = mode
        self.k = k
        self.blocks = blocks
        self.memory_source = memory_source
        self.headroom = headroom
        self.hysteresis = hysteresis
        self.relax_after = relax_after
        self.shape_bucket = shape_bucket
        self.cost = cost
        self.selective = selective
        self.offload = offload
        self.max_retries = max_retries
        self.oom_backoff = oom_backoff
        self.use_reentrant = use_reentrant
        self.log_every_n_steps = log_every_n_steps
        self.verbose = verbose

        self.budget_bytes: int | None = None
        self.schedule: BlockSchedule | None = None
        self.block_paths: list[str] = []
        self.history: list[dict[str, Any]] = []
        self.counters = {"steps": 0, "profiles": 0, "tightenings": 0, "relaxations": 0, "oom_retries": 0}
        self._blocks: list[nn.Module] = []
        self._source: MemorySource | None = None
        self._buckets: dict[str, _Bucket] = {}
        self._key: str | None = None
        self._profiling = False
        self._plan_used: tuple[str, ...] | None = None
        self._offset_used = 0.0
        self._loaded: dict[str, Any] | None = None
        self._retry_undo: list[Callable[[], None]] = []
        self._cost_kind: Literal["flops", "time"] = "flops"
        self._allowed: tuple[str, ...] = ("none", "checkpoint")
        self._bandwidth = 0.0
        self._oom_in_step = False
        self._batch_size = 0
        self._step_t0 = 0.0
        self._aux_meter: SavedTensorMeter | None = None
        self._warned_floor = False

    # ------------------------------------------------------------------------------------------
    # public read-outs
    # ------------------------------------------------------------------------------------------
    @property
    def plan(self) -> Plan | None:
        """The plan of the current shape bucket."""
        if self._key is None:
            return None
        return self._buckets[self._key].plan if self._key in self._buckets else None

    @property
    def modes(self) -> list[str]:
        """The modes in force for the current step (one per block)."""
        return list(self.schedule.modes) if self.schedule is not None else []

    @property
    def checkpointed_blocks(self) -> list[int]:
        return [i for i, m in enumerate(self.modes) if m in ("checkpoint", "selective")]

    @property
    def offloaded_blocks(self) -> list[int]:
        return [i for i, m in enumerate(self.modes) if m == "offload"]

    # ------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After configure_model, the strategy's wrapping and adapter injection: the blocks exist
        # and parameters are frozen or not as they will train.
        found = find_blocks(pl_module, self.blocks)
        self.block_paths = [path for path, _ in found]
        self._blocks = [block for _, container in found for block in container]
        self._prepare_models(pl_module)
        if self.use_reentrant:
            frozen = [name for b in self._blocks for name, p in b.named_parameters() if not p.requires_grad]
            if frozen:
                raise ValueError(
                    "use_reentrant=True is refused with a frozen base: reentrant checkpointing only back-propagates "
                    "into a checkpointed block when one of its tensor inputs requires grad, and with frozen "
                    "embeddings none does, so adapter weights inside the blocks would silently get no gradient "
                    "('element 0 of tensors does not require grad'). Frozen parameters found, e.g. "
                    f"{frozen[:3]}. Use use_reentrant=False (the default)."
                )
        self.schedule = wrap_blocks(self._blocks)
        self.schedule.use_reentrant = self.use_reentrant

        device = pl_module.device
        self._source = self._make_source(device)
        total = self._source.total_bytes()
        self.budget_bytes = self._resolve_budget(total)
        self._cost_kind = ("time" if device.type == "cuda" else "flops") if self.cost == "auto" else self.cost
        allowed = ["none", "checkpoint"]
        selective = self.selective
        if selective == "auto":
            # Measured on an H200 (docs/adaptive_checkpointing.md): selective checkpointing's
            # per-op dispatch overhead outweighs its savings on LoRA models, whose saved
            # activations are already mostly matmul outputs. Opt in with selective=True.
            selective = False
        elif selective and self._source.activation_only:
            raise ValueError(
                "selective=True needs a memory source that measures the whole device (CUDA): the saved-activation "
                "meter cannot see what selective checkpointing caches; use selective=False on CPU"
            )
        if selective:
            allowed.append("selective")
        if self.offload:
            if device.type != "cuda":
                rank_zero_warn("AdaptiveCheckpointCallback: offload=True needs CUDA; offloading is disabled on "
                               f"{device.type}.")
            else:
                allowed.append("offload")
                self._bandwidth = self._measure_bandwidth(device)
        self._allowed = tuple(allowed)
        self._install_retry(trainer, pl_module)
        if self._loaded is not None:
            self._apply_loaded(self._loaded)
            self._loaded = None
        if self.verbose:
            paths = ", ".join(self.block_paths)
            budget = format_bytes(self.budget_bytes) if self.budget_bytes else "none"
            rank_zero_info(
                f"AdaptiveCheckpointCallback: {len(self._blocks)} blocks in {paths}; mode={self.mode}, "
                f"budget={budget}, memory source={type(self._source).__name__}, modes allowed={list(self._allowed)}"
            )

    def _prepare_models(self, pl_module: nn.Module) -> None:
        for module in pl_module.modules():
            # transformers: our wrapper replaces its gradient checkpointing; caches mutated inside
            # a checkpointed block would be updated twice by the recomputation.
            hf_flag = "is_activation_checkpointing" if hasattr(type(module), "is_activation_checkpointing") else (
                "is_gradient_checkpointing"
            )
            if hasattr(module, "gradient_checkpointing_disable") and getattr(module, hf_flag, False):
                module.gradient_checkpointing_disable()
                rank_zero_warn("AdaptiveCheckpointCallback: disabled transformers' gradient checkpointing "
                               "(this callback decides what is checkpointed).")
            config = getattr(module, "config", None)
            if config is not None and getattr(config, "use_cache", False) and hasattr(module, "generate"):
                config.use_cache = False
            # timm: its own grad_checkpointing wraps all blocks in checkpoint_seq
            if getattr(module, "grad_checkpointing", False) is True and hasattr(module, "set_grad_checkpointing"):
                module.set_grad_checkpointing(False)
                rank_zero_warn("AdaptiveCheckpointCallback: disabled timm's grad_checkpointing "
                               "(this callback decides what is checkpointed).")

    def _make_source(self, device: torch.device) -> MemorySource:
        src = self.memory_source
        if isinstance(src, MemorySource):
            return src
        if src == "cuda" or (src == "auto" and device.type == "cuda"):
            if device.type != "cuda":
                raise ValueError(f"memory_source='cuda' but the model is on {device}")
            return CudaMemorySource(device)
        return SavedTensorSource()

    def _resolve_budget(self, total: int | None) -> int | None:
        if self._budget_value is None:
            return None
        kind, value = self._budget_value
        if kind == "fraction":
            if total is None:
                raise ValueError(
                    f"budget={self.budget!r} is a fraction of device memory, but the memory source "
                    f"({type(self._source).__name__}) knows no device total; give bytes instead, e.g. '64MiB'"
                )
            return int(value * total)
        return int(value)

    @staticmethod
    def _measure_bandwidth(device: torch.device) -> float:
        n = 64 << 20
        src = torch.empty(n, dtype=torch.uint8, device=device)
        dst = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(3):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        return 3 * n / max(time.perf_counter() - t0, 1e-9)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self._source is not None:
            self._source.stop()
        self._stop_aux()
        for undo in reversed(self._retry_undo):
            undo()
        self._retry_undo = []
        if self._blocks:
            unwrap_blocks(self._blocks)
        self._blocks = []

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning does not call callback teardown after an exception: leave the model as we found it
        self.teardown(trainer, pl_module, "fit")

    # ------------------------------------------------------------------------------------------
    # out-of-memory retry
    # ------------------------------------------------------------------------------------------
    def _install_retry(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Make a training step that runs out of memory retry the same batch with more checkpointing.

        Lightning has no retry hook, and an out-of-memory error can happen in forward *or* in
        backward (recomputation transients), so the retry must cover both, and must not run the
        optimizer twice. Design:

        * Automatic optimization: every step's work is a ``Closure`` object (``training_step`` +
          ``zero_grad`` + ``backward``) built by the loop's ``_make_closure``; the optimizer calls
          it (``optimizer_step``) or the loop calls it directly (gradient accumulation). We wrap
          ``_make_closure`` so each closure's body runs in a retry loop. A failed attempt never
          reached ``optimizer.step`` (the closure runs *before* the update), so a retry is exactly
          the step that should have happened: the partial graph is freed, the trainable
          parameters' ``.grad`` are restored to what they were before the attempt (a copy is kept
          only when gradients are being accumulated, i.e. the closure has no ``zero_grad``: a
          closure that zeroes them before its backward needs none), the plan is tightened and the
          closure runs again on the same batch. ``ClosureResult`` holds the successful attempt.
        * Manual optimization: the LightningModule's ``training_step`` (which calls
          ``manual_backward`` itself) is wrapped the same way. Keep ``optimizer.step()`` after the
          last ``manual_backward`` so that an out-of-memory retry never repeats an update.

        ``_make_closure`` is a private Lightning method (pinned ``lightning<2.7``); if it is missing
        the strategy's ``training_step`` is wrapped instead (forward-only retries) with a warning.
        Logged values (``self.log``) of a failed attempt may be recorded again by the retry.
        Under DDP a retry after a failure *inside backward* cannot be matched by the other ranks'
        gradient all-reduce; keep ``headroom`` so that the budget, not the device, is the limit.
        """
        if pl_module.automatic_optimization:
            loop = trainer.fit_loop.epoch_loop.automatic_optimization
            original = getattr(loop, "_make_closure", None)
            if original is not None:
                def make_closure(*args: Any, **kwargs: Any) -> Any:
                    closure = original(*args, **kwargs)
                    # a closure with a zero_grad clears the gradients before its backward anyway
                    accumulating = getattr(closure, "_zero_grad_fn", None) is None
                    closure.closure = self._retrying(closure.closure, pl_module, keep_grads=accumulating)
                    return closure

                loop._make_closure = make_closure
                self._retry_undo.append(lambda: loop.__dict__.pop("_make_closure", None))
                return
            rank_zero_warn("AdaptiveCheckpointCallback: this Lightning version has no closure factory to wrap; "
                           "out-of-memory retries cover only the forward pass (strategy.training_step).")
            strategy = trainer.strategy
            original_step = strategy.training_step
            # forward only: an attempt never touches the gradients
            strategy.training_step = self._retrying(original_step, pl_module, keep_grads=False)
            self._retry_undo.append(lambda: strategy.__dict__.pop("training_step", None))
        else:
            original_ts = pl_module.training_step
            pl_module.training_step = self._retrying(original_ts, pl_module)
            self._retry_undo.append(lambda: pl_module.__dict__.pop("training_step", None))

    def _retrying(
        self, fn: Callable[..., Any], pl_module: pl.LightningModule, keep_grads: bool = True
    ) -> Callable[..., Any]:
        """``fn`` retried after an out-of-memory error; ``keep_grads``: restore the trainable
        parameters' ``.grad`` to their values before the attempt (a copy taken at every call)."""

        def run(*args: Any, **kwargs: Any) -> Any:
            snapshot = [
                (p, None if p.grad is None else p.grad.detach().clone())
                for p in pl_module.parameters()
                if p.requires_grad
            ] if keep_grads else []
            attempt = 0
            while True:
                message = None
                try:
                    return fn(*args, **kwargs)
                except BaseException as err:  # noqa: BLE001 - re-raised unless it is an OOM we can handle
                    if not _is_oom(err) or self.schedule is None:
                        raise
                    if attempt >= self.max_retries:
                        raise
                    message = f"{type(err).__name__}: {err}"
                # the exception and its frames (holding the partial graph) are gone here
                attempt += 1
                self._recover(pl_module, snapshot, message or "")

        return run

    def _recover(self, pl_module: pl.LightningModule, snapshot: list, message: str) -> None:
        assert self.schedule is not None and self._source is not None
        self._source.stop()
        self._stop_aux()
        gc.collect()
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.empty_cache()
        for p, g in snapshot:
            p.grad = g
        self.counters["oom_retries"] += 1
        self._oom_in_step = True
        current = tuple(self.schedule.modes)
        floor = ("checkpoint",) * len(current)
        new = current
        bucket = self._buckets.get(self._key) if self._key is not None else None
        if self.mode != "adaptive":
            new = floor  # a static plan that ran out of memory: fall back to checkpointing everything
        elif bucket is not None:
            bucket.oom_scale *= self.oom_backoff
            if bucket.profiles is None:
                new = floor
            else:
                bucket.plan = self._plan_for(bucket)  # not strict: the floor plan when nothing fits
                new = bucket.plan.modes
                # a plan that would not lower the predicted peak cannot help: checkpoint everything
                if predict_peak(bucket.profiles, new, bucket.pre, bucket.post) >= predict_peak(
                    bucket.profiles, current, bucket.pre, bucket.post
                ):
                    new = floor
                if new == floor:
                    bucket.plan = self._make_plan(bucket, floor)
        if new == current:
            raise torch.OutOfMemoryError(
                f"AdaptiveCheckpointCallback: out of memory with every block already checkpointed ({message}). "
                "Use a smaller batch or sequence length."
            )
        if self.verbose:
            rank_zero_info(
                f"AdaptiveCheckpointCallback: out of memory ({message.splitlines()[0][:200]}); retrying the same batch "
                f"with blocks {[i for i, m in enumerate(new) if m != 'none']} checkpointed/offloaded"
            )
        self.schedule.set_modes(new)
        self._plan_used = new
        self.schedule.begin_step(self._profiling)
        self._start_measuring(pl_module)

    # ------------------------------------------------------------------------------------------
    # per step
    # ------------------------------------------------------------------------------------------
    def _bucket_shape(self, trainer: pl.Trainer, shape: list[list[int]]) -> list[list[int]]:
        """The plan-cache shape of a batch whose tensors have ``shape`` (rounded, max over ranks)."""
        q = self.shape_bucket
        if q:
            shape = [[s[0], *[-(-d // q) * q for d in s[1:]]] if s else s for s in shape]
        if trainer.world_size > 1:
            flat = [float(d) for s in shape for d in s]
            if flat:
                reduced = self._all_reduce_max(trainer, flat)
                it = iter(int(v) for v in reduced)
                shape = [[next(it) for _ in s] for s in shape]
        return shape

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        assert self.schedule is not None and self._source is not None
        actual = _tensor_shapes(batch)
        self._batch_size = actual[0][0] if actual and actual[0] else 0
        shape = self._bucket_shape(trainer, actual)
        key = "|".join("x".join(str(d) for d in s) for s in shape) or "-"
        self._key = key
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(shape=shape)
            ceiling, real = _numel(shape), _numel(actual)
            bucket.scale = ceiling / real if self.shape_bucket and real else 1.0
        n = len(self._blocks)
        self._profiling = False
        if self.mode != "adaptive":
            modes = static_modes(self.mode, n, self.k)
        elif bucket.profiles is None:
            # first visit: profile; run the plan of a profiled larger shape, else checkpoint all
            self._profiling = True
            modes = ("checkpoint",) * n
            donors = [b for b in self._buckets.values() if b.plan is not None and _dominates(b.shape, shape)]
            if donors:
                modes = min(donors, key=lambda b: _numel(b.shape)).plan.modes  # type: ignore[union-attr]
        else:
            at_boundary = batch_idx % max(trainer.accumulate_grad_batches, 1) == 0
            if bucket.pending_relax and at_boundary:
                self._relax(bucket)
            if bucket.plan is None:
                bucket.plan = self._plan_for(bucket)
            modes = bucket.plan.modes
        self.schedule.set_modes(modes)
        self._plan_used = tuple(modes)
        self._offset_used = bucket.offset
        self._oom_in_step = False
        self.schedule.begin_step(self._profiling)
        self._step_t0 = time.perf_counter()
        self._start_measuring(pl_module)

    def _start_measuring(self, pl_module: nn.Module) -> None:
        assert self._source is not None
        self._stop_aux()
        self._source.start(pl_module)
        if self._profiling and self._source.meter() is None:
            # profile steps on a whole-device source (CUDA) also run the saved-activation meter:
            # it measures the bytes saved before/after the blocks and recomputation transients
            # detached aliases: a graph abandoned by an out-of-memory error must not leak
            self._aux_meter = SavedTensorMeter(pl_module, detach=True).__enter__()

    def _stop_aux(self) -> None:
        if self._aux_meter is not None:
            self._aux_meter.__exit__(None, None, None)
            self._aux_meter = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        assert self.schedule is not None and self._source is not None and self._key is not None
        source = self._source
        meter = source.meter() or self._aux_meter
        source.stop()
        self._stop_aux()
        bucket = self._buckets[self._key]
        measured = float(source.peak_bytes())
        oom = float(self._oom_in_step)
        measured, oom = self._all_reduce_max(trainer, [measured, oom])
        self.counters["steps"] += 1
        events: list[str] = []
        if oom:
            events.append("oom-retry")
        if self._profiling:
            profiles = self.schedule.finish_profiles()
            if profiles is not None:
                pre = self.schedule.pre_bytes
                post = 0
                if meter is not None:
                    post = max(meter.forward_peak_bytes - self.schedule.last_exit_live, 0)
                profiles, pre, post = self._reduce_profiles(trainer, profiles, pre, post)
                for p in profiles:
                    p.offload_bandwidth = self._bandwidth
                if bucket.scale != 1.0:
                    profiles = [self._scaled(p, bucket.scale) for p in profiles]
                    pre, post = int(pre * bucket.scale), int(post * bucket.scale)
                bucket.profiles, bucket.pre, bucket.post = profiles, pre, post
                self.counters["profiles"] += 1
                events.append("profile")
        elif bucket.profiles is not None and source.activation_only:
            # the meter also observes recomputation transients; keep the largest seen
            changed = False
            for i, seen in enumerate(self.schedule.observed_transient):
                if seen > bucket.profiles[i].recompute_peak:
                    bucket.profiles[i].recompute_peak = seen
                    changed = True
            if changed and self.mode == "adaptive":
                bucket.plan = None  # re-plan with the larger transients before the next step

        predicted = float("nan")
        modes_used = self._plan_used or tuple(self.schedule.modes)
        fraction = sum(m != "none" for m in modes_used) / max(len(modes_used), 1)
        if bucket.profiles is not None:
            used = self._make_plan(bucket, modes_used)
            activation = used.predicted_peak
            predicted = activation + self._offset_used
            if used.full_cost > 0:
                fraction = used.recompute_fraction
            observed_offset = measured - activation
            bucket.recent_offsets.append(observed_offset)
            if self.mode == "adaptive":
                events += self._decide(bucket, measured, observed_offset, first=("profile" in events))

        record = {
            "step": trainer.global_step,
            "batch_idx": batch_idx,
            "bucket": self._key,
            "modes": list(modes_used),
            "checkpointed": [i for i, m in enumerate(modes_used) if m in ("checkpoint", "selective")],
            "offloaded": [i for i, m in enumerate(modes_used) if m == "offload"],
            "predicted_peak_bytes": predicted,
            "measured_peak_bytes": measured,
            "budget_bytes": self.budget_bytes,
            "recompute_fraction": fraction,
            "recomputed_blocks": sum(1 for c in self.schedule.recomputed if c),
            "step_time_s": time.perf_counter() - self._step_t0,
            "events": events,
        }
        self.history.append(record)
        if len(self.history) > 100_000:
            del self.history[: len(self.history) - 100_000]
        if self.log_every_n_steps and self.counters["steps"] % self.log_every_n_steps == 0:
            metrics = {
                "adaptive_ckpt/predicted_peak_bytes": predicted,
                "adaptive_ckpt/measured_peak_bytes": measured,
                "adaptive_ckpt/recompute_fraction": fraction,
                "adaptive_ckpt/checkpointed_blocks": float(len(record["checkpointed"])),
                "adaptive_ckpt/offloaded_blocks": float(len(record["offloaded"])),
            }
            if self.budget_bytes:
                metrics["adaptive_ckpt/budget_bytes"] = float(self.budget_bytes)
            metrics = {k: v for k, v in metrics.items() if not math.isnan(v)}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def _decide(self, bucket: _Bucket, measured: float, observed_offset: float, first: bool) -> list[str]:
        """Update the bucket's offset and plan from one measured peak (identical on all ranks)."""
        assert self.budget_bytes is not None
        events: list[str] = []
        limit = self.budget_bytes * (1 - self.headroom) * bucket.oom_scale
        old = bucket.plan.modes if bucket.plan is not None else None
        if first or bucket.calibrating:
            # activation-only meters are exact up to recomputation temporaries: never go below 0
            bucket.offset = max(observed_offset, 0.0)
            calibrate = first and not self._source_activation_only()
            try:
                bucket.plan = self._plan_for(bucket, strict=True)
                bucket.calibrating = False
            except BudgetTooSmallError:
                if not calibrate:
                    raise
                # A whole-device source measured the profile step, whose side forwards and
                # meters may cost a little extra: confirm with one plain all-checkpointed step
                # before declaring the budget infeasible.
                bucket.calibrating = True
                bucket.plan = self._make_plan(bucket, ("checkpoint",) * len(bucket.profiles or []))
                events.append("calibrate")
        elif measured > limit:
            floor_plan = bucket.plan is not None and all(m == "checkpoint" for m in bucket.plan.modes)
            if floor_plan and not self._warned_floor:
                self._warned_floor = True
                rank_zero_warn(
                    f"AdaptiveCheckpointCallback[{self._key}]: measured peak {format_bytes(measured)} exceeds the "
                    f"budget's limit {format_bytes(limit)} with every block checkpointed; use a smaller batch."
                )
            bucket.offset = max(bucket.offset, observed_offset) + 0.01 * self.budget_bytes
            bucket.plan = self._plan_for(bucket)
            bucket.calm = 0
            self.counters["tightenings"] += 1
            events.append("tighten")
        elif measured < limit * (1 - self.hysteresis):
            bucket.calm += 1
            if bucket.calm >= self.relax_after:
                bucket.pending_relax = True
        else:
            bucket.calm = 0
        if bucket.plan is not None and old != bucket.plan.modes and self.verbose:
            rank_zero_info(f"AdaptiveCheckpointCallback[{self._key}]: {bucket.plan.describe()}")
        return events

    def _source_activation_only(self) -> bool:
        return self._source is not None and self._source.activation_only

    def _relax(self, bucket: _Bucket) -> None:
        bucket.pending_relax = False
        bucket.calm = 0
        recent = list(bucket.recent_offsets)[-self.relax_after :]
        if not recent:
            return
        new_offset = max(max(recent), 0.0)
        if new_offset >= bucket.offset:
            return
        old = bucket.plan
        bucket.offset = new_offset
        bucket.plan = self._plan_for(bucket)
        if old is None or bucket.plan.modes != old.modes:
            self.counters["relaxations"] += 1
            if self.verbose:
                rank_zero_info(f"AdaptiveCheckpointCallback[{self._key}] relaxed: {bucket.plan.describe()}")

    def _plan_for(self, bucket: _Bucket, strict: bool = False) -> Plan:
        """The cheapest plan under the bucket's usable budget. Infeasible: ``strict`` raises
        :class:`BudgetTooSmallError` (with the floor in the budget's units), otherwise the
        all-checkpointed plan is returned (after an overshoot or an out-of-memory error)."""
        assert bucket.profiles is not None and self.budget_bytes is not None
        usable = self.budget_bytes * (1 - self.headroom) * bucket.oom_scale - bucket.offset
        try:
            return plan_blocks(
                bucket.profiles,
                int(usable),
                pre=bucket.pre,
                post=bucket.post,
                allowed=self._allowed,
                cost=self._cost_kind,
                offload_bandwidth=self._bandwidth,
            )
        except BudgetTooSmallError:
            floor_act = min_peak(bucket.profiles, bucket.pre, bucket.post, self._allowed)
            if strict:
                needed = int((floor_act + bucket.offset) / (1 - self.headroom)) + 1
                detail = ""
                if self._batch_size:
                    fits = int(self._batch_size * self.budget_bytes / needed)
                    detail = f" at batch size {self._batch_size}; about {max(fits, 0)} would fit"
                if bucket.offset > 0:
                    detail += f", including {format_bytes(bucket.offset)} measured outside the blocks' activations"
                if self.headroom:
                    detail += f" and {self.headroom:.0%} headroom"
                raise BudgetTooSmallError(self.budget_bytes, needed, detail) from None
            # tightened below the floor after an overshoot/out-of-memory: do the most we can
            return self._make_plan(bucket, tuple(("checkpoint",) * len(bucket.profiles)))

    def _make_plan(self, bucket: _Bucket, modes: tuple[str, ...]) -> Plan:
        assert bucket.profiles is not None
        full = sum(recompute_cost(p, "checkpoint", self._cost_kind) for p in bucket.profiles)
        spent = sum(recompute_cost(p, m, self._cost_kind, offload_bandwidth=self._bandwidth, next_time=p.time)
                    for p, m in zip(bucket.profiles, modes))
        return Plan(tuple(modes), predict_peak(bucket.profiles, modes, bucket.pre, bucket.post), spent, full)

    @staticmethod
    def _scaled(p: BlockProfile, s: float) -> BlockProfile:
        return BlockProfile(
            act_bytes=int(p.act_bytes * s), input_bytes=int(p.input_bytes * s), extra_bytes=int(p.extra_bytes * s),
            flops=p.flops * s, time=p.time * s, sel_bytes=int(p.sel_bytes * s), sel_time=p.sel_time * s,
            recompute_peak=int(p.recompute_peak * s), offload_bandwidth=p.offload_bandwidth,
        )

    # ------------------------------------------------------------------------------------------
    # distributed
    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _all_reduce_max(trainer: pl.Trainer, values: list[float]) -> list[float]:
        """Element-wise maximum over ranks, so that every rank takes the same decision."""
        if trainer.world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return values
        t = torch.tensor(values, dtype=torch.float64, device=trainer.strategy.root_device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return t.tolist()

    def _reduce_profiles(
        self, trainer: pl.Trainer, profiles: list[BlockProfile], pre: int, post: int
    ) -> tuple[list[BlockProfile], int, int]:
        if trainer.world_size <= 1:
            return profiles, pre, post
        flat = [v for p in profiles for v in p.to_list()] + [float(pre), float(post)]
        flat = self._all_reduce_max(trainer, flat)
        width = len(profiles[0].to_list())
        out = [BlockProfile.from_list(flat[i * width : (i + 1) * width]) for i in range(len(profiles))]
        return out, int(flat[-2]), int(flat[-1])

    # ------------------------------------------------------------------------------------------
    # checkpointed state
    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        buckets = {}
        for key, b in self._buckets.items():
            buckets[key] = {
                "shape": [list(s) for s in b.shape],
                "profiles": None if b.profiles is None else [p.to_list() for p in b.profiles],
                "pre": b.pre,
                "post": b.post,
                "scale": b.scale,
                "offset": b.offset,
                "oom_scale": b.oom_scale,
                "plan": None if b.plan is None else list(b.plan.modes),
                "calm": b.calm,
                "calibrating": b.calibrating,
                "recent_offsets": list(b.recent_offsets),
            }
        return {
            "version": 1,
            "num_blocks": len(self._blocks) if self._blocks else None,
            "budget_bytes": self.budget_bytes,
            "buckets": buckets,
            "counters": dict(self.counters),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict)
        if self.schedule is not None:  # already set up: apply now
            self._apply_loaded(self._loaded)
            self._loaded = None

    def _apply_loaded(self, state: dict[str, Any]) -> None:
        n = state.get("num_blocks")
        if n is not None and self._blocks and n != len(self._blocks):
            raise ValueError(
                f"AdaptiveCheckpointCallback state is for {n} blocks but the model has {len(self._blocks)}; "
                "it was saved for a different model"
            )
        self.counters.update(state.get("counters", {}))
        self._buckets = {}
        for key, d in state.get("buckets", {}).items():
            b = _Bucket(shape=[list(s) for s in d["shape"]])
            if d.get("profiles") is not None:
                b.profiles = [BlockProfile.from_list(v) for v in d["profiles"]]
            b.pre, b.post = int(d.get("pre", 0)), int(d.get("post", 0))
            b.scale = float(d.get("scale", 1.0))
            b.offset = float(d.get("offset", 0.0))
            b.oom_scale = float(d.get("oom_scale", 1.0))
            b.calm = int(d.get("calm", 0))
            b.calibrating = bool(d.get("calibrating", False))
            b.recent_offsets.extend(d.get("recent_offsets", []))
            if d.get("plan") is not None and b.profiles is not None:
                modes = tuple(d["plan"])
                if all(m in MODES for m in modes) and len(modes) == len(b.profiles):
                    b.plan = self._make_plan(b, modes) if self._blocks else None
            self._buckets[key] = b
