"""Grouped matmuls over expert-sorted rows (``torch.nn.functional.grouped_mm`` where it runs,
an opaque per-expert loop elsewhere), and the sort that groups routed tokens by expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: (kind, device type, dtype) where grouped_mm raised once: the loop is used there from then on
GMM_FAILED: set[tuple[str, str, torch.dtype]] = set()


def gmm_usable(kind: str, x: torch.Tensor) -> bool:
    """Whether ``F.grouped_mm`` runs for ``x`` here (else the loop ops below are used)."""
    if not hasattr(F, "grouped_mm") or (kind, x.device.type, x.dtype) in GMM_FAILED:
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False  # under torch.compile grouped_mm traces in bf16 only: use the opaque loop op
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16  # the CUDA kernels take bf16 only
    return x.device.type == "cpu"


# The fallbacks loop over experts with one host sync (offs.tolist()). As custom ops they are
# opaque to torch.compile (no graph break, no data-dependent guards); our autograd Function
# calls them with gradients off, so they need no autograd formula of their own.
@torch.library.custom_op("lightning_peft::grouped_mm_loop", mutates_args=())
def _grouped_mm_loop(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    out = x.new_zeros(x.shape[0], w.shape[-1])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(x[start:end], w[e], out=out[start:end])
        start = end
    return out


@_grouped_mm_loop.register_fake
def _(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[-1])


@torch.library.custom_op("lightning_peft::grouped_outer_loop", mutates_args=())
def _grouped_outer_loop(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    out = a.new_zeros(offs.shape[0], a.shape[1], b.shape[1])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(a[start:end].t(), b[start:end], out=out[e])
        start = end
    return out


@_grouped_outer_loop.register_fake
def _(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return a.new_empty(offs.shape[0], a.shape[1], b.shape[1])


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``out[rows of e] = x[rows of e] @ w[e]`` for ``x [S, k]`` sorted by expert, ``w [E, k, n]``
    and ``offs [E]`` (int32 cumulative row counts, ``offs[-1] == S``) -> ``[S, n]``."""
    if gmm_usable("mm", x):
        if torch.compiler.is_compiling():
            return F.grouped_mm(x, w, offs=offs)
        try:
            return F.grouped_mm(x, w, offs=offs)
        except RuntimeError:  # shape/alignment the kernel does not take: use the loop from now on
            GMM_FAILED.add(("mm", x.device.type, x.dtype))
    return _grouped_mm_loop(x, w, offs)


def grouped_outer(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``out[e] = a[rows of e]^T @ b[rows of e]`` for ``a [S, m]``, ``b [S, n]`` -> ``[E, m, n]``
    (the per-expert weight gradient)."""
    if gmm_usable("outer", a):
        if torch.compiler.is_compiling():
            return F.grouped_mm(a.t(), b, offs=offs)
        try:
            return F.grouped_mm(a.t(), b, offs=offs)
        except RuntimeError:
            GMM_FAILED.add(("outer", a.device.type, a.dtype))
    return _grouped_outer_loop(a, b, offs)


def sort_by_expert(top_k_index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(perm, expert_ids_sorted, offs)`` for the flattened ``(token, k)`` pairs: row ``i`` of
    the sorted order is pair ``perm[i]`` (token ``perm[i] // K``)."""
    ids = top_k_index.reshape(-1)
    sorted_ids, perm = torch.sort(ids, stable=True)
    # histc, not bincount: no device sync (bincount sizes its output from the data); CPU histc
    # takes floats only, CUDA integers (as transformers' grouped_mm path)
    values = sorted_ids.float() if ids.device.type in ("cpu", "mps") else sorted_ids.int()
    counts = torch.histc(values, bins=num_experts, min=0, max=num_experts - 1)
    return perm, sorted_ids, torch.cumsum(counts, 0).to(torch.int32)
