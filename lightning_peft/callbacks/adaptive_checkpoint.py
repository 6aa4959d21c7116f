"""AdaptiveCheckpointCallback: fit a memory budget with the least recomputation.

See ``docs/adaptive_checkpointing.md`` for the method and measurements. The decisions are made by
the pure-torch :class:`~lightning_peft.memory.CheckpointController`; this callback adapts it to
Lightning:

1. At ``fit`` start the repeated blocks of the LightningModule are found
   (:func:`~lightning_peft.memory.find_blocks`) and made switchable
   (:func:`~lightning_peft.memory.wrap_blocks`, non-reentrant checkpointing); transformers' and
   timm's own checkpointing is switched off (:mod:`~lightning_peft.callbacks.library_checkpointing`).
2. Before each batch the controller picks the modes for the batch's shape bucket (the first
   step of a bucket is a *profile* step); after it, the measured peak (the maximum over ranks,
   ``trainer.strategy.reduce``) goes back to the controller, which tightens or relaxes the plan.
3. An out-of-memory error inside a training step is caught, the plan tightened, and the *same*
   batch run again (:mod:`~lightning_peft.callbacks.oom_retry`).
4. The controller's state (profiles, offsets, plans per bucket) round-trips through
   ``state_dict``/``load_state_dict``, so a resumed run does not profile again.
"""

from __future__ import annotations

import gc
import math
import time
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_peft.callbacks.adaptive_checkpoint_args import StaticMode, check_arguments
from lightning_peft.callbacks.library_checkpointing import disable_library_checkpointing
from lightning_peft.callbacks.oom_retry import install_oom_retry
from lightning_peft.memory import (
    BlockProfile,
    BlockSchedule,
    Bucket,
    CheckpointController,
    ControllerConfig,
    CudaMemorySource,
    MemorySource,
    Plan,
    SavedTensorMeter,
    SavedTensorSource,
    StepOutcome,
    find_blocks,
    format_bytes,
    measure_bandwidth,
    parse_budget,
    round_shape,
    tensor_shapes,
    unwrap_blocks,
    wrap_blocks,
)

__all__ = ["AdaptiveCheckpointCallback", "parse_budget"]


class AdaptiveCheckpointCallback(Callback):
    """Checkpoint (or offload) the fewest, cheapest blocks that keep the peak under a budget.

    Args:
        budget: the memory budget: bytes (``int``), a fraction of the device's total memory
            (``float`` in ``(0, 1]``, needs a source that knows the total, e.g. CUDA), or a string
            (``"2GiB"``, ``"512MB"``, ``"40%"``, or a fraction written as a string, ``"0.5"``).
            NaN, infinities and non-positive sizes are refused (see ``parse_budget``). With the
            saved-activation meter (CPU) the budget is in activation bytes. Required for ``mode="adaptive"``.
        mode: ``"adaptive"`` (plan for the budget) or a static plan for comparison: ``"none"``,
            ``"all"``, ``"every_k"`` (blocks ``0, k, 2k, ...``), ``"first_k"`` (blocks ``0..k-1``),
            ``"offload_first_k"`` (blocks ``0..k-1`` offloaded; CUDA, plain forward elsewhere).
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
        plan: the current :class:`~lightning_peft.memory.Plan` (modes per block).
        controller: the :class:`~lightning_peft.memory.CheckpointController` making the
            decisions (created at ``fit`` start).
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
        check_arguments(locals())
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
        self.controller: CheckpointController | None = None
        self.block_paths: list[str] = []
        self.history: list[dict[str, Any]] = []
        self.counters = {"steps": 0, "profiles": 0, "tightenings": 0, "relaxations": 0, "oom_retries": 0}
        self._blocks: list[nn.Module] = []
        self._source: MemorySource | None = None
        self._loaded: dict[str, Any] | None = None
        self._retry_undo: list = []
        self._allowed: tuple[str, ...] = ("none", "checkpoint")
        self._step_t0 = 0.0
        self._aux_meter: SavedTensorMeter | None = None
        self._pl_module: pl.LightningModule | None = None

    # ------------------------------------------------------------------------------------------
    # public read-outs
    # ------------------------------------------------------------------------------------------
    @property
    def plan(self) -> Plan | None:
        """The plan of the current shape bucket."""
        bucket = self.controller.bucket if self.controller is not None else None
        return bucket.plan if bucket is not None else None

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

    @property
    def _buckets(self) -> dict[str, Bucket]:
        """The controller's shape buckets (read by tests and benchmarks)."""
        return self.controller.buckets if self.controller is not None else {}

    # ------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After configure_model, the strategy's wrapping and adapter injection: the blocks exist
        # and parameters are frozen or not as they will train.
        found = find_blocks(pl_module, self.blocks)
        self.block_paths = [path for path, _ in found]
        self._blocks = [block for _, container in found for block in container]
        disable_library_checkpointing(pl_module, rank_zero_warn)
        self._check_reentrant()
        self.schedule = wrap_blocks(self._blocks)
        self.schedule.use_reentrant = self.use_reentrant
        device = pl_module.device
        self._source = self._make_source(device)
        self.budget_bytes = self._resolve_budget(self._source.total_bytes())
        self._allowed = self._allowed_modes(device)
        self._pl_module = pl_module
        bandwidth = measure_bandwidth(device) if "offload" in self._allowed else 0.0
        previous = self.controller
        self.controller = CheckpointController(
            ControllerConfig(
                num_blocks=len(self._blocks),
                budget_bytes=self.budget_bytes,
                mode=self.mode,
                k=self.k,
                headroom=self.headroom,
                hysteresis=self.hysteresis,
                relax_after=self.relax_after,
                shape_bucket=self.shape_bucket,
                oom_backoff=self.oom_backoff,
                allowed=self._allowed,
                cost_kind=("time" if device.type == "cuda" else "flops") if self.cost == "auto" else self.cost,
                bandwidth=bandwidth,
                activation_only=self._source.activation_only,
                verbose=self.verbose,
            ),
            counters=self.counters,
            info=rank_zero_info,
            warn=rank_zero_warn,
        )
        if previous is not None:  # a second fit with this callback: keep what was learnt
            self.controller.buckets = previous.buckets
        self._retry_undo = install_oom_retry(trainer, pl_module, self._recover, lambda: self.max_retries)
        if self._loaded is not None:
            self.controller.load_state_dict(self._loaded)
            self._loaded = None
        if self.verbose:
            budget = format_bytes(self.budget_bytes) if self.budget_bytes else "none"
            rank_zero_info(
                f"AdaptiveCheckpointCallback: {len(self._blocks)} blocks in {', '.join(self.block_paths)}; "
                f"mode={self.mode}, budget={budget}, memory source={type(self._source).__name__}, "
                f"modes allowed={list(self._allowed)}"
            )

    def _check_reentrant(self) -> None:
        if not self.use_reentrant:
            return
        frozen = [name for b in self._blocks for name, p in b.named_parameters() if not p.requires_grad]
        if frozen:
            raise ValueError(
                "use_reentrant=True is refused with a frozen base: reentrant checkpointing only back-propagates "
                "into a checkpointed block when one of its tensor inputs requires grad, and with frozen "
                "embeddings none does, so adapter weights inside the blocks would silently get no gradient "
                "('element 0 of tensors does not require grad'). Frozen parameters found, e.g. "
                f"{frozen[:3]}. Use use_reentrant=False (the default)."
            )

    def _allowed_modes(self, device: torch.device) -> tuple[str, ...]:
        assert self._source is not None
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
                rank_zero_warn(f"AdaptiveCheckpointCallback: offload=True needs CUDA; offloading is disabled on {device.type}.")
            else:
                allowed.append("offload")
        return tuple(allowed)

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
    # out-of-memory retry (the patch itself is in callbacks/oom_retry.py)
    # ------------------------------------------------------------------------------------------
    def _recover(self, snapshot: list, message: str) -> None:
        """After an out-of-memory attempt: free, restore ``.grad``, tighten, restart measuring."""
        assert self.schedule is not None and self._source is not None and self.controller is not None
        self._source.stop()
        self._stop_aux()
        gc.collect()
        assert self._pl_module is not None
        if torch.cuda.is_available() and self._pl_module.device.type == "cuda":
            torch.cuda.empty_cache()
        for p, g in snapshot:
            p.grad = g
        new = self.controller.after_oom(self.schedule.modes, message)
        if self.verbose:
            rank_zero_info(
                f"AdaptiveCheckpointCallback: out of memory ({message.splitlines()[0][:200]}); retrying the same batch "
                f"with blocks {[i for i, m in enumerate(new) if m != 'none']} checkpointed/offloaded"
            )
        self.schedule.set_modes(new)
        self.schedule.begin_step(self.controller.profiling)
        self._start_measuring(self._pl_module)

    # ------------------------------------------------------------------------------------------
    # per step
    # ------------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        assert self.schedule is not None and self._source is not None and self.controller is not None
        actual = tensor_shapes(batch)
        shape = self._max_shape(trainer, round_shape(actual, self.shape_bucket))
        at_boundary = batch_idx % max(trainer.accumulate_grad_batches, 1) == 0
        modes = self.controller.start_step(shape, actual, at_boundary)
        self.schedule.set_modes(modes)
        self.schedule.begin_step(self.controller.profiling)
        self._step_t0 = time.perf_counter()
        self._start_measuring(pl_module)

    def _start_measuring(self, pl_module: nn.Module) -> None:
        assert self._source is not None and self.controller is not None
        self._stop_aux()
        self._source.start(pl_module)
        if self.controller.profiling and self._source.meter() is None:
            # profile steps on a whole-device source (CUDA) also run the saved-activation meter:
            # it measures the bytes saved before/after the blocks and recomputation transients
            # detached aliases: a graph abandoned by an out-of-memory error must not leak
            self._aux_meter = SavedTensorMeter(pl_module, detach=True).__enter__()

    def _stop_aux(self) -> None:
        if self._aux_meter is not None:
            self._aux_meter.__exit__(None, None, None)
            self._aux_meter = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        assert self.schedule is not None and self._source is not None and self.controller is not None
        source = self._source
        meter = source.meter() or self._aux_meter
        source.stop()
        self._stop_aux()
        measured, oom = self._reduce_max(trainer, [float(source.peak_bytes()), float(self.controller.oom_in_step)])
        profiled = self._collect_profiles(trainer, meter) if self.controller.profiling else None
        outcome = self.controller.end_step(measured, bool(oom), profiled, self.schedule.observed_transient)
        record = self._record(trainer, batch_idx, outcome, measured)
        self.history.append(record)
        if len(self.history) > 100_000:
            del self.history[: len(self.history) - 100_000]
        if self.log_every_n_steps and self.counters["steps"] % self.log_every_n_steps == 0:
            self._log_metrics(trainer, record)

    def _collect_profiles(self, trainer: pl.Trainer, meter: SavedTensorMeter | None) -> tuple[list[BlockProfile], int, int] | None:
        """This profile step's block profiles and pre/post bytes, maximum over ranks (``None``:
        some block did not run)."""
        assert self.schedule is not None
        profiles = self.schedule.finish_profiles()
        if profiles is None:
            return None
        pre, post = self.schedule.pre_bytes, 0
        if meter is not None:
            post = max(meter.forward_peak_bytes - self.schedule.last_exit_live, 0)
        if trainer.world_size <= 1:
            return profiles, pre, post
        flat = self._reduce_max(trainer, [v for p in profiles for v in p.to_list()] + [float(pre), float(post)])
        width = len(profiles[0].to_list())
        out = [BlockProfile.from_list(flat[i * width : (i + 1) * width]) for i in range(len(profiles))]
        return out, int(flat[-2]), int(flat[-1])

    def _record(self, trainer: pl.Trainer, batch_idx: int, outcome: StepOutcome, measured: float) -> dict[str, Any]:
        assert self.schedule is not None and self.controller is not None
        modes = outcome.modes
        return {
            "step": trainer.global_step,
            "batch_idx": batch_idx,
            "bucket": self.controller.key,
            "modes": list(modes),
            "checkpointed": [i for i, m in enumerate(modes) if m in ("checkpoint", "selective")],
            "offloaded": [i for i, m in enumerate(modes) if m == "offload"],
            "predicted_peak_bytes": outcome.predicted,
            "measured_peak_bytes": measured,
            "budget_bytes": self.budget_bytes,
            "recompute_fraction": outcome.fraction,
            "recomputed_blocks": sum(1 for c in self.schedule.recomputed if c),
            "step_time_s": time.perf_counter() - self._step_t0,
            "events": outcome.events,
        }

    def _log_metrics(self, trainer: pl.Trainer, record: dict[str, Any]) -> None:
        metrics = {
            "adaptive_ckpt/predicted_peak_bytes": record["predicted_peak_bytes"],
            "adaptive_ckpt/measured_peak_bytes": record["measured_peak_bytes"],
            "adaptive_ckpt/recompute_fraction": record["recompute_fraction"],
            "adaptive_ckpt/checkpointed_blocks": float(len(record["checkpointed"])),
            "adaptive_ckpt/offloaded_blocks": float(len(record["offloaded"])),
        }
        if self.budget_bytes:
            metrics["adaptive_ckpt/budget_bytes"] = float(self.budget_bytes)
        metrics = {k: v for k, v in metrics.items() if not math.isnan(v)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    # ------------------------------------------------------------------------------------------
    # distributed: every rank must take the same decision
    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _reduce_max(trainer: pl.Trainer, values: list[float]) -> list[float]:
        """Element-wise maximum over ranks (``trainer.strategy.reduce``)."""
        if trainer.world_size <= 1 or not values:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=trainer.strategy.root_device)
        return trainer.strategy.reduce(t, reduce_op="max").tolist()

    def _max_shape(self, trainer: pl.Trainer, shape: list[list[int]]) -> list[list[int]]:
        """The plan-cache shape: the maximum over ranks of the (rounded) batch shape."""
        if trainer.world_size <= 1:
            return shape
        flat = [float(d) for s in shape for d in s]
        reduced = iter(int(v) for v in self._reduce_max(trainer, flat))
        return [[next(reduced) for _ in s] for s in shape]

    # ------------------------------------------------------------------------------------------
    # checkpointed state
    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.controller is None:
            return {"version": 1, "num_blocks": None, "budget_bytes": self.budget_bytes, "buckets": {}, "counters": dict(self.counters)}
        state = self.controller.state_dict()
        state["num_blocks"] = len(self._blocks) if self._blocks else None
        state["budget_bytes"] = self.budget_bytes
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict)
        if self.schedule is not None and self.controller is not None and self._blocks:  # already set up: apply now
            self.controller.load_state_dict(self._loaded)
            self._loaded = None
