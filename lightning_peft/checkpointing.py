"""Compatibility module: the checkpointing names now live in :mod:`lightning_peft.memory`.

``lightning_peft.checkpointing`` was one 867-line module; its parts are ``memory.profiles``
(cost model, ``Plan``), ``memory.planner`` (``plan_blocks``, ``min_peak``), ``memory.switchable``
(``wrap_blocks``, ``BlockSchedule``), ``memory.ops`` and ``memory.offload``. Existing imports
(``from lightning_peft.checkpointing import plan_blocks``) keep working through this re-export.
"""

from lightning_peft.memory.ops import expensive_ops
from lightning_peft.memory.planner import min_peak, plan_blocks
from lightning_peft.memory.profiles import (
    MODES,
    BlockProfile,
    BudgetTooSmallError,
    Mode,
    Plan,
    held_bytes,
    make_plan,
    plan_cost,
    predict_peak,
    recompute_cost,
    static_modes,
    transient_bytes,
)
from lightning_peft.memory.switchable import BlockSchedule, SwitchableBlock, unwrap_blocks, wrap_blocks

__all__ = [
    "MODES",
    "Mode",
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
    "held_bytes",
    "transient_bytes",
    "plan_cost",
    "make_plan",
    "expensive_ops",
]
