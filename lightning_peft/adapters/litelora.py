"""LiteLoRA: continual LoRA that reuses the adapters it has and recruits a new one only when it must.

After Dieudonne et al., "When One Adapter Speaks for Many" (arXiv 2606.28117; abstract level, the
gate's exact form is not public: every choice below is an option). While training task ``t``, a
frozen linear ``W0 [d_out, d_in]`` (bias ``b``) computes::

    y = x W0^T + b + sum_{i<t} c_i s_i (x A_i^T) B_i^T + gamma * s (dropout(x) A^T) B^T      [..., d_out]

* the **bank**: the ``k`` earlier adapters' factors ``A_i [r_i, d_in]``, ``B_i [d_out, r_i]`` and
  scales ``s_i``, frozen, stored concatenated as buffers ``bank_A [R, d_in]``, ``bank_B [d_out, R]``
  (``R = sum r_i``; ``bank_owner [R]`` says which adapter each rank slot belongs to). They are
  non-persistent: the adapter library holds them (``lightning_peft.continual.begin_task`` fills the
  bank from it), so checkpoints and exports carry only what trains;
* the **coefficients** ``c [k]`` (trainable, start at ``coefficient_init``): one vector per module
  (``coefficients="per_module"``) or one shared by every module (``"global"``);
* the **new adapter** ``A [r, d_in]`` (Kaiming-uniform), ``B [d_out, r]`` (zero), ``s = alpha / r``
  (``r`` per module with ``rank_pattern``);
* the **gate** ``gamma``: a hard-concrete variable (Louizos et al. 2018) with trainable ``log_alpha``,
  temperature ``beta`` and stretch limits ``(l, h) = (stretch_low, stretch_high)``::

      training:  u ~ U(0, 1),  g = sigmoid((log u - log(1 - u) + log_alpha) / beta),  gamma = clamp(g (h - l) + l, 0, 1)
      eval:      gamma = clamp(sigmoid(log_alpha) (h - l) + l, 0, 1)            (deterministic)
      P(gamma != 0) = sigmoid(log_alpha - beta log(-l / h))                       (the expected L0)
      E[gamma]      = int_0^1 sigmoid(log_alpha - beta logit((t - l) / (h - l))) dt

  ``gate_scope="global"`` (default): one gate per task, shared by every module (one sample per model
  forward); ``"per_module"``: one gate per module. The objective adds ``l0_weight * sum over gates
  P(gamma != 0)`` (``lightning_peft.continual.l0_penalty``). After training, ``E[gamma] <
  gate_threshold`` means **reuse**: the new adapter is dropped and only ``c`` is kept; otherwise the
  new adapter is **recruited** with its deterministic gate folded into ``B``.

Merge: the layer is linear in ``x``, so ``W0 + sum_i c_i s_i B_i A_i + gamma_eval s B A`` reproduces
its eval-mode output exactly (``delta_weight``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.adapters.base import AdapterSpec, LinearAdapterLayer, check_positive, first_match
from lightning_peft.validation import InvalidArgumentError, check_bool, check_choice, check_float, check_int, check_mapping

__all__ = ["BankFactors", "HardConcreteGate", "LiteLoRA", "LiteLoRALinear", "litelora_gates", "litelora_layers"]

#: one frozen adapter in a module's bank: ``(A [r_i, d_in], B [d_out, r_i], s_i)``
BankFactors = tuple[torch.Tensor, torch.Tensor, float]
_EPS = 1e-6
#: midpoints of the quadrature of E[gamma] (the integrand is smooth and bounded: 1024 points
#: reach ~1e-6 against a Monte Carlo estimate's ~1e-3)
_QUADRATURE_POINTS = 1024


class HardConcreteGate(nn.Module):
    """A scalar hard-concrete gate with trainable ``log_alpha`` (0-dim, fp32); see the module
    docstring for the formulas. ``shared_sample`` is set by the model-level hook of a global gate so
    that every module of one forward sees the same draw."""

    def __init__(self, log_alpha_init: float, temperature: float, stretch_low: float, stretch_high: float, device=None) -> None:
        super().__init__()
        self.log_alpha = nn.Parameter(torch.tensor(float(log_alpha_init), device=device, dtype=torch.float32))
        self.temperature, self.low, self.high = float(temperature), float(stretch_low), float(stretch_high)
        self.shared_sample: torch.Tensor | None = None

    def draw(self) -> torch.Tensor:
        """One reparameterised training sample in ``[0, 1]`` (global RNG: reproducible under a seed)."""
        u = torch.rand((), device=self.log_alpha.device).clamp(_EPS, 1 - _EPS)
        g = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.temperature)
        return (g * (self.high - self.low) + self.low).clamp(0.0, 1.0)

    def deterministic(self) -> torch.Tensor:
        """The eval-mode value ``clamp(sigmoid(log_alpha) (h - l) + l, 0, 1)``."""
        return (torch.sigmoid(self.log_alpha) * (self.high - self.low) + self.low).clamp(0.0, 1.0)

    def open_probability(self) -> torch.Tensor:
        """``P(gamma != 0) = sigmoid(log_alpha - beta log(-l / h))``: the gate's expected L0."""
        return torch.sigmoid(self.log_alpha - self.temperature * math.log(-self.low / self.high))

    def expected(self) -> torch.Tensor:
        """``E[gamma]`` of the training distribution, by midpoint quadrature of ``P(gamma > t)``."""
        t = (torch.arange(_QUADRATURE_POINTS, device=self.log_alpha.device, dtype=torch.float64) + 0.5) / _QUADRATURE_POINTS
        c = (t - self.low) / (self.high - self.low)  # inside (0, 1) since l < 0 < 1 < h
        survival = torch.sigmoid(self.log_alpha.double() - self.temperature * (torch.log(c) - torch.log1p(-c)))
        return survival.mean().float()

    def value(self) -> torch.Tensor:
        """``gamma`` for a forward: a sample in training (the shared one if set), else deterministic."""
        if not self.training:
            return self.deterministic()
        return self.shared_sample if self.shared_sample is not None else self.draw()

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:.4g}, stretch=({self.low:g}, {self.high:g})"


class LiteLoRALinear(LinearAdapterLayer):
    """A frozen ``nn.Linear`` plus the frozen bank, ``coefficients [k]``, ``lora_A [r, d_in]``,
    ``lora_B [d_out, r]`` and a ``gate`` (see the module docstring).

    ``bank``: the ``k`` earlier adapters' factors for this module in library order (``None`` where
    an adapter does not touch this module: it then contributes nothing here). With ``fixed_gate``
    the gate is absent and ``gamma = 1`` (the first task when ``LiteLoRA.gate_first_task`` is off).
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        spec: LiteLoRA,
        bank: Sequence[BankFactors | None] = (),
        fixed_gate: bool = False,
        rank: int | None = None,
    ) -> None:
        super().__init__()
        self.base_layer, self.spec = base_layer, spec
        w = base_layer.weight
        kw = {"device": w.device, "dtype": w.dtype if w.is_floating_point() else torch.float32}
        d_out, d_in = base_layer.out_features, base_layer.in_features
        rank = spec.rank if rank is None else rank
        self.rank, self.scale, self.dropout = rank, spec.alpha / rank, spec.dropout
        self.lora_A = nn.Parameter(torch.empty(rank, d_in, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank, **kw))  # starts equal to base + bank
        self.num_bank = len(bank)
        a_parts, b_parts, owner, scales = [], [], [], []
        for i, factors in enumerate(bank):
            scales.append(0.0 if factors is None else float(factors[2]))
            if factors is None:
                continue
            a, b, _ = factors
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != d_in or b.shape[0] != d_out or a.shape[0] != b.shape[1]:
                raise ValueError(
                    f"bank adapter {i} has A {list(a.shape)} and B {list(b.shape)}, which do not fit a linear layer of "
                    f"[d_out={d_out}, d_in={d_in}]: it must be A [r, {d_in}] and B [{d_out}, r] (an adapter of another base?)"
                )
            a_parts.append(a.detach().to(**kw))
            b_parts.append(b.detach().to(**kw))
            owner += [i] * a.shape[0]
        self.register_buffer("bank_A", torch.cat(a_parts, 0) if a_parts else torch.zeros(0, d_in, **kw), persistent=False)
        self.register_buffer("bank_B", torch.cat(b_parts, 1) if b_parts else torch.zeros(d_out, 0, **kw), persistent=False)
        self.register_buffer("bank_owner", torch.tensor(owner, dtype=torch.long, device=w.device), persistent=False)
        self.register_buffer("bank_scales", torch.tensor(scales, dtype=torch.float32, device=w.device), persistent=False)
        if self.num_bank:
            self.coefficients = nn.Parameter(torch.full((self.num_bank,), spec.coefficient_init, device=w.device, dtype=torch.float32))
        else:
            self.register_parameter("coefficients", None)
        self.gate: HardConcreteGate | None = None
        if not fixed_gate:
            self.gate = HardConcreteGate(spec.log_alpha_init, spec.temperature, spec.stretch_low, spec.stretch_high, device=w.device)

    # --- parts --------------------------------------------------------------------------------
    def gate_value(self) -> torch.Tensor:
        """``gamma`` for this forward (0-dim fp32): sampled in training, deterministic in eval."""
        if self.gate is None:
            return torch.ones((), device=self.lora_A.device)
        return self.gate.value()

    def eval_gate(self) -> float:
        return 1.0 if self.gate is None else float(self.gate.deterministic().detach())

    def slot_weights(self) -> torch.Tensor:
        """``c_owner * s_owner [R]``: the weight of each bank rank slot."""
        return (self.coefficients * self.bank_scales)[self.bank_owner]

    def bank_output(self, x: torch.Tensor) -> torch.Tensor:
        """``sum_i c_i s_i (x A_i^T) B_i^T [..., d_out]`` (the frozen bank's contribution)."""
        u = F.linear(x, self.bank_A.to(x.dtype))
        return F.linear(u * self.slot_weights().to(x.dtype), self.bank_B.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        if self.bank_A.shape[0]:
            y = y + self.bank_output(x)
        h = F.dropout(x, self.dropout, self.training) if self.dropout else x
        new = F.linear(F.linear(h, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return y + (self.gate_value() * self.scale).to(x.dtype) * new

    # --- merge --------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """``sum_i c_i s_i B_i A_i + gamma_eval s B A`` in fp32 ``[d_out, d_in]`` (eval-mode update)."""
        delta = self.eval_gate() * self.scale * (self.lora_B.detach().float() @ self.lora_A.detach().float())
        if self.bank_A.shape[0]:
            delta = delta + (self.bank_B.float() * self.slot_weights().detach().float()) @ self.bank_A.float()
        return delta

    def peft_metadata(self) -> dict[str, object]:
        return {"rank": self.rank, "alpha": self.spec.alpha, "bank": self.num_bank}

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:.4g}, bank={self.num_bank} adapters / {self.bank_A.shape[0]} slots"


class LiteLoRA(AdapterSpec):
    """LiteLoRA on linear layers (see the module docstring for the math).

    Args:
        rank: ``r`` of the new adapter (``1 <= r <= min(d_in, d_out)``).
        alpha: the new adapter is scaled by ``s = alpha / r``.
        target_modules, exclude_modules, module_path: as for ``LoRA`` (default ``"all-linear"``).
        dropout: dropout on the new adapter's input (training only).
        coefficients: ``"per_module"`` (a vector ``c [k]`` per module) or ``"global"`` (one ``c [k]``
            shared by every module).
        coefficient_init: initial value of every ``c_i`` (``0``: the task starts from the plain base).
        gate_scope: ``"global"`` (one gate per task for all modules) or ``"per_module"``.
        log_alpha_init: initial ``log_alpha`` of every gate (``2``: ``P(open) ~ 0.97``, ``gamma_eval ~ 0.96``).
        temperature: ``beta``, the hard concrete's temperature (``> 0``; Louizos et al.: ``2/3``).
        stretch_low, stretch_high: ``(l, h)`` with ``l < 0`` and ``h > 1`` (Louizos et al.: ``-0.1, 1.1``).
        l0_weight: weight of ``sum over gates P(gamma != 0)`` in the objective (``>= 0``).
        gate_threshold: ``E[gamma]`` below it after training means reuse (drop the new adapter), in ``(0, 1)``.
        gate_first_task: gate the first task too; ``False`` (default) fixes ``gamma = 1`` while the
            bank is empty (nothing to reuse: the first adapter is always recruited).
        rank_pattern: per-module ranks, ``{name pattern: rank}`` (as ``LoRA``; e.g. a 2-way head
            takes at most rank 2).
    """

    kind = "litelora"

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 16.0,
        target_modules: str | list[str] | None = None,
        exclude_modules: list[str] | None = None,
        module_path: str | None = None,
        dropout: float = 0.0,
        coefficients: Literal["per_module", "global"] = "per_module",
        coefficient_init: float = 0.0,
        gate_scope: Literal["global", "per_module"] = "global",
        log_alpha_init: float = 2.0,
        temperature: float = 2.0 / 3.0,
        stretch_low: float = -0.1,
        stretch_high: float = 1.1,
        l0_weight: float = 0.01,
        gate_threshold: float = 0.1,
        gate_first_task: bool = False,
        rank_pattern: dict[str, int] | None = None,
    ) -> None:
        super().__init__(target_modules, exclude_modules, module_path)
        check_positive("rank", rank, int)
        check_positive("alpha", alpha, float)
        check_float("dropout", dropout, 0.0, 1.0, high_open=True)
        check_choice("coefficients", coefficients, ("per_module", "global"))
        check_float("coefficient_init", coefficient_init)
        check_choice("gate_scope", gate_scope, ("global", "per_module"))
        check_float("log_alpha_init", log_alpha_init)
        check_positive("temperature", temperature, float)
        check_float("stretch_low", stretch_low, high=0.0, high_open=True)
        check_float("stretch_high", stretch_high, low=1.0, low_open=True)
        check_float("l0_weight", l0_weight, low=0.0)
        check_float("gate_threshold", gate_threshold, 0.0, 1.0, low_open=True, high_open=True)
        check_bool("gate_first_task", gate_first_task)
        check_mapping("rank_pattern", rank_pattern, lambda key, v: check_int(key, v, low=1))
        self.rank, self.alpha, self.dropout = rank, float(alpha), float(dropout)
        self.coefficients, self.coefficient_init, self.gate_scope = coefficients, float(coefficient_init), gate_scope
        self.log_alpha_init, self.temperature = float(log_alpha_init), float(temperature)
        self.stretch_low, self.stretch_high = float(stretch_low), float(stretch_high)
        self.l0_weight, self.gate_threshold, self.gate_first_task = float(l0_weight), float(gate_threshold), gate_first_task
        self.rank_pattern = dict(rank_pattern or {})
        # set by with_bank (never by a file): module name -> k bank entries; bank_names: the k adapters
        self.bank: dict[str, list[BankFactors | None]] = {}
        self.bank_names: list[str] = []

    def with_bank(self, bank_names: Sequence[str], bank: Mapping[str, Sequence[BankFactors | None]]) -> LiteLoRA:
        """A copy of this spec whose layers get the frozen adapters ``bank_names`` (``k`` names):
        ``bank[module name]`` lists their factors for that module in the same order (``None`` where
        one does not touch it; a module absent from ``bank`` gets no bank factors)."""
        names = list(bank_names)
        for module, entries in bank.items():
            if len(entries) != len(names):
                raise ValueError(f"bank[{module!r}] has {len(entries)} entries for {len(names)} bank adapters {names}")
        spec = copy.copy(self)
        spec.bank_names, spec.bank = names, {m: list(e) for m, e in bank.items()}
        return spec

    def rank_for(self, name: str) -> int:
        key = first_match(name, self.rank_pattern)
        return self.rank if key is None else self.rank_pattern[key]

    def check(self, name: str, module: nn.Module) -> None:
        if not isinstance(module, nn.Linear):
            raise TypeError(f"LiteLoRA cannot adapt {name!r}: it is a {type(module).__name__}, not an nn.Linear")
        rank, limit = self.rank_for(name), min(module.in_features, module.out_features)
        if rank > limit:
            raise InvalidArgumentError(
                "rank",
                f"rank {rank} is larger than {name!r} allows: min(in_features={module.in_features}, "
                f"out_features={module.out_features}) = {limit}. Use rank <= {limit} (or a rank_pattern entry) or exclude the module.",
            )

    def wrap(self, name: str, module: nn.Module) -> nn.Module:
        self.check(name, module)
        bank = self.bank.get(name, [None] * len(self.bank_names))
        fixed = not self.bank_names and not self.gate_first_task
        return LiteLoRALinear(module, self, bank=bank, fixed_gate=fixed, rank=self.rank_for(name))  # type: ignore[arg-type]

    def attach(self, model: nn.Module, layers: dict[str, nn.Module]) -> list[object]:
        """Tie what ``"global"`` shares: one coefficient vector and/or one gate for every layer; a
        global gate draws one sample per forward of ``model`` (pre-hook) and forgets it after."""
        lite = [m for m in layers.values() if isinstance(m, LiteLoRALinear)]
        if not lite:
            return []
        if self.coefficients == "global" and lite[0].coefficients is not None:
            shared = lite[0].coefficients
            for layer in lite[1:]:
                layer.coefficients = shared
        if self.gate_scope != "global" or lite[0].gate is None:
            return []
        gate = lite[0].gate
        for layer in lite[1:]:
            layer.gate = gate

        def draw(module: nn.Module, args: object) -> None:
            gate.shared_sample = gate.draw() if gate.training else None

        def forget(module: nn.Module, args: object, output: object) -> None:
            gate.shared_sample = None

        return [model.register_forward_pre_hook(draw), model.register_forward_hook(forget)]


def litelora_layers(model: nn.Module) -> dict[str, LiteLoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LiteLoRALinear)}


def litelora_gates(model: nn.Module) -> dict[str, HardConcreteGate]:
    """Each distinct gate once, under the name of the first layer that holds it."""
    gates: dict[str, HardConcreteGate] = {}
    seen: set[int] = set()
    for name, layer in litelora_layers(model).items():
        if layer.gate is not None and id(layer.gate) not in seen:
            seen.add(id(layer.gate))
            gates[name] = layer.gate
    return gates
