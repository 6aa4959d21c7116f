"""FRAME: a mixture of low-rank experts, each adapting in its own fractional-Fourier domain.

For a frozen linear ``W0 [d_out, d_in]`` (bias ``b``), FRAME learns ``E`` experts
``A_e [r, d_in]``, ``B_e [d_out, r]``, a token router ``W_r [E, d_in]`` and one scalar order
``a_e`` per expert::

    y = x W0^T + b + s * sum_{e in TopK(x)} g_e(x) Re{ F_{-a_e}( B_e A_e F_{a_e}(x) ) },   s = alpha / r

``g(x) = softmax(W_r x)`` (the top-k probabilities, not renormalised), ``F_a`` the discrete
fractional Fourier transform (``lightning_peft.adapters.kernels.frft``) along the features,
of size ``d_in`` on the input side and ``d_out`` on the output side. ``a = 0`` is plain LoRA,
``a = 1`` a low-rank update in the DFT basis, orders in between interpolate. ``B_e`` starts at
zero (the model starts equal to the base); the orders start spread over ``order_range``.

The update is an even function of the order (``Re{F_{a} M F_{-a}} = Re{conj(F_{-a} M F_a)}``
for real ``M``): orders in ``[-1, 0]`` repeat ``[0, 1]``, and ``a = 0`` is a stationary point
(zero gradient in ``a``; the gradient is nonzero at ``a = 1`` and in between).

How it runs. No transform is applied per token: each forward folds the transforms into real
rank-``2r`` factors ``A'_e = [Re(A_e F_a); Im(A_e F_a)]``, ``B'_e = [Re(F_{-a} B_e),
-Im(F_{-a} B_e)]`` (``kernels.frft.fractional_lowrank_factors``: ``O(E r d^2)``, independent
of the batch; reused across no-grad forwards), and the tokens go through one dense gated
mixture node (``kernels.mixture.gated_mixture``): ``u = x A'^T [T, E*2r]``, gated per expert,
then ``u B'^T``. Orders fixed at 0 (``train_orders=False, order_init=0.0``) skip the fold and
run the same node at rank ``r``: that is the MoE-LoRA baseline.

The balance loss (``kernels.routing.grouped_balance_loss``, experts grouped by their current
order into ``balance_groups`` equal bins of ``order_range``) reaches the router through the layer's
output (``kernels.routing.with_aux_gradient``): any ``loss.backward()`` through the model adds
``balance_coef * d aux / d W_r``; the training step is unchanged.

Pure torch. ``lightning_peft.callbacks.frame.FRAMECallback`` (added by ``AdapterCallback``)
puts the orders in their own optimizer group and logs orders and expert loads.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.adapters.base import AdapterSpec, LinearAdapterLayer, check_positive
from lightning_peft.adapters.kernels.frft import fractional_lowrank_factors
from lightning_peft.adapters.kernels.mixture import gated_mixture, router_logits
from lightning_peft.adapters.kernels.routing import grouped_balance_loss, top_k_gates, with_aux_gradient
from lightning_peft.validation import InvalidArgumentError, InvalidArgumentTypeError, check_bool, check_float, check_int

__all__ = ["FRAME", "FRAMELinear", "frame_layers", "frame_parameter_groups"]

#: orders are 4-periodic (F_4 = I): a range inside one period around 0 covers every transform
ORDER_LIMIT = 2.0
MERGE_REFUSAL = (
    "a token-routed mixture has no single merged weight (each token gets its own combination of experts); "
    "keep the adapter unmerged, or export it with save_adapter"
)


class FRAMELinear(LinearAdapterLayer):
    """A frozen ``nn.Linear`` plus ``E`` fractional-domain low-rank experts and a router.

    Tensors: ``lora_A [E, r, d_in]``, ``lora_B [E, d_out, r]``, ``router.weight [E, d_in]``,
    ``orders [E]`` (a parameter, or a buffer when the orders are fixed)."""

    def __init__(self, base_layer: nn.Linear, spec: FRAME) -> None:
        super().__init__()
        self.base_layer, self.spec = base_layer, spec
        d_in, d_out, e, r = base_layer.in_features, base_layer.out_features, spec.num_experts, spec.rank
        weight = base_layer.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        kw = {"device": weight.device, "dtype": dtype}
        self.rank, self.num_experts, self.top_k, self.alpha = r, e, spec.top_k, spec.alpha
        self.scale = spec.alpha / r
        self.lora_A = nn.Parameter(torch.empty(e, r, d_in, **kw))
        self.lora_B = nn.Parameter(torch.zeros(e, d_out, r, **kw))
        for i in range(e):  # each expert's A as LoRA's (nn.Linear's Kaiming-uniform)
            nn.init.kaiming_uniform_(self.lora_A.data[i], a=math.sqrt(5))
        self.router = nn.Linear(d_in, e, bias=False, **kw)
        orders = torch.tensor(spec.initial_orders(), device=weight.device, dtype=torch.promote_types(dtype, torch.float32))
        if spec.train_orders:
            self.orders = nn.Parameter(orders)
        else:
            self.register_buffer("orders", orders)
        # fixed orders all 0: the transforms are the identity, skip them (MoE-LoRA)
        self.spatial = not spec.train_orders and all(a == 0.0 for a in spec.initial_orders())
        self.last_load: torch.Tensor | None = None  # [E] expert loads of the last training forward
        self.last_balance_loss: torch.Tensor | None = None
        self._no_grad_factors: tuple[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] | None = None
        #: multiplies ``balance_coef`` in backward; FRAMECallback sets ``1 / accumulate_grad_batches``
        #: (Lightning divides the loss by it, the balance term must follow)
        self.balance_grad_scale = 1.0

    def project_orders(self) -> None:
        """Put trained orders back into ``order_range`` (projected gradient descent; through
        ``.data`` so autograd's version counters are untouched: values inside stay bit-equal)."""
        if isinstance(self.orders, nn.Parameter):
            low, high = self.spec.order_range
            self.orders.data.clamp_(low, high)

    def expert_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A' [E, R, d_in], B' [E, d_out, R])`` with ``R = r`` (spatial) or ``2r``:
        ``sum_e g_e B'_e A'_e x`` is the experts' update before the scale ``s``."""
        if self.spatial:
            return self.lora_A, self.lora_B
        return fractional_lowrank_factors(self.lora_A, self.lora_B, self.orders)

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``expert_factors()``, kept between no-grad calls (evaluation, inference) until a
        tensor they come from changes (its version counter or storage)."""
        if torch.is_grad_enabled() or self.spatial:
            self._no_grad_factors = None
            return self.expert_factors()
        tensors = (self.lora_A, self.lora_B, self.orders)
        key = tuple(t._version for t in tensors) + tuple(t.data_ptr() for t in tensors) + (hash(self.lora_A.dtype),)
        if self._no_grad_factors is None or self._no_grad_factors[0] != key:
            self._no_grad_factors = (key, self.expert_factors())
        return self._no_grad_factors[1]

    def delta_weights(self) -> torch.Tensor:
        """Every expert's dense real update ``s Re(F_{-a} B A F_a)`` ``[E, d_out, d_in]`` (fp32;
        for analysis, e.g. inter-expert correlation)."""
        a, b = self.expert_factors()
        return self.scale * (b.float() @ a.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.project_orders()
        y = self.base_layer(x)  # any nn.Linear subclass (a quantized one too) computes its own base
        recompute = self.spec.recompute_input
        probs, gates = top_k_gates(router_logits(x, self.router.weight, recompute), self.top_k)
        a, b = self._factors()
        e, r2 = a.shape[0], a.shape[1]
        b_all = (b * self.scale).permute(1, 0, 2).reshape(self.out_features, e * r2)  # [d_out, E*R], expert-major like A's rows
        delta = gated_mixture(x, a.reshape(e * r2, self.in_features), b_all, gates, recompute)
        y = y + delta.view(*x.shape[:-1], self.out_features).to(y.dtype)
        if self.training and torch.is_grad_enabled():
            groups = self.spec.group_membership(self.orders)  # by the current orders: groups follow them as they learn
            aux, load = grouped_balance_loss(probs, gates, groups, self.top_k)
            self.last_load, self.last_balance_loss = load, aux.detach()
            if self.spec.balance_coef > 0 and self.router.weight.requires_grad and aux.requires_grad:
                y = with_aux_gradient(y, aux, self.spec.balance_coef * self.balance_grad_scale)
        return y

    def merge(self, keep_original: bool = True) -> None:
        raise ValueError(f"FRAME cannot be merged: {MERGE_REFUSAL}")

    def unmerge(self) -> None:
        return  # never merged

    def merge_refusal(self) -> str | None:
        return f"FRAME: {MERGE_REFUSAL}"

    def peft_metadata(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "num_experts": self.num_experts, "top_k": self.top_k}

    def extra_repr(self) -> str:
        kind = (
            "spatial (orders fixed at 0)"
            if self.spatial
            else ("learned orders" if isinstance(self.orders, nn.Parameter) else "fixed orders")
        )
        return f"rank={self.rank}, num_experts={self.num_experts}, top_k={self.top_k}, scale={self.scale:.4g}, {kind}"


class FRAME(AdapterSpec):
    """FRAME: experts of rank ``r`` on linear layers, each in its own fractional-Fourier domain.

    Args:
        rank: ``r`` of every expert (``1 <= r <= min(d_in, d_out)``). Each expert computes at
            rank ``2r`` (real and imaginary parts) unless the orders are fixed at 0.
        num_experts: ``E >= 1``.
        top_k: experts per token (``1 <= top_k <= num_experts``).
        alpha: the update is scaled by ``alpha / rank`` (LoRA's convention).
        order_init: ``"spread"`` (the centres of ``E`` equal bins of ``order_range``: 0.125,
            0.375, 0.625, 0.875 for ``E = 4`` over ``(0, 1)``), one order for every expert, or a
            list of ``E`` orders; all inside ``order_range``. The update is even in ``a`` (see
            the module docstring), so its gradient in ``a`` is 0 at ``a = 0``: an expert that
            starts there stays spatial.
        train_orders: learn the orders (``False``: fixed; ``order_init=0.0`` gives MoE-LoRA,
            ``1.0`` a Fourier-domain MoE-LoRA).
        order_range: ``(low, high)`` with ``-2 <= low < high <= 2``: where orders may start and
            stay (trained orders are projected back into it before each training forward).
        order_lr: learning rate of the orders' optimizer group (``None``: the optimizer's);
            the group has no weight decay. Used by ``FRAMECallback`` / ``frame_parameter_groups``.
        balance_coef: weight of the grouped load-balancing loss (0 switches it off).
        balance_groups: number of equal-width bins of ``order_range`` that group experts for
            the balance loss (1: one Switch-style loss over all experts).
        recompute_input: recompute the layer input in backward from its producer's saved
            tensors (a LayerNorm, GELU ...) instead of keeping it, as LoRA does (exact up to
            rounding; saves memory).
        target_modules, exclude_modules, module_path: see ``AdapterSpec``.
    """

    kind = "frame"
    training_callbacks = ("lightning_peft.callbacks.frame.FRAMECallback",)

    def __init__(
        self,
        rank: int = 4,
        num_experts: int = 4,
        top_k: int = 2,
        alpha: float = 8.0,
        order_init: Literal["spread"] | float | list[float] = "spread",
        train_orders: bool = True,
        order_range: tuple[float, float] = (0.0, 1.0),
        order_lr: float | None = None,
        balance_coef: float = 0.01,
        balance_groups: int = 2,
        recompute_input: bool = True,
        target_modules: str | list[str] | None = None,
        exclude_modules: list[str] | None = None,
        module_path: str | None = None,
    ) -> None:
        super().__init__(target_modules, exclude_modules, module_path)
        check_positive("rank", rank, int)
        check_positive("num_experts", num_experts, int)
        check_int("top_k", top_k, low=1)
        if top_k > num_experts:
            raise InvalidArgumentError(
                "top_k", f"top_k ({top_k}) must be <= num_experts ({num_experts}): a token cannot pick more experts than exist"
            )
        check_positive("alpha", alpha, float)
        check_bool("train_orders", train_orders)
        check_bool("recompute_input", recompute_input)
        self.order_range = _check_range(order_range)
        self.order_init = _check_init(order_init, num_experts, self.order_range)
        check_float("order_lr", order_lr, low=0.0, low_open=True, allow_none=True)
        check_float("balance_coef", balance_coef, low=0.0)
        check_int("balance_groups", balance_groups, low=1)  # more bins than experts: some stay empty
        self.rank, self.num_experts, self.top_k, self.alpha = rank, num_experts, top_k, float(alpha)
        self.train_orders = train_orders
        self.order_lr = None if order_lr is None else float(order_lr)
        self.balance_coef, self.balance_groups = float(balance_coef), balance_groups
        self.recompute_input = recompute_input

    def initial_orders(self) -> list[float]:
        if self.order_init == "spread":  # the centres of E equal bins (not the ends: a = 0 is stationary)
            low, high = self.order_range
            width = (high - low) / self.num_experts
            return [low + (i + 0.5) * width for i in range(self.num_experts)]
        if isinstance(self.order_init, list):
            return list(self.order_init)
        return [float(self.order_init)] * self.num_experts

    def group_membership(self, orders: torch.Tensor | None = None) -> torch.Tensor:
        """``[G, E]`` one-hot (float32, on ``orders``' device): expert ``e`` is in bin
        ``floor(G (a_e - low) / (high - low))`` of ``order_range`` (the top edge in the last
        bin). ``orders``: the current ones (``None``: the initial ones). Computed on the device,
        without a host synchronisation."""
        low, high = self.order_range
        width = (high - low) / self.balance_groups
        if orders is None:
            orders = torch.tensor(self.initial_orders(), dtype=torch.float64)
        bins = ((orders.detach() - low) / width).floor().clamp(0, self.balance_groups - 1).long()
        return F.one_hot(bins, self.balance_groups).T.float()

    def check(self, name: str, module: nn.Module) -> None:
        if not isinstance(module, nn.Linear):
            raise TypeError(
                f"FRAME cannot adapt {name!r}: it is a {type(module).__name__}, not an nn.Linear. Exclude it or target linear layers."
            )
        limit = min(module.in_features, module.out_features)
        if self.rank > limit:
            raise ValueError(
                f"rank {self.rank} is larger than {name!r} allows: min(in_features={module.in_features}, "
                f"out_features={module.out_features}) = {limit}. Use rank <= {limit}."
            )

    def wrap(self, name: str, module: nn.Module) -> nn.Module:
        self.check(name, module)
        return FRAMELinear(module, self)


def _check_range(value: Any) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise InvalidArgumentTypeError("order_range", f"order_range must be a pair (low, high) of numbers, got {value!r}")
    low = check_float("order_range[0]", value[0], low=-ORDER_LIMIT, high=ORDER_LIMIT)
    high = check_float("order_range[1]", value[1], low=-ORDER_LIMIT, high=ORDER_LIMIT)
    if not low < high:  # type: ignore[operator]
        raise InvalidArgumentError("order_range", f"order_range must have low < high, got {value!r}; e.g. (0.0, 1.0)")
    return float(low), float(high)  # type: ignore[arg-type]


def _check_init(value: Any, num_experts: int, order_range: tuple[float, float]) -> str | float | list[float]:
    low, high = order_range
    if isinstance(value, str):
        if value != "spread":
            raise InvalidArgumentError(
                "order_init", f"order_init must be 'spread', a number or a list of {num_experts} numbers, got {value!r}"
            )
        return value
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if isinstance(value, (list, tuple)) and len(values) != num_experts:
        raise InvalidArgumentError(
            "order_init", f"order_init has {len(values)} orders but num_experts is {num_experts}: give one order per expert"
        )
    for i, v in enumerate(values):
        try:
            check_float("order_init", v, low=low, high=high)
        except (InvalidArgumentError, InvalidArgumentTypeError) as error:
            raise type(error)(
                "order_init", f"{error} (entry {i}; orders must lie in order_range {order_range}: widen order_range or change the order)"
            ) from None
    return [float(v) for v in values] if isinstance(value, (list, tuple)) else float(value)


def frame_layers(model: nn.Module) -> dict[str, FRAMELinear]:
    """Every FRAME layer of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FRAMELinear)}


def frame_parameter_groups(
    params: nn.Module | Iterable[nn.Parameter], lr: float, weight_decay: float = 0.0, order_lr: float | None = None
) -> list[dict[str, Any]]:
    """Optimizer groups for a model (or its parameters) with FRAME layers: every trainable
    parameter but the orders with ``lr``/``weight_decay``, and per distinct order learning rate
    one group of orders with ``weight_decay=0``. ``order_lr`` overrides the specs' ``order_lr``
    (``None`` there: ``lr``). Use it in a plain-torch loop; ``FRAMECallback`` does the same to
    a Lightning module's optimizer."""
    modules = list(params.modules()) if isinstance(params, nn.Module) else []
    order_lrs = {
        id(m.orders): (order_lr or m.spec.order_lr or lr)
        for m in modules
        if isinstance(m, FRAMELinear) and isinstance(m.orders, nn.Parameter)
    }
    plist = [p for p in (params.parameters() if isinstance(params, nn.Module) else params) if p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": [p for p in plist if id(p) not in order_lrs], "lr": lr, "weight_decay": weight_decay}]
    for value in sorted({order_lrs[id(p)] for p in plist if id(p) in order_lrs}):
        groups.append({"params": [p for p in plist if order_lrs.get(id(p)) == value], "lr": value, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]
