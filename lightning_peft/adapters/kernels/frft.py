"""A batched, differentiable discrete fractional Fourier transform (matrix form).

The orthonormal DFT ``F [n, n]``, ``F[j, m] = exp(-2 pi i j m / n) / sqrt(n)`` (what
``torch.fft.fft(x, norm="ortho")`` applies), has the four eigenvalues ``(-i)^k``. Its
*fractional* powers are not unique; the discrete fractional Fourier transform (Candan, Kutay,
Ozaktas 2000) picks the eigenvectors that sample Hermite-Gaussian functions and lets the order
``a`` act on the Hermite index ``k``::

    F_a = V diag(exp(-i pi a k / 2)) V^T,        V [n, n] real orthogonal, k [n] integers

``V`` are the eigenvectors of Grünbaum's tridiagonal-plus-circulant matrix ``S`` (second
difference plus ``diag(2 cos(2 pi j / n) - 4)``), which commutes with ``F``; they are computed
separately on the even and odd subspaces (so that each keeps its parity) and sorted by their
``S``-eigenvalue, which orders them like Hermite functions: even ones get ``k = 0, 2, 4, ...``,
odd ones ``k = 1, 3, 5, ...``, and for even ``n`` the last index is ``n`` instead of ``n - 1``.
Each column's eigenvalue under ``F`` is checked against ``(-i)^k`` when the basis is built, so
``F_1`` *is* the orthonormal DFT (to rounding), ``F_0 = I``, ``F_a F_b = F_{a+b}``, every
``F_a`` is unitary and symmetric, and ``F_{-a} = conj(F_a) = F_a^{-1}``.

Unlike the chirp-based fast FrFT (and the ``torch-frft`` package), this form is one smooth
expression in ``a``: it is batched over any number of orders (one per expert), works for odd
and even ``n``, and has a nonzero derivative at integer orders. It costs ``O(n^2)`` per vector
(``O(n^3)`` for a full matrix); FRAME never applies it per token (see
:func:`fractional_lowrank_factors`). The basis is computed once in float64 on the host and
cached per ``(n, dtype, device)``.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import torch

__all__ = ["frft", "frft_basis", "frft_matrix", "fractional_lowrank_factors"]

_CACHE: dict[tuple[int, torch.dtype, str], tuple[torch.Tensor, torch.Tensor]] = {}
_LOCK = threading.Lock()


def _grunbaum(n: int) -> torch.Tensor:
    """``S [n, n]`` (float64): the circulant second difference plus its DFT image, which
    commutes with the DFT."""
    j = torch.arange(n, dtype=torch.float64)
    s = torch.diag(2.0 * torch.cos(2.0 * math.pi * j / n) - 4.0)
    idx = torch.arange(n)
    s[idx, (idx + 1) % n] += 1.0
    s[idx, (idx - 1) % n] += 1.0
    return s


def _parity_split(n: int) -> tuple[torch.Tensor, int]:
    """``P [n, n]`` orthogonal (float64) whose first ``n_even`` rows span the even vectors
    (``v[j] = v[-j mod n]``) and the rest the odd ones."""
    p = torch.zeros(n, n, dtype=torch.float64)
    half = n // 2
    n_even = half + 1
    p[0, 0] = 1.0
    r = 1 / math.sqrt(2.0)
    for j in range(1, (n + 1) // 2):  # pairs (j, n - j)
        p[j, j] = p[j, n - j] = r
        p[n_even + j - 1, j], p[n_even + j - 1, n - j] = -r, r
    if n % 2 == 0:
        p[half, half] = 1.0
    return p, n_even


def _hermite_basis(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(V [n, n], k [n])`` in float64: Hermite-Gaussian-like DFT eigenvectors (columns) and
    their Hermite indices."""
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    s = _grunbaum(n)
    p, n_even = _parity_split(n)
    blocks = p @ s @ p.T  # block diagonal: even and odd subspaces do not mix
    vectors, orders = [], []
    for lo, hi, first in ((0, n_even, 0), (n_even, n, 1)):
        if hi <= lo:
            continue
        values, vecs = torch.linalg.eigh(blocks[lo:hi, lo:hi])
        order = torch.argsort(values, descending=True)  # largest S-eigenvalue = lowest Hermite index
        vecs = p[lo:hi].T @ vecs[:, order]
        for i in range(hi - lo):
            v = vecs[:, i]
            v = v * (1.0 if v[int(torch.argmax(v.abs()))] >= 0 else -1.0)  # a deterministic sign
            vectors.append(v)
            orders.append(first + 2 * i)
    # even n: the even vectors reach k = n and no vector gets n - 1 (Candan et al.'s index set)
    k = torch.tensor(orders, dtype=torch.float64)
    v = torch.stack(vectors, dim=1)
    sort = torch.argsort(k)
    return v[:, sort].contiguous(), k[sort].contiguous()


def _check_eigenvalues(v: torch.Tensor, k: torch.Tensor) -> None:
    """Each column's DFT eigenvalue is ``(-i)^k`` (what makes ``F_1`` the DFT)."""
    fv = torch.fft.fft(v.to(torch.complex128), dim=0, norm="ortho")
    expected = torch.polar(torch.ones_like(k), -math.pi / 2 * k)
    err = (fv - v * expected).abs().max().item()
    if err > 1e-8:
        raise RuntimeError(f"fractional Fourier basis of size {v.shape[0]}: eigenvalue check failed ({err:.2e}); please report it")


def frft_basis(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(V [n, n], k [n])``: the real orthogonal Hermite-Gaussian DFT eigenvectors (columns)
    and their Hermite indices, in ``dtype`` on ``device``. Cached (computed once per size in
    float64 on the host); the returned tensors must not be modified."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"frft_basis: the size must be a positive int, got {n!r}")
    device = torch.device(device if device is not None else "cpu")
    key = (n, dtype, str(device))
    found = _CACHE.get(key)
    if found is not None:
        return found
    with _LOCK:
        base_key = (n, torch.float64, "cpu")
        if base_key not in _CACHE:
            v, k = _hermite_basis(n)
            _check_eigenvalues(v, k)
            _CACHE[base_key] = (v, k)
        v, k = _CACHE[base_key]
        _CACHE[key] = (v.to(device=device, dtype=dtype), k.to(device=device, dtype=dtype))
    return _CACHE[key]


def _phases(orders: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` of ``theta k``, ``theta = pi a / 2``: ``[*orders.shape, n]``, in the
    orders' dtype. The angle is formed in float64: ``a k`` reaches thousands of radians for wide
    layers, where float32 would lose ~1e-4 of the phase."""
    angle = orders.to(torch.float64).unsqueeze(-1) * (math.pi / 2) * k.to(torch.float64)
    return torch.cos(angle).to(orders.dtype), torch.sin(angle).to(orders.dtype)


def frft_matrix(orders: torch.Tensor, n: int) -> torch.Tensor:
    """``F_a [*orders.shape, n, n]`` (complex) for a tensor of orders; differentiable in them.
    ``F_a[j, m]`` multiplies ``x[m]``: ``frft(x, a) == F_a @ x``."""
    if not torch.is_tensor(orders):
        orders = torch.tensor(float(orders), dtype=torch.float64)
    real = orders.dtype if orders.is_floating_point() else torch.float32
    v, k = frft_basis(n, real, orders.device)
    cos, sin = _phases(orders.to(real), k)
    # V diag(e^{-i theta k}) V^T, real and imaginary parts
    re = (v * cos.unsqueeze(-2)) @ v.T
    im = -(v * sin.unsqueeze(-2)) @ v.T
    return torch.complex(re, im)


def frft(x: torch.Tensor, orders: torch.Tensor | float, dim: int = -1) -> torch.Tensor:
    """``F_a x`` along ``dim`` for real or complex ``x``, via the eigenbasis (``O(n^2)`` per
    vector): ``z = V^T x``, ``z *= exp(-i pi a k / 2)``, back with ``V``.

    ``orders``: a number, or a tensor broadcastable against ``x`` without ``dim`` (e.g. one
    order per batch row). Returns a complex tensor of ``x``'s shape; differentiable in ``x``
    and in ``orders``."""
    x = x.movedim(dim, -1)
    n = x.shape[-1]
    real = x.real.dtype if x.is_complex() else (x.dtype if x.is_floating_point() else torch.float32)
    a = orders.to(device=x.device, dtype=real) if torch.is_tensor(orders) else torch.tensor(float(orders), dtype=real, device=x.device)
    v, k = frft_basis(n, real, x.device)
    cos, sin = _phases(a, k)
    phase = torch.complex(cos, -sin)
    z = (x if x.is_complex() else x.to(real)) @ v.to(x.dtype if x.is_complex() else real)  # row vectors: x V = (V^T x)^T
    out = (z * phase) @ v.T.to(phase.dtype)
    return out.movedim(-1, dim)


class _FoldedFactors(torch.autograd.Function):
    """``(A', B')`` from ``(A, B, orders)`` with a hand-written backward that recomputes the
    thin products ``A V`` and ``V^T B`` instead of saving them, and never saves the bases:
    nothing of size ``d^2`` (nor any activation) is kept for backward."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor, orders: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        ctx.save_for_backward(a, b, orders)
        (e, r, d_in), d_out = a.shape, b.shape[-2]
        v_in, k_in = frft_basis(d_in, a.dtype, a.device)
        v_out, k_out = frft_basis(d_out, a.dtype, a.device)
        # A F_a = (A V) diag(e^{-i theta k}) V^T; plain 2-D matmuls (batched ones with a thin
        # r dimension run far slower on CPU)
        cos, sin = _phases(orders, k_in)  # [E, d_in]
        av = (a.reshape(e * r, d_in) @ v_in).view(e, r, d_in)
        a_new = torch.cat([av * cos.unsqueeze(1), -(av * sin.unsqueeze(1))], dim=1)  # [E, 2r, d_in]
        a_new = (a_new.reshape(e * 2 * r, d_in) @ v_in.T).view(e, 2 * r, d_in)
        # F_{-a} B = V diag(e^{+i theta k}) V^T B, with the experts side by side: [d_out, E, r]
        cos, sin = _phases(orders, k_out)  # [E, d_out]
        vb = (v_out.T @ b.permute(1, 0, 2).reshape(d_out, e * r)).view(d_out, e, r)
        b_new = torch.cat([vb * cos.T.unsqueeze(-1), -(vb * sin.T.unsqueeze(-1))], dim=-1)  # [d_out, E, 2r]
        b_new = (v_out @ b_new.reshape(d_out, e * 2 * r)).view(d_out, e, 2 * r)
        return a_new, b_new

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_a: torch.Tensor | None, grad_b: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        a, b, orders = ctx.saved_tensors
        (e, r, d_in), d_out = a.shape, b.shape[-2]
        grad_a = None if grad_a is None else grad_a.to(a.dtype)
        grad_b = None if grad_b is None else grad_b.to(a.dtype)
        grad_orders = torch.zeros_like(orders)
        da = db = None
        if grad_a is not None:
            v, k = frft_basis(d_in, a.dtype, a.device)
            cos, sin = _phases(orders, k)
            av = (a.reshape(e * r, d_in) @ v).view(e, r, d_in)
            g = (grad_a.reshape(e * 2 * r, d_in) @ v).view(e, 2 * r, d_in)
            p, q = g[:, :r], g[:, r:]  # the real and imaginary halves' gradients in the eigenbasis
            da = ((p * cos.unsqueeze(1) - q * sin.unsqueeze(1)).reshape(e * r, d_in) @ v.T).view(e, r, d_in)
            d_cos, d_sin = (av * p).sum(1), -(av * q).sum(1)  # [E, d_in]
            grad_orders += ((d_sin * cos - d_cos * sin) * k).sum(-1)
        if grad_b is not None:
            v, k = frft_basis(d_out, a.dtype, a.device)
            cos, sin = _phases(orders, k)
            vb = (v.T @ b.permute(1, 0, 2).reshape(d_out, e * r)).view(d_out, e, r)
            g = (v.T @ grad_b.reshape(d_out, e * 2 * r)).view(d_out, e, 2 * r)
            p, q = g[..., :r], g[..., r:]
            dvb = p * cos.T.unsqueeze(-1) - q * sin.T.unsqueeze(-1)  # [d_out, E, r]
            db = (v @ dvb.reshape(d_out, e * r)).view(d_out, e, r).permute(1, 0, 2)
            d_cos, d_sin = (vb * p).sum(-1).T, -(vb * q).sum(-1).T  # [E, d_out]
            grad_orders += ((d_sin * cos - d_cos * sin) * k).sum(-1)
        return da, db, grad_orders * (math.pi / 2)


def fractional_lowrank_factors(lora_a: torch.Tensor, lora_b: torch.Tensor, orders: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Real rank-``2r`` factors of ``E`` fractional-domain low-rank updates.

    For ``A_e [r, d_in]``, ``B_e [d_out, r]`` and orders ``a_e`` (``lora_a [E, r, d_in]``,
    ``lora_b [E, d_out, r]``, ``orders [E]``), the update of a real input ``x``::

        Re{ F_{-a} B A F_a x } = B' A' x,   A' = [Re(A F_a); Im(A F_a)]      [2r, d_in]
                                            B' = [Re(F_{-a} B), -Im(F_{-a} B)] [d_out, 2r]

    (``F_a`` of size ``d_in``, ``F_{-a}`` of size ``d_out``). Building them costs
    ``O(E r (d_in^2 + d_out^2))`` once per call, independent of the number of tokens, and keeps
    nothing but the inputs for backward; applying them is a real rank-``2r`` LoRA. Returns
    ``(A' [E, 2r, d_in], B' [E, d_out, 2r])`` in the factors' dtype (computed in at least
    float32); ``B'`` is a permuted view of a contiguous ``[d_out, E, 2r]`` tensor, the layout a
    layer stacking the experts side by side needs. Differentiable once in all three inputs."""
    work = torch.promote_types(lora_a.dtype, torch.float32)
    with torch.autocast(lora_a.device.type, enabled=False):  # the factors in float32 at least, under autocast too
        a_new, b_new = _FoldedFactors.apply(lora_a.to(work), lora_b.to(work), orders.to(work))
    return a_new.to(lora_a.dtype), b_new.permute(1, 0, 2).to(lora_b.dtype)
