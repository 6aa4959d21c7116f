"""AdaLoRA: SVD-form adapters with importance-driven rank allocation (Zhang et al., 2023).

For a frozen linear ``W0 [d_out, d_in]`` the update is ``P diag(lambda) Q`` with ``Q [R, d_in]``
(``lora_A``), ``lambda [R, 1]`` (``lora_E``) and ``P [d_out, R]`` (``lora_B``)::

    y = x W0^T + b + s * x (diag(lambda * m) Q)^T P^T,     s = alpha / init_rank

``m = rank_mask [1, R]`` marks the surviving triplets ``(P_{:,i}, lambda_i, Q_{i,:})``. Every step
``AdaLoRAAllocator`` (driven by ``AdaLoRACallback``, which ``AdapterCallback`` adds
automatically) updates each parameter's sensitivity ``I = |theta * grad|`` as

    I_bar <- beta1 I_bar + (1 - beta1) I,     U_bar <- beta2 U_bar + (1 - beta2) |I - I_bar|

scores triplet ``i`` by ``S_i = s(lambda_i) + mean_j s(Q_ij) + mean_j s(P_ji)`` with
``s = I_bar * U_bar``, adds the gradient of the orthogonality regulariser
``orth_reg_weight * (||Q Q^T - I||_F + ||P^T P - I||_F)`` and, on the cubic budget schedule
(``init_warmup`` steps at ``init_rank`` per layer, then every ``interval`` steps down to
``target_rank`` per layer on average by ``total_steps - final_warmup``), keeps the globally
top-scored triplets and prunes the rest through the shared rank machinery
(``rank_ops.zero_slots``: factors and optimizer state zeroed, mask off). Pruning here is final:
a pruned triplet gets no gradient, and the budget only decreases.

Shapes are static (storage at ``init_rank``), so DDP/FSDP2/compile and the optimizer are
unaffected; the reported trainable count is the effective ``sum over active triplets of
(d_in + d_out + 1)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_peft.adapters.base import (
    AdapterSpec,
    LinearAdapterLayer,
    check_positive,
)
from lightning_peft.adapters.kernels.lora import lora_forward
from lightning_peft.adapters.rank_ops import full_tensor
from lightning_peft.allocation.adalora import cubic_budget
from lightning_peft.allocation.rank_ops import drop_slots, effective_parameters, masked
from lightning_peft.validation import (
    InvalidArgumentError,
    check_bool,
    check_float,
    check_int,
)

#: training forwards without an allocator update before AdaLoRA warns that ranks never change
UNDRIVEN_FORWARDS = 200


class AdaLoRALinear(LinearAdapterLayer):
    """A frozen ``nn.Linear`` plus AdaLoRA factors ``lora_A [R, d_in]``, ``lora_E [R, 1]``,
    ``lora_B [d_out, R]`` and the ``rank_mask [1, R]`` buffer (peft's parameter names)."""

    def __init__(
        self,
        base_layer: nn.Linear,
        init_rank: int,
        alpha: float,
        dropout: float = 0.0,
        recompute_input: bool = True,
        spec: AdapterSpec | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.init_rank, self.alpha, self.dropout, self.recompute_input = init_rank, float(alpha), dropout, recompute_input
        self.scale = alpha / init_rank
        w = base_layer.weight
        kw = {"device": w.device, "dtype": w.dtype if w.is_floating_point() else torch.float32}
        # as peft: lambda = 0 (the model starts equal to the base), P and Q small Gaussians
        self.lora_A = nn.Parameter(torch.randn(init_rank, base_layer.in_features, **kw) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(init_rank, 1, **kw))
        self.lora_B = nn.Parameter(torch.randn(base_layer.out_features, init_rank, **kw) * 0.02)
        self.register_buffer("rank_mask", torch.ones(1, init_rank, dtype=torch.bool, device=w.device))
        self.spec = spec if spec is not None else AdaLoRA(init_rank=init_rank, target_rank=init_rank, alpha=alpha)
        self._undriven = 0
        self._warned = False

    @property
    def rank(self) -> int:
        return int(self.rank_mask.sum())

    def rank_parameters(self) -> list[tuple[nn.Parameter, int | None, int]]:
        return [(self.lora_A, None, 0), (self.lora_E, None, 0), (self.lora_B, None, 1)]

    def slot_cost(self) -> int:
        return self.in_features + self.out_features + 1

    def num_trainable(self) -> int:
        return effective_parameters(self)

    def scaled_a(self) -> torch.Tensor:
        """``diag(lambda * m) Q`` ``[R, d_in]`` (differentiable)."""
        return self.lora_A * masked(self.lora_E, self.rank_mask, None, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        if self.training and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            self._undriven += 1
            if self._undriven > UNDRIVEN_FORWARDS and not self._warned:
                self._warned = True
                warnings.warn(
                    f"AdaLoRA: {self._undriven} training forwards without a rank update, so ranks never change. Use "
                    "AdapterCallback (it adds AdaLoRACallback), add AdaLoRACallback, or call AdaLoRAAllocator.step() "
                    "after every optimizer step in your own loop.",
                    stacklevel=2,
                )
        dropout = self.dropout if self.training else 0.0
        base = self.base_layer
        return lora_forward(x, base.weight, base.bias, self.scaled_a(), self.lora_B, self.scale, dropout, self.recompute_input)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.lora_B.detach().float() @ self.scaled_a().detach().float())

    def peft_metadata(self) -> dict[str, Any]:
        return {"rank": self.rank, "init_rank": self.init_rank, "alpha": self.alpha}

    def extra_repr(self) -> str:
        return f"init_rank={self.init_rank}, rank={self.rank}, alpha={self.alpha}, scale={self.scale:.4g}"


class AdaLoRA(AdapterSpec):
    """AdaLoRA on linear layers: ranks start at ``init_rank`` and are pruned on a schedule to
    ``target_rank`` per layer on average, globally by importance.

    Args:
        init_rank: starting (and storage) rank of every layer.
        target_rank: average final rank per layer (total budget ``target_rank * layers``).
        alpha: the update is scaled by ``alpha / init_rank``.
        target_modules, exclude_modules, module_path: as for ``LoRA``.
        dropout: dropout on the adapter input (training only).
        init_warmup: steps before pruning starts (``t_i``).
        final_warmup: steps at the end with the final budget fixed (``t_f``).
        interval: steps between budget re-allocations (``Delta T``).
        beta1: EMA factor of the sensitivity.
        beta2: EMA factor of its uncertainty.
        orth_reg_weight: weight of the orthogonality regulariser on ``P`` and ``Q``.
        total_steps: schedule length in optimizer steps; ``None``: ``AdaLoRACallback`` takes
            ``trainer.estimated_stepping_batches``.
        recompute_input: as for ``LoRA``.
    """

    kind = "adalora"
    #: callbacks ``AdapterCallback`` adds so that ranks are updated every step (class paths,
    #: imported there: adapters never import Lightning)
    training_callbacks = ("lightning_peft.callbacks.expert_importance.AdaLoRACallback",)

    def __init__(
        self,
        init_rank: int = 12,
        target_rank: int = 8,
        alpha: float = 32.0,
        target_modules: str | list[str] | None = None,
        exclude_modules: list[str] | None = None,
        module_path: str | None = None,
        dropout: float = 0.0,
        init_warmup: int = 0,
        final_warmup: int = 0,
        interval: int = 1,
        beta1: float = 0.85,
        beta2: float = 0.85,
        orth_reg_weight: float = 0.5,
        total_steps: int | None = None,
        recompute_input: bool = True,
    ) -> None:
        super().__init__(target_modules, exclude_modules, module_path)
        check_positive("init_rank", init_rank, int)
        check_positive("target_rank", target_rank, int)
        check_positive("alpha", alpha, float)
        check_positive("interval", interval, int)
        if target_rank > init_rank:
            raise InvalidArgumentError(
                "target_rank", f"target_rank={target_rank} exceeds init_rank={init_rank}: AdaLoRA only prunes; use target_rank <= init_rank"
            )
        check_float("dropout", dropout, 0.0, 1.0, high_open=True)
        check_float("beta1", beta1, 0.0, 1.0, high_open=True)
        check_float("beta2", beta2, 0.0, 1.0, high_open=True)
        check_int("init_warmup", init_warmup, low=0)
        check_int("final_warmup", final_warmup, low=0)
        check_float("orth_reg_weight", orth_reg_weight, low=0.0)
        check_bool("recompute_input", recompute_input)
        if total_steps is not None:
            check_positive("total_steps", total_steps, int)
            if init_warmup + final_warmup >= total_steps:
                raise InvalidArgumentError(
                    "total_steps",
                    f"init_warmup + final_warmup ({init_warmup + final_warmup}) must be < total_steps ({total_steps}): "
                    "shorten the warmups or raise total_steps",
                )
        self.init_rank, self.target_rank, self.alpha, self.dropout = init_rank, target_rank, float(alpha), float(dropout)
        self.init_warmup, self.final_warmup, self.interval = init_warmup, final_warmup, interval
        self.beta1, self.beta2, self.orth_reg_weight = float(beta1), float(beta2), float(orth_reg_weight)
        self.total_steps, self.recompute_input = total_steps, recompute_input

    def check(self, name: str, module: nn.Module) -> None:
        if not self.supports(module):
            raise TypeError(f"AdaLoRA cannot adapt {name!r}: it is a {type(module).__name__}, not an nn.Linear")
        limit = min(module.in_features, module.out_features)
        if self.init_rank > limit:
            raise ValueError(f"init_rank {self.init_rank} is larger than {name!r} allows (min(in, out) = {limit})")

    def wrap(self, name: str, module: nn.Module) -> nn.Module:
        self.check(name, module)
        return AdaLoRALinear(module, self.init_rank, self.alpha, self.dropout, self.recompute_input, spec=self)  # type: ignore[arg-type]


def adalora_layers(model: nn.Module) -> dict[str, AdaLoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaLoRALinear)}


def _like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor) on ``param``'s device, sharded like ``param`` when that is a
    DTensor (FSDP2), so the importance statistics combine with its gradients."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    value = value.to(param.device)
    return distribute_tensor(value, param.device_mesh, param.placements) if isinstance(param, DTensor) else value


class AdaLoRAAllocator:
    """AdaLoRA's per-step update over all ``AdaLoRALinear`` layers of ``model`` (pure torch).

    In a plain loop::

        loss.backward()
        allocator.accumulate()          # importance EMAs + orthogonality-regulariser gradients
        optimizer.step(); optimizer.zero_grad()
        allocator.allocate(step + 1, [optimizer])   # prune to the scheduled budget

    ``step()`` updates the importance (``accumulate`` without the regulariser, whose gradient
    would come after the optimizer used the gradients) then ``allocate``s, for loops that call it
    after ``optimizer.step()`` (before ``zero_grad``).
    """

    def __init__(self, model: nn.Module, total_steps: int | None = None) -> None:
        self.layers = adalora_layers(model)
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no AdaLoRA layers")
        self.spec: AdaLoRA = next(iter(self.layers.values())).spec  # type: ignore[assignment]
        total = self.spec.total_steps or total_steps
        if total is None:
            raise ValueError("AdaLoRA needs the schedule length: set AdaLoRA(total_steps=...) or trainer.max_steps/max_epochs")
        if self.spec.init_warmup + self.spec.final_warmup >= total:
            raise ValueError(f"init_warmup + final_warmup must be < total_steps ({total})")
        self.total_steps = int(total)
        self.initial_budget = sum(l.init_rank for l in self.layers.values())
        self.target_budget = self.spec.target_rank * len(self.layers)
        self.ipt: dict[str, torch.Tensor] = {}
        self.unc: dict[str, torch.Tensor] = {}
        self.last_allocation = -1

    def describe(self) -> str:
        return (
            f"{len(self.layers)} layers, triplets {self.initial_budget} -> {self.target_budget} over steps "
            f"{self.spec.init_warmup}..{self.total_steps - self.spec.final_warmup} (every {self.spec.interval})"
        )

    def active_slots(self) -> int:
        return sum(int(l.rank_mask.sum()) for l in self.layers.values())

    def trainable(self) -> int:
        return sum(l.num_trainable() for l in self.layers.values())

    def budget(self, step: int) -> tuple[int, bool]:
        """``(triplets to keep, whether to re-allocate at this step)`` -- AdaLoRA's cubic schedule."""
        s = self.spec
        return cubic_budget(step, self.initial_budget, self.target_budget, s.init_warmup, s.final_warmup, self.total_steps, s.interval)

    @torch.no_grad()
    def _update_importance(self) -> None:
        beta1, beta2 = self.spec.beta1, self.spec.beta2
        for name, layer in self.layers.items():
            for key in ("lora_A", "lora_E", "lora_B"):
                p = getattr(layer, key)
                if p.grad is None:
                    continue
                ipt = (p * p.grad).abs().float()
                full = f"{name}.{key}"
                if full not in self.ipt:
                    self.ipt[full] = torch.zeros_like(ipt)
                    self.unc[full] = torch.zeros_like(ipt)
                self.ipt[full].mul_(beta1).add_(ipt, alpha=1 - beta1)
                self.unc[full].mul_(beta2).add_((ipt - self.ipt[full]).abs(), alpha=1 - beta2)
            layer._undriven = 0

    def _orthogonality(self) -> float:
        """Add the gradient of the orthogonality regulariser to ``lora_A``/``lora_B`` grads."""
        weight = self.spec.orth_reg_weight
        if weight == 0:
            return 0.0
        params, terms = [], []
        with torch.enable_grad():
            for layer in self.layers.values():
                mask = layer.rank_mask[0]
                if not mask.any():
                    continue
                # FSDP2 shards the factors: the regulariser needs whole matrices; full_tensor is
                # differentiable, so each rank's gradient comes back as its shard
                q = full_tensor(layer.lora_A)[mask]
                p = full_tensor(layer.lora_B)[:, mask]
                eye = torch.eye(int(mask.sum()), device=q.device, dtype=torch.float32)
                term = torch.linalg.matrix_norm(q.float() @ q.float().t() - eye) + torch.linalg.matrix_norm(p.float().t() @ p.float() - eye)
                terms.append(term)
                params += [layer.lora_A, layer.lora_B]
            if not terms:
                return 0.0
            reg = weight * torch.stack(terms).sum() / len(terms)
            grads = torch.autograd.grad(reg, params, allow_unused=True)
        for param, grad in zip(params, grads):
            if grad is None:
                continue
            param.grad = grad.to(param.dtype) if param.grad is None else param.grad.add_(grad.to(param.grad.dtype))
        return float(reg.detach())

    def accumulate(self) -> float:
        """After backward, before the optimizer step: update importance, add regulariser
        gradients. Returns the regulariser value."""
        self._update_importance()
        return self._orthogonality()

    def scores(self) -> dict[str, torch.Tensor]:
        """Triplet scores ``[R]`` per layer (0 for layers without statistics yet)."""
        out = {}
        for name, layer in self.layers.items():
            keys = [f"{name}.{k}" for k in ("lora_A", "lora_E", "lora_B")]
            if any(k not in self.ipt for k in keys):
                out[name] = torch.zeros(layer.init_rank)
                continue
            s = {k: full_tensor(self.ipt[k] * self.unc[k]).cpu() for k in keys}  # all-gathered under FSDP2
            out[name] = s[keys[1]].flatten() + s[keys[0]].mean(dim=1) + s[keys[2]].mean(dim=0)
        return out

    @torch.no_grad()
    def allocate(self, step: int, optimizers: Sequence[torch.optim.Optimizer] = ()) -> int:
        """Prune to the scheduled budget at ``step`` (once per step). Returns active triplets."""
        budget, due = self.budget(step)
        active = self.active_slots()
        if not due or step == self.last_allocation or active <= budget:
            return active
        self.last_allocation = step
        scores = self.scores()
        candidates = sorted(
            (
                (float(scores[name][k]), i, k)
                for i, (name, layer) in enumerate(self.layers.items())
                for k in layer.rank_mask[0].nonzero().flatten().tolist()
            ),
        )
        layers = list(self.layers.values())
        pruned: dict[int, torch.Tensor] = {}  # layer index -> slots to prune, one zeroing pass per layer
        for _, i, k in candidates[: active - budget]:  # lowest scores first, ties by (layer, slot)
            pruned.setdefault(i, torch.zeros_like(layers[i].rank_mask))[0, k] = True
        for i, slots in pruned.items():
            drop_slots(layers[i], slots, optimizers)
        return self.active_slots()

    def step(self, step: int, optimizers: Sequence[torch.optim.Optimizer] = ()) -> int:
        """Importance update + ``allocate`` for loops that call it after ``optimizer.step()``."""
        self._update_importance()
        return self.allocate(step, optimizers)

    def state_dict(self) -> dict[str, Any]:
        return {
            # whole tensors (FSDP2 shards gathered: every rank calls this), loadable at any world size
            "ipt": {k: full_tensor(v).cpu() for k, v in self.ipt.items()},
            "unc": {k: full_tensor(v).cpu() for k, v in self.unc.items()},
            "last_allocation": self.last_allocation,
            "total_steps": self.total_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        params = {f"{name}.{key}": getattr(layer, key) for name, layer in self.layers.items() for key in ("lora_A", "lora_E", "lora_B")}
        self.ipt = {k: _like(params[k], v) for k, v in state["ipt"].items()}
        self.unc = {k: _like(params[k], v) for k, v in state["unc"].items()}
        self.last_allocation = int(state["last_allocation"])
        self.total_steps = int(state["total_steps"])
