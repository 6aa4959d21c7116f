"""The state-space kernels: FFT convolution == the sequential recurrence (float32 and float64),
dense == modal kernels, causality, and long sequences that stay finite."""

from __future__ import annotations

import pytest
import torch

from lightning_peft.adapters.kernels.ssm import (
    causal_convolution,
    dense_kernel,
    diagonal_kernel,
    modal_ssm,
    sequential_ssm,
    ssm_convolution,
)


def _stable_dense(n: int, m: int, p: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=dtype)
    a = 0.9 * a / torch.linalg.matrix_norm(a, ord=2)  # spectral radius <= 0.9
    b, c, d = (torch.randn(*shape, generator=g, dtype=dtype) for shape in ((n, m), (p, n), (p, m)))
    return a, b, c, d


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("length", [1, 2, 37, 128])
def test_fft_convolution_equals_the_recurrence(dtype: torch.dtype, tol: float, length: int) -> None:
    a, b, c, d = _stable_dense(6, 3, 4, dtype)
    u = torch.randn(2, length, 3, dtype=dtype, generator=torch.Generator().manual_seed(1))
    reference = sequential_ssm(a, b, c, d, u)
    fast = ssm_convolution(u, dense_kernel(a, b, c, length), d)
    assert fast.dtype == dtype and fast.shape == (2, length, 4)
    scale = reference.abs().max().item()
    assert torch.allclose(fast, reference, atol=tol * max(scale, 1.0), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_diagonal_kernel_equals_the_complex_recurrence(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    n, m, p, length = 5, 3, 2, 64
    log_r = torch.log(torch.rand(n, generator=g, dtype=dtype) * 0.5 + 0.45)
    theta = torch.rand(n, generator=g, dtype=dtype) * 3.14
    cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    b = torch.randn(n, m, generator=g, dtype=cdtype)
    c = torch.randn(p, n, generator=g, dtype=cdtype)
    d = torch.randn(p, m, generator=g, dtype=dtype)
    lam = torch.polar(torch.exp(log_r), theta)
    modal = diagonal_kernel(log_r, theta, b, c, length)
    dense = dense_kernel(torch.diag(lam), b, c, length).real
    assert torch.allclose(modal, dense, atol=1e-5 if dtype == torch.float32 else 1e-12)
    u = torch.randn(3, length, m, generator=g, dtype=dtype)
    reference = sequential_ssm(torch.diag(lam), b, c, d.to(cdtype), u)
    fast = ssm_convolution(u, modal, d)
    assert torch.allclose(fast, reference.to(dtype), atol=(1e-4 if dtype == torch.float32 else 1e-10) * reference.abs().max().item())


def test_causality_a_future_token_leaves_the_past_unchanged() -> None:
    a, b, c, d = _stable_dense(4, 2, 2, torch.float64, seed=3)
    u = torch.randn(1, 50, 2, dtype=torch.float64)
    kernel = dense_kernel(a, b, c, 50)
    before = ssm_convolution(u, kernel, d)
    changed = u.clone()
    changed[:, 30] += 10.0
    after = ssm_convolution(changed, kernel, d)
    assert torch.equal(before[:, :30], after[:, :30]) or torch.allclose(before[:, :30], after[:, :30], atol=1e-12)
    assert (after[:, 30:] - before[:, 30:]).abs().max() > 1.0  # the change does reach t >= 30


def test_convolution_is_linear_not_circular() -> None:
    """A pulse at the last step must not wrap around to t = 0 (the 2L padding)."""
    kernel = torch.ones(8, 1, 1)
    u = torch.zeros(1, 8, 1)
    u[0, -1] = 1.0
    y = causal_convolution(u, kernel)
    assert torch.allclose(y[0, :-1], torch.zeros(7, 1), atol=1e-6) and abs(y[0, -1, 0].item() - 1.0) < 1e-6


def test_long_kernels_stay_finite_near_the_unit_circle() -> None:
    log_r = torch.log(torch.tensor([0.9999, 0.5]))
    theta = torch.tensor([0.3, 2.0])
    b = torch.ones(2, 1, dtype=torch.complex64)
    c = torch.ones(1, 2, dtype=torch.complex64)
    kernel = diagonal_kernel(log_r, theta, b, c, 100_000)
    assert torch.isfinite(kernel).all() and kernel.abs().max() <= 2.0 + 1e-4


def test_half_precision_inputs_run_in_float32() -> None:
    a, b, c, d = _stable_dense(3, 2, 2, torch.float32)
    u = torch.randn(1, 16, 2).to(torch.bfloat16)
    y = ssm_convolution(u, dense_kernel(a, b, c, 16), d)
    assert y.dtype == torch.float32
    assert torch.allclose(y, sequential_ssm(a, b, c, d, u.float()), atol=1e-4)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("length", [1, 2, 50])
def test_modal_convolution_equals_the_kernel_form_and_the_recurrence(dtype: torch.dtype, tol: float, length: int) -> None:
    g = torch.Generator().manual_seed(4)
    n, m, p = 6, 3, 2
    cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    log_r = torch.log(torch.rand(n, generator=g, dtype=dtype) * 0.5 + 0.49)
    theta = torch.rand(n, generator=g, dtype=dtype) * 6.0 - 3.0
    b, c = torch.randn(n, m, generator=g, dtype=cdtype), torch.randn(p, n, generator=g, dtype=cdtype)
    d = torch.randn(p, m, generator=g, dtype=dtype)
    u = torch.randn(2, length, m, generator=g, dtype=dtype)
    fast = modal_ssm(u, log_r, theta, b, c, d)
    kernel_form = ssm_convolution(u, diagonal_kernel(log_r, theta, b, c, max(length - 1, 0)), d)
    reference = sequential_ssm(torch.diag(torch.polar(torch.exp(log_r), theta)), b, c, d.to(cdtype), u).to(dtype)
    scale = max(reference.abs().max().item(), 1.0)
    assert fast.dtype == dtype and fast.shape == (2, length, p)
    assert torch.allclose(fast, reference, atol=tol * scale) and torch.allclose(kernel_form, reference, atol=tol * scale)


def test_modal_gradients_match_the_recurrence() -> None:
    g = torch.Generator().manual_seed(5)
    n, m = 3, 2
    log_r = (torch.rand(n, generator=g, dtype=torch.float64) * -1.0).requires_grad_()
    theta = torch.rand(n, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(n, m, generator=g, dtype=torch.complex128, requires_grad=True)
    c = torch.randn(m, n, generator=g, dtype=torch.complex128, requires_grad=True)
    d = torch.randn(m, m, generator=g, dtype=torch.float64, requires_grad=True)
    u = torch.randn(2, 20, m, generator=g, dtype=torch.float64)
    weights = torch.randn(2, 20, m, generator=g, dtype=torch.float64)
    fast = torch.autograd.grad((modal_ssm(u, log_r, theta, b, c, d) * weights).sum(), (log_r, theta, b, c, d))
    lam = torch.exp(torch.complex(log_r, theta))
    slow = torch.autograd.grad((sequential_ssm(torch.diag(lam), b, c, d.to(torch.complex128), u) * weights).sum(), (log_r, theta, b, c, d))
    for a, r in zip(fast, slow):
        assert torch.allclose(a, r, atol=1e-9)
