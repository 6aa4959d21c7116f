"""Moved to :mod:`lightning_peft.allocation.rank_ops`; this name keeps old imports working."""

from lightning_peft.allocation.rank_ops import (  # noqa: F401
    RankAdaptive,
    effective_parameters,
    masked,
    full_tensor,
    write_rows,
    zero_slots,
    drop_slots,
    orthogonal_rows,
    slot_generator,
    free_slots,
    check_budget,
)
