"""LoRA's fused autograd node: base and low-rank update in one node that saves only what
backward needs (see ``lightning_peft.adapters.lora`` for the maths and the memory argument)."""

from __future__ import annotations

from typing import Any

import torch

from lightning_peft.adapters.dtypes import compute_dtype
from lightning_peft.adapters.kernels.recompute import cast, fold_kind, input_recipe, recipe_grad, replay

_is_any_autocast_enabled = torch._C._is_any_autocast_enabled  # one global flag read
_compiling = torch.compiler.is_compiling

#: ``dy`` elements from which ``thin_outer`` takes the transposed product on the CPU
THIN_OUTER_MIN_ELEMENTS = 1 << 16
_BLAS_DTYPES = (torch.float32, torch.float64)  # MKL's sgemm/dgemm; bf16/fp16 go to oneDNN
#: rows per weight column from which the base GEMM takes the merged weight ``W + s B A``: forward
#: when ``N >= MERGE_MIN_ROWS_PER_COLUMN * d_in``, ``dx`` when ``N >= MERGE_MIN_ROWS_PER_COLUMN * d_out``
#: (at 1 the bytes saved and spent are even; 4 keeps it where the saving is clear)
MERGE_MIN_ROWS_PER_COLUMN = 4.0


def thin_outer(dy: torch.Tensor, u: torch.Tensor, scale: float, like: torch.Tensor) -> torch.Tensor:
    """``scale * dy^T u`` for ``dy [N, d_out]``, ``u [N, r]`` with a small ``r`` -> ``[d_out, r]``
    (LoRA's ``dB``); ``like`` is any ``[d_out, r]`` tensor of the result's dtype (``B``).

    The scale rides in the GEMM: ``addmm(like, ., ., beta=0, alpha=scale)`` ignores ``like``'s
    values (documented for ``beta=0``: not even NaN passes) and saves a separate ``mul_`` (an op
    in eager, a kernel under ``torch.compile``). On the CPU in fp32/fp64, MKL ran ``dy^T u`` (a
    transposed left operand, ``r`` columns) on one thread and 1.6-2.1x slower than the same
    product as ``(u^T dy)^T`` on the host first measured (ViT-S / Llama shapes,
    ``benchmarks/thin_outer.py``), so large products take that form; on an AMD EPYC host the
    direct form was as fast or faster (``thin_outer_cpu_epyc.json``; no host-independent rule
    yet). Its result is a transposed view, which autograd copies into ``B``'s
    layout: on small products the copy costs more than it saves, and in bf16 (oneDNN) the forms
    are about even, so those stay direct, as does every other device."""
    if dy.numel() >= THIN_OUTER_MIN_ELEMENTS and dy.shape[0] > 128 and dy.device.type == "cpu" and dy.dtype in _BLAS_DTYPES:
        return torch.addmm(like.t(), u.t(), dy, beta=0, alpha=scale).t()
    return torch.addmm(like, dy.t(), u, beta=0, alpha=scale)


def takes_merged_weight(rows: int, columns: int, dtype: torch.dtype) -> bool:
    """Whether a base GEMM over ``rows`` activation rows, contracting or producing ``columns``
    (``d_in`` forward, ``d_out`` for ``dx``), runs on ``W + s B A`` (see ``LoRAFunction``)."""
    return rows >= MERGE_MIN_ROWS_PER_COLUMN * columns and dtype in _BLAS_DTYPES and not _compiling()


class LoRAFunction(torch.autograd.Function):
    """``y = [x W^T + b] + s * drop(x) A^T B^T`` on ``x [..., d_in]`` (flattened to ``[N, d_in]``).

    Where the activations outweigh the weight (``N >= 4 d_in`` rows, ``MERGE_MIN_ROWS_PER_COLUMN``)
    the base GEMM runs on the merged weight ``W' = W + s B A`` (``[d_out, r] @ [r, d_in]``, cheap)::

        y = x W'^T + b                   instead of  (x W^T + b) + s u B^T,   u = x A^T [N, r]
        dx = dy W'  (N >= 4 d_out rows)  instead of  dy W + s (dy B) A

    The same values up to rounding, one pass over ``[N, d_out]`` (``[N, d_in]``) fewer for
    two over ``[d_out, d_in]``; ``W'`` is rebuilt in backward, never saved. Only in fp32/fp64:
    rounding ``W + s B A`` to bf16 would drop an update below ``W``'s last bit. ``u`` is still
    computed (``dB`` needs it), ``dA`` and ``dB`` are unchanged. Not under ``torch.compile``:
    there the partitioner kept more for backward (ViT-S block 1.017x -> 1.194x the frozen base's
    saved bytes, ``benchmarks/compile_memory.py``) for no measured speed.

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
            merged = mask is None and takes_merged_weight(xc.shape[0], w.shape[1], dtype)
            w_in = torch.addmm(w, b, a, alpha=scale) if merged else w
            if bias is not None:
                out = torch.addmm(bias if bias.dtype == dtype else bias.to(dtype), xc, w_in.t())
            else:
                out = torch.mm(xc, w_in.t())
            if not merged:
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
            # a norm's fp32 input folds into dA's GEMM (no replay); else replay in backward
            recipe = (fold_kind(kind, input_tensors, extra, mask is not None), extra)
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
            if mask is None and w is not None and takes_merged_weight(dy.shape[0], w.shape[0], dtype):
                grad_x = torch.mm(dy, torch.addmm(w, b, a, alpha=scale))
            elif mask is None and w is not None:
                # the thin GEMM writes grad_x and the big one accumulates into it inside its
                # kernel: one pass over [N, d_in] less than adding the thin product afterwards
                grad_x = torch.mm(g, a).addmm_(dy, w, beta=scale)
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
            if recipe is not None and mask is None:  # (a recipe is only made for a frozen base)
                grad_a = cast(recipe_grad(g, recipe[0], tuple(rest), recipe[1], dtype).mul_(scale), a_dtype)
            else:
                x = rest[0] if recipe is None else replay(recipe[0], tuple(rest), recipe[1])
                xc = cast(x if x.dim() == 2 else x.reshape(-1, x.shape[-1]), dtype)
                if need_w:
                    grad_w = torch.mm(dy.t(), xc)
                if need_a:  # s g^T x, the scale in the GEMM (`a` only gives the shape: beta=0)
                    xa = xc if mask is None else xc * mask / (1.0 - dropout)
                    grad_a = cast(torch.addmm(a, g.t(), xa, beta=0, alpha=scale), a_dtype)
        if need_b:
            grad_bias = dy.sum(0)
        if need_lb:
            grad_lb = cast(thin_outer(dy, u, scale, b), b_dtype)
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


class SharedInputLoRAFunction(torch.autograd.Function):
    """Several fused LoRA layers that read the same ``x [..., d_in]`` as ONE node: layer ``i``
    (frozen ``W_i [d_i, d_in]``, ``b_i``, ``A_i [r_i, d_in]``, ``B_i [d_i, r_i]``, scale ``s_i``)::

        u   = x [A_1; ...; A_k]^T                          [N, sum r_i]   one read of x
        y_i = x W_i^T + b_i + s_i u[:, slice_i] B_i^T       [N, d_i]

    backward, with ``g = [s_1 dy_1 B_1, ..., s_k dy_k B_k]`` ``[N, sum r_i]``::

        dx = sum_i dy_i W_i + g [A_1; ...; A_k],   d[A_1; ...; A_k] = g^T x,   dB_i = s_i dy_i^T u[:, slice_i]

    The same values as ``k`` separate ``LoRAFunction`` nodes (up to rounding), one saved input
    (or its recompute recipe, as there), one set of host work. Frozen bases only, no dropout.
    ``tensors`` is ``(W_1, b_1 or None, A_1, B_1, W_2, ...)``.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, scales: tuple[float, ...], recompute_input: bool, *tensors: torch.Tensor | None
    ) -> tuple[torch.Tensor, ...]:  # type: ignore[override]  # noqa: E501
        dtype = compute_dtype(x) if _is_any_autocast_enabled() else x.dtype
        x_shape = x.shape
        x2 = x if len(x_shape) == 2 else x.reshape(-1, x_shape[-1])
        xc = cast(x2, dtype)
        weights = [cast(t, dtype) for t in tensors[0::4]]  # type: ignore[arg-type]
        biases = [None if t is None else cast(t, dtype) for t in tensors[1::4]]
        a_cat = cast(torch.cat(tensors[2::4]), dtype)  # type: ignore[arg-type]
        lora_bs = [cast(t, dtype) for t in tensors[3::4]]  # type: ignore[arg-type]
        u = torch.mm(xc, a_cat.t())  # [N, sum r]
        outs, offset = [], 0
        for w, bias, b, s in zip(weights, biases, lora_bs, scales):
            r = b.shape[1]
            out = torch.addmm(bias, xc, w.t()) if bias is not None else torch.mm(xc, w.t())
            out.addmm_(u[:, offset : offset + r], b.t(), alpha=s)
            outs.append(out if len(x_shape) == 2 else out.view(*x_shape[:-1], out.shape[-1]))
            offset += r
        recipe = input_recipe(x) if recompute_input and not torch.compiler.is_compiling() else None
        if recipe is None:
            input_tensors: tuple[torch.Tensor, ...] = (x,)
        else:
            kind, input_tensors, extra = recipe
            recipe = (fold_kind(kind, input_tensors, extra, False), extra)
        k = len(scales)
        ctx.state = (k, scales, dtype, x.dtype, x_shape, tuple(t.dtype for t in tensors[2::4]), recipe)  # type: ignore[union-attr]
        ctx.set_materialize_grads(False)  # an output nobody read gets no zero-filled gradient
        # the A's, not their concatenation: a parameter costs no bytes, a new tensor would
        ctx.save_for_backward(u, *tensors[2::4], *weights, *lora_bs, *input_tensors)
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *grad_outs: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        k, scales, dtype, x_dtype, x_shape, param_dtypes, recipe = ctx.state
        u, *rest = ctx.saved_tensors
        lora_as, weights, lora_bs, inputs = rest[:k], rest[k : 2 * k], rest[2 * k : 3 * k], tuple(rest[3 * k :])
        n = u.shape[0]
        dys = [None if dy is None else cast(dy.reshape(n, dy.shape[-1]), dtype) for dy in grad_outs]
        g = torch.cat([u.new_zeros(n, b.shape[1]) if dy is None else torch.mm(dy, b).mul_(s) for dy, b, s in zip(dys, lora_bs, scales)], 1)
        need_x = ctx.needs_input_grad[0]
        grad_x = None
        if need_x:
            grad_x = torch.mm(g, cast(torch.cat(lora_as), dtype))
            for dy, w in zip(dys, weights):
                if dy is not None:
                    grad_x.addmm_(dy, w)
            grad_x = cast(grad_x, x_dtype).view(x_shape)
        if recipe is not None:
            grad_a_cat = recipe_grad(g, recipe[0], inputs, recipe[1], dtype)
        else:
            grad_a_cat = torch.mm(g.t(), cast(inputs[0].reshape(n, inputs[0].shape[-1]), dtype))
        grads: list[torch.Tensor | None] = []
        offset = 0
        for i, (dy, b, s) in enumerate(zip(dys, lora_bs, scales)):
            r = b.shape[1]
            grad_a = cast(grad_a_cat[offset : offset + r], param_dtypes[i])
            grad_b = None if dy is None else cast(thin_outer(dy, u[:, offset : offset + r], s, b), param_dtypes[i])
            grads += [None, None, grad_a, grad_b]
            offset += r
        return (grad_x, None, None, *grads)
