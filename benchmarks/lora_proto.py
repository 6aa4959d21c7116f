"""Prototype of changes proposed for ``lightning_peft/adapters/lora.py`` (benchmark variant
``ours_proto`` of ``benchmarks/lora_step.py``). Not part of the package.

Differences from ``_LoRAFunction``:

1. **Normalisation folds.** When the adapter input is ``x = LayerNorm(h)`` or an RMSNorm
   ``x = c * (h * r)`` (Llama/Qwen/Mistral: ``weight * (h * rsqrt(var + eps)).to(dtype)``), ``x``
   is never rebuilt in backward. The only use of ``x`` is ``dA = g^T x`` with ``g = s dy B``, and
   for a row-wise normalisation it folds into one GEMM over the producer's saved input::

       LayerNorm: g^T x = ((g*rstd)^T h - colsum(g*rstd*mean)) * w + colsum(g) b
       RMSNorm:   g^T x = ((g*r)^T h) * c

   ``h`` is what the producer saved anyway (fp32 under autocast / for RMSNorm's upcast), so this
   reads ``h`` once instead of replaying four or five elementwise kernels and reading ``x``
   again. (Exact up to rounding: ``x``'s own rounding to the compute dtype is skipped, so it is
   slightly *more* precise.)
2. **RMSNorm recognised** (it is ``mul(weight, to(mul(h, rsqrt)))`` in eager transformers, whose
   outer ``MulBackward0`` does not save the activation when the weight is frozen): q/k/v and
   gate/up inputs of Llama are no longer saved -- ``2 * tokens * hidden * 2`` bytes per layer.
3. **Less per-call overhead**: no autocast context or dtype casts when nothing changes, the
   scale folded into ``B`` (one kernel less each way).

``use_prototype(model, layout="cat")`` (variants ``ours_cat`` / ``ours_cat_fold``) also tries a
**concatenated weight layout**: each adapted layer keeps one buffer
``M = [[W, B], [A, 0]]`` of shape ``[d_out + r, d_in + r]``; the frozen ``weight`` (and bias) are
views of it, ``A`` and ``B`` stay ordinary parameters copied into ``M`` at each forward (two tiny
copies; making them views of ``M`` too breaks fused AdamW: CUDA rejects parameters and states of
different strides, and CPU's fused kernel silently computes wrong updates for them). Then

* forward: ``[x W^T | x A^T] = x @ M[:, :d_in]^T`` is one GEMM (``u`` comes with the base
  output: ``x`` is read once instead of twice), then ``out += s u B^T``;
* backward: ``[dy W | dy B] = dy @ M[:d_out, :]`` is one GEMM (``dy`` is read once for ``dx`` and
  ``g``), then ``dx += s g A``;

which removes two of the eight ``[tokens, d]``-sized passes per layer that the unfused node makes
(``8 (d_in + d_out)`` bytes per token in bf16 beyond the frozen base, measured as the whole of
ours' gap on the Llama shape).

Measured on the H200 (same run): **slower, do not adopt** -- Llama 1.1B 0.80x (fold: 0.78x) vs
ours 0.865x of the frozen limit, ViT-B 0.60x vs 0.66x. The outputs and input gradients become
row-strided views (row stride ``d + r``), which the downstream kernels and the ``N = d + 16``
GEMM shapes pay for more than the saved passes.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.adapters.lora import LoRALinear, _replay, _saved

_NULL = contextlib.nullcontext()


def _hooks_allow_reading_saved() -> bool:
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return hooks is None or getattr(hooks[0], "_lightning_peft_transparent", False)


def _rms_recipe(node: Any, x: torch.Tensor) -> tuple[str, tuple[torch.Tensor, ...], Any] | None:
    """``x = c * cast(h * r)`` with a constant per-feature ``c`` and per-row ``r``."""
    a, b = _saved(node, "_saved_self"), _saved(node, "_saved_other")
    if (a is None) == (b is None):
        return None
    const, idx = (a, 1) if a is not None else (b, 0)  # the saved one multiplies the other input
    d = x.shape[-1]
    if const.requires_grad or const.numel() != d or const.shape[-1] != d:
        return None
    inner = node.next_functions[idx][0]
    while inner is not None and type(inner).__name__ == "ToCopyBackward0":
        inner = inner.next_functions[0][0]
    if inner is None or type(inner).__name__ != "MulBackward0":
        return None
    h, r = _saved(inner, "_saved_self"), _saved(inner, "_saved_other")
    if h is None or r is None:
        return None
    if h.shape[-1] != d:
        h, r = r, h
    if h.shape != x.shape or r.shape[-1] != 1 or r.numel() * d != x.numel():
        return None
    return "rms_fold", (h, r, const), None


def _recipe(x: torch.Tensor, allow_fold: bool) -> tuple[str, tuple[torch.Tensor, ...], Any] | None:
    node = x.grad_fn
    if node is None or not _hooks_allow_reading_saved():
        return None
    kind = type(node).__name__
    if kind == "NativeLayerNormBackward0":
        inp, mean, rstd = (_saved(node, n) for n in ("_saved_input", "_saved_result1", "_saved_result2"))
        if inp is None or mean is None or rstd is None:
            return None
        weight, bias = _saved(node, "_saved_weight"), _saved(node, "_saved_bias")
        tensors = tuple(t for t in (inp, mean, rstd, weight, bias) if t is not None)
        extra = (weight is not None, bias is not None)
        if allow_fold and inp.dtype == torch.float32:
            return "ln_fold", tensors, extra
        return "layer_norm", tensors, extra
    if kind == "GeluBackward0":
        inp = _saved(node, "_saved_self")
        return None if inp is None else ("gelu", (inp,), node._saved_approximate)
    if kind == "SiluBackward0":
        inp = _saved(node, "_saved_self")
        return None if inp is None else ("silu", (inp,), None)
    if kind == "MulBackward0":
        a, b = _saved(node, "_saved_self"), _saved(node, "_saved_other")
        if a is not None and b is not None:
            return "mul", (a, b), None
        if allow_fold:
            return _rms_recipe(node, x)
    return None


class _ProtoLoRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x, weight, bias, lora_a, lora_b, scale, dropout, recompute_input):  # type: ignore[override]
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        with torch.autocast(device_type, enabled=False) if autocast else _NULL:
            xc = x.reshape(-1, x.shape[-1])
            if xc.dtype != dtype:
                xc = xc.to(dtype)
            a = lora_a if lora_a.dtype == dtype else lora_a.to(dtype)
            b = lora_b if lora_b.dtype == dtype else lora_b.to(dtype)
            mask = None
            xd = xc
            if dropout > 0.0:
                mask = torch.empty_like(xc, dtype=torch.bool).bernoulli_(1.0 - dropout)
                xd = xc * mask / (1.0 - dropout)
            u = xd @ a.t()
            if weight is not None:
                w = weight if weight.dtype == dtype else weight.to(dtype)
                bc = None if bias is None else (bias if bias.dtype == dtype else bias.to(dtype))
                out = F.linear(xc, w, bc)
                out.addmm_(u, b.t(), alpha=scale)
            else:
                w = None
                out = (u @ b.t()).mul_(scale)
        base_trains = weight is not None and (weight.requires_grad or (bias is not None and bias.requires_grad))
        recipe = None
        if recompute_input and not base_trains:
            recipe = _recipe(x, allow_fold=mask is None and ctx.needs_input_grad[3])
        if recipe is None:
            ctx.recipe = None
            inputs: tuple[torch.Tensor, ...] = (x,)
        else:
            ctx.recipe = (recipe[0], recipe[2])
            inputs = recipe[1]
        ctx.has_weight, ctx.has_mask = w is not None, mask is not None
        ctx.scale, ctx.dropout, ctx.dtype = scale, dropout, dtype
        ctx.param_dtypes = (lora_a.dtype, lora_b.dtype)
        ctx.save_for_backward(u, a, b, *((w,) if w is not None else ()), *((mask,) if mask is not None else ()), *inputs)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        saved = ctx.saved_tensors
        u, a, b = saved[0], saved[1], saved[2]
        i = 3
        w = mask = None
        if ctx.has_weight:
            w, i = saved[i], i + 1
        if ctx.has_mask:
            mask, i = saved[i], i + 1
        rest = saved[i:]
        dtype, scale = ctx.dtype, ctx.scale
        need_x, need_w, need_b, need_a, need_lb = ctx.needs_input_grad[:5]
        recipe = ctx.recipe
        device_type = grad_out.device.type
        with torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else _NULL:
            dy = grad_out.reshape(-1, grad_out.shape[-1])
            if dy.dtype != dtype:
                dy = dy.to(dtype)
            g = dy @ (b * scale)  # [N, r]
            grad_x = grad_w = grad_bias = grad_a = grad_lb = None
            if need_x:
                lora_dx = g @ a
                if mask is not None:
                    lora_dx.mul_(mask).div_(1.0 - ctx.dropout)
                grad_x = lora_dx if w is None else lora_dx.addmm_(dy, w)
                if grad_x.dtype != ctx.x_dtype:
                    grad_x = grad_x.to(ctx.x_dtype)
                grad_x = grad_x.view(ctx.x_shape)
            if recipe is not None and recipe[0] == "ln_fold":
                if need_a:
                    inp, mean, rstd, *affine = rest
                    has_weight, has_bias = recipe[1]
                    d = inp.shape[-1]
                    g32 = g.float()
                    gr = g32 * rstd.reshape(-1, 1)
                    ga = gr.t() @ inp.reshape(-1, d)
                    ga.sub_((gr * mean.reshape(-1, 1)).sum(0).unsqueeze(1))
                    if has_weight:
                        ga.mul_(affine.pop(0).reshape(1, d))
                    if has_bias:
                        ga.addr_(g32.sum(0), affine.pop(0).reshape(d).float())
                    grad_a = ga.to(ctx.param_dtypes[0])
            elif recipe is not None and recipe[0] == "rms_fold":
                if need_a:
                    h, r, c = rest
                    d = h.shape[-1]
                    gr = (g.to(torch.promote_types(g.dtype, torch.float32)) * r.reshape(-1, 1)).to(h.dtype)
                    grad_a = ((gr.t() @ h.reshape(-1, d)) * c.reshape(1, d)).to(ctx.param_dtypes[0])
            else:
                x = rest[0] if recipe is None else _replay(recipe[0], tuple(rest), recipe[1])
                xc = x.reshape(-1, x.shape[-1])
                if xc.dtype != dtype:
                    xc = xc.to(dtype)
                if need_w:
                    grad_w = dy.t() @ xc
                if need_a:
                    xd = xc if mask is None else xc * mask / (1.0 - ctx.dropout)
                    grad_a = (g.t() @ xd).to(ctx.param_dtypes[0])
            if need_b:
                grad_bias = dy.sum(0)
            if need_lb:
                grad_lb = (dy.t() @ u).mul_(scale).to(ctx.param_dtypes[1])
        return grad_x, grad_w, grad_bias, grad_a, grad_lb, None, None, None


class ProtoLoRALinear(LoRALinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self._fused:
            return super().forward(x)
        base = self.base_layer
        dropout = self.dropout if self.training else 0.0
        return _ProtoLoRAFunction.apply(
            x, base.weight, base.bias, self.lora_A.weight, self.lora_B.weight, self.scale, dropout, self.recompute_input
        )


def use_prototype(model: nn.Module, layout: str = "separate", fold: bool = True) -> int:
    """Switch every ``LoRALinear`` in ``model`` to a prototype node; returns how many.

    ``layout="separate"``: ``_ProtoLoRAFunction`` (folds + RMSNorm recipe).
    ``layout="cat"``: the concatenated weight layout; ``fold`` picks the normalisation folds (and
    RMSNorm recognition) or the library's current recipes. Call before building the optimizer.
    """
    n = 0
    for m in list(model.modules()):
        if type(m) is LoRALinear and m._fused:
            if layout == "cat":
                _to_cat_layout(m, fold)
            else:
                m.__class__ = ProtoLoRALinear
            n += 1
    return n


# --------------------------------------------------------------------------------------------
# Concatenated layout M = [[W, B], [A, 0]]
# --------------------------------------------------------------------------------------------
class _CatLoRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, M, bias_ext, lora_a, lora_b, scale, fold):  # type: ignore[override]
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
        d_out, d_in = lora_b.shape[0], lora_a.shape[1]
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        with torch.autocast(device_type, enabled=False) if autocast else _NULL:
            xc = x.reshape(-1, d_in)
            if xc.dtype != dtype:
                xc = xc.to(dtype)
            mc = M if M.dtype == dtype else M.to(dtype)
            w_a = mc[:, :d_in]  # [[W], [A]]: [d_out + r, d_in]
            if bias_ext is None:
                y = torch.mm(xc, w_a.t())
            else:
                y = torch.addmm(bias_ext if bias_ext.dtype == dtype else bias_ext.to(dtype), xc, w_a.t())
            u = y[:, d_out:].clone()
            out = y[:, :d_out]
            out.addmm_(u, mc[:d_out, d_in:].t(), alpha=scale)
        recipe = _recipe(x, allow_fold=fold and ctx.needs_input_grad[3]) if not M.requires_grad else None
        if recipe is not None and not fold and recipe[0] in ("ln_fold", "rms_fold"):
            recipe = None
        if recipe is None:
            ctx.recipe = None
            inputs: tuple[torch.Tensor, ...] = (x,)
        else:
            ctx.recipe = (recipe[0], recipe[2])
            inputs = recipe[1]
        ctx.scale, ctx.dtype, ctx.dims = scale, dtype, (d_out, d_in)
        ctx.param_dtypes = (lora_a.dtype, lora_b.dtype)
        ctx.save_for_backward(u, mc, *inputs)
        return out.view(*x.shape[:-1], d_out)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        u, mc, *rest = ctx.saved_tensors
        d_out, d_in = ctx.dims
        dtype, scale = ctx.dtype, ctx.scale
        need_x, _, _, need_a, need_lb = ctx.needs_input_grad[:5]
        recipe = ctx.recipe
        device_type = grad_out.device.type
        grad_x = grad_a = grad_lb = None
        with torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else _NULL:
            dy = grad_out.reshape(-1, d_out)
            if dy.dtype != dtype:
                dy = dy.to(dtype)
            z = torch.mm(dy, mc[:d_out, :])  # [dy W | dy B]
            g = z[:, d_in:] * scale
            if need_x:
                dx = z[:, :d_in]
                dx.addmm_(g, mc[d_out:, :d_in])
                grad_x = dx if dx.dtype == ctx.x_dtype else dx.to(ctx.x_dtype)
                grad_x = grad_x.view(ctx.x_shape) if grad_x.is_contiguous() else grad_x.reshape(ctx.x_shape)
            if need_a:
                if recipe is not None and recipe[0] == "ln_fold":
                    inp, mean, rstd, *affine = rest
                    has_weight, has_bias = recipe[1]
                    d = inp.shape[-1]
                    g32 = g.float()
                    gr = g32 * rstd.reshape(-1, 1)
                    ga = gr.t() @ inp.reshape(-1, d)
                    ga.sub_((gr * mean.reshape(-1, 1)).sum(0).unsqueeze(1))
                    if has_weight:
                        ga.mul_(affine.pop(0).reshape(1, d))
                    if has_bias:
                        ga.addr_(g32.sum(0), affine.pop(0).reshape(d).float())
                    grad_a = ga.to(ctx.param_dtypes[0])
                elif recipe is not None and recipe[0] == "rms_fold":
                    h, r, c = rest
                    d = h.shape[-1]
                    gr = (g.to(torch.promote_types(g.dtype, torch.float32)) * r.reshape(-1, 1)).to(h.dtype)
                    grad_a = ((gr.t() @ h.reshape(-1, d)) * c.reshape(1, d)).to(ctx.param_dtypes[0])
                else:
                    x = rest[0] if recipe is None else _replay(recipe[0], tuple(rest), recipe[1])
                    xc = x.reshape(-1, x.shape[-1])
                    if xc.dtype != dtype:
                        xc = xc.to(dtype)
                    grad_a = (g.t() @ xc).to(ctx.param_dtypes[0])
            if need_lb:
                grad_lb = (dy.t() @ u).mul_(scale).to(ctx.param_dtypes[1])
        return grad_x, None, None, grad_a, grad_lb, None, None


class CatLoRALinear(LoRALinear):
    """``M = [[W, B], [A, 0]]`` is a buffer; the frozen ``weight`` (and ``bias``) are views of
    it. ``lora_A`` / ``lora_B`` stay ordinary contiguous parameters (fused optimizers need dense
    parameters and states of the same strides) and are copied into ``M`` at every forward (two
    ``r x d`` copies per layer per step; a version check cannot replace this: fused AdamW
    updates parameters without bumping their version counter)."""

    _cat_fold = False

    def _sync(self) -> None:
        a, b = self.lora_A.weight, self.lora_B.weight
        d_out, d_in = b.shape[0], a.shape[1]
        with torch.no_grad():
            self._cat_M[d_out:, :d_in].copy_(a)
            self._cat_M[:d_out, d_in:].copy_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.dropout > 0.0 and self.training:
            return super().forward(x)
        self._sync()
        return _CatLoRAFunction.apply(
            x, self._cat_M, self._cat_bias, self.lora_A.weight, self.lora_B.weight, self.scale, self._cat_fold
        )


def _to_cat_layout(m: LoRALinear, fold: bool) -> None:
    base = m.base_layer
    w, a = base.weight, m.lora_A.weight
    d_out, d_in = w.shape
    r = a.shape[0]
    with torch.no_grad():
        M = torch.zeros(d_out + r, d_in + r, dtype=w.dtype, device=w.device)
        M[:d_out, :d_in] = w
        base.weight = nn.Parameter(M[:d_out, :d_in], requires_grad=False)
        bias_ext = None
        if base.bias is not None:
            bias_ext = torch.zeros(d_out + r, dtype=base.bias.dtype, device=w.device)
            bias_ext[:d_out] = base.bias
            base.bias = nn.Parameter(bias_ext[:d_out], requires_grad=False)
    m.register_buffer("_cat_M", M, persistent=False)
    m.register_buffer("_cat_bias", bias_ext, persistent=False)
    m.__class__ = CatLoRALinear
    m._cat_fold = fold


