"""HRM: a linear time-invariant state-space residual at a block's MLP (or attention) output.

After Thapliyal, "SSM Adapters via Hankel Reduced-order Modeling" (arXiv 2606.26290). At an
injection site with input sequence ``x_t [d_in]`` and output ``h_t [d_out]`` (``t < L``)::

    u_t     = P_in x_t                           P_in [m, d_in]      (m = input_dim)
    s_{t+1} = A s_t + B u_t,   s_0 = 0           A = diag(lambda) [n, n] complex (n = state_dim)
    z_t     = Re(C s_t) + D u_t                  B [n, m], C [m, n] complex, D [m, m] real
    out_t   = h_t + g * (P_out z_t)              P_out [d_out, m], g = sigmoid(w) [d_out]

Padded positions (mask 0) get ``u_t = 0`` (they never feed the state; with left padding the
first real token starts from ``s = 0`` exactly as without padding) and a zero residual.

Parallel form: ``z = D u + K * u`` with ``K_k = Re(C A^k B)``, one causal convolution through
FFTs of length ``2L`` (``kernels.ssm``), ``O(L log L)``, equal to the recurrence. The layer runs
it in mode space (``modal_ssm``: ``n`` scalar convolutions with ``lambda_j^k``, then ``C``), which
gives the same numbers as the ``m x m`` kernel form (``diagonal_kernel`` + ``ssm_convolution``)
with elementwise products instead of a matrix product per frequency.

Stability by construction: ``lambda_j = rho * sigmoid(nu_j) * e^{i theta_j}`` with
``rho = 1 - 1e-4``, so ``|lambda_j| < 1`` whatever training does to ``nu`` and ``theta``.

Start: ``P_out = 0``, so the adapted model starts *exactly* at the frozen one (as LoRA's
``B = 0``). At the first step only ``P_out`` gets a gradient (``dL/dP_out = g * z^T dL/dout``,
non-zero since ``g = gate_init > 0`` and ``z`` is not zero); every other tensor gets one from the
second step on. The gate is not the zero, because a zero gate would leave ``P_out``'s gradient
zero too.

Initialisation: ``"random"`` (``P_in`` Gaussian ``1/d_in``, ``|lambda|`` uniform in [0.5, 0.99],
phases in [0, pi], ``B`` scaled by ``sqrt(1 - |lambda|^2)``); ``"balanced_truncation"`` needs
calibration data (``lightning_peft.hrm_calibration.calibrate_hrm``, run by ``AdapterCallback``
through ``HRMCalibrationCallback`` at fit start), which writes ``P_in``, ``lambda``, ``B``, ``C``, ``D``
through :meth:`HRMLayer.set_system`. Until then the layer has its random initialisation and
warns at its first training forward.

Sites: ``"mlp"`` selects modules named ``mlp`` / ``feed_forward`` / ``ffn`` (Llama-family
decoders: ``model.layers.i.mlp``) and BERT's ``encoder.layer.i.output``; ``"attention"``
selects ``self_attn`` / ``attn`` / ``self_attention`` and BERT's ``attention.output``; any
other string or list is module-name patterns (``target_modules`` syntax). The site's input is
its ``input_tensor`` argument when its forward has one (BERT's ``BertOutput`` /
``BertSelfOutput``: the sub-block's input, so the residual is added to the sub-block's
normalised output ``LayerNorm(FFN(x) + x)``), else its first argument (``hidden_states``).
``d_in`` is the first ``nn.Linear``'s ``in_features`` (``d_out`` for an ``input_tensor`` site),
``d_out`` the last one's ``out_features``; an output tuple gets the residual on its first item.

The mask reaches the site through forward pre-hooks on the model (``sequence_mask``); HRM
runs on whole sequences, so incremental decoding with a KV cache is refused by name.
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.adapters.base import AdapterLayer, AdapterSpec, check_targets
from lightning_peft.adapters.kernels.ssm import modal_ssm
from lightning_peft.adapters.sequence_mask import SequenceMask, attach_mask_capture
from lightning_peft.validation import check_choice, check_float, check_int, check_str

__all__ = ["HRM", "HRMLayer", "MAX_RADIUS", "SITE_PATTERNS", "hrm_parameter_count", "site_dims"]

#: the largest eigenvalue modulus the parameterisation can reach (a memory of ~10^4 tokens)
MAX_RADIUS = 1.0 - 1e-4
SITE_PATTERNS: dict[str, str] = {
    "mlp": r"(.*\.)?(mlp|feed_forward|ffn)|(.*\.)?layers?\.\d+\.output",
    "attention": r"(.*\.)?(self_attn|attn|self_attention)|(.*\.)?attention\.output",
}


def hrm_parameter_count(d_in: int, d_out: int, input_dim: int, state_dim: int) -> int:
    """Trainable parameters of one HRM layer: ``P_in`` ``m d_in``, ``nu, theta`` ``2n``, complex
    ``B, C`` ``4 n m``, ``D`` ``m^2``, ``P_out`` ``d_out m``, gate ``d_out``."""
    m, n = input_dim, state_dim
    return m * d_in + 2 * n + 4 * n * m + m * m + d_out * m + d_out


def site_dims(module: nn.Module) -> tuple[int, int, str] | None:
    """``(d_in, d_out, input argument name)`` of a site, or ``None`` when it has no ``nn.Linear``
    to read its widths from."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        return None
    try:
        names = [p.name for p in inspect.signature(module.forward).parameters.values()]
    except (TypeError, ValueError):
        names = []
    d_out = linears[-1].out_features
    if "input_tensor" in names:
        return d_out, d_out, "input_tensor"
    return linears[0].in_features, d_out, names[0] if names else "input"


def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p) - torch.log1p(-p)


class HRMLayer(AdapterLayer):
    """The frozen site ``base_layer`` plus the state-space residual (see the module docstring).

    Tensors: ``p_in [m, d_in]``, ``nu [n]``, ``theta [n]``, ``b [n, m, 2]`` and ``c [m, n, 2]``
    (real and imaginary parts), ``d [m, m]``, ``p_out [d_out, m]``, ``gate [d_out]`` (the logit
    of ``g``); buffer ``calibrated`` (1 once calibration ran: balanced truncation set the system,
    or a requested random fallback kept the random one). All float32.
    """

    def __init__(self, base_layer: nn.Module, spec: HRM, name: str, d_in: int, d_out: int, input_name: str) -> None:
        super().__init__()
        self.base_layer, self.spec, self.site_name = base_layer, spec, name
        self.d_in, self.d_out, self.input_name = d_in, d_out, input_name
        m, n = spec.input_dim, spec.state_dim
        device = next((p.device for p in base_layer.parameters()), None)
        kw: dict[str, Any] = {"device": device, "dtype": torch.float32}
        self.p_in = nn.Parameter(torch.empty(m, d_in, **kw))
        self.nu = nn.Parameter(torch.empty(n, **kw))
        self.theta = nn.Parameter(torch.empty(n, **kw))
        self.b = nn.Parameter(torch.empty(n, m, 2, **kw))
        self.c = nn.Parameter(torch.empty(m, n, 2, **kw))
        self.d = nn.Parameter(torch.empty(m, m, **kw))
        self.p_out = nn.Parameter(torch.zeros(d_out, m, **kw))
        self.gate = nn.Parameter(torch.full((d_out,), math.log(spec.gate_init) - math.log1p(-spec.gate_init), **kw))
        self.register_buffer("calibrated", torch.zeros((), **kw))
        self.mask_source: SequenceMask | None = None  # set by HRM.attach (not a submodule)
        self.recorder: Any = None  # set while calibrate_hrm records this site
        self._warned = False
        self.reset_random()

    # --- parameters --------------------------------------------------------------------------
    @torch.no_grad()
    def reset_random(self) -> None:
        """The random initialisation (the ``init="random"`` ablation)."""
        m, n = self.spec.input_dim, self.spec.state_dim
        self.p_in.normal_(0.0, self.d_in**-0.5)
        radius = torch.rand(n, device=self.nu.device) * 0.49 + 0.5
        self.nu.copy_(_logit(radius / MAX_RADIUS))
        self.theta.uniform_(0.0, math.pi)
        self.b.normal_(0.0, (2 * m) ** -0.5).mul_(torch.sqrt(1 - radius**2)[:, None, None])
        self.c.normal_(0.0, (2 * n) ** -0.5)
        self.d.normal_(0.0, m**-0.5)
        self.p_out.zero_()
        self.calibrated.zero_()

    def log_radius(self) -> torch.Tensor:
        return math.log(MAX_RADIUS) + F.logsigmoid(self.nu)

    def eigenvalues(self) -> torch.Tensor:
        """``lambda [n]`` (complex): the diagonal of ``A``."""
        return torch.polar(torch.exp(self.log_radius().detach()), self.theta.detach())

    @torch.no_grad()
    def set_system(self, p_in: torch.Tensor, eigenvalues: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> None:
        """Write ``P_in [m, d_in]``, ``lambda [n]`` (complex, ``|lambda| < 1``), complex ``B [n, m]``,
        ``C [m, n]`` and real ``D [m, m]`` (balanced truncation); ``P_out`` is set to zero so the
        model still starts at the frozen one, and ``calibrated`` to 1. Moduli above
        ``MAX_RADIUS`` or below 1e-6 are clipped into the parameterisation's range."""
        radius = eigenvalues.abs().to(self.nu) / MAX_RADIUS
        self.p_in.copy_(p_in)
        self.nu.copy_(_logit(radius.clamp(1e-6, 1 - 1e-6)))
        self.theta.copy_(eigenvalues.angle().to(self.theta))
        self.b.copy_(torch.view_as_real(b.to(torch.complex64)))
        self.c.copy_(torch.view_as_real(c.to(torch.complex64)))
        self.d.copy_(d)
        self.p_out.zero_()
        self.calibrated.fill_(1.0)

    # --- forward -----------------------------------------------------------------------------
    def site_input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        if self.input_name in kwargs:
            return kwargs[self.input_name]
        index = 1 if self.input_name == "input_tensor" else 0
        if len(args) <= index:
            raise TypeError(f"HRM at {self.site_name!r}: cannot find the site's input {self.input_name!r} in its call arguments")
        return args[index]

    def residual(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``g * P_out z`` for ``x [batch, L, d_in]`` and ``mask [batch, L]`` (or ``None``):
        ``[batch, L, d_out]`` float32."""
        length = x.shape[1]
        limit = self.spec.max_length
        if limit is not None and length > limit:
            raise ValueError(
                f"HRM at {self.site_name!r}: the sequence has {length} positions but max_length is {limit}; "
                "truncate or chunk the input, or raise HRM(max_length=...)"
            )
        # complex FFT maths in (at least) float32, even for a model cast to half precision
        dtype = torch.promote_types(self.p_in.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            u = F.linear(x.to(dtype), self.p_in.to(dtype))
            if mask is not None:
                u = u * mask[..., None].to(dtype)
            b, c = torch.view_as_complex(self.b.to(dtype)), torch.view_as_complex(self.c.to(dtype))
            log_radius = math.log(MAX_RADIUS) + F.logsigmoid(self.nu.to(dtype))
            z = modal_ssm(u, log_radius, self.theta.to(dtype), b, c, self.d.to(dtype))
            gated = self.p_out.to(dtype) * torch.sigmoid(self.gate.to(dtype))[:, None]  # the gate folded into P_out
            y = F.linear(z, gated)
            return y if mask is None else y * mask[..., None].to(dtype)

    def _mask_for(self, x: torch.Tensor) -> torch.Tensor | None:
        mask = self.mask_source.mask if self.mask_source is not None else None
        if mask is None:
            return None
        if tuple(mask.shape) != tuple(x.shape[:2]):
            raise ValueError(
                f"HRM at {self.site_name!r}: the model's {self.mask_source.argument} has shape {tuple(mask.shape)} but the site "
                f"sees a sequence of shape {tuple(x.shape[:2])}. HRM runs on whole sequences: incremental decoding with a KV "
                "cache is not supported (use use_cache=False and pass the full sequence)"
            )
        return mask.to(x.device)

    def _check_calibrated(self) -> None:
        self._warned = True  # checked once: reading the buffer synchronises with the device
        if self.spec.init == "balanced_truncation" and not bool(self.calibrated):
            warnings.warn(
                f"HRM at {self.site_name!r} (init='balanced_truncation') was never calibrated, so it trains from its random "
                "initialisation: call lightning_peft.calibrate_hrm(model, batches) first, or train with AdapterCallback "
                "(it calibrates at fit start), or use HRM(init='random')",
                stacklevel=3,
            )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        x = self.site_input(args, kwargs)
        h = out[0] if isinstance(out, (tuple, list)) else out
        unbatched = x.dim() == 2
        if unbatched:
            x, h = x.unsqueeze(0), h.unsqueeze(0)
        if x.dim() != 3 or h.dim() != 3 or h.shape[:2] != x.shape[:2] or h.shape[-1] != self.d_out:
            raise ValueError(
                f"HRM at {self.site_name!r} needs a [batch, length, {self.d_in}] input and a [batch, length, {self.d_out}] output, "
                f"got {tuple(x.shape)} -> {tuple(h.shape)}: choose a site that maps a sequence to a sequence"
            )
        mask = self._mask_for(x)
        if self.recorder is not None:  # calibration: record, and behave as the frozen site
            self.recorder(self, x.detach(), h.detach(), mask)
            return out
        if self.training and not self._warned:
            self._check_calibrated()
        new = h + self.residual(x, mask).to(h.dtype)
        new = new.squeeze(0) if unbatched else new
        if isinstance(out, tuple):
            return (new, *out[1:])
        if isinstance(out, list):
            return [new, *out[1:]]
        return new

    # --- contract ----------------------------------------------------------------------------
    @property
    def base_shape(self) -> list[int] | None:
        return [self.d_out, self.d_in]

    def merge(self, keep_original: bool = True) -> None:
        raise ValueError(
            f"HRM at {self.site_name!r} cannot be merged: its output at a position depends on earlier positions through a "
            "recurrent state, which no weight of the frozen module can express. Keep it unmerged (save_adapter exports it)"
        )

    def unmerge(self) -> None:
        return None  # never merged

    def peft_metadata(self) -> dict[str, Any]:
        return {"state_dim": self.spec.state_dim, "input_dim": self.spec.input_dim, "init": self.spec.init, "site_input": self.input_name}


class HRM(AdapterSpec):
    """A state-space residual at every selected site (see the module docstring for the maths).

    Args:
        state_dim: ``n``, the number of (complex) modes of ``A``; at most the site's width and,
            for balanced truncation, at most the fitted model's order ``input_dim * fit_lags``.
        input_dim: ``m``, the width of the reduced input ``u = P_in x`` (and of ``z``); at most
            ``min(d_in, d_out)`` of the site.
        site: ``"mlp"``, ``"attention"``, or module-name patterns (``target_modules`` syntax).
        init: ``"balanced_truncation"`` (needs calibration data) or ``"random"``.
        calibration_batches: batches the calibration runs the frozen model on.
        gate_init: the gate ``g = sigmoid(w)``'s initial value, in (0, 1).
        max_length: longest sequence accepted (``None``: no limit); longer ones raise.
        fit: the high-order model balanced truncation reduces: ``"arx"`` (auto-regressive with
            inputs) or ``"fir"`` (inputs only; always stable).
        fit_lags: ``q``, the lags of that model (its order is ``q * input_dim``).
        ridge: ridge regularisation of the least-squares fit, relative to the data's scale.
        on_unstable: a fitted model that is not stable raises (``"error"``) or leaves that site
            at its random initialisation with a warning (``"random"``).
        mask_argument: the model argument holding the ``[batch, length]`` padding mask.
        exclude_modules, module_path: as for every spec.
    """

    kind = "hrm"
    training_callbacks = ("lightning_peft.callbacks.hrm.HRMCalibrationCallback",)

    def __init__(
        self,
        state_dim: int = 16,
        input_dim: int = 16,
        site: Literal["mlp", "attention"] | str | list[str] = "mlp",
        init: Literal["balanced_truncation", "random"] = "balanced_truncation",
        calibration_batches: int = 4,
        gate_init: float = 0.1,
        max_length: int | None = None,
        fit: Literal["arx", "fir"] = "arx",
        fit_lags: int = 8,
        ridge: float = 1e-3,
        on_unstable: Literal["error", "random"] = "error",
        mask_argument: str = "attention_mask",
        exclude_modules: list[str] | None = None,
        module_path: str | None = None,
    ) -> None:
        named = isinstance(site, str) and site in SITE_PATTERNS
        if not named:
            if isinstance(site, str) and not site.startswith("re:"):
                check_targets("site", "re:" + site)
            else:
                check_targets("site", site)
        super().__init__(target_modules=None if named else site, exclude_modules=exclude_modules, module_path=module_path)
        self.state_dim = check_int("state_dim", state_dim, low=1)
        self.input_dim = check_int("input_dim", input_dim, low=1)
        self.site = list(site) if isinstance(site, (list, tuple)) else site
        self.init = check_choice("init", init, ("balanced_truncation", "random"))
        self.calibration_batches = check_int("calibration_batches", calibration_batches, low=1)
        self.gate_init = check_float("gate_init", gate_init, low=0.0, high=1.0, low_open=True, high_open=True)
        self.max_length = check_int("max_length", max_length, low=1, allow_none=True)
        self.fit = check_choice("fit", fit, ("arx", "fir"))
        self.fit_lags = check_int("fit_lags", fit_lags, low=1)
        self.ridge = check_float("ridge", ridge, low=0.0, low_open=True)
        self.on_unstable = check_choice("on_unstable", on_unstable, ("error", "random"))
        self.mask_argument = check_str("mask_argument", mask_argument)
        if self.init == "balanced_truncation" and self.state_dim > self.input_dim * self.fit_lags:
            raise ValueError(
                f"state_dim={self.state_dim} exceeds the order of the model balanced truncation reduces "
                f"(input_dim * fit_lags = {self.input_dim * self.fit_lags}): raise fit_lags or lower state_dim"
            )

    def default_targets(self) -> str:
        return "re:" + SITE_PATTERNS[self.site] if isinstance(self.site, str) and self.site in SITE_PATTERNS else "re:.*"

    def supports(self, module: nn.Module) -> bool:
        return not isinstance(module, AdapterLayer) and site_dims(module) is not None

    def check(self, name: str, module: nn.Module) -> None:
        dims = site_dims(module)
        if dims is None:
            raise TypeError(f"HRM cannot adapt {name!r} ({type(module).__name__}): it has no nn.Linear to read its widths from")
        d_in, d_out, _ = dims
        if self.input_dim > min(d_in, d_out):
            raise ValueError(
                f"HRM input_dim={self.input_dim} is too large for {name!r} (input width {d_in}, output width {d_out}): "
                f"use input_dim <= {min(d_in, d_out)}"
            )
        if self.state_dim > d_out:
            raise ValueError(f"HRM state_dim={self.state_dim} is too large for {name!r} (width {d_out}): use state_dim <= {d_out}")

    def wrap(self, name: str, module: nn.Module) -> nn.Module:
        self.check(name, module)
        d_in, d_out, input_name = site_dims(module)  # type: ignore[misc]
        return HRMLayer(module, self, name, d_in, d_out, input_name)

    def attach(self, model: nn.Module, layers: dict[str, nn.Module]) -> list[Any]:
        """One shared :class:`SequenceMask` for this spec's layers, fed by pre-hooks on ``model``
        and every module above them."""
        shared = SequenceMask(self.mask_argument)
        for layer in layers.values():
            if isinstance(layer, HRMLayer):
                layer.mask_source = shared
        return attach_mask_capture(model, list(layers), shared)
