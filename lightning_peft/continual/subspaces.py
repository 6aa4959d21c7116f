"""Principal angles between the subspaces of a library's LoRA adapters (the redundancy diagnostic).

For one module and two adapter entries ``i``, ``j`` with factors ``A_i [r_i, d_in]``, ``B_i [d_out, r_i]``:
the input subspace of ``i`` is ``span(A_i^T)`` (the directions ``A_i`` reads), its output subspace
``span(B_i)``. With orthonormal bases ``Q_i [d, r_i]`` (from an SVD, rank-deficient directions
dropped), the singular values of ``Q_i^T Q_j`` are ``cos theta_1 >= ... >= cos theta_m``,
``m = min(rank_i, rank_j)``: the principal angles ``theta`` (degrees). The overlap is
``mean_k cos^2 theta_k`` in ``[0, 1]`` (1: one subspace contains the other). Two random subspaces
of dimensions ``p <= q`` in ``R^d`` have expected overlap ``q / d`` (``chance``), the baseline to
read the overlap against.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch

__all__ = ["orthonormal_basis", "principal_angles", "subspace_angles"]

_RANK_TOLERANCE = 1e-6  # singular values below this fraction of the largest are no direction


def orthonormal_basis(columns: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis ``[d, rank]`` of the column space of ``columns [d, r]`` (fp64)."""
    u, s, _ = torch.linalg.svd(columns.detach().double(), full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return u[:, :0]
    return u[:, s > _RANK_TOLERANCE * s[0]]


def subspace_angles(first: torch.Tensor, second: torch.Tensor) -> dict[str, Any]:
    """Principal angles between the column spaces of ``first [d, p]`` and ``second [d, q]``:
    ``{"degrees": [...], "overlap": mean cos^2, "chance": max(p, q) / d, "ranks": [p, q]}``
    (``degrees`` empty and ``overlap`` ``None`` when one of them is zero)."""
    q1, q2 = orthonormal_basis(first), orthonormal_basis(second)
    ranks = [q1.shape[1], q2.shape[1]]
    if 0 in ranks:
        return {"degrees": [], "overlap": None, "chance": None, "ranks": ranks}
    cosines = torch.linalg.svdvals(q1.T @ q2).clamp(0.0, 1.0)
    return {
        "degrees": [math.degrees(math.acos(float(c))) for c in cosines],
        "overlap": float((cosines**2).mean()),
        "chance": max(ranks) / first.shape[0],
        "ranks": ranks,
    }


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def principal_angles(library: Any, names: list[str] | None = None) -> dict[str, Any]:
    """Principal angles between every pair of the LoRA adapter entries ``names`` of ``library``
    (an ``AdapterLibrary``; default: every adapter entry), per module the two share.

    Returns ``{"entries": names, "pairs": [{"a", "b", "modules": {module: {"A": ..., "B": ...}},
    "A_overlap", "B_overlap", "A_chance", "B_chance"}], "summary": {"A_overlap", "B_overlap",
    "A_chance", "B_chance", "pairs"}}`` where ``"A"`` / ``"B"`` are :func:`subspace_angles` of the
    input (``A^T``) and output (``B``) subspaces, and overlaps/chances are means over modules, then
    over pairs."""
    from lightning_peft.continual.library_view import adapter_entries

    known = adapter_entries(library)
    if names is None:
        names = known
    names = list(names)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"principal_angles: {unknown} are not LoRA adapter entries of the library; its adapter entries are {known}")
    factors = {n: library.lora_factors(n) for n in names}
    pairs = []
    for a, b in itertools.combinations(names, 2):
        modules = {}
        for module in [m for m in factors[a] if m in factors[b]]:
            (a_i, b_i, _), (a_j, b_j, _) = factors[a][module], factors[b][module]
            modules[module] = {"A": subspace_angles(a_i.T, a_j.T), "B": subspace_angles(b_i, b_j)}
        pair: dict[str, Any] = {"a": a, "b": b, "modules": modules}
        for side in ("A", "B"):
            pair[f"{side}_overlap"] = _mean([m[side]["overlap"] for m in modules.values()])
            pair[f"{side}_chance"] = _mean([m[side]["chance"] for m in modules.values()])
        pairs.append(pair)
    summary: dict[str, Any] = {"pairs": len(pairs)}
    for key in ("A_overlap", "B_overlap", "A_chance", "B_chance"):
        summary[key] = _mean([p[key] for p in pairs])
    return {"entries": names, "pairs": pairs, "summary": summary}
