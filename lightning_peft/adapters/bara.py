"""BaRA: Bayesian adaptive rank allocation (after Duan et al., arXiv 2606.29184; abstract level).

A pool of ``R = max_rank`` disentangled rank-1 factors on a frozen linear ``W0 [d_out, d_in]``,
of which a sparse, input-dependent subset is active::

    u = x A^T                                   [..., R]      (A = lora_A [R, d_in])
    z = z_global * z_local(u)                   [..., R]
    y = x W0^T + b + s * (u * z) B^T            [..., d_out]  (B = lora_B [d_out, R], s = alpha / R)

* **Global gates** ``z_global [R]``: one binary-concrete (relaxed Bernoulli) variable per factor
  with trainable log-odds ``gate_logit [R]``, ``pi = sigmoid(gate_logit)`` the probability that
  factor ``k`` is on. In training each example (leading index of ``x``) draws its own sample
  ``z_k = sigmoid((gate_logit_k + log v - log(1 - v)) / temperature)``, ``v ~ U(0, 1)``
  (reparameterised: gradients reach ``gate_logit``).
* **Local gates** ``z_local(u) = sigmoid(u G^T + c) [..., R]`` per token (``local_gate=True``),
  a deterministic gating network on the factor activations ``u`` the layer computes anyway:
  ``G = gate_weight [R, R]`` (starts at zero) and ``c = gate_bias [R]`` (starts at
  ``local_init_logit``). Extra cost per token: ``R^2`` multiply-adds, against ``R (d_in + d_out)``
  for the factors themselves.
* **KL**: ``sum_k KL(Bernoulli(pi_k) || Bernoulli(prior))`` per layer -- the KL of the discrete
  gates the relaxation approximates (the relaxed sample has no closed-form KL). The objective is
  ``task loss + kl_weight * sum over layers KL``. ``BaRACallback`` (added by ``AdapterCallback``)
  adds the KL's gradient to ``gate_logit.grad`` before every optimizer step; a plain loop calls
  ``add_kl_gradients(model)`` after ``backward`` (or adds ``kl_weight * bara_kl(model)`` to its
  loss).
* **Evaluation**: ``eval_gate="expected"`` uses ``z_global = pi``; ``"sampled"`` averages
  ``samples`` fresh concrete draws of the global gate per example (the update is linear in ``z``,
  so this is the layer output averaged over the draws). ``monte_carlo(model)`` makes every
  layer draw one sample per forward in eval too, for model-level predictive averaging.
* **Effective rank** (per layer; ``effective_ranks``): ``global_rank = sum_k pi_k`` (expected
  number of factors switched on) and the **joint effective rank** ``E_tokens[sum_k pi_k *
  z_local_k(u)]`` (expected active factor mass per token, global times local, over the tokens
  the layer saw since the last ``reset_rank_stats``; padding tokens included: a linear layer
  does not see the mask). Without a local gate the two are equal.
* **Merge**: only without a local gate, where ``W0 + s B diag(pi) A`` is exactly the
  expected-gate layer. With ``local_gate=True`` the update depends on the input and merging is
  refused.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.adapters.base import AdapterSpec, LinearAdapterLayer, check_positive
from lightning_peft.validation import InvalidArgumentError, check_bool, check_choice, check_float, check_int

__all__ = [
    "BaRA",
    "BaRALinear",
    "UNDRIVEN_FORWARDS",
    "add_kl_gradients",
    "bara_kl",
    "bara_layers",
    "effective_ranks",
    "monte_carlo",
    "reset_rank_stats",
]

#: training forwards without the KL gradient before a layer warns that the prior never acts
UNDRIVEN_FORWARDS = 200
_EPS = 1e-6


def bernoulli_kl(logit: torch.Tensor, prior: float) -> torch.Tensor:
    """``KL(Bernoulli(sigmoid(logit)) || Bernoulli(prior))`` elementwise, computed from the
    log-odds with log-sigmoids (stable for large ``|logit|``)."""
    pi = torch.sigmoid(logit)
    log_pi, log_not_pi = F.logsigmoid(logit), F.logsigmoid(-logit)
    return pi * (log_pi - math.log(prior)) + (1 - pi) * (log_not_pi - math.log1p(-prior))


class BaRALinear(LinearAdapterLayer):
    """A frozen ``nn.Linear`` plus ``lora_A [R, d_in]``, ``lora_B [d_out, R]``, ``gate_logit [R]``
    and, with a local gate, ``gate_weight [R, R]`` and ``gate_bias [R]`` (see module docstring)."""

    def __init__(self, base_layer: nn.Linear, spec: BaRA) -> None:
        super().__init__()
        self.base_layer, self.spec = base_layer, spec
        rank, w = spec.max_rank, base_layer.weight
        kw = {"device": w.device, "dtype": w.dtype if w.is_floating_point() else torch.float32}
        self.max_rank, self.scale = rank, spec.alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base_layer.in_features, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, rank, **kw))  # starts equal to the base
        init = math.log(spec.init_prob) - math.log1p(-spec.init_prob)
        self.gate_logit = nn.Parameter(torch.full((rank,), init, **kw))
        if spec.local_gate:
            self.gate_weight = nn.Parameter(torch.zeros(rank, rank, **kw))
            self.gate_bias = nn.Parameter(torch.full((rank,), spec.local_init_logit, **kw))
        self.monte_carlo = False  # set by monte_carlo(): eval draws one sample like training
        self._undriven = 0
        self._warned = False
        self.reset_rank_stats()

    # --- gates ------------------------------------------------------------------------------
    def expected_gate(self) -> torch.Tensor:
        """``pi = sigmoid(gate_logit) [R]``: each factor's probability of being on."""
        return torch.sigmoid(self.gate_logit)

    def kl(self) -> torch.Tensor:
        """``sum_k KL(Bernoulli(pi_k) || Bernoulli(prior))`` (0-dim, differentiable, fp32)."""
        return bernoulli_kl(self.gate_logit.float(), self.spec.prior).sum()

    def _concrete(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Binary-concrete samples ``[*shape, R]`` (global RNG: reproducible under a seed)."""
        v = torch.rand(*shape, self.max_rank, device=self.gate_logit.device, dtype=torch.float32).clamp(_EPS, 1 - _EPS)
        noise = torch.log(v) - torch.log1p(-v)
        return torch.sigmoid((self.gate_logit.float() + noise) / self.spec.temperature).to(dtype)

    def global_gate(self, x: torch.Tensor) -> torch.Tensor:
        """``z_global``, broadcastable to ``[..., R]``: one sample per example (leading index)
        in training or under ``monte_carlo``; ``pi`` or the mean of ``samples`` draws in eval."""
        per_example = (x.shape[0],) + (1,) * (x.dim() - 2) if x.dim() >= 2 else ()
        if self.training or self.monte_carlo:
            return self._concrete(per_example, x.dtype)
        if self.spec.eval_gate == "expected":
            return self.expected_gate().to(x.dtype)
        return self._concrete((self.spec.samples, *per_example), x.dtype).mean(dim=0)

    def local_gate(self, u: torch.Tensor) -> torch.Tensor | None:
        """``z_local = sigmoid(u G^T + c) [..., R]``, ``None`` without a local gate."""
        if not self.spec.local_gate:
            return None
        return torch.sigmoid(F.linear(u, self.gate_weight.to(u.dtype), self.gate_bias.to(u.dtype)))

    # --- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer(x)
        if self.merged:
            return base
        if self.training and torch.is_grad_enabled():
            self._count_undriven()
        u = F.linear(x, self.lora_A.to(x.dtype))
        z = self.global_gate(x)
        local = self.local_gate(u)
        if local is not None:
            z = z * local
        self._record(local)
        return base + self.scale * F.linear(u * z, self.lora_B.to(x.dtype))

    @torch.no_grad()
    def _record(self, local: torch.Tensor | None) -> None:
        """Accumulate the joint effective rank's numerator and token count (on the device)."""
        if torch.compiler.is_compiling():
            return
        if local is None:  # the joint rank is the global rank: nothing to accumulate
            return
        flat = local.detach().float().reshape(-1, self.max_rank)
        if self._rank_sum.device != flat.device:  # the module moved since the last reset
            self._rank_sum = self._rank_sum.to(flat.device)
        self._rank_sum += (flat @ self.expected_gate().detach().float()).sum()
        self._tokens += flat.shape[0]

    def _count_undriven(self) -> None:
        self._undriven += 1
        if self._undriven > UNDRIVEN_FORWARDS and not self._warned and self.spec.kl_weight > 0:
            self._warned = True
            warnings.warn(
                f"BaRA: {self._undriven} training forwards without the KL term, so the sparse prior never acts. Use "
                "AdapterCallback (it adds BaRACallback), add BaRACallback, or call add_kl_gradients(model) after "
                "backward in your own loop.",
                stacklevel=3,
            )

    def reset_rank_stats(self) -> None:
        # a plain tensor, not a buffer: out of state dicts and files, and never overwritten by
        # DDP's buffer broadcast (each process keeps its own statistic)
        self._rank_sum = torch.zeros((), device=self.gate_logit.device)
        self._tokens = 0

    def rank_stats(self) -> dict[str, float]:
        """``{"global_rank": sum pi, "joint_rank": E_tokens[sum pi * z_local]}`` (the joint
        rank of the expected gate when no token was seen since the last reset)."""
        global_rank = float(self.expected_gate().detach().float().sum())
        if self._tokens == 0 or not self.spec.local_gate:
            return {"global_rank": global_rank, "joint_rank": global_rank}
        return {"global_rank": global_rank, "joint_rank": float(self._rank_sum) / self._tokens}

    # --- merge ------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """``s B diag(pi) A`` in fp32 ``[d_out, d_in]`` (the expected-gate update)."""
        pi = self.expected_gate().detach().float()
        return self.scale * (self.lora_B.detach().float() * pi) @ self.lora_A.detach().float()

    def merge_refusal(self) -> str | None:
        if not self.spec.local_gate:
            return None
        return (
            "BaRA cannot merge a layer with a local gate: its update B diag(z_global * z_local(x)) A x depends on the "
            "input x, so no single weight reproduces it. Train with BaRA(local_gate=False) to get a mergeable adapter "
            "(merging then folds the expected global gate, W0 + s B diag(pi) A, exactly)."
        )

    @torch.no_grad()
    def merge(self, keep_original: bool = True) -> None:
        if self.merged:
            return
        if (reason := self.merge_refusal()) is not None:
            raise ValueError(reason)
        if self.spec.eval_gate == "sampled":
            warnings.warn(
                "BaRA merge folds the expected gate pi; the unmerged layer evaluates with eval_gate='sampled' "
                f"({self.spec.samples} concrete draws), so merged outputs equal the expected-gate evaluation, not the sampled one.",
                stacklevel=2,
            )
        super().merge(keep_original)

    def peft_metadata(self) -> dict[str, Any]:
        return {"max_rank": self.max_rank, "alpha": self.spec.alpha, "local_gate": self.spec.local_gate}

    def extra_repr(self) -> str:
        return f"max_rank={self.max_rank}, scale={self.scale:.4g}, local_gate={self.spec.local_gate}, prior={self.spec.prior}"


class BaRA(AdapterSpec):
    """BaRA on linear layers: ``max_rank`` gated rank-1 factors, a sparse prior on the gates.

    Args:
        max_rank: ``R``, the size of the factor pool (``1 <= R <= min(d_in, d_out)``).
        prior: prior probability that a factor is on (``Bernoulli(prior)``, in ``(0, 1)``;
            small = sparse).
        kl_weight: weight of ``sum over layers KL`` in the objective (``>= 0``; ``0`` trains
            without the prior). For an ELBO per example use ``1 / number of training examples``.
        samples: concrete draws averaged per evaluation forward when ``eval_gate="sampled"``
            (and the default count for ``monte_carlo`` predictive averaging); ``>= 1``.
        temperature: the binary concrete's temperature (``> 0``; lower = closer to 0/1 samples,
            noisier gradients).
        local_gate: the per-token gating network ``z_local``; ``False`` leaves only the global
            gates (then the adapter merges exactly).
        alpha: the update is scaled by ``alpha / max_rank``.
        init_prob: initial ``pi`` of every global gate, in ``(0, 1)``.
        local_init_logit: initial bias ``c`` of the local gate (``sigmoid(c)`` is its initial
            value for every token).
        eval_gate: ``"expected"`` (``z_global = pi``, deterministic) or ``"sampled"``.
        target_modules, exclude_modules, module_path: as for ``LoRA``.
    """

    kind = "bara"
    #: adds the KL gradient every optimizer step and logs the effective ranks (class paths:
    #: adapters never import Lightning)
    training_callbacks = ("lightning_peft.callbacks.bara.BaRACallback",)

    def __init__(
        self,
        max_rank: int = 16,
        prior: float = 0.2,
        kl_weight: float = 1e-3,
        samples: int = 4,
        temperature: float = 2.0 / 3.0,
        local_gate: bool = True,
        alpha: float = 32.0,
        init_prob: float = 0.5,
        local_init_logit: float = 2.0,
        eval_gate: Literal["expected", "sampled"] = "expected",
        target_modules: str | list[str] | None = None,
        exclude_modules: list[str] | None = None,
        module_path: str | None = None,
    ) -> None:
        super().__init__(target_modules, exclude_modules, module_path)
        check_positive("max_rank", max_rank, int)
        check_float("prior", prior, 0.0, 1.0, low_open=True, high_open=True)
        check_float("kl_weight", kl_weight, low=0.0)
        check_int("samples", samples, low=1)
        check_positive("temperature", temperature, float)
        check_bool("local_gate", local_gate)
        check_positive("alpha", alpha, float)
        check_float("init_prob", init_prob, 0.0, 1.0, low_open=True, high_open=True)
        check_float("local_init_logit", local_init_logit)
        check_choice("eval_gate", eval_gate, ("expected", "sampled"))
        self.max_rank, self.prior, self.kl_weight, self.samples = max_rank, float(prior), float(kl_weight), samples
        self.temperature, self.local_gate, self.alpha = float(temperature), local_gate, float(alpha)
        self.init_prob, self.local_init_logit, self.eval_gate = float(init_prob), float(local_init_logit), eval_gate

    def check(self, name: str, module: nn.Module) -> None:
        if not isinstance(module, nn.Linear):
            raise TypeError(f"BaRA cannot adapt {name!r}: it is a {type(module).__name__}, not an nn.Linear")
        limit = min(module.in_features, module.out_features)
        if self.max_rank > limit:
            raise InvalidArgumentError(
                "max_rank",
                f"max_rank {self.max_rank} is larger than {name!r} allows: min(in_features={module.in_features}, "
                f"out_features={module.out_features}) = {limit}. Use max_rank <= {limit} or exclude the module.",
            )

    def wrap(self, name: str, module: nn.Module) -> nn.Module:
        self.check(name, module)
        return BaRALinear(module, spec=self)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Model-level helpers (pure torch: plain loops and the Lightning callback both use them)
# --------------------------------------------------------------------------------------------
def bara_layers(model: nn.Module) -> dict[str, BaRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BaRALinear)}


def bara_kl(model: nn.Module, weighted: bool = True) -> torch.Tensor:
    """``sum over layers kl_weight * KL`` (``weighted=False``: the bare KL sum), 0-dim fp32."""
    layers = bara_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no BaRA layers")
    terms = [(layer.spec.kl_weight if weighted else 1.0) * layer.kl() for layer in layers.values()]
    return torch.stack(terms).sum()


def add_kl_gradients(model: nn.Module) -> float:
    """Add ``d(kl_weight * KL)/d gate_logit`` to each ``gate_logit.grad`` (after ``backward``,
    before the optimizer step; once per step). The KL depends only on the parameters, so its
    gradient is the same on every DDP rank. Returns the unweighted KL sum."""
    layers = list(bara_layers(model).values())
    if not layers:
        raise ValueError(f"{type(model).__name__} has no BaRA layers")
    for layer in layers:
        layer._undriven = 0
    with torch.enable_grad():
        kls = [layer.kl() for layer in layers]
        trained = [(layer.spec.kl_weight * kl, layer.gate_logit) for layer, kl in zip(layers, kls) if layer.gate_logit.requires_grad]
        if trained:
            params = [param for _, param in trained]
            grads = torch.autograd.grad(torch.stack([term for term, _ in trained]).sum(), params)
            for param, grad in zip(params, grads):
                param.grad = grad.to(param.dtype) if param.grad is None else param.grad.add_(grad.to(param.grad.dtype))
    return float(torch.stack([kl.detach() for kl in kls]).sum())


def effective_ranks(model: nn.Module) -> dict[str, dict[str, float]]:
    """``{layer name: {"global_rank", "joint_rank"}}`` (see the module docstring)."""
    return {name: layer.rank_stats() for name, layer in bara_layers(model).items()}


def reset_rank_stats(model: nn.Module) -> None:
    for layer in bara_layers(model).values():
        layer.reset_rank_stats()


@contextlib.contextmanager
def monte_carlo(model: nn.Module) -> Iterator[None]:
    """Inside the block every BaRA layer draws one fresh global-gate sample per example on each
    forward, in eval too: average the model's predictions over several forwards for a
    model-level predictive mean (``samples`` forwards is the spec's suggestion)."""
    layers = list(bara_layers(model).values())
    previous = [layer.monte_carlo for layer in layers]
    for layer in layers:
        layer.monte_carlo = True
    try:
        yield
    finally:
        for layer, value in zip(layers, previous):
            layer.monte_carlo = value
