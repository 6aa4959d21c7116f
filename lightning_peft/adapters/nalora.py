"""NA-LoRA: nonlinearity-aware LoRA for self-gated FFNs (Yuan et al., arXiv 2606.31717).

A self-gated FFN (SwiGLU, GeGLU) computes ``W_down(phi(W_gate x) * W_up x)`` with
``phi(z) = z s(z)``: ``s`` is the *selection weight* (SiLU: ``sigma(z)``; GELU: ``Phi(z)``). A
LoRA update on the gate, ``z -> z + delta`` with ``delta = B_g A_g x``, changes channel ``j``'s
output to first order by ``phi'(z_j) delta_j``, where::

    phi'(z) = s(z) k(z),      k(z) = z phi'(z) / phi(z) = 1 + z s'(z) / s(z)

``k`` is the local effective homogeneity degree (SiLU: ``k = 1 + z (1 - sigma(z))``; ReLU:
``k = 1`` everywhere, ReLU being exactly 1-homogeneous). Channels with ``phi' ~ 0`` (very negative
``z``) do not respond to their gate update at all; ``k ~ 1`` marks near-linear channels.

The adapter itself is plain LoRA: every target becomes a ``LoRALinear``, so NA-LoRA merges,
saves and exports exactly as LoRA does (peft-loadable where LoRA is) and costs nothing at
inference. What changes is training, in ``NALoRAController``
(``lightning_peft.adapters.nalora_control``; driven by ``NALoRACallback``, which
``AdapterCallback`` adds): a derivative-based temporal-importance mask on the rows of the gate's
``B`` and an activation-specific per-row step scaling. The paper gives no formulas; the forms
and every constant here are ours (see ``docs/nalora.md``).

This module: the activation maths, the discovery of gate/up/down triplets, and the spec.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.adapters.base import AdapterLayer
from lightning_peft.adapters.lora import LoRA
from lightning_peft.validation import (
    InvalidArgumentError,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_mapping,
    check_str,
)

Activation = Literal["auto", "silu", "gelu", "gelu_tanh", "relu"]
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
#: activations whose homogeneity varies with z (step scaling can mean something); ReLU's k == 1
SMOOTH_GATES = ("silu", "gelu", "gelu_tanh")

#: child-name conventions of gated FFNs: gate, up and down projections and the activation module
FFN_CONVENTIONS: tuple[dict[str, str], ...] = (
    {"gate": "gate_proj", "up": "up_proj", "down": "down_proj", "act": "act_fn"},  # Llama, Mistral, Qwen, Gemma
    {"gate": "wi_0", "up": "wi_1", "down": "wo", "act": "act"},  # T5 v1.1 / mT5 / Flan-T5 (GeGLU)
    {"gate": "w1", "up": "w3", "down": "w2", "act": "act_fn"},  # Mixtral-style expert MLPs
)
_FFN_KEYS = ("gate", "up", "down", "act")
_GELU_TANH_C = math.sqrt(2.0 / math.pi)
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


# --------------------------------------------------------------------------------------------
# Activation maths (elementwise, any shape; computed in the dtype of z)
# --------------------------------------------------------------------------------------------
def selection_weight(z: torch.Tensor, activation: str) -> torch.Tensor:
    """``s(z)`` with ``phi(z) = z s(z)``: SiLU ``sigma(z)``, GELU ``Phi(z)``, GELU-tanh
    ``(1 + tanh(c (z + 0.044715 z^3))) / 2``, ReLU ``1[z > 0]``."""
    if activation == "silu":
        return torch.sigmoid(z)
    if activation == "gelu":
        return torch.special.ndtr(z)
    if activation == "gelu_tanh":
        return 0.5 * (1.0 + torch.tanh(_GELU_TANH_C * (z + 0.044715 * z**3)))
    if activation == "relu":
        return (z > 0).to(z.dtype)
    raise ValueError(f"unknown gate activation {activation!r}; expected one of {ACTIVATIONS}")


def selection_and_homogeneity(z: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s(z), k(z))``; ``phi'(z) = s(z) * k(z)``. ``k = 1 + z s'/s`` is computed in a form that
    stays finite where ``s`` underflows (GELU: ``s'/s = exp(log pdf - log Phi)``)."""
    if activation == "silu":
        s = torch.sigmoid(z)
        return s, 1.0 + z * (1.0 - s)
    if activation == "gelu":
        s = torch.special.ndtr(z)
        ratio = torch.exp(-0.5 * z * z - _LOG_SQRT_2PI - torch.special.log_ndtr(z))
        return s, 1.0 + z * ratio
    if activation == "gelu_tanh":
        t = torch.tanh(_GELU_TANH_C * (z + 0.044715 * z**3))
        # s = (1 + t) / 2, s' = (1 - t^2) c (1 + 3a z^2) / 2, so s'/s = (1 - t) c (1 + 3a z^2)
        return 0.5 * (1.0 + t), 1.0 + z * (1.0 - t) * _GELU_TANH_C * (1.0 + 3 * 0.044715 * z * z)
    if activation == "relu":
        return (z > 0).to(z.dtype), torch.ones_like(z)
    raise ValueError(f"unknown gate activation {activation!r}; expected one of {ACTIVATIONS}")


def selection_and_excess(z: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s(z), k(z) - 1)`` with few passes over ``z`` (the per-step statistics' hot path; the
    second tensor is freshly allocated, so callers may modify it in place)."""
    if activation == "silu":
        s = torch.sigmoid(z)
        return s, torch.rsub(s, 1.0).mul_(z)
    s, k = selection_and_homogeneity(z, activation)
    return s, k.sub_(1.0)


def _reference(activation: str, z: torch.Tensor) -> torch.Tensor:
    if activation == "gelu":
        return F.gelu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    return F.silu(z) if activation == "silu" else F.relu(z)


@torch.no_grad()
def identify_activation(act: nn.Module) -> str | None:
    """Which of ``silu``/``gelu``/``gelu_tanh``/``relu`` the module ``act`` computes, by
    evaluating it on a grid (works for torch's and transformers' classes alike); ``None``."""
    param = next(act.parameters(), None)
    z = torch.linspace(-6.0, 6.0, 241, dtype=torch.float64 if param is None else param.dtype)
    z = z if param is None else z.to(param.device)
    try:
        y = act(z)
    except Exception:  # an activation that cannot take a 1-d tensor: not identifiable
        return None
    if not isinstance(y, torch.Tensor) or y.shape != z.shape:
        return None
    errors = {name: float((y.double() - _reference(name, z.double()).double()).abs().max()) for name in ACTIVATIONS}
    best = min(errors, key=errors.__getitem__)
    return best if errors[best] < 2e-5 else None


# --------------------------------------------------------------------------------------------
# Gated FFN discovery
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GatedFFN:
    """One self-gated FFN: full module names of its parent, gate, up and down projections, and
    the gate activation."""

    parent: str
    gate: str
    up: str
    down: str
    activation: str


def _linear_like(module: nn.Module | None) -> bool:
    if isinstance(module, AdapterLayer):
        module = module.base_layer
    return isinstance(module, nn.Linear)


def _join(prefix: str, child: str) -> str:
    return f"{prefix}.{child}" if prefix else child


def _activation_of(parent_name: str, parent: nn.Module, names: dict[str, str], activation: str) -> str:
    if activation != "auto":
        return activation
    act = getattr(parent, names.get("act", ""), None) if names.get("act") else None
    found = identify_activation(act) if isinstance(act, nn.Module) else None
    if found is None:
        what = f"its {names['act']!r} is a {type(act).__name__}" if act is not None else f"it has no activation module {names.get('act')!r}"
        raise ValueError(
            f"NALoRA: the gated FFN {parent_name!r} has gate/up/down projections, but {what} that NA-LoRA can identify "
            f"(it recognises {list(ACTIVATIONS)}); set NALoRA(activation=...) to the gate activation"
        )
    return found


def find_gated_ffns(
    model: nn.Module, ffn_names: dict[str, str] | None = None, activation: str = "auto", module_path: str | None = None
) -> list[GatedFFN]:
    """Every module of ``model`` with linear children named as one of ``FFN_CONVENTIONS`` (or
    as ``ffn_names``: ``{"gate", "up", "down"[, "act"]}`` child names) whose gate and up
    projections map to the same width and whose down projection maps that width back. Children
    may already be adapter layers. Raises when a triplet's activation cannot be identified."""
    conventions = (ffn_names,) if ffn_names is not None else FFN_CONVENTIONS
    found = []
    for parent_name, parent in model.named_modules():
        if module_path and not (parent_name == module_path or parent_name.startswith(module_path + ".")):
            continue
        for names in conventions:
            gate, up, down = (getattr(parent, names[k], None) for k in ("gate", "up", "down"))
            if not (_linear_like(gate) and _linear_like(up) and _linear_like(down)):
                continue
            if not (gate.out_features == up.out_features == down.in_features and gate.in_features == up.in_features):
                continue
            act = _activation_of(parent_name, parent, names, activation)
            found.append(GatedFFN(parent_name, *(_join(parent_name, names[k]) for k in ("gate", "up", "down")), act))  # type: ignore[call-arg]
            break
    return found


def no_gated_ffn_error(model: nn.Module, ffn_names: dict[str, str] | None) -> ValueError:
    """What NA-LoRA looked for, with the model's nearest module names and its linear layers."""
    conventions = (ffn_names,) if ffn_names is not None else FFN_CONVENTIONS
    looked = "; ".join("(" + ", ".join(c[k] for k in ("gate", "up", "down") if k in c) + ")" for c in conventions)
    names = [n for n, _ in model.named_modules() if n]
    leaves = sorted({leaf for leaf in (n.rsplit(".", 1)[-1] for n in names) if not leaf.isdigit()})  # not list indices
    wanted = [c[k] for c in conventions for k in ("gate", "up", "down")]
    close = {m for w in wanted for m in difflib.get_close_matches(w, leaves, n=3, cutoff=0.6)}
    near = [n for n in names if n.rsplit(".", 1)[-1] in close][:6]
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:6]
    return ValueError(
        f"NALoRA found no gated FFN in {type(model).__name__}: it looks for a module with linear children named "
        f"{looked} (gate and up of equal width, down back from it). Nearest module names: {near or 'none close'}; "
        f"linear layers include {linear}. For another naming pass ffn_names={{'gate': ..., 'up': ..., 'down': ..., "
        "'act': ...}; for a model without a gated FFN use LoRA (or NALoRA with explicit target_modules: it then "
        "trains as plain LoRA and says so)"
    )


# --------------------------------------------------------------------------------------------
# The spec
# --------------------------------------------------------------------------------------------
def _check_ffn_names(ffn_names: dict[str, str] | None) -> None:
    check_mapping("ffn_names", ffn_names, lambda key, v: check_str(key, v))
    if ffn_names is None:
        return
    missing = [k for k in ("gate", "up", "down") if k not in ffn_names]
    unknown = [k for k in ffn_names if k not in _FFN_KEYS]
    if missing or unknown:
        raise InvalidArgumentError(
            "ffn_names",
            f"ffn_names needs the keys 'gate', 'up', 'down' (and optionally 'act'), got {sorted(ffn_names)}"
            + (f": missing {missing}" if missing else "")
            + (f", unknown {unknown}" if unknown else ""),
        )


def _check_control(args: dict[str, Any]) -> None:
    """The NA-LoRA control options of ``NALoRA.__init__`` (``args``: its locals)."""
    check_choice("activation", args["activation"], ("auto", *ACTIVATIONS))
    check_bool("temporal_mask", args["temporal_mask"])
    check_bool("step_scaling", args["step_scaling"])
    check_float("keep_fraction", args["keep_fraction"], 0.0, 1.0, low_open=True)
    check_float("importance_decay", args["importance_decay"], 0.0, 1.0, high_open=True)
    check_int("warmup_steps", args["warmup_steps"], low=0)
    check_int("refresh_every", args["refresh_every"], low=1)
    for key in ("scale_near_linear", "scale_responsive", "scale_saturated"):
        check_float(key, args[key], low=0.0)
    linear_tol = check_float("linear_tol", args["linear_tol"], low=0.0, low_open=True)
    saturated_below = check_float("saturated_below", args["saturated_below"], high=1.0, high_open=True)
    check_float("min_group_fraction", args["min_group_fraction"], 0.0, 0.5)
    if saturated_below >= 1.0 - linear_tol:
        raise InvalidArgumentError(
            "saturated_below",
            f"saturated_below={saturated_below} overlaps the near-linear band |k - 1| <= {linear_tol}: use saturated_below < "
            f"{1.0 - linear_tol:g}",
        )


class NALoRA(LoRA):
    """LoRA whose gate-projection updates are trained nonlinearity-aware (see module docstring).

    Targets: by default (``target_modules=None``) the gate, up and down projections of every
    gated FFN (``FFN_CONVENTIONS`` or ``ffn_names``); a model without one is refused, naming what
    was looked for. With explicit ``target_modules`` (e.g. attention too) every match gets LoRA,
    and the gate projections among them get NA-LoRA's control; if there are none, training is
    plain LoRA and the controller says so.

    Args:
        rank, alpha, target_modules, exclude_modules, module_path, dropout, use_rslora, init,
        rank_pattern, alpha_pattern, recompute_input: as for ``LoRA``.
        ffn_names: child names of one gated-FFN convention, ``{"gate", "up", "down"[, "act"]}``
            (default: ``FFN_CONVENTIONS``).
        activation: the gate activation; ``"auto"`` identifies the FFN's ``act`` module.
        temporal_mask: mask the update of the least responsive gate channels' ``B`` rows.
        keep_fraction: ``rho``, the share of gate channels (per layer) whose rows update.
        importance_decay: ``beta`` of the EMA ``T_j <- beta T_j + (1 - beta) d_j``,
            ``d_j = mean_tokens |phi'(z_j)|``.
        warmup_steps: optimizer steps of statistics before the first mask and grouping.
        refresh_every: optimizer steps between mask/grouping refreshes.
        step_scaling: scale each gate channel's ``B``-row step by its homogeneity group.
        scale_near_linear, scale_responsive, scale_saturated: the per-group step factors.
        linear_tol: a token is near-linear when ``|k(z) - 1| <= linear_tol``.
        saturated_below: a token is saturated when ``k(z) < saturated_below``; others are
            responsive. A channel's group is its most frequent bin (EMA of the bin shares).
        min_group_fraction: step scaling runs in a layer only while at least two groups each
            hold this share of its channels (and the gate is smooth: not ReLU).
    """

    kind = "nalora"
    #: the per-step control (class path: adapters never import Lightning)
    training_callbacks = ("lightning_peft.callbacks.nalora.NALoRACallback",)

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 16.0,
        target_modules: str | list[str] | None = None,
        exclude_modules: list[str] | None = None,
        module_path: str | None = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: Literal["kaiming", "gaussian"] = "kaiming",
        rank_pattern: dict[str, int] | None = None,
        alpha_pattern: dict[str, float] | None = None,
        recompute_input: bool = True,
        ffn_names: dict[str, str] | None = None,
        activation: Activation = "auto",
        temporal_mask: bool = True,
        keep_fraction: float = 0.5,
        importance_decay: float = 0.9,
        warmup_steps: int = 10,
        refresh_every: int = 100,
        step_scaling: bool = True,
        scale_near_linear: float = 1.0,
        scale_responsive: float = 1.5,
        scale_saturated: float = 0.5,
        linear_tol: float = 0.1,
        saturated_below: float = 0.0,
        min_group_fraction: float = 0.05,
    ) -> None:
        super().__init__(
            rank,
            alpha,
            target_modules,
            exclude_modules,
            module_path,
            dropout,
            use_rslora,
            init,
            rank_pattern,
            alpha_pattern,
            recompute_input,
        )
        _check_ffn_names(ffn_names)
        _check_control(locals())
        self.ffn_names = dict(ffn_names) if ffn_names is not None else None
        self.activation, self.temporal_mask, self.step_scaling = activation, temporal_mask, step_scaling
        self.keep_fraction, self.importance_decay = float(keep_fraction), float(importance_decay)
        self.warmup_steps, self.refresh_every = warmup_steps, refresh_every
        self.scale_near_linear, self.scale_responsive = float(scale_near_linear), float(scale_responsive)
        self.scale_saturated = float(scale_saturated)
        self.linear_tol, self.saturated_below, self.min_group_fraction = (
            float(linear_tol),
            float(saturated_below),
            float(min_group_fraction),
        )

    def group_scales(self) -> tuple[float, float, float]:
        """Step factors of the groups (near-linear, responsive, saturated)."""
        return self.scale_near_linear, self.scale_responsive, self.scale_saturated

    def gated_ffns(self, model: nn.Module) -> list[GatedFFN]:
        return find_gated_ffns(model, self.ffn_names, self.activation, self.module_path)

    def select(self, model: nn.Module, names: list[str]) -> list[str]:
        """Default targets: the gate/up/down projections of the gated FFNs among ``names``
        (refuses a model without one). Explicit targets are kept as given."""
        if self.target_modules is not None:
            return names
        ffns = self.gated_ffns(model)
        members = {n for f in ffns for n in (f.gate, f.up, f.down)}
        chosen = [n for n in names if n in members]
        if not chosen:
            raise no_gated_ffn_error(model, self.ffn_names)
        return chosen


def nalora_gates(model: nn.Module) -> list[tuple[GatedFFN, nn.Module]]:
    """``(ffn, gate layer)`` for every gated FFN of ``model`` whose gate projection is a layer of
    an ``NALoRA`` spec (what the controller drives)."""
    modules = dict(model.named_modules())
    specs = {id(m.spec): m.spec for m in modules.values() if isinstance(m, AdapterLayer) and isinstance(m.spec, NALoRA)}
    out, seen = [], set()
    for spec in specs.values():
        for ffn in find_gated_ffns(model, spec.ffn_names, spec.activation):
            layer = modules.get(ffn.gate)
            if isinstance(layer, AdapterLayer) and layer.spec is spec and ffn.gate not in seen:
                seen.add(ffn.gate)
                out.append((ffn, layer))
    return out
