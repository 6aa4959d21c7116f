"""The checkpointing planner: the least-cost plan under a budget, and the floor (pure torch).

Blocks run forward in order ``0..L-1`` and backward in reverse; the peak of a plan is given by
:func:`~lightning_peft.memory.profiles.predict_peak`. :func:`plan_blocks` finds the plan of least
recompute cost with ``peak <= budget`` exactly (up to a byte quantum rounded up) by dynamic
programming over blocks with the running held bytes as state; :func:`min_peak` is the lowest
peak any plan reaches (a min-max program over the same state).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from lightning_peft.memory.profiles import (
    MODES,
    BlockProfile,
    BudgetTooSmallError,
    Plan,
    held_bytes,
    make_plan,
    recompute_cost,
    transient_bytes,
)

__all__ = ["plan_blocks", "min_peak"]


def min_peak(
    profiles: Sequence[BlockProfile],
    pre: int = 0,
    post: int = 0,
    allowed: Iterable[str] = ("none", "checkpoint"),
    quantum_count: int = 4096,
) -> int:
    """The floor: the lowest predicted peak any plan of the allowed modes reaches.

    Usually "checkpoint everything" (or everything but the last block, whose recompute transient
    equals keeping it). Found by a min-max dynamic program over the running held bytes (rounded
    up to a quantum, so the returned floor is never below the true one by more than a quantum
    per block, and plans at this budget are feasible).
    """
    import numpy as np

    allowed = tuple(dict.fromkeys(("none", *allowed)))
    if not profiles:
        return pre + post
    total = pre + post + sum(max(held_bytes(p, m) + transient_bytes(p, m) for m in allowed) for p in profiles)
    unit = max(1, math.ceil(total / quantum_count))
    hmax = total // unit + 1
    inf = math.inf
    best = np.full(hmax + 1, inf)  # minimal peak so far for each running held amount
    best[0] = 0.0
    idx = np.arange(hmax + 1)
    for p in profiles:
        nxt = np.full(hmax + 1, inf)
        for m in allowed:
            hu = -(-held_bytes(p, m) // unit)
            tu = -(-transient_bytes(p, m) // unit)
            if hu > hmax:
                continue
            src = best[: hmax + 1 - hu]
            h_new = idx[: hmax + 1 - hu] + hu
            event = (pre / unit + h_new + tu) if tu else np.zeros_like(src)
            cand = np.maximum(src, event)
            cur = nxt[hu:]
            np.minimum(cur, cand, out=cur)
        best = nxt
    final = np.maximum(best, pre / unit + idx + post / unit)
    return int(math.ceil(float(final.min()) * unit))


def plan_blocks(
    profiles: Sequence[BlockProfile],
    budget: int,
    *,
    pre: int = 0,
    post: int = 0,
    allowed: Iterable[str] = ("none", "checkpoint"),
    cost: Literal["flops", "time"] = "flops",
    offload_bandwidth: float = 0.0,
    quantum_count: int = 4096,
) -> Plan:
    """Least-cost plan whose :func:`predict_peak` is at most ``budget``.

    Dynamic programming over blocks in forward order; the state is the running held bytes
    ``H = sum_{i<j} h_i`` in quanta of ``(budget - pre) / quantum_count`` (every block's bytes
    rounded *up*, so the true peak of the returned plan is never above the budget). Choosing
    mode ``m`` for block ``j`` moves ``H -> H + h_j(m)`` at cost ``cost_j(m)`` and is allowed
    only if ``pre + H + h_j(m) + t_j(m) <= budget``; at the end ``pre + post + H <= budget``.
    Among equal costs the plan with the smaller held bytes wins.

    Raises:
        BudgetTooSmallError: no plan fits (the message names the all-checkpointed floor).
    """
    import numpy as np

    allowed = _allowed_modes(allowed)
    cap = budget - pre
    final_cap = budget - pre - post
    if not profiles:
        if final_cap < 0:
            raise BudgetTooSmallError(budget, pre + post)
        return Plan((), pre + post, 0.0, 0.0)
    if final_cap < 0:
        raise BudgetTooSmallError(budget, min_peak(profiles, pre, post, allowed))
    unit = max(1, math.ceil(cap / quantum_count))
    best, choice = _least_cost_table(profiles, allowed, cost, offload_bandwidth, unit, cap // unit)
    final = best[: final_cap // unit + 1]
    if not np.isfinite(final).any():
        raise BudgetTooSmallError(budget, max(min_peak(profiles, pre, post, allowed), budget + 1))
    min_cost = final.min()
    h = int(np.flatnonzero(final <= min_cost + 1e-9 * max(1.0, abs(min_cost)))[0])
    modes: list[str] = []
    for j in range(len(profiles) - 1, -1, -1):  # backtrack from the cheapest final state
        m = allowed[int(choice[j, h])]
        modes.append(m)
        h -= -(-held_bytes(profiles[j], m) // unit)
    modes.reverse()
    return make_plan(profiles, modes, pre, post, cost, offload_bandwidth)


def _allowed_modes(allowed: Iterable[str]) -> tuple[str, ...]:
    """The allowed modes, checked, deduplicated, with ``"none"`` always among them."""
    allowed = tuple(dict.fromkeys(allowed))
    for m in allowed:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; expected a subset of {MODES}")
    return allowed if "none" in allowed else ("none", *allowed)


def _least_cost_table(
    profiles: Sequence[BlockProfile],
    allowed: tuple[str, ...],
    cost: Literal["flops", "time"],
    offload_bandwidth: float,
    unit: int,
    hmax: int,
) -> tuple[Any, Any]:
    """The forward pass of :func:`plan_blocks`' dynamic program.

    Returns ``best[H]`` (least cost of a plan of all blocks holding ``H`` quanta, ``inf`` when none
    fits) and ``choice[j, H]`` (the index in ``allowed`` of block ``j``'s mode on the way to ``H``).
    """
    import numpy as np

    n = len(profiles)
    best = np.full(hmax + 1, math.inf)
    best[0] = 0.0
    choice = np.full((n, hmax + 1), -1, dtype=np.int8)
    for j, p in enumerate(profiles):
        nxt = np.full(hmax + 1, math.inf)
        next_time = profiles[j + 1].time if j + 1 < n else p.time  # as in plan_cost
        for mi, m in enumerate(allowed):
            c = recompute_cost(p, m, cost, offload_bandwidth=offload_bandwidth, next_time=next_time)
            if not math.isfinite(c):
                continue
            hu = -(-held_bytes(p, m) // unit)
            tu = -(-transient_bytes(p, m) // unit)
            limit = hmax - hu - tu  # largest H before this block
            if limit < 0:
                continue
            cand = best[: limit + 1] + c
            cur = nxt[hu : hu + limit + 1]
            better = cand * (1 + 1e-12) < cur
            cur[better] = cand[better]
            choice[j, hu : hu + limit + 1][better] = mi
        best = nxt
    return best, choice
