"""Moved to :mod:`lightning_peft.allocation.rank_ops`; this name keeps old imports working."""

from lightning_peft.allocation.rank_ops import (  # noqa: F401
    RankAdaptive,
    check_budget,
    drop_slots,
    effective_parameters,
    free_slots,
    full_tensor,
    masked,
    orthogonal_rows,
    slot_generator,
    write_rows,
    zero_slots,
)
