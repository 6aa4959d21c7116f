"""LoRA's fused autograd node: base and low-rank update in one node that saves only what
backward needs (see ``lightning_peft.adapters.lora`` for the maths and the memory argument)."""

from __future__ import annotations

from typing import Any

import torch

from lightning_peft.adapters.dtypes import compute_dtype
from lightning_peft.adapters.kernels.recompute import cast, input_recipe, layer_norm_grad_a, replay

_is_any_autocast_enabled = torch._C._is_any_autocast_enabled  # one global flag read


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
        # host cost matters here (small layers are bound by it): one cheap global check instead
        # of a per-device autocast query, torch.mm/addmm (not the heavier matmul), no cast calls
        # for tensors already in the compute dtype, ctx state in one tuple
        dtype = compute_dtype(x) if _is_any_autocast_enabled() else x.dtype
        x_shape = x.shape
        x2 = x if len(x_shape) == 2 else x.reshape(-1, x_shape[-1])
        xc = x2 if x2.dtype == dtype else x2.to(dtype)
        a = lora_a if lora_a.dtype == dtype else lora_a.to(dtype)
        b = lora_b if lora_b.dtype == dtype else lora_b.to(dtype)
        mask = None
        if dropout > 0.0:
            mask = torch.empty_like(xc, dtype=torch.bool).bernoulli_(1.0 - dropout)
            u = torch.mm(xc * mask / (1.0 - dropout), a.t())  # [N, r]
        else:
            u = torch.mm(xc, a.t())  # [N, r]
        w = None
        if weight is not None:
            w = weight if weight.dtype == dtype else weight.to(dtype)
            if bias is not None:
                out = torch.addmm(bias if bias.dtype == dtype else bias.to(dtype), xc, w.t())
            else:
                out = torch.mm(xc, w.t())
            out.addmm_(u, b.t(), alpha=scale)
            base_trains = weight.requires_grad or (bias is not None and bias.requires_grad)
        else:
            out = torch.mm(u, b.t()).mul_(scale)
            base_trains = False

        # under torch.compile reading grad_fn would break the graph: save the input instead
        recipe = input_recipe(x) if recompute_input and not base_trains and not torch.compiler.is_compiling() else None
        if recipe is None:
            input_tensors: tuple[torch.Tensor, ...] = (x,)
        else:
            kind, input_tensors, extra = recipe
            # a LayerNorm input in fp32 folds into dA's GEMM (no replay); else replay in backward
            if kind == "layer_norm" and mask is None and input_tensors[0].dtype == torch.float32:
                kind = "layer_norm_fold"
            recipe = (kind, extra)
        ctx.state = (w is not None, mask is not None, scale, dropout, dtype, x.dtype, x_shape, lora_a.dtype, lora_b.dtype, recipe)
        if w is not None:
            if mask is not None:
                ctx.save_for_backward(u, a, b, w, mask, *input_tensors)
            else:
                ctx.save_for_backward(u, a, b, w, *input_tensors)
        elif mask is not None:
            ctx.save_for_backward(u, a, b, mask, *input_tensors)
        else:
            ctx.save_for_backward(u, a, b, *input_tensors)
        return out if len(x_shape) == 2 else out.view(*x_shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        has_weight, has_mask, scale, dropout, dtype, x_dtype, x_shape, a_dtype, b_dtype, recipe = ctx.state
        u, a, b, *rest = ctx.saved_tensors
        w = rest.pop(0) if has_weight else None
        mask = rest.pop(0) if has_mask else None
        need_x, need_w, need_b, need_a, need_lb = ctx.needs_input_grad[:5]
        dy = grad_out if grad_out.dim() == 2 else grad_out.reshape(-1, grad_out.shape[-1])
        if dy.dtype != dtype:
            dy = dy.to(dtype)
        g = torch.mm(dy, b)  # [N, r]: gradient w.r.t. u, before the scale
        grad_x = grad_w = grad_bias = grad_a = grad_lb = None
        if need_x:
            if mask is None and w is not None:
                grad_x = torch.mm(dy, w).addmm_(g, a, alpha=scale)
            else:
                grad_x = torch.mm(g, a).mul_(scale)
                if mask is not None:
                    grad_x.mul_(mask).div_(1.0 - dropout)
                if w is not None:
                    grad_x.addmm_(dy, w)
            if grad_x.dtype != x_dtype:
                grad_x = grad_x.to(x_dtype)
            if len(x_shape) != 2:
                grad_x = grad_x.view(x_shape)
        if need_a or need_w:
            if recipe is not None and recipe[0] == "layer_norm_fold":
                grad_a = layer_norm_grad_a(g, tuple(rest), recipe[1])
            else:
                x = rest[0] if recipe is None else replay(recipe[0], tuple(rest), recipe[1])
                xc = cast(x if x.dim() == 2 else x.reshape(-1, x.shape[-1]), dtype)
                if need_w:
                    grad_w = torch.mm(dy.t(), xc)
                grad_a = torch.mm(g.t(), xc if mask is None else xc * mask / (1.0 - dropout))
            grad_a = cast(grad_a.mul_(scale), a_dtype) if need_a else None
        if need_b:
            grad_bias = dy.sum(0)
        if need_lb:
            grad_lb = cast(torch.mm(dy.t(), u).mul_(scale), b_dtype)
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
