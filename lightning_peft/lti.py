"""Discrete-time linear time-invariant systems in numpy/scipy: fitting, Gramians, balanced truncation.

Used by HRM's initialisation (``lightning_peft.hrm_calibration``) and usable on its own. A
system ``(A, B, C, D)`` maps inputs ``u_t [m]`` to outputs ``y_t [p]`` by
``s_{t+1} = A s_t + B u_t``, ``y_t = C s_t + D u_t`` (``A [N, N]``; stable when every eigenvalue
of ``A`` has modulus < 1). Its transfer function is ``G(z) = C (z I - A)^{-1} B + D``.

* :class:`ARXAccumulator` fits, by ridge-regularised least squares over streamed sequences, the
  ARX model ``z_t = sum_{k=1}^{q} F_k z_{t-k} + sum_{k=0}^{q} G_k u_{t-k}`` (``F_k = 0`` for
  ``autoregressive=False``: an FIR model) and realises it in block observer-canonical form of
  order ``N = q p`` (:func:`arx_realisation`).
* :func:`gramians`: controllability ``W_c = A W_c A^T + B B^T`` and observability
  ``W_o = A^T W_o A + C^T C`` from ``scipy.linalg.solve_discrete_lyapunov``.
* :func:`balanced_truncation`: the square-root method. Factor ``W_c = U U^T``, ``W_o = L L^T``;
  SVD ``U^T L = Z S Y^T`` (``S``: the Hankel singular values ``sigma_1 >= sigma_2 >= ...``);
  keep ``n``: ``T = U Z_n S_n^{-1/2}``, ``T^+ = S_n^{-1/2} Y_n^T L^T``,
  ``(A_r, B_r, C_r, D) = (T^+ A T, T^+ B, C T, D)``. For a stable system with
  ``sigma_n > sigma_{n+1}`` the result is stable and
  ``sigma_{n+1} <= ||G - G_r||_inf <= 2 sum_{i > n} sigma_i``.
* :func:`hinf_norm` evaluates ``||G||_inf = max_w sigma_max(G(e^{iw}))`` on a dense grid (a lower
  estimate of the true supremum that tightens as the grid grows).
* :func:`modal_form`: ``A = V diag(lambda) V^{-1}`` with ``B~ = V^{-1} B``, ``C~ = C V``.

No torch, no Lightning: numpy and scipy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import linalg

__all__ = [
    "ARXAccumulator",
    "BalancedTruncation",
    "arx_realisation",
    "balanced_truncation",
    "gramians",
    "hinf_norm",
    "modal_form",
    "spectral_radius",
]


def spectral_radius(a: np.ndarray) -> float:
    return float(np.abs(np.linalg.eigvals(a)).max()) if a.size else 0.0


def _lagged(x: np.ndarray, lag: int) -> np.ndarray:
    """``x`` ``[N, L, c]`` shifted ``lag`` steps later in time, zeros before the start."""
    if lag == 0:
        return x
    out = np.zeros_like(x)
    out[:, lag:] = x[:, :-lag]
    return out


class ARXAccumulator:
    """Streams ``(u, z, mask)`` batches into the normal equations of an ARX fit.

    ``u [N, L, m]``, ``z [N, L, p]``, ``mask [N, L]`` (True: a real token). Padded positions
    count as zero input (as the HRM layer treats them) and are left out of the targets. The
    regressor at time ``t`` is ``[u_t, u_{t-1}, .., u_{t-q}, z_{t-1}, .., z_{t-q}]`` (values before
    the sequence start are zero: the fit starts from rest like the layer's state).
    """

    def __init__(self, input_dim: int, output_dim: int, lags: int, autoregressive: bool = True) -> None:
        if lags < 1:
            raise ValueError(f"lags must be >= 1, got {lags}")
        self.m, self.p, self.lags, self.autoregressive = input_dim, output_dim, lags, autoregressive
        features = input_dim * (lags + 1) + (output_dim * lags if autoregressive else 0)
        self.gram = np.zeros((features, features))
        self.cross = np.zeros((features, output_dim))
        self.target_power = 0.0
        self.target_sum = np.zeros(output_dim)
        self.count = 0

    def update(self, u: np.ndarray, z: np.ndarray, mask: np.ndarray) -> None:
        mask = mask.astype(bool)
        u = np.where(mask[..., None], u, 0.0).astype(np.float64)
        z = np.where(mask[..., None], z, 0.0).astype(np.float64)
        columns = [_lagged(u, k) for k in range(self.lags + 1)]
        if self.autoregressive:
            columns += [_lagged(z, k) for k in range(1, self.lags + 1)]
        phi = np.concatenate(columns, axis=-1)[mask]  # [tokens, features]
        target = z[mask]
        self.gram += phi.T @ phi
        self.cross += phi.T @ target
        self.target_power += float((target**2).sum())
        self.target_sum += target.sum(axis=0)
        self.count += int(target.shape[0])

    def solve(self, ridge: float = 1e-3) -> tuple[np.ndarray, np.ndarray, float]:
        """``(F [q, p, p], G [q+1, p, m], r2)``: the ridge solution (``ridge`` relative to the
        mean diagonal of the Gram matrix) and the fraction of target variance it explains."""
        if self.count == 0:
            raise ValueError("no calibration tokens were seen: the ARX fit needs at least one unmasked position")
        scale = max(float(np.trace(self.gram)) / len(self.gram), 1e-30)
        theta = linalg.solve(self.gram + ridge * scale * np.eye(len(self.gram)), self.cross, assume_a="pos")
        residual = self.target_power - 2 * float((theta * self.cross).sum()) + float((theta * (self.gram @ theta)).sum())
        centred = self.target_power - float((self.target_sum**2).sum()) / self.count
        r2 = 1.0 - residual / centred if centred > 0 else 0.0
        m, p, q = self.m, self.p, self.lags
        g = theta[: m * (q + 1)].reshape(q + 1, m, p).transpose(0, 2, 1)
        f = theta[m * (q + 1) :].reshape(q, p, p).transpose(0, 2, 1) if self.autoregressive else np.zeros((q, p, p))
        return f, g, r2


def arx_realisation(f: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Block observer-canonical realisation of ``z_t = sum_k F_k z_{t-k} + sum_k G_k u_{t-k}``
    (``F [q, p, p]``, ``G [q+1, p, m]``): order ``q p``, ``A`` with ``F_k`` down its first block
    column and identities on the block superdiagonal, ``B_k = G_k + F_k G_0``, ``C = [I 0 .. 0]``,
    ``D = G_0``."""
    q, p, _ = f.shape
    a = np.zeros((q * p, q * p))
    b = np.zeros((q * p, g.shape[2]))
    for k in range(q):
        a[k * p : (k + 1) * p, :p] = f[k]
        if k + 1 < q:
            a[k * p : (k + 1) * p, (k + 1) * p : (k + 2) * p] = np.eye(p)
        b[k * p : (k + 1) * p] = g[k + 1] + f[k] @ g[0]
    c = np.zeros((p, q * p))
    c[:, :p] = np.eye(p)
    return a, b, c, g[0].copy()


def gramians(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(W_c, W_o)`` of a stable system (discrete Lyapunov equations); raises ``ValueError``
    for an unstable one (whose Gramians do not exist)."""
    rho = spectral_radius(a)
    if not rho < 1.0:
        raise ValueError(f"the system is not stable (spectral radius {rho:.6g} >= 1): its Gramians do not exist")
    w_c = linalg.solve_discrete_lyapunov(a, b @ b.T)
    w_o = linalg.solve_discrete_lyapunov(a.T, c.T @ c)
    return (w_c + w_c.T) / 2, (w_o + w_o.T) / 2


def _factor(w: np.ndarray) -> np.ndarray:
    """``F`` with ``w = F F^T`` for a positive semidefinite ``w`` (Cholesky when definite, else
    a symmetric eigen-factor with negative rounding noise clipped to zero)."""
    try:
        return np.linalg.cholesky(w)
    except np.linalg.LinAlgError:
        values, vectors = np.linalg.eigh(w)
        return vectors * np.sqrt(np.clip(values, 0.0, None))


@dataclass
class BalancedTruncation:
    """A reduced system and what its reduction cost: ``hankel`` holds every Hankel singular value
    of the full system (descending), ``bound = 2 * sum(hankel[order:])``."""

    a: np.ndarray
    b: np.ndarray
    c: np.ndarray
    d: np.ndarray
    hankel: np.ndarray
    order: int

    @property
    def bound(self) -> float:
        return float(2.0 * self.hankel[self.order :].sum())


def balanced_truncation(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray, order: int) -> BalancedTruncation:
    """Square-root balanced truncation of the stable ``(a, b, c, d)`` to ``order`` states.

    Raises ``ValueError`` if the system is unstable, if ``order`` is not in ``[1, N]``, or if
    fewer than ``order`` Hankel singular values are non-zero (the system's minimal order is
    smaller: lower ``order``)."""
    size = a.shape[0]
    if not 1 <= order <= size:
        raise ValueError(f"order must be in [1, {size}] (the full system's order), got {order}")
    w_c, w_o = gramians(a, b, c)
    upper, lower = _factor(w_c), _factor(w_o)
    z, s, yt = np.linalg.svd(upper.T @ lower)
    if not s[order - 1] > 1e-12 * max(s[0], 1e-300):
        nonzero = int((s > 1e-12 * max(s[0], 1e-300)).sum())
        raise ValueError(
            f"only {nonzero} Hankel singular values are non-zero, so balanced truncation cannot keep {order} states: "
            f"lower the order to <= {nonzero}"
        )
    root = 1.0 / np.sqrt(s[:order])
    t = upper @ z[:, :order] * root
    t_inv = (root[:, None] * yt[:order]) @ lower.T
    return BalancedTruncation(t_inv @ a @ t, t_inv @ b, c @ t, d.copy(), s, order)


def hinf_norm(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray, points: int = 4096) -> float:
    """``max_w sigma_max(C (e^{iw} I - A)^{-1} B + D)`` over ``points`` frequencies in
    ``[0, pi]`` (real systems: ``G(e^{-iw})`` is the conjugate), through an eigen-decomposition
    of ``A`` when it is well conditioned, else one solve per frequency."""
    omega = np.linspace(0.0, np.pi, points)
    z = np.exp(1j * omega)
    n = a.shape[0]
    values, vectors = np.linalg.eig(a) if n else (np.zeros(0), np.zeros((0, 0)))
    if n and np.linalg.cond(vectors) < 1e8:
        left, right = c @ vectors, np.linalg.solve(vectors, b)
        response = np.einsum("pn,wn,nm->wpm", left, 1.0 / (z[:, None] - values[None, :]), right) + d
    else:
        response = np.stack([c @ np.linalg.solve(zi * np.eye(n) - a, b) + d for zi in z])
    return float(np.linalg.norm(response, ord=2, axis=(1, 2)).max())


def modal_form(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """``(lambda [n], B~ [n, m], C~ [p, n], cond(V))`` with ``A = V diag(lambda) V^{-1}``: the
    same input-output map, ``C A^k B = C~ diag(lambda)^k B~`` (complex; conjugate pairs for a
    real system), exact when ``V`` is well conditioned."""
    values, vectors = np.linalg.eig(a)
    return values, np.linalg.solve(vectors, b.astype(complex)), c @ vectors, float(np.linalg.cond(vectors))
