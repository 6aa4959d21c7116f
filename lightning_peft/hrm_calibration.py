"""HRM's balanced-truncation initialisation from calibration batches (plain PyTorch).

``calibrate_hrm(model, batches)`` runs the frozen model (every HRM layer switched off, no
gradients, eval mode) over a few batches and initialises every ``HRM(init="balanced_truncation")``
layer from what its site saw. Per site, with inputs ``x_t [d_in]``, outputs ``h_t [d_out]`` and
the padding mask (only real tokens count):

1. **Reduced coordinates.** ``P_in = Lambda_x^{-1/2} V_x^T`` from the top ``m`` eigenpairs of the
   centred covariance of ``x`` (so ``u`` is white: unit variance per channel), and likewise
   ``W = Lambda_h^{-1/2} V_h^T`` for the outputs, ``z_t = W (h_t - mean(h))``.
2. **High-order model.** A ridge least-squares ARX fit (or FIR with ``fit="fir"``) of ``z_t`` on
   ``u_{t..t-q}`` (and ``z_{t-1..t-q}``), centred, with ``q = fit_lags``
   (``lightning_peft.lti.ARXAccumulator``), realised in block observer-canonical form of order
   ``N = q m``. An unstable fit (spectral radius >= 1) raises, or with ``on_unstable="random"``
   leaves that site at its random initialisation with a warning.
3. **Balanced truncation** to ``n = state_dim`` states (controllability/observability Gramians by
   ``scipy.linalg.solve_discrete_lyapunov``, square-root method, the top ``n`` Hankel singular
   values; the H-infinity error of the reduction is at most twice the sum of the discarded ones).
4. **Into the layer's parameterisation.** The dense reduced ``A_r`` is diagonalised,
   ``A_r = V diag(lambda) V^{-1}``: ``B = V^{-1} B_r``, ``C = C_r V`` (complex), ``D = G_0``. Same
   input-output map; the report gives the relative Markov-parameter error of that step (moduli are
   clipped into ``(0, 1 - 1e-4)``). ``P_out`` stays zero, so the model still starts exactly at the
   frozen one: balanced truncation sets the *dynamics* and the input reduction.

Everything is computed before anything is written: an error leaves every layer unchanged. Memory:
two ``d x d`` float64 moment matrices per site while it runs, and the batches themselves.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_peft.adapters.hrm import MAX_RADIUS, HRMLayer
from lightning_peft.lti import ARXAccumulator, arx_realisation, balanced_truncation, modal_form, spectral_radius

__all__ = ["HRMCalibrationReport", "SiteCalibration", "calibrate_hrm", "default_forward"]


@dataclass
class SiteCalibration:
    """What calibration did at one site."""

    name: str
    status: str  # "balanced_truncation" or "random (unstable fit)"
    tokens: int
    fit_r2: float
    fitted_order: int
    fitted_radius: float
    hankel: list[float] = field(default_factory=list)  # the fitted system's Hankel singular values, descending
    kept: int = 0
    error_bound: float = 0.0  # 2 * sum of the discarded Hankel singular values
    reduced_radius: float = 0.0
    modal_error: float = 0.0  # relative error of the Markov parameters after diagonalisation


@dataclass
class HRMCalibrationReport:
    batches: int
    sites: list[SiteCalibration]

    def __str__(self) -> str:
        lines = [f"HRM calibration on {self.batches} batches", f"{'site':40s} {'status':22s} {'tokens':>7s} {'fit R2':>7s} {'kept':>5s} "
                 f"{'bound/sum':>9s} {'radius':>7s}"]  # fmt: skip
        for s in self.sites:
            total = sum(s.hankel) or 1.0
            share = s.error_bound / (2 * total)  # discarded share of the Hankel singular values
            lines.append(f"{s.name:40s} {s.status:22s} {s.tokens:7d} {s.fit_r2:7.3f} {s.kept:5d} {share:9.3f} {s.reduced_radius:7.4f}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Running the model
# --------------------------------------------------------------------------------------------
def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on ``batch``: a dict as keyword arguments (only those ``forward`` takes,
    e.g. ``labels`` is dropped for a model without it), a tuple/list as positional arguments (as
    many as ``forward`` takes: ``(x, y)`` gives ``model(x)``), anything else as the one argument."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    if isinstance(batch, Mapping):
        names = {p.name for p in params}
        kwargs = {k: v for k, v in batch.items() if var_kw or k in names}
        return model(**kwargs) if kwargs or not params else model(batch)  # forward(batch): the dict itself
    if isinstance(batch, (list, tuple)):
        if any(p.kind is p.VAR_POSITIONAL for p in params):
            return model(*batch)
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        return model(*batch[: max(1, len(positional))])
    return model(batch)


class _Moments:
    """Pass 1 at one site: masked token counts, sums and second moments of ``x`` and ``h``."""

    def __init__(self) -> None:
        self.count = 0
        self.sx: torch.Tensor | None = None
        self.sxx: torch.Tensor | None = None
        self.sh: torch.Tensor | None = None
        self.shh: torch.Tensor | None = None

    def __call__(self, layer: HRMLayer, x: torch.Tensor, h: torch.Tensor, mask: torch.Tensor | None) -> None:
        keep = mask if mask is not None else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        xs, hs = x[keep].double(), h[keep].double()
        pairs = ((xs.sum(0), xs.T @ xs), (hs.sum(0), hs.T @ hs))
        if self.sx is None:
            (self.sx, self.sxx), (self.sh, self.shh) = pairs
        else:
            self.sx, self.sxx = self.sx + pairs[0][0], self.sxx + pairs[0][1]
            self.sh, self.shh = self.sh + pairs[1][0], self.shh + pairs[1][1]
        self.count += int(keep.sum())

    def whitening(self, which: str, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W [m, d], mean [d])``: the top-``m`` principal directions, scaled to unit variance."""
        s, ss = (self.sx, self.sxx) if which == "x" else (self.sh, self.shh)
        mean = s / self.count
        cov = ss / self.count - torch.outer(mean, mean)
        values, vectors = torch.linalg.eigh(cov.cpu())
        top_values, top_vectors = values.flip(0)[:m], vectors.flip(1)[:, :m]
        floor = max(float(values.max()) * 1e-8, 1e-30)
        return (top_vectors / top_values.clamp_min(floor).sqrt()).T, mean.cpu()


class _Fit:
    """Pass 2 at one site: the reduced, centred signals into an ARX accumulator."""

    def __init__(self, moments: _Moments, layer: HRMLayer) -> None:
        spec = layer.spec
        self.p_in, self.mean_x = moments.whitening("x", spec.input_dim)
        self.w_out, self.mean_h = moments.whitening("h", spec.input_dim)
        self.acc = ARXAccumulator(spec.input_dim, spec.input_dim, spec.fit_lags, autoregressive=spec.fit == "arx")

    def __call__(self, layer: HRMLayer, x: torch.Tensor, h: torch.Tensor, mask: torch.Tensor | None) -> None:
        u = (x.double().cpu() - self.mean_x) @ self.p_in.T
        z = (h.double().cpu() - self.mean_h) @ self.w_out.T
        keep = mask.cpu() if mask is not None else torch.ones(x.shape[:2], dtype=torch.bool)
        self.acc.update(u.numpy(), z.numpy(), keep.numpy())


def _run(model: nn.Module, layers: dict[str, HRMLayer], recorders: dict[str, Any], batches: list[Any], forward: Callable) -> None:
    for name, layer in layers.items():
        layer.recorder = recorders[name]
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    forward(model, batch)
                except TypeError as error:
                    raise TypeError(
                        f"calibrate_hrm could not run {type(model).__name__} on a batch ({error}); pass forward=lambda model, "
                        "batch: ... to calibrate_hrm, or define hrm_calibration_forward(batch) on the LightningModule"
                    ) from error
    finally:
        for layer in layers.values():
            layer.recorder = None
        for module, flag in training.items():
            module.train(flag)


# --------------------------------------------------------------------------------------------
# Per-site maths
# --------------------------------------------------------------------------------------------
def _reduce(name: str, layer: HRMLayer, fit: _Fit) -> tuple[SiteCalibration, tuple[torch.Tensor, ...] | None]:
    """The site's fitted, reduced system as ``set_system`` arguments (``None``: left random)."""
    spec = layer.spec
    f, g, r2 = fit.acc.solve(spec.ridge)
    a, b, c, d = arx_realisation(f, g)
    radius = spectral_radius(a)
    site = SiteCalibration(name, "balanced_truncation", fit.acc.count, r2, a.shape[0], radius)
    if not radius < 1.0 - 1e-9:
        if spec.on_unstable == "error":
            raise ValueError(
                f"HRM calibration at {name!r}: the fitted {spec.fit.upper()} model is not stable (spectral radius {radius:.4f} >= 1), "
                "so balanced truncation has no Gramians. Use HRM(fit='fir') (always stable), a larger ridge, more "
                "calibration_batches, or HRM(on_unstable='random') to keep the random initialisation at such sites"
            )
        warnings.warn(
            f"HRM calibration at {name!r}: the fitted model is unstable (radius {radius:.4f}); the site keeps its random initialisation",
            stacklevel=3,
        )
        site.status = "random (unstable fit)"
        return site, None
    try:
        bt = balanced_truncation(a, b, c, d, spec.state_dim)
    except ValueError as error:
        raise ValueError(f"HRM calibration at {name!r}: {error} (HRM state_dim)") from error
    lam, b_modal, c_modal, _ = modal_form(bt.a, bt.b, bt.c)
    clipped = np.clip(np.abs(lam), 1e-6 * MAX_RADIUS, MAX_RADIUS * (1 - 1e-6)) * np.exp(1j * np.angle(lam))
    powers = clipped[None, :] ** np.arange(64)[:, None]
    modal = np.einsum("pn,kn,nm->kpm", c_modal, powers, b_modal).real
    dense = np.stack([bt.c @ np.linalg.matrix_power(bt.a, k) @ bt.b for k in range(64)])
    site.hankel, site.kept, site.error_bound = [float(v) for v in bt.hankel], bt.order, bt.bound
    site.reduced_radius = float(np.abs(lam).max())
    site.modal_error = float(np.abs(modal - dense).max() / max(np.abs(dense).max(), 1e-30))
    tensors = (fit.p_in.float(), torch.from_numpy(lam), torch.from_numpy(b_modal), torch.from_numpy(c_modal), torch.from_numpy(d).float())
    return site, tensors


def hrm_layers(model: nn.Module) -> dict[str, HRMLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, HRMLayer)}


def calibrate_hrm(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any] | None = None,
    max_batches: int | None = None,
    include_random: bool = False,
) -> HRMCalibrationReport:
    """Initialise every balanced-truncation HRM layer of ``model`` from ``batches`` (see the
    module docstring for the method). Plain PyTorch; ``AdapterCallback`` runs it at fit start.

    Args:
        model: a model with HRM layers (after ``apply_adapter`` / ``load_adapter``).
        batches: what ``forward`` takes; the first ``max_batches`` are used (default: the
            largest ``calibration_batches`` of the HRM specs). Tensors are moved to the
            model's device.
        forward: ``forward(model, batch)`` runs one batch (default :func:`default_forward`:
            dicts as keyword arguments, tuples positionally).
        max_batches: how many batches to use.
        include_random: also calibrate layers whose spec says ``init="random"``.

    Returns the per-site report. Raises ``ValueError`` (every layer unchanged) when the model
    has no HRM layer to calibrate, ``batches`` is empty or has no unmasked token, or a fitted
    system is unstable (unless ``on_unstable="random"``) or has fewer non-zero Hankel singular
    values than ``state_dim``.
    """
    layers = {n: l for n, l in hrm_layers(model).items() if include_random or l.spec.init == "balanced_truncation"}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no HRM layer with init='balanced_truncation' to calibrate (apply HRM(...) first)")
    count = max_batches if max_batches is not None else max(l.spec.calibration_batches for l in layers.values())
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    chosen = [_to_device(b, device) for b in islice(iter(batches), count)]
    if not chosen:
        raise ValueError("calibrate_hrm got no calibration batches: balanced truncation needs data (or use HRM(init='random'))")
    forward = forward or default_forward
    moments = {n: _Moments() for n in layers}
    _run(model, layers, moments, chosen, forward)
    empty = [n for n, m in moments.items() if m.count == 0]
    if empty:
        raise ValueError(
            f"calibrate_hrm saw no unmasked token at {empty[:3]}: the batches are empty or fully padded, or never reach the site"
        )
    fits = {n: _Fit(moments[n], layers[n]) for n in layers}
    _run(model, layers, fits, chosen, forward)
    results = {n: _reduce(n, layers[n], fits[n]) for n in layers}  # all computed before any write
    for name, (_, tensors) in results.items():
        if tensors is None:  # the requested fallback: calibration ran, and chose the random system
            layers[name].reset_random()
            layers[name].calibrated.fill_(1.0)
        else:
            layers[name].set_system(*tensors)
    return HRMCalibrationReport(len(chosen), [site for site, _ in results.values()])
