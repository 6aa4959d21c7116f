"""Linear time-invariant state-space maths for HRM: kernels, the FFT convolution, a reference.

The system (one sequence, time ``t = 0 .. L-1``, zero initial state ``s_0 = 0``)::

    s_{t+1} = A s_t + B u_t          A [n, n], B [n, m], u_t [m]
    y_t     = C s_t + D u_t          C [p, n], D [p, m], y_t [p]

unrolls to ``y_t = D u_t + sum_{k=0}^{t-1} K_k u_{t-1-k}`` with the Markov parameters
``K_k = C A^k B`` (``[p, m]``). Because ``A`` is constant this is one causal convolution with
the kernel ``H = [D, K_0, K_1, ..., K_{L-2}]`` (``H_0 = D``, ``H_j = K_{j-1}``), computed with
real FFTs of length ``2L`` (zero padding makes the circular convolution linear, so no output
wraps around to an earlier time): ``y = irfft(rfft(H) * rfft(u))[:L]``, ``O(L log L)``, exact up
to floating-point rounding. :func:`sequential_ssm` is the step-by-step recurrence the tests
compare against.

HRM stores ``A`` in modal (complex-diagonal) form ``A = diag(lambda)``, ``lambda_j = r_j e^{i
theta_j}`` with complex ``B``, ``C`` and a real output ``Re(C s_t)``; :func:`diagonal_kernel`
builds its Markov parameters from ``lambda^k = exp(k (log r + i theta))``, which stays finite
(values and gradients) for every ``k`` when ``r < 1``. Pure torch.
"""

from __future__ import annotations

import torch

__all__ = ["causal_convolution", "dense_kernel", "diagonal_kernel", "modal_ssm", "sequential_ssm", "ssm_convolution"]


def dense_kernel(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, length: int) -> torch.Tensor:
    """``K_k = C A^k B`` for ``k = 0 .. length-1`` as ``[length, p, m]`` (dense ``A [n, n]``,
    ``B [n, m]``, ``C [p, n]``; ``length`` matrix products, for references and small systems)."""
    out = []
    state = b  # A^k B
    for _ in range(length):
        out.append(c @ state)
        state = a @ state
    return torch.stack(out) if out else c.new_zeros(0, c.shape[0], b.shape[1])


def diagonal_kernel(log_radius: torch.Tensor, theta: torch.Tensor, b: torch.Tensor, c: torch.Tensor, length: int) -> torch.Tensor:
    """``K_k = Re(C diag(lambda)^k B)`` for ``k = 0 .. length-1`` as a real ``[length, p, m]``.

    ``lambda_j = exp(log_radius_j + i theta_j)`` (``[n]`` each, ``log_radius < 0`` for a
    stable system); ``b`` complex ``[n, m]``, ``c`` complex ``[p, n]``. Cost ``O(length n p m)``.
    """
    k = torch.arange(length, device=log_radius.device, dtype=log_radius.dtype)
    # lambda^k = exp(k (log r + i theta)): from the logarithm, so large k never overflows or loses
    # phase; a complex exp rather than torch.polar, whose backward divides by r^k (0/0 = NaN once
    # r^k underflows)
    powers = torch.exp(k[:, None] * torch.complex(log_radius, theta)[None, :])  # [L, n]
    # Re(sum_j C[:, j] lambda_j^k B[j, :]) = Re((C * lambda^k) @ B)
    return torch.einsum("pn,kn,nm->kpm", c, powers, b).real


def causal_convolution(u: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``y_t = sum_{j=0}^{t} H_j u_{t-j}`` for ``u [batch, L, m]`` and ``kernel`` ``H [L', p, m]``
    (``L' >= L``; entries past ``L`` are unused), via real FFTs of length ``2L``: ``[batch, L, p]``.

    Computed in at least float32 (FFTs have no half-precision CPU kernels) and returned in that
    dtype."""
    length = u.shape[1]
    dtype = torch.promote_types(u.dtype, torch.float32)
    h = kernel[:length].to(dtype)
    n_fft = 2 * length
    u_f = torch.fft.rfft(u.to(dtype), n=n_fft, dim=1)  # [batch, L+1, m]
    h_f = torch.fft.rfft(h, n=n_fft, dim=0)  # [L+1, p, m]
    y_f = torch.einsum("bfm,fpm->bfp", u_f, h_f)
    return torch.fft.irfft(y_f, n=n_fft, dim=1)[:, :length]


def ssm_convolution(u: torch.Tensor, markov: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``y_t = D u_t + sum_{k=0}^{t-1} K_k u_{t-1-k}`` for ``u [batch, L, m]``, Markov parameters
    ``markov`` ``K [>= L-1, p, m]`` and ``d`` ``D [p, m]``: the kernel ``H = [D, K_0, ...]``
    through :func:`causal_convolution`. ``[batch, L, p]``."""
    length = u.shape[1]
    kernel = torch.cat([d[None].to(markov.dtype), markov[: max(length - 1, 0)]], dim=0)
    return causal_convolution(u, kernel)


def modal_ssm(
    u: torch.Tensor, log_radius: torch.Tensor, theta: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor
) -> torch.Tensor:
    """The same output as ``ssm_convolution(u, diagonal_kernel(...), d)``, convolved in mode space.

    With ``v = u B^T`` (complex ``[batch, L, n]``) each mode is a scalar recurrence,
    ``s_{t+1,j} = lambda_j s_{t,j} + v_{t,j}``, i.e. ``s_{t,j} = sum_{k<t} lambda_j^k v_{t-1-k,j}``:
    one complex FFT convolution (length ``2L``) per mode with the geometric kernel ``lambda_j^k``,
    then ``z = Re(s C^T) + u D^T``. The products are elementwise over ``n`` channels instead of an
    ``m x m`` matrix per frequency, which is what makes it fast (and light in backward).
    ``u [batch, L, m]`` real, ``b`` complex ``[n, m]``, ``c`` complex ``[p, n]``, ``d [p, m]``
    -> ``[batch, L, p]``, in at least float32."""
    length = u.shape[1]
    dtype = torch.promote_types(u.dtype, torch.float32)
    u = u.to(dtype)
    n_fft = 2 * length
    k = torch.arange(length, device=u.device, dtype=log_radius.dtype)
    geometric = torch.exp(k[:, None] * torch.complex(log_radius, theta)[None, :])  # lambda^k, [L, n]
    v = u.to(b.dtype) @ b.T  # [batch, L, n]
    w = torch.fft.ifft(torch.fft.fft(v, n=n_fft, dim=1) * torch.fft.fft(geometric, n=n_fft, dim=0), dim=1)[:, : length - 1]
    state = torch.cat([w.new_zeros(w.shape[0], 1, w.shape[2]), w], dim=1)  # s_0 = 0, s_t = w_{t-1}
    return (state @ c.T).real.to(dtype) + u @ d.to(dtype).T


def sequential_ssm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The recurrence itself, one step at a time from ``s_0 = 0`` (the reference the FFT form
    is tested against): ``a [n, n]``, ``b [n, m]``, ``c [p, n]``, ``d [p, m]`` (real or complex;
    a complex system's output is its real part), ``u [batch, L, m]`` -> ``[batch, L, p]``."""
    batch, length, _ = u.shape
    dtype = torch.promote_types(a.dtype, u.dtype)
    state = torch.zeros(batch, a.shape[0], dtype=dtype, device=u.device)
    outputs = []
    for t in range(length):
        u_t = u[:, t].to(dtype)
        y_t = state @ c.to(dtype).T + u_t @ d.to(dtype).T
        outputs.append(y_t.real if y_t.is_complex() else y_t)
        state = state @ a.to(dtype).T + u_t @ b.to(dtype).T
    return torch.stack(outputs, dim=1)
