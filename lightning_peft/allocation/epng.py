"""EPnG (expert prune-and-grow): the per-cycle rank plan over the experts of MoE layers.

Pure arithmetic on ranks and importance; ``ExpertImportanceCallback`` measures the importance
and applies the plan through the layers' ``prune_expert`` / ``grow_expert``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Unit = tuple[int, int]  # (layer, expert)


def _count(fraction: float, active: int) -> int:
    """How many of ``active`` experts a ``fraction`` selects (at least one; none of a single one)."""
    return 0 if fraction <= 0 else max(1, int(fraction * active)) if active > 1 else 0


def _prune(
    new: list[list[int]],
    by_importance: list[Unit],
    grow: list[Unit],
    costs: Sequence[int],
    min_active: Sequence[int],
    n_prune: int,
    headroom: int,
) -> None:
    """Set the least important experts' ranks to 0 in place, at most ``n_prune``, never a growing
    one nor below ``min_active`` per layer, and stop once the freed parameters reach ``headroom``
    (what the growing experts can still absorb beyond the slack)."""
    active_per_layer = [sum(1 for r in layer if r > 0) for layer in new]
    freed = pruned = 0
    for l, e in by_importance:
        if pruned >= n_prune or freed >= headroom:
            break
        if (l, e) in grow or active_per_layer[l] - 1 < min_active[l]:
            continue
        freed += new[l][e] * costs[l]
        new[l][e] = 0
        active_per_layer[l] -= 1
        pruned += 1


def _grow(new: list[list[int]], grow: list[Unit], costs: Sequence[int], limits: Sequence[int], available: int) -> None:
    """Spend ``available`` parameters on the growing experts in place: equal rank increments
    first (capped at ``limits``), then one rank at a time in importance order."""
    step = available // sum(costs[l] for l, _ in grow)
    for l, e in grow:
        add = min(step, limits[l] - new[l][e])
        new[l][e] += add
        available -= add * costs[l]
    progress = True
    while progress:
        progress = False
        for l, e in grow:
            if new[l][e] < limits[l] and costs[l] <= available:
                new[l][e] += 1
                available -= costs[l]
                progress = True


def plan_prune_grow(
    importance: Sequence[torch.Tensor],
    ranks: Sequence[Sequence[int]],
    costs: Sequence[int],
    limits: Sequence[int],
    budget: int,
    prune_fraction: float,
    grow_fraction: float,
    min_active: Sequence[int],
) -> list[list[int]]:
    """New ranks for one prune-and-grow cycle over the experts of the given layers.

    Among active experts (``r > 0``), the lowest-importance ``prune_fraction`` are pruned (rank
    0; never below ``min_active[l]`` active experts in layer ``l``) and the top ``grow_fraction``
    grow. Pruning stops once the growing experts could not absorb more freed parameters; the
    freed budget (``budget`` minus what the remaining ranks use) is split into equal rank
    increments over the growing experts, capped at ``limits[l]``, and what is left goes one
    rank at a time in importance order. The result never uses more than ``budget`` parameters
    (``cost[l]`` per rank of an expert of layer ``l``). Ties are broken by (layer, expert), so
    every process computes the same plan from the same importance."""
    new = [list(r) for r in ranks]
    units = [(l, e) for l, r in enumerate(new) for e in range(len(r))]
    imp = {(l, e): float(importance[l][e]) for l, e in units}
    active = [u for u in units if new[u[0]][u[1]] > 0]
    if not active:
        return new
    by_importance = sorted(active, key=lambda u: (imp[u], u))
    grow = [u for u in reversed(by_importance) if new[u[0]][u[1]] < limits[u[0]]][: _count(grow_fraction, len(active))]
    capacity = sum((limits[l] - new[l][e]) * costs[l] for l, e in grow)
    slack = max(0, budget - sum(new[l][e] * costs[l] for l, e in units))
    _prune(new, by_importance, grow, costs, min_active, _count(prune_fraction, len(active)), capacity - slack)
    available = budget - sum(new[l][e] * costs[l] for l, e in units)
    if grow and available > 0:
        _grow(new, grow, costs, limits, available)
    return new
