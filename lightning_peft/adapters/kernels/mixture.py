"""A gated mixture of low-rank experts in one autograd node, dense over the experts, and the
router's logits in another; neither keeps its input when it can be recomputed.

For tokens ``x [T, d_in]``, stacked expert factors ``A [E*R, d_in]`` (expert-major rows),
``B [d_out, E*R]`` (the same column order) and gates ``g [T, E]`` (zero for experts a token
does not use)::

    u = x A^T [T, E*R],    y = (u * g) B^T [T, d_out]       (g broadcast over each expert's R columns)

Dense over the experts: with a handful of thin experts (``E * R`` of a few dozen) two GEMMs
over all of them beat gathering each expert's tokens, and a zero gate contributes exactly
zero, so the result is the top-k mixture's. Backward keeps ``u`` and ``g`` (the gated ``u * g``
is recomputed; autograd's own graph would keep it too) and ``x`` -- unless ``x`` can be
recomputed from tensors its producer already saved (a LayerNorm's input and statistics, a
GELU's input ...; ``kernels.recompute``, as LoRA's node does): then nothing of ``x``'s size is
kept. ``router_logits`` (``x W_r^T``) does the same for the router. Matmuls run in the compute
dtype (autocast's when on, see ``lightning_peft.adapters.dtypes``).
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_peft.adapters.dtypes import compute_dtype
from lightning_peft.adapters.kernels.recompute import cast, input_recipe, replay

__all__ = ["gated_mixture", "router_logits"]


def _keep_input(ctx: Any, x: torch.Tensor, recompute: bool) -> tuple[torch.Tensor, ...]:
    """What backward needs to get ``x`` back: a recipe's tensors, or ``x`` itself."""
    recipe = input_recipe(x) if recompute and not torch.compiler.is_compiling() else None
    ctx.recipe, ctx.x_shape = (None if recipe is None else (recipe[0], recipe[2])), x.shape
    return (x,) if recipe is None else recipe[1]


def _input(ctx: Any, kept: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
    x = kept[0] if ctx.recipe is None else replay(ctx.recipe[0], tuple(kept), ctx.recipe[1])
    return cast(x.reshape(-1, ctx.x_shape[-1]), dtype)


class _GatedMixture(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, gates: torch.Tensor, recompute: bool) -> torch.Tensor:  # type: ignore[override]
        dtype = compute_dtype(x)
        xc, ac, bc = cast(x.reshape(-1, x.shape[-1]), dtype), cast(a, dtype), cast(b, dtype)
        e = gates.shape[-1]
        u = xc @ ac.t()  # [T, E*R]
        g = cast(gates, dtype)
        out = (u.view(u.shape[0], e, -1) * g.unsqueeze(-1)).view_as(u) @ bc.t()
        ctx.save_for_backward(ac, bc, u, g, *_keep_input(ctx, x, recompute))
        ctx.dtypes = (x.dtype, a.dtype, b.dtype, gates.dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        a, b, u, g, *kept = ctx.saved_tensors
        need_x, need_a, need_b, need_g, _ = ctx.needs_input_grad
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
            grad_a = cast(du.t() @ _input(ctx, tuple(kept), u.dtype), ctx.dtypes[1])
        if need_x:
            grad_x = cast(du @ a, ctx.dtypes[0]).view(ctx.x_shape)
        return grad_x, grad_a, grad_b, grad_g, None


class _RouterLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, recompute: bool) -> torch.Tensor:  # type: ignore[override]
        dtype = compute_dtype(x)
        w = cast(weight, dtype)
        ctx.save_for_backward(w, *_keep_input(ctx, x, recompute))
        ctx.dtypes = (x.dtype, weight.dtype)
        return cast(x.reshape(-1, x.shape[-1]), dtype) @ w.t()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        w, *kept = ctx.saved_tensors
        need_x, need_w, _ = ctx.needs_input_grad
        dy = cast(grad_out, w.dtype)
        grad_x = cast(dy @ w, ctx.dtypes[0]).view(ctx.x_shape) if need_x else None
        grad_w = cast(dy.t() @ _input(ctx, tuple(kept), w.dtype), ctx.dtypes[1]) if need_w else None
        return grad_x, grad_w, None


def gated_mixture(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, gates: torch.Tensor, recompute_input: bool = True) -> torch.Tensor:
    """``(x A^T * g) B^T``: ``x [..., d_in]`` (``T`` tokens), ``a [E*R, d_in]``,
    ``b [d_out, E*R]``, ``gates [T, E]`` -> ``[T, d_out]`` in the compute dtype (see the module
    docstring). ``recompute_input``: recompute ``x`` in backward when its producer allows."""
    return _GatedMixture.apply(x, a, b, gates, recompute_input)


def router_logits(x: torch.Tensor, weight: torch.Tensor, recompute_input: bool = True) -> torch.Tensor:
    """``x W_r^T``: ``x [..., d_in]``, ``weight [E, d_in]`` -> ``[T, E]`` in the compute dtype,
    keeping ``x`` for backward only when it cannot be recomputed."""
    return _RouterLogits.apply(x, weight, recompute_input)
