"""A gated mixture of low-rank experts in one autograd node, dense over the experts.

For tokens ``x [T, d_in]``, stacked expert factors ``A [E*R, d_in]`` (expert-major rows),
``B [d_out, E*R]`` (the same column order) and gates ``g [T, E]`` (zero for experts a token
does not use)::

    u = x A^T [T, E*R],    y = (u * g) B^T [T, d_out]       (g broadcast over each expert's R columns)

Dense over the experts: with a handful of thin experts (``E * R`` of a few dozen) two GEMMs
over all of them beat gathering each expert's tokens, and a zero gate contributes exactly
zero, so the result is the top-k mixture's. Backward keeps ``x``, ``u`` and ``g`` only (the
gated ``u * g`` is recomputed); autograd's own graph would also keep ``u * g``. Matmuls run in
the compute dtype (autocast's when on, see ``lightning_peft.adapters.dtypes``).
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_peft.adapters.dtypes import compute_dtype
from lightning_peft.adapters.kernels.recompute import cast

__all__ = ["gated_mixture"]


class _GatedMixture(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        dtype = compute_dtype(x)
        xc, ac, bc = cast(x, dtype), cast(a, dtype), cast(b, dtype)
        e = gates.shape[-1]
        u = xc @ ac.t()  # [T, E*R]
        g = cast(gates, dtype)
        out = (u.view(u.shape[0], e, -1) * g.unsqueeze(-1)).view_as(u) @ bc.t()
        ctx.save_for_backward(xc, ac, bc, u, g)
        ctx.dtypes = (x.dtype, a.dtype, b.dtype, gates.dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, a, b, u, g = ctx.saved_tensors
        need_x, need_a, need_b, need_g = ctx.needs_input_grad
        t, e = g.shape
        dy = cast(grad_out, u.dtype)
        grad_x = grad_a = grad_b = grad_g = None
        if need_b:
            grad_b = cast(dy.t() @ (u.view(t, e, -1) * g.unsqueeze(-1)).view_as(u), ctx.dtypes[2])
        dgu = (dy @ b).view(t, e, -1)  # gradient w.r.t. u * g
        if need_g:
            grad_g = cast((dgu * u.view(t, e, -1)).sum(-1), ctx.dtypes[3])
        du = (dgu * g.unsqueeze(-1)).view_as(u)
        if need_a:
            grad_a = cast(du.t() @ x, ctx.dtypes[1])
        if need_x:
            grad_x = cast(du @ a, ctx.dtypes[0])
        return grad_x, grad_a, grad_b, grad_g


def gated_mixture(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """``(x A^T * g) B^T``: ``x [T, d_in]``, ``a [E*R, d_in]``, ``b [d_out, E*R]``,
    ``gates [T, E]`` -> ``[T, d_out]`` in the compute dtype (see the module docstring)."""
    return _GatedMixture.apply(x, a, b, gates)
