"""AdaLoRA's budget schedule (Zhang et al., 2023): how many triplets survive at each step.

``init_warmup`` steps at the initial budget ``b0``, then a cubic decrease to the target ``bT``
by ``total_steps - final_warmup``, re-allocating every ``interval`` steps; the target after::

    b(t) = bT + (b0 - bT) * (1 - (t - t_i) / (t_f - t_i))^3,   t_i = init_warmup, t_f = total_steps - final_warmup

``AdaLoRAAllocator`` (``lightning_peft.adapters.adalora``) scores the triplets and prunes to it.
"""

from __future__ import annotations


def cubic_budget(
    step: int, initial: int, target: int, init_warmup: int, final_warmup: int, total_steps: int, interval: int
) -> tuple[int, bool]:
    """``(triplets to keep, whether to re-allocate at this step)`` for ``step``."""
    if step <= init_warmup:
        return initial, False
    end = total_steps - final_warmup
    if step > end:
        return target, True
    progress = 1.0 - (step - init_warmup) / (end - init_warmup)
    return int((initial - target) * progress**3 + target), step % interval == 0
