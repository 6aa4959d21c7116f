"""Memory: meters, sources, block discovery and the adaptive-checkpointing planner (pure torch).

No Lightning import anywhere in this package; the callback
(:mod:`lightning_peft.callbacks.adaptive_checkpoint`) is a thin adapter around it.

==================  ============================================================================
``meters``          ``SavedTensorMeter``: bytes saved for backward (deterministic, any device)
``sources``         what measures a step's peak: CUDA allocator, the meter, a simulated device
``sizes``           ``parse_bytes``/``format_bytes`` and the budget forms (``parse_budget``)
``blocks``          ``find_blocks``: the repeated blocks of a model
``profiles``        ``BlockProfile``, the cost model (held/transient bytes, recompute cost), ``Plan``
``planner``         ``plan_blocks`` (least cost under a budget) and ``min_peak`` (the floor)
``buckets``         shape buckets and their per-bucket state
``controller``      ``CheckpointController``: profile, plan, tighten/relax with hysteresis, OOM
``ops``             the op profiler (FLOPs, time) and the selective-checkpointing policy
``offload``         pinned-host offloading of saved activations (CUDA)
``switchable``      ``wrap_blocks``: per-block switchable checkpointing (instance ``forward``)
==================  ============================================================================

Every name is re-exported here, so ``from lightning_peft.memory import X`` works for all of them;
:mod:`lightning_peft.checkpointing` keeps the checkpointing names of the old module.
"""

from lightning_peft.memory.blocks import BlockDiscoveryError, block_candidates, find_blocks
from lightning_peft.memory.buckets import Bucket, dominates, largest_numel, round_shape, shape_key, tensor_shapes
from lightning_peft.memory.controller import CheckpointController, ControllerConfig, StepOutcome
from lightning_peft.memory.meters import SavedTensorMeter, current_meter, tensor_leaves
from lightning_peft.memory.offload import measure_bandwidth
from lightning_peft.memory.ops import expensive_ops
from lightning_peft.memory.planner import min_peak, plan_blocks
from lightning_peft.memory.profiles import (
    MODES,
    STATIC_PLANS,
    BlockProfile,
    BudgetTooSmallError,
    Mode,
    Plan,
    StaticPlan,
    held_bytes,
    make_plan,
    plan_cost,
    predict_peak,
    recompute_cost,
    static_modes,
    transient_bytes,
)
from lightning_peft.memory.sizes import format_bytes, parse_budget, parse_bytes
from lightning_peft.memory.sources import CudaMemorySource, MemorySource, SavedTensorSource, SimulatedMemorySource
from lightning_peft.memory.switchable import BlockSchedule, SwitchableBlock, unwrap_blocks, wrap_blocks

__all__ = [
    "SavedTensorMeter",
    "MemorySource",
    "SavedTensorSource",
    "CudaMemorySource",
    "SimulatedMemorySource",
    "current_meter",
    "tensor_leaves",
    "find_blocks",
    "block_candidates",
    "BlockDiscoveryError",
    "parse_bytes",
    "format_bytes",
    "parse_budget",
    "MODES",
    "Mode",
    "STATIC_PLANS",
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
    "plan_blocks",
    "min_peak",
    "expensive_ops",
    "measure_bandwidth",
    "BlockSchedule",
    "SwitchableBlock",
    "wrap_blocks",
    "unwrap_blocks",
    "Bucket",
    "tensor_shapes",
    "round_shape",
    "shape_key",
    "largest_numel",
    "dominates",
    "CheckpointController",
    "ControllerConfig",
    "StepOutcome",
]
