"""Recomputing an adapter's input in backward from the tensors its producer already saved.

This reads autograd internals: a node's ``_saved_*`` attributes (``NativeLayerNormBackward0.
_saved_input`` ...) and the top saved-tensor hooks. It is kept in this one module because a torch
upgrade may rename them; ``tests/adapters/test_lora.py`` checks that the recipes are still found (so a
rename fails loudly there instead of silently costing memory: without a recipe the kernels save
the input, which is correct, only larger).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

Recipe = tuple[str, tuple[torch.Tensor, ...], Any]
#: autograd node types whose saved tensors determine their output (the recipes below)
RECIPE_PRODUCERS = frozenset({"NativeLayerNormBackward0", "GeluBackward0", "SiluBackward0", "MulBackward0"})


def saved_tensor(node: Any, name: str) -> torch.Tensor | None:
    try:
        value = getattr(node, name)
    except RuntimeError:  # freed or modified in place since it was saved
        return None
    return value if isinstance(value, torch.Tensor) else None


def input_recipe(x: torch.Tensor) -> Recipe | None:
    """How to recompute ``x`` in backward from tensors autograd already keeps, or ``None``.

    Only producers whose saved tensors fully determine ``x`` by a cheap elementwise or
    normalisation op qualify. Reading a producer's saved tensors is only safe when no
    non-transparent saved-tensor hook (e.g. activation checkpointing) is active, because such
    hooks replace saved tensors with placeholders that must not be unpacked during forward.
    """
    node = x.grad_fn
    if node is None:
        return None
    kind = type(node).__name__
    if kind not in RECIPE_PRODUCERS:  # the common miss: decided by one set lookup
        return None
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if hooks is not None and not getattr(hooks[0], "_lightning_peft_transparent", False):
        return None
    if kind == "NativeLayerNormBackward0":
        inp, mean, rstd = (saved_tensor(node, n) for n in ("_saved_input", "_saved_result1", "_saved_result2"))
        if inp is None or mean is None or rstd is None:
            return None
        weight, bias = saved_tensor(node, "_saved_weight"), saved_tensor(node, "_saved_bias")
        tensors = tuple(t for t in (inp, mean, rstd, weight, bias) if t is not None)
        return "layer_norm", tensors, (weight is not None, bias is not None)
    if kind == "GeluBackward0":
        inp = saved_tensor(node, "_saved_self")
        return None if inp is None else ("gelu", (inp,), node._saved_approximate)
    if kind == "SiluBackward0":
        inp = saved_tensor(node, "_saved_self")
        return None if inp is None else ("silu", (inp,), None)
    if kind == "MulBackward0":
        a, b = saved_tensor(node, "_saved_self"), saved_tensor(node, "_saved_other")
        return None if a is None or b is None else ("mul", (a, b), None)
    return None


def replay(kind: str, tensors: tuple[torch.Tensor, ...], extra: Any) -> torch.Tensor:
    if kind == "layer_norm":
        inp, mean, rstd, *affine = tensors
        has_weight, has_bias = extra
        out = (inp - mean) * rstd
        if has_weight:
            out = out * affine.pop(0)
        if has_bias:
            out = out + affine.pop(0)
        return out
    if kind == "gelu":
        return F.gelu(tensors[0], approximate=extra)
    if kind == "silu":
        return F.silu(tensors[0])
    return tensors[0] * tensors[1]  # mul


def layer_norm_grad_a(g: torch.Tensor, tensors: tuple[torch.Tensor, ...], extra: Any) -> torch.Tensor:
    """``g^T LN(h)`` without materialising ``LN(h)``: with ``LN(h) = (h - mu) r w + b`` row-wise,

        g^T LN(h) = w * ((g r)^T h - (g r)^T mu) + (sum_n g_n) b^T        ([r_lora, d])

    one GEMM over the saved LayerNorm input instead of an elementwise replay of ``[N, d]``."""
    inp, mean, rstd, *affine = tensors
    has_weight, has_bias = extra
    d = inp.shape[-1]
    h = inp.reshape(-1, d)
    g = g.to(h.dtype)
    gr = g * rstd.reshape(-1, 1)  # [N, r]
    out = (gr.t() @ h).sub_((gr * mean.reshape(-1, 1)).sum(0).unsqueeze(1))
    if has_weight:
        out.mul_(affine.pop(0).reshape(1, d))
    if has_bias:
        out.addr_(g.sum(0), affine.pop(0).reshape(d).to(out.dtype))
    return out


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)
