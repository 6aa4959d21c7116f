"""LoRA's fused autograd node: base and low-rank update in one node that saves only what
backward needs (see ``lightning_peft.adapters.lora`` for the maths and the memory argument)."""

from __future__ import annotations

from typing import Any

import torch

from lightning_peft.adapters.dtypes import compute_dtype
from lightning_peft.adapters.kernels.recompute import cast, input_recipe, layer_norm_grad_a, replay


class LoRAFunction(torch.autograd.Function):
    """``y = [x W^T + b] + s * drop(x) A^T B^T`` on ``x [..., d_in]`` (flattened to ``[N, d_in]``).

    With ``weight=None`` only the update is returned (the caller adds a base it cannot fuse,
    e.g. a bitsandbytes 4-bit layer). Every operand is cast to one compute dtype (autocast's
    when autocast is on) so the matmuls below are unaffected by autocast; few host-side ops,
    because small layers are bound by launch overhead.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scale: float,
        dropout: float,
        recompute_input: bool,
    ) -> torch.Tensor:
        dtype = compute_dtype(x)
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        xc = cast(x2, dtype)
        a, b = cast(lora_a, dtype), cast(lora_b, dtype)
        mask = None
        xd = xc
        if dropout > 0.0:
            mask = torch.empty_like(xc, dtype=torch.bool).bernoulli_(1.0 - dropout)
            xd = xc * mask / (1.0 - dropout)
        u = xd @ a.t()  # [N, r]
        w = None
        if weight is not None:
            w = cast(weight, dtype)
            out = torch.addmm(cast(bias, dtype), xc, w.t()) if bias is not None else xc @ w.t()
            out.addmm_(u, b.t(), alpha=scale)
        else:
            out = (u @ b.t()).mul_(scale)

        base_trains = weight is not None and (weight.requires_grad or (bias is not None and bias.requires_grad))
        # under torch.compile reading grad_fn would break the graph: save the input instead
        recipe = input_recipe(x) if recompute_input and not base_trains and not torch.compiler.is_compiling() else None
        if recipe is None:
            ctx.recipe = None
            input_tensors: tuple[torch.Tensor, ...] = (x,)
        else:
            kind, tensors, extra = recipe
            # a LayerNorm input in fp32 folds into dA's GEMM (no replay); else replay in backward
            if kind == "layer_norm" and mask is None and tensors[0].dtype == torch.float32:
                kind = "layer_norm_fold"
            ctx.recipe = (kind, extra)
            input_tensors = tensors
        ctx.has_weight, ctx.has_mask = w is not None, mask is not None
        ctx.scale, ctx.dropout, ctx.dtype, ctx.x_dtype, ctx.x_shape = scale, dropout, dtype, x.dtype, x.shape
        ctx.param_dtypes = (lora_a.dtype, lora_b.dtype)
        ctx.save_for_backward(u, a, b, *((w,) if w is not None else ()), *((mask,) if mask is not None else ()), *input_tensors)
        return out if x.dim() == 2 else out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        u, a, b, *rest = ctx.saved_tensors
        w = rest.pop(0) if ctx.has_weight else None
        mask = rest.pop(0) if ctx.has_mask else None
        dtype, scale, recipe = ctx.dtype, ctx.scale, ctx.recipe
        need_x, need_w, need_b, need_a, need_lb = ctx.needs_input_grad[:5]
        dy = grad_out if grad_out.dim() == 2 else grad_out.reshape(-1, grad_out.shape[-1])
        dy = cast(dy, dtype)
        g = dy @ b  # [N, r]: gradient w.r.t. u, before the scale
        grad_x = grad_w = grad_bias = grad_a = grad_lb = None
        if need_x:
            if mask is None and w is not None:
                grad_x = (dy @ w).addmm_(g, a, alpha=scale)
            else:
                grad_x = (g @ a).mul_(scale)
                if mask is not None:
                    grad_x.mul_(mask).div_(1.0 - ctx.dropout)
                if w is not None:
                    grad_x.addmm_(dy, w)
            grad_x = cast(grad_x, ctx.x_dtype).view(ctx.x_shape)
        if need_a or need_w:
            if recipe is not None and recipe[0] == "layer_norm_fold":
                grad_a = layer_norm_grad_a(g, tuple(rest), recipe[1])
            else:
                x = rest[0] if recipe is None else replay(recipe[0], tuple(rest), recipe[1])
                xc = cast(x if x.dim() == 2 else x.reshape(-1, x.shape[-1]), dtype)
                if need_w:
                    grad_w = dy.t() @ xc
                xd = xc if mask is None else xc * mask / (1.0 - ctx.dropout)
                grad_a = g.t() @ xd
            grad_a = cast(grad_a.mul_(scale), ctx.param_dtypes[0]) if need_a else None
        if need_b:
            grad_bias = dy.sum(0)
        if need_lb:
            grad_lb = cast((dy.t() @ u).mul_(scale), ctx.param_dtypes[1])
        return grad_x, grad_w, grad_bias, grad_a, grad_lb, None, None, None


def lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    dropout: float = 0.0,
    recompute_input: bool = True,
) -> torch.Tensor:
    """Functional LoRA on ``x [..., d_in]`` -> ``[..., d_out]`` (see ``LoRAFunction``)."""
    return LoRAFunction.apply(x, weight, bias, lora_a, lora_b, scale, dropout, recompute_input)
