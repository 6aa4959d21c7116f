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
RECIPE_PRODUCERS = frozenset({"NativeLayerNormBackward0", "GeluBackward0", "SiluBackward0", "MulBackward0"})  # Mul: also RMSNorm


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
        if a is not None and b is not None:
            return "mul", (a, b), None
        return rms_norm_recipe(x, node, a, b)
    return None


def rms_norm_recipe(x: torch.Tensor, node: Any, a: torch.Tensor | None, b: torch.Tensor | None) -> Recipe | None:
    """``x = w * cast(h * rstd)``: an RMSNorm (Llama, Mistral, Qwen, T5) with a frozen weight.

    Its outer product saved only the weight ``w [d]`` (the normalised side is not needed for a
    frozen ``w``); the inner product ``h * rstd`` saved the norm's input ``h`` and ``rstd
    [..., 1]``. The cast between them (``.to(input_dtype)``, a ``ToCopyBackward0`` that records no
    dtype) is known only when ``x`` and ``w`` share a 16-bit dtype: promotion then leaves no other
    choice for the cast's dtype, so any other cast is not recomputed."""
    weight, side = (a, 1) if b is None else (b, 0)  # the saved factor is the weight; the other side is the norm
    if weight is None or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        return None
    inner = node.next_functions[side][0]
    cast_to = None
    if type(inner).__name__ == "ToCopyBackward0":
        if x.dtype != weight.dtype or x.dtype not in (torch.bfloat16, torch.float16):
            return None
        cast_to, inner = x.dtype, inner.next_functions[0][0]
    if type(inner).__name__ != "MulBackward0":
        return None
    p, q = saved_tensor(inner, "_saved_self"), saved_tensor(inner, "_saved_other")
    if p is None or q is None:
        return None
    h, rstd = (p, q) if q.dim() == p.dim() and q.shape[-1] == 1 else (q, p)
    if h.shape != x.shape or rstd.shape != (*x.shape[:-1], 1):
        return None
    return "rms_norm", (h, rstd, weight), cast_to


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
    if kind == "rms_norm":
        h, rstd, weight = tensors
        normed = h * rstd
        return weight * (normed if extra is None else normed.to(extra))
    if kind == "gelu":
        return F.gelu(tensors[0], approximate=extra)
    if kind == "silu":
        return F.silu(tensors[0])
    return tensors[0] * tensors[1]  # mul


#: elements of one replayed chunk on CPU: the chunk buffer stays in a core's L2 cache (2 MiB on
#: the machine measured) where a whole ``[N, d]`` replay is a fresh allocation each backward
REPLAY_CHUNK_ELEMENTS = 1 << 17

_REPLAY_INTO = {
    "gelu": lambda tensors, extra, out: torch._C._nn.gelu(tensors[0], approximate=extra, out=out),
    "silu": lambda tensors, extra, out: torch._C._nn.silu(tensors[0], out=out),
    "mul": lambda tensors, extra, out: torch.mul(tensors[0], tensors[1], out=out),
}


def replay_grad(g: torch.Tensor, kind: str, tensors: tuple[torch.Tensor, ...], extra: Any, dtype: torch.dtype) -> torch.Tensor:
    """``g^T x`` (``g [N, r]``, ``x [N, d]`` the replayed input, in ``dtype``) -> ``[r, d]``.

    On CPU an elementwise recipe (GELU, SiLU, a product of same-shaped factors) is replayed in
    row chunks into one reused ``[rows, d]`` buffer (when ``x`` exceeds four chunks) and accumulated into the ``[r, d]`` result,
    so the ``[N, d]`` input is never materialised: the replay's arithmetic is cheap, but a whole
    ``[N, d]`` replay is a fresh allocation that is written to memory (and, under glibc, often
    faulted in page by page) only to be read once. Elsewhere (GPU: a caching allocator, and each
    chunk would cost kernel launches) the input is replayed whole."""
    d = tensors[0].shape[-1]
    n = g.shape[0]
    rows = max(1, REPLAY_CHUNK_ELEMENTS // d)
    into = _REPLAY_INTO.get(kind)
    small = n * d <= 4 * REPLAY_CHUNK_ELEMENTS  # cache-resident anyway: chunks would only add host work
    if into is None or small or g.device.type != "cpu" or any(t.shape != tensors[0].shape or t.dtype != dtype for t in tensors):
        x = replay(kind, tensors, extra)
        return torch.mm(g.t(), cast(x.reshape(-1, d), dtype))
    flat = tuple(t.reshape(-1, d) for t in tensors)
    buffer = torch.empty(rows, d, dtype=dtype, device=g.device)
    out = torch.mm(g[:rows].t(), into(tuple(t[:rows] for t in flat), extra, buffer))
    for start in range(rows, n, rows):
        stop = min(start + rows, n)
        chunk = buffer if stop - start == rows else buffer[: stop - start]
        out.addmm_(g[start:stop].t(), into(tuple(t[start:stop] for t in flat), extra, chunk))
    return out


def fold_kind(kind: str, tensors: tuple[torch.Tensor, ...], extra: Any, has_mask: bool) -> str:
    """``kind``, or its ``*_fold`` form when ``g^T x`` can be taken from the norm's saved input
    without replaying ``x`` (fp32, no dropout mask, no cast inside the recipe)."""
    if has_mask or tensors[0].dtype != torch.float32:
        return kind
    if kind == "layer_norm" or (kind == "rms_norm" and extra is None):
        return kind + "_fold"
    return kind


def recipe_grad(g: torch.Tensor, kind: str, tensors: tuple[torch.Tensor, ...], extra: Any, dtype: torch.dtype) -> torch.Tensor:
    """``g^T x`` ``[r, d]`` for the input ``x`` a recipe describes (``fold_kind`` applied)."""
    if kind == "layer_norm_fold":
        return layer_norm_grad_a(g, tensors, extra)
    if kind == "rms_norm_fold":
        return rms_norm_grad_a(g, tensors)
    return replay_grad(g, kind, tensors, extra, dtype)


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


def rms_norm_grad_a(g: torch.Tensor, tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``g^T (w * h * rstd) = w * ((g rstd)^T h)``: one GEMM over the saved RMSNorm input."""
    h, rstd, weight = tensors
    d = h.shape[-1]
    return torch.mm((g.to(h.dtype) * rstd.reshape(-1, 1)).t(), h.reshape(-1, d)).mul_(weight.reshape(1, d))


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)
