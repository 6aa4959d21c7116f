"""ExpertLoRA's autograd node: one expert projection, base and LoRA update, over
expert-sorted rows, with grouped matmuls only over the routed tokens (no dense per-expert delta)."""

from __future__ import annotations

from typing import Any

import torch

from lightning_peft.adapters.dtypes import compute_dtype
from lightning_peft.adapters.kernels.grouped import grouped_mm, grouped_outer
from lightning_peft.adapters.kernels.recompute import input_recipe, replay


class ExpertLoRAFunction(torch.autograd.Function):
    """One expert projection over expert-sorted rows, base and LoRA update in one node::

        xg  = x[gather]                        [S, d_in]    (x itself when gather is None)
        out = xg W_e^T + s (xg A_e^T) B_e^T    [S, d_out]   per expert e, rows of e only

    ``w_io [E, d_in, d_out]`` (a view of the frozen weight), ``a [E, R, d_in]``,
    ``b [E, d_out, R]`` (already rank-masked). Saved for backward: ``x`` (or nothing new when it
    can be recomputed from its producer's saved tensors), ``gather``, ``u = xg A^T [S, R]`` and
    the small factors.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        gather: torch.Tensor | None,
        offs: torch.Tensor,
        w_io: torch.Tensor,
        a: torch.Tensor | None,
        b: torch.Tensor | None,
        scale: float,
        recompute_input: bool,
    ) -> torch.Tensor:
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(dtype)
            xg = xc[gather] if gather is not None else xc
            w = w_io.to(dtype)
            out = grouped_mm(xg, w, offs)
            u = None
            if a is not None and b is not None:
                ac, bc = a.to(dtype), b.to(dtype)
                u = grouped_mm(xg, ac.transpose(1, 2), offs)  # [S, R]
                out.add_(grouped_mm(u, bc.transpose(1, 2), offs), alpha=scale)
            else:
                ac = bc = None
        needs_x_later = (a is not None and a.requires_grad) or w_io.requires_grad
        # (dynamo cannot trace grad_fn inspection: compiled graphs save x, their own memory planning applies)
        recipe = input_recipe(x) if recompute_input and needs_x_later and not torch.compiler.is_compiling() else None
        if not needs_x_later:
            ctx.recipe, inputs = None, ()
        elif recipe is None:
            ctx.recipe, inputs = None, (x,)
        else:
            ctx.recipe, inputs = (recipe[0], recipe[2]), recipe[1]
        ctx.has_x = needs_x_later
        ctx.has_gather, ctx.has_lora = gather is not None, u is not None
        ctx.scale, ctx.dtype, ctx.x_dtype, ctx.x_shape = scale, dtype, x.dtype, x.shape
        ctx.param_dtypes = (None if a is None else a.dtype, None if b is None else b.dtype, w_io.dtype)
        tensors = [offs, w_io]
        if gather is not None:
            tensors.append(gather)
        if u is not None:
            tensors += [u, ac, bc]
        ctx.save_for_backward(*tensors, *inputs)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        saved = list(ctx.saved_tensors)
        offs, w_io = saved.pop(0), saved.pop(0)
        gather = saved.pop(0) if ctx.has_gather else None
        u = a = b = None
        if ctx.has_lora:
            u, a, b = saved.pop(0), saved.pop(0), saved.pop(0)
        x = None
        if ctx.has_x:
            x = saved[0] if ctx.recipe is None else replay(ctx.recipe[0], tuple(saved), ctx.recipe[1])
        need_x, _, _, need_w, need_a, need_b = ctx.needs_input_grad[:6]
        dtype, scale = ctx.dtype, ctx.scale
        grad_x = grad_w = grad_a = grad_b = None
        with torch.autocast(grad_out.device.type, enabled=False):
            dy = grad_out.to(dtype).contiguous()
            g = None
            if u is not None:
                g = grouped_mm(dy, b, offs).mul_(scale)  # [S, R]
            if need_x:
                dxg = grouped_mm(dy, w_io.to(dtype).transpose(1, 2), offs)
                if g is not None:
                    dxg.add_(grouped_mm(g, a, offs))
                if gather is not None:
                    grad_x = torch.zeros(ctx.x_shape, dtype=dtype, device=dy.device).index_add_(0, gather, dxg)
                else:
                    grad_x = dxg
                grad_x = grad_x.to(ctx.x_dtype)
            if need_a or need_b or need_w:
                xg = None
                if x is not None:
                    xc = x.to(dtype)
                    xg = xc[gather] if gather is not None else xc
                if need_a and g is not None:
                    grad_a = grouped_outer(g, xg, offs).to(ctx.param_dtypes[0])
                if need_b and u is not None:
                    grad_b = grouped_outer(dy, u, offs).mul_(scale).to(ctx.param_dtypes[1])
                if need_w:
                    grad_w = grouped_outer(xg, dy, offs).to(ctx.param_dtypes[2])
        return grad_x, None, None, grad_w, grad_a, grad_b, None, None


def expert_linear(
    x: torch.Tensor,
    gather: torch.Tensor | None,
    offs: torch.Tensor,
    w_io: torch.Tensor,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    scale: float,
    recompute_input: bool = True,
) -> torch.Tensor:
    """Functional form of ``ExpertLoRAFunction``."""
    return ExpertLoRAFunction.apply(x, gather, offs, w_io, a, b, scale, recompute_input)
