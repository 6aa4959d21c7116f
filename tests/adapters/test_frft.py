"""The discrete fractional Fourier transform (matrix form): identity at 0, the orthonormal DFT
at 1, additivity, unitarity, Hermite-Gaussian eigenvectors, gradients in the order and the input,
batching over orders, and the folded low-rank factors FRAME runs on."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_peft.adapters.kernels.frft import fractional_lowrank_factors, frft, frft_basis, frft_matrix

SIZES = [1, 2, 3, 4, 5, 8, 12, 17, 32, 63]  # odd and even, n = 0 mod 4 and 2 mod 4
F64 = torch.float64


def dft(n: int) -> torch.Tensor:
    return torch.fft.fft(torch.eye(n, dtype=torch.complex128), dim=0, norm="ortho")


@pytest.mark.parametrize("n", SIZES)
def test_order_0_is_identity_and_order_1_is_the_orthonormal_dft(n):
    eye = torch.eye(n, dtype=torch.complex128)
    assert torch.allclose(frft_matrix(torch.tensor(0.0, dtype=F64), n), eye, atol=1e-12)
    assert torch.allclose(frft_matrix(torch.tensor(1.0, dtype=F64), n), dft(n), atol=1e-12)
    x = torch.randn(3, n, dtype=F64, generator=torch.Generator().manual_seed(n))
    assert torch.allclose(frft(x, 1.0), torch.fft.fft(x, norm="ortho"), atol=1e-12)
    assert torch.allclose(frft(x, 0.0), x.to(torch.complex128), atol=1e-12)
    # integer orders: F_2 is the parity flip x[-j], F_-1 the inverse DFT
    assert torch.allclose(frft(x, 2.0), torch.roll(x.flip(-1), 1, -1).to(torch.complex128), atol=1e-12)
    assert torch.allclose(frft(x, -1.0), torch.fft.ifft(x, norm="ortho"), atol=1e-12)


@pytest.mark.parametrize("n", [5, 8, 12, 31])
def test_additivity_unitarity_and_inverse(n):
    a = torch.tensor([0.3, -0.7, 1.4, 0.25], dtype=F64)
    b = torch.tensor([0.45, 0.2, -0.9, 1.75], dtype=F64)
    fa, fb, fab = frft_matrix(a, n), frft_matrix(b, n), frft_matrix(a + b, n)
    assert torch.allclose(fa @ fb, fab, atol=1e-11)
    eye = torch.eye(n, dtype=torch.complex128).expand(4, n, n)
    assert torch.allclose(fa @ fa.mH, eye, atol=1e-11)
    assert torch.allclose(frft_matrix(-a, n), fa.conj(), atol=1e-12)  # F_{-a} = conj(F_a) = F_a^{-1}
    assert torch.allclose(fa, fa.transpose(-2, -1), atol=1e-12)  # symmetric
    assert torch.allclose(frft_matrix(a + 4.0, n), fa, atol=1e-10)  # period 4


def test_eigenvectors_are_hermite_gaussian_like():
    """Low-index eigenvectors sample Hermite functions: the 0th is a (periodised) Gaussian
    around index 0, and the k-th has k sign changes over the centred grid."""
    n = 64
    v, k = frft_basis(n, F64)
    assert torch.allclose(v.T @ v, torch.eye(n, dtype=F64), atol=1e-12)
    assert k.tolist() == list(range(n - 1)) + [n]  # even n: indices 0..n-2 and n
    centred = torch.roll(v, n // 2, dims=0)  # index 0 in the middle
    t = (torch.arange(n, dtype=F64) - n // 2) * math.sqrt(2 * math.pi / n)
    gauss = torch.exp(-(t**2) / 2)
    assert abs(float(centred[:, 0] @ gauss / gauss.norm())) > 0.999
    for i in range(6):
        x = centred[:, i]
        x = x[x.abs() > 1e-6 * x.abs().max()]
        assert int((x[1:] * x[:-1] < 0).sum()) == i
    assert frft_basis(7, F64)[1].tolist() == list(range(7))


def test_fractional_orders_match_a_continuous_gaussian():
    # a Gaussian of unit width is an eigenfunction of every continuous F_a; the discrete
    # Hermite-Gaussian basis is a second-order approximation (error ~1e-3 at n = 64)
    n = 64
    t = (torch.arange(n, dtype=F64) - n // 2) * math.sqrt(2 * math.pi / n)
    g = torch.roll(torch.exp(-(t**2) / 2), -(n // 2))
    for a in (0.3, 0.5, 1.7):
        assert torch.allclose(frft(g, a).abs(), g.to(torch.complex128).abs(), atol=5e-3)


def test_gradcheck_in_the_order_and_the_input():
    gen = torch.Generator().manual_seed(0)
    for n in (5, 6):
        x = torch.randn(2, n, dtype=F64, generator=gen, requires_grad=True)
        for a0 in (0.0, 1.0, 0.37, 1.6):  # integer orders too: nonzero, exact gradient
            a = torch.tensor([a0, a0 + 0.2], dtype=F64, requires_grad=True)
            assert torch.autograd.gradcheck(lambda x, a: torch.view_as_real(frft(x, a)), (x, a))
            assert torch.autograd.gradcheck(lambda a, n=n: torch.view_as_real(frft_matrix(a, n)), (a,))
        grad = torch.autograd.grad(frft(x, torch.tensor(1.0, dtype=F64, requires_grad=True)).real.sum(), x)[0]
        assert grad.abs().sum() > 0
    z = torch.randn(2, 5, dtype=torch.complex128, generator=gen, requires_grad=True)
    a = torch.tensor(0.6, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z, a: torch.view_as_real(frft(z, a)), (z, a))
    assert torch.autograd.grad(frft(z, a).real.sum(), a)[0].abs() > 0


def test_batched_orders_equal_one_call_per_order_and_dim():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 9, dtype=F64, generator=gen)
    a = torch.tensor([0.0, 0.5, 1.0, 1.3], dtype=F64)
    batched = frft(x, a.unsqueeze(-1).squeeze(-1))
    for i in range(4):
        assert torch.allclose(batched[i], frft(x[i], float(a[i])), atol=1e-12)
        assert torch.allclose(batched[i], frft_matrix(a[i], 9) @ x[i].to(torch.complex128), atol=1e-12)
    assert torch.allclose(frft(x.T, a, dim=0), batched.T, atol=1e-12)


def test_float32_and_cache():
    v32, _ = frft_basis(48, torch.float32)
    assert v32.dtype == torch.float32 and frft_basis(48, torch.float32)[0] is v32  # cached
    x = torch.randn(3, 48)
    assert torch.allclose(frft(x, 1.0), torch.fft.fft(x, norm="ortho"), atol=1e-5)
    with pytest.raises(ValueError, match="positive int"):
        frft_basis(0)
    # a MiniLM-wide transform in float32: the phases a k (hundreds of radians) stay exact
    x = torch.randn(2, 384)
    assert torch.allclose(frft(x, 1.0), torch.fft.fft(x, norm="ortho"), atol=2e-6)
    assert torch.allclose(frft(frft(x, 0.3), 0.7), torch.fft.fft(x, norm="ortho"), atol=4e-6)


@pytest.mark.parametrize(("d_in", "d_out"), [(6, 6), (7, 10), (12, 5)])
def test_folded_factors_equal_the_transformed_update(d_in, d_out):
    """B' A' x == Re{F_{-a}(B A F_a x)} with transforms of size d_in and d_out."""
    gen = torch.Generator().manual_seed(d_in)
    e, r = 3, 2
    a_mat = torch.randn(e, r, d_in, dtype=F64, generator=gen)
    b_mat = torch.randn(e, d_out, r, dtype=F64, generator=gen)
    orders = torch.tensor([0.0, 0.4, 1.0], dtype=F64)
    x = torch.randn(5, d_in, dtype=F64, generator=gen)
    a_new, b_new = fractional_lowrank_factors(a_mat, b_mat, orders)
    assert a_new.shape == (e, 2 * r, d_in) and b_new.shape == (e, d_out, 2 * r)
    for i in range(e):
        xa = frft(x, orders[i])  # [5, d_in] complex
        inner = xa @ a_mat[i].T.to(xa.dtype) @ b_mat[i].T.to(xa.dtype)  # (B A F_a x)^T rows
        expected = frft(inner, -orders[i]).real
        assert torch.allclose(x @ a_new[i].T @ b_new[i].T, expected, atol=1e-10)
    assert torch.allclose(b_new[0] @ a_new[0], b_mat[0] @ a_mat[0], atol=1e-12)  # a = 0: the LoRA update
