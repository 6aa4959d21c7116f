"""Balanced truncation (numpy/scipy): the standard error bound on random stable systems, the
Gramians, the ARX fit and its realisation, the modal form, and clear refusals."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import signal

from lightning_peft.lti import (
    ARXAccumulator,
    arx_realisation,
    balanced_truncation,
    gramians,
    hinf_norm,
    modal_form,
    spectral_radius,
)


def random_stable(order: int, m: int, p: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((order, order))
    a *= rng.uniform(0.6, 0.95) / spectral_radius(a)
    return a, rng.standard_normal((order, m)), rng.standard_normal((p, order)), rng.standard_normal((p, m))


def difference(full: tuple[np.ndarray, ...], reduced: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """The error system G - G_r as one realisation."""
    (a, b, c, d), (ar, br, cr, dr) = full, reduced
    n, r = len(a), len(ar)
    big = np.block([[a, np.zeros((n, r))], [np.zeros((r, n)), ar]])
    return big, np.vstack([b, br]), np.hstack([c, -cr]), d - dr


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("order", [1, 3, 6])
def test_hinf_error_is_within_twice_the_discarded_hankel_values(seed: int, order: int) -> None:
    system = random_stable(12, 2, 3, seed)
    bt = balanced_truncation(*system, order=order)
    error = hinf_norm(*difference(system, (bt.a, bt.b, bt.c, bt.d)), points=8192)
    assert error <= bt.bound * (1 + 1e-6) + 1e-9, (error, bt.bound)
    assert error >= bt.hankel[order] * (1 - 1e-2)  # the lower bound: the truncation is not trivially good
    assert spectral_radius(bt.a) < 1.0  # truncating a stable system keeps it stable


def test_the_full_order_realisation_is_balanced() -> None:
    """At full order T is a similarity that balances: both Gramians equal diag(sigma). (A
    truncated discrete-time system is in general not balanced itself, unlike continuous time.)"""
    system = random_stable(10, 2, 2, seed=11)
    bt = balanced_truncation(*system, order=10)
    w_c, w_o = gramians(bt.a, bt.b, bt.c)
    assert np.allclose(w_c, np.diag(bt.hankel), atol=1e-8 * bt.hankel[0])
    assert np.allclose(w_o, np.diag(bt.hankel), atol=1e-8 * bt.hankel[0])


def test_gramians_solve_the_lyapunov_equations_and_match_the_hankel_values() -> None:
    a, b, c, _ = random_stable(8, 2, 2, seed=5)
    w_c, w_o = gramians(a, b, c)
    assert np.allclose(a @ w_c @ a.T + b @ b.T, w_c) and np.allclose(a.T @ w_o @ a + c.T @ c, w_o)
    hankel = np.sqrt(np.sort(np.linalg.eigvals(w_c @ w_o).real)[::-1])
    assert np.allclose(balanced_truncation(a, b, c, np.zeros((2, 2)), 8).hankel, hankel, rtol=1e-6)


def test_full_order_truncation_reproduces_the_system() -> None:
    system = random_stable(6, 1, 1, seed=7)
    bt = balanced_truncation(*system, order=6)
    assert hinf_norm(*difference(system, (bt.a, bt.b, bt.c, bt.d))) < 1e-8


def test_hinf_norm_agrees_with_scipy_on_a_siso_system() -> None:
    a, b, c, d = random_stable(5, 1, 1, seed=2)
    _, response = signal.dfreqresp(signal.StateSpace(a, b, c, d, dt=1.0), w=np.linspace(0, np.pi, 4096))
    assert abs(hinf_norm(a, b, c, d, points=4096) - np.abs(response).max()) < 1e-8


def test_unstable_systems_and_bad_orders_are_refused() -> None:
    a, b, c, d = random_stable(4, 1, 1, seed=1)
    with pytest.raises(ValueError, match="not stable"):
        balanced_truncation(a * 1.5 / spectral_radius(a), b, c, d, 2)
    with pytest.raises(ValueError, match=r"order must be in \[1, 4\]"):
        balanced_truncation(a, b, c, d, 5)
    # a system of minimal order 1 padded to 4 states: only one Hankel value is non-zero
    padded = np.zeros((4, 4))
    padded[0, 0] = 0.5
    with pytest.raises(ValueError, match="only 1 Hankel singular values are non-zero"):
        balanced_truncation(padded, np.eye(4)[:, :1], np.eye(4)[:1], np.zeros((1, 1)), 2)


def simulate_arx(f: np.ndarray, g: np.ndarray, u: np.ndarray) -> np.ndarray:
    q, p = f.shape[0], f.shape[1]
    z = np.zeros((u.shape[0], u.shape[1], p))
    for t in range(u.shape[1]):
        acc = sum(u[:, t - k] @ g[k].T for k in range(q + 1) if t - k >= 0)
        acc = acc + sum(z[:, t - k] @ f[k - 1].T for k in range(1, q + 1) if t - k >= 0)
        z[:, t] = acc
    return z


def simulate(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray, u: np.ndarray) -> np.ndarray:
    s = np.zeros((u.shape[0], a.shape[0]))
    out = []
    for t in range(u.shape[1]):
        out.append(s @ c.T + u[:, t] @ d.T)
        s = s @ a.T + u[:, t] @ b.T
    return np.stack(out, axis=1)


def test_arx_fit_recovers_a_known_model_and_its_realisation_matches() -> None:
    rng = np.random.default_rng(0)
    q, m, p = 2, 2, 2
    f = rng.standard_normal((q, p, p)) * 0.2
    g = rng.standard_normal((q + 1, p, m))
    u = rng.standard_normal((6, 200, m))
    z = simulate_arx(f, g, u)
    acc = ARXAccumulator(m, p, lags=q)
    acc.update(u[:3], z[:3], np.ones((3, 200)))
    acc.update(u[3:], z[3:], np.ones((3, 200)))
    f_hat, g_hat, r2 = acc.solve(ridge=1e-10)
    assert np.allclose(f_hat, f, atol=1e-6) and np.allclose(g_hat, g, atol=1e-6) and r2 > 0.999999
    a, b, c, d = arx_realisation(f_hat, g_hat)
    assert a.shape == (q * p, q * p)
    assert np.allclose(simulate(a, b, c, d, u), z, atol=1e-5)


def test_fir_fit_ignores_padding_and_is_stable() -> None:
    rng = np.random.default_rng(1)
    g = rng.standard_normal((4, 1, 2))
    u = rng.standard_normal((4, 50, 2))
    z = simulate_arx(np.zeros((3, 1, 1)), g, u)
    mask = np.ones((4, 50), dtype=bool)
    mask[:, 40:] = False  # right padding: garbage there must not matter
    z[:, 40:] = 1e6
    acc = ARXAccumulator(2, 1, lags=3, autoregressive=False)
    acc.update(u, z, mask)
    f_hat, g_hat, _ = acc.solve(ridge=1e-10)
    assert np.allclose(g_hat, g, atol=1e-6) and not f_hat.any()
    assert spectral_radius(arx_realisation(f_hat, g_hat)[0]) == 0.0  # an FIR model is nilpotent: stable


def test_arx_without_data_is_refused() -> None:
    with pytest.raises(ValueError, match="no calibration tokens"):
        ARXAccumulator(2, 2, lags=2).solve()


def test_modal_form_has_the_same_markov_parameters() -> None:
    a, b, c, _ = random_stable(6, 2, 3, seed=3)
    lam, bm, cm, cond = modal_form(a, b, c)
    assert cond < 1e6
    for k in range(10):
        assert np.allclose((cm * lam**k) @ bm, c @ np.linalg.matrix_power(a, k) @ b, atol=1e-9)
