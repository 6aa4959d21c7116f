"""LoRA: a trainable low-rank update on a frozen linear layer.

For a frozen ``W0 [d_out, d_in]`` (and bias ``b``), LoRA learns ``A [r, d_in]`` and
``B [d_out, r]``::

    y = x W0^T + b + s * dropout(x) A^T B^T,      s = alpha / r   (rsLoRA: alpha / sqrt(r))

``A`` starts random (Kaiming-uniform like ``nn.Linear``, or Gaussian), ``B`` at zero, so the
adapted model starts equal to the base.

Speed and memory. ``LoRALinear`` runs base and update in one autograd node
(``lightning_peft.adapters.kernels.lora.LoRAFunction``) that saves only what backward needs:

* the frozen weight (as the frozen-base model does, for ``dx = dy W0``),
* the rank-``r`` projection ``u = x A^T [N, r]`` for ``dB = s dy^T u``,
* the input ``x`` for ``dA = s (dy B)^T x`` -- unless ``x`` can be recomputed cheaply from
  tensors its producer already saved (a LayerNorm's input and statistics, a GELU's or SiLU's
  input, the two factors of a product). Then nothing new is kept: this is what brings LoRA's
  activation memory down to the frozen-base floor.

All matmuls run in the activation dtype (autocast's dtype when autocast is on), the update is
accumulated into the base output in place, and no fp32 copies of activations are made. In fp32
with many rows per weight column (``N >= 4 d``) the base GEMM runs on ``W0 + s B A`` instead
(one activation pass fewer; the same values up to rounding).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.adapters.base import (
    AdapterLayer,
    AdapterSpec,
    add_to_weight,
    check_positive,
    first_match,
    restore_weight,
)
from lightning_peft.adapters.kernels.lora import LoRAFunction, SharedInputLoRAFunction, lora_forward
from lightning_peft.adapters.kernels.lora_mixed import MixedLoRA, mixed_lora_delta
from lightning_peft.validation import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_mapping,
)

__all__ = ["LoRA", "LoRALinear", "dequantized_weight", "lora_forward"]  # lora_forward: kernels.lora, re-exported


# --------------------------------------------------------------------------------------------
# Layer and spec
# --------------------------------------------------------------------------------------------
class LoRALinear(AdapterLayer):
    """A frozen linear ``base_layer`` plus ``lora_A.weight [r, d_in]``, ``lora_B.weight [d_out, r]``.

    Parameter names follow Hugging Face peft, so exported keys need no renaming.
    ``base_layer`` may be an ``nn.Linear`` (fused fast path) or any module mapping
    ``[..., d_in] -> [..., d_out]`` (e.g. a bitsandbytes 4-bit layer), whose output the update is
    added to.
    """

    #: set (per instance) by ``AdapterLibrary.per_sample``: each sample uses its own adapter
    mixed_lora: MixedLoRA | None = None

    def __init__(
        self,
        base_layer: nn.Module,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        recompute_input: bool = True,
        spec: AdapterSpec | None = None,
    ) -> None:
        super().__init__()
        in_features, out_features = base_layer.in_features, base_layer.out_features
        self.base_layer = base_layer
        self.rank, self.alpha, self.dropout, self.use_rslora = rank, alpha, dropout, use_rslora
        self.recompute_input = recompute_input
        self.scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        weight = getattr(base_layer, "weight", None)
        device = weight.device if weight is not None else None
        param_dtype = weight.dtype if weight is not None and weight.is_floating_point() else torch.float32
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=device, dtype=param_dtype)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=device, dtype=param_dtype)
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / rank)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.spec = spec if spec is not None else LoRA(rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init=init)
        self._fused = type(base_layer).forward is nn.Linear.forward
        self.dequantize_without_grad = False  # set by QLoRA for widths its CPU kernel cannot run
        self.merged = False  # in the instance dict from the start: torch.compile's guard on it survives merge + unmerge
        self._original_weight: torch.Tensor | None = None
        self._merged_module: nn.Module | None = None
        self._group: SharedInputGroup | None = None  # set by LoRA.attach (not a submodule: files stay per layer)

    @property
    def in_features(self) -> int:
        return self.lora_A.in_features

    @property
    def out_features(self) -> int:
        return self.lora_B.out_features

    @property
    def base_shape(self) -> list[int] | None:
        return [self.out_features, self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mixed_lora is not None:  # a mixed batch (lightning_peft.adapters.kernels.lora_mixed)
            return self.base_layer(x) + mixed_lora_delta(x, self.mixed_lora)
        # the common case first, with no extra Python frame (small layers are bound by host work)
        if self._group is not None:
            return self._group.forward(self, x)
        if self._fused and not self.merged:
            weight, bias, lora_a, lora_b = self.operands()
            dropout = self.dropout if self.training else 0.0
            return LoRAFunction.apply(x, weight, bias, lora_a, lora_b, self.scale, dropout, self.recompute_input)
        return self.forward_alone(x)

    def operands(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """``(W, b, A, B)`` of a fused layer, read from the modules' parameter dicts directly
        (``nn.Module.__getattr__`` costs about 0.3 us a name, seven names a call); a parametrised
        or otherwise non-plain attribute is read the ordinary way."""
        modules = self._modules
        base_params = modules["base_layer"]._parameters  # type: ignore[union-attr]
        a_params, b_params = modules["lora_A"]._parameters, modules["lora_B"]._parameters  # type: ignore[union-attr]
        if "weight" in base_params and "bias" in base_params and "weight" in a_params and "weight" in b_params:
            return base_params["weight"], base_params["bias"], a_params["weight"], b_params["weight"]  # type: ignore[return-value]
        base = self.base_layer
        return base.weight, base.bias, self.lora_A.weight, self.lora_B.weight

    def forward_alone(self, x: torch.Tensor) -> torch.Tensor:
        """This layer's own node (no shared-input group)."""
        if self.merged:
            return (self._merged_module or self.base_layer)(x)
        dropout = self.dropout if self.training else 0.0
        if self._fused:
            base = self.base_layer
            return lora_forward(
                x, base.weight, base.bias, self.lora_A.weight, self.lora_B.weight, self.scale, dropout, self.recompute_input
            )
        if self.dequantize_without_grad and not torch.is_grad_enabled() and x.device.type == "cpu":
            base = self.base_layer
            base_out = F.linear(x, dequantized_weight(base).to(x.dtype), None if base.bias is None else base.bias.to(x.dtype))
        else:
            base_out = self.base_layer(x)
        delta = lora_forward(x, None, None, self.lora_A.weight, self.lora_B.weight, self.scale, dropout, self.recompute_input)
        return base_out + delta.to(base_out.dtype)

    def for_weight_readers(self, attributes: set[str]) -> LoRALinear | None:
        """For a parent that reads ``weight`` / ``bias`` of this child: the same layer as a
        ``LoRAEffectiveWeightLinear`` (a subclass with no state of its own, so the class is
        swapped in place, parameters untouched). Only plain LoRA on a dense ``nn.Linear``: the
        other LoRA-family layers (DoRA, QLoRA) have no cheap effective weight."""
        if type(self) is not LoRALinear or not self._fused or not attributes <= {"weight", "bias"}:
            return None
        if self.dropout > 0:
            warnings.warn(
                f"LoRA dropout={self.dropout} is not applied where a parent reads this layer's weight itself (it gets "
                "W0 + s*B*A); calls of the layer keep it",
                stacklevel=2,
            )
        self.__class__ = LoRAEffectiveWeightLinear
        return self

    def delta_weight(self) -> torch.Tensor:
        """``s * B A`` in fp32, shape ``[d_out, d_in]``."""
        return self.scale * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    @torch.no_grad()
    def merge(self, keep_original: bool = True) -> None:
        """Fold the update into the base weight. With ``keep_original`` the exact base weight
        is kept in host memory so that ``unmerge`` restores it bit for bit."""
        if self.merged:
            return
        if self._fused:
            self._original_weight = add_to_weight(self.base_layer.weight, self.delta_weight(), keep_original)
        else:
            # quantized base: merge into a dense copy, leave the quantized weights untouched
            dense = dequantized_weight(self.base_layer)
            merged = nn.Linear(
                self.in_features, self.out_features, bias=self.base_layer.bias is not None, device=dense.device, dtype=dense.dtype
            )
            merged.weight.copy_((dense.float() + self.delta_weight().to(dense.device)).to(dense.dtype))
            if self.base_layer.bias is not None:
                merged.bias.copy_(self.base_layer.bias)
            merged.requires_grad_(False)
            self._merged_module = merged
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if self._fused:
            restore_weight(self.base_layer.weight, self._original_weight, self.delta_weight)
        self._original_weight = self._merged_module = None
        self.merged = False

    def peft_metadata(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha}

    # peft's own LoRA layer: same tensor names, one target module with this layer's rank and alpha
    def peft_scaling(self) -> tuple[bool, float] | None:
        return self.use_rslora, self.dropout

    def peft_config_entry(self, name: str, use_rslora: bool = False) -> dict[str, Any] | None:
        return {"target_modules": [name], "rank": self.rank, "alpha": self.alpha}

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scale={self.scale:.4g}, dropout={self.dropout}"


class LoRAEffectiveWeightLinear(LoRALinear):
    """``LoRALinear`` whose parent reads ``child.weight`` / ``child.bias`` itself: an
    ``nn.MultiheadAttention``'s ``out_proj``, T5's ``wo`` (its parent checks the weight's dtype),
    a module computing ``F.linear(x, self.proj.weight)``. ``weight`` is the effective
    ``W0 + s B A`` ``[d_out, d_in]`` (differentiable in ``A`` and ``B``; ``W0`` itself once merged),
    ``bias`` the base's, so such a parent computes the adapted layer instead of silently the base.
    Calling the layer is unchanged; each read of ``weight`` builds the sum (one ``[d_out, r] @
    [r, d_in]`` GEMM and a ``[d_out, d_in]`` tensor). Files and peft exports are those of
    ``LoRALinear``."""

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        w0 = self.base_layer.weight
        if self.merged:
            return w0
        return torch.addmm(w0, self.lora_B.weight.to(w0.dtype), self.lora_A.weight.to(w0.dtype), alpha=self.scale)

    @property
    def bias(self) -> torch.Tensor | None:  # type: ignore[override]
        return self.base_layer.bias


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """Dense ``[d_out, d_in]`` weight of a linear-like layer (bitsandbytes 4/8-bit included)."""
    weight = layer.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # bitsandbytes 4-bit
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, quant_state).to(quant_state.dtype)
    scb = getattr(weight, "SCB", None)
    if scb is None:
        scb = getattr(getattr(layer, "state", None), "SCB", None)
    if weight.dtype == torch.int8 and scb is not None:  # bitsandbytes 8-bit (row-wise absmax)
        return weight.data.float() * scb.float().unsqueeze(1) / 127.0
    return weight.detach()


#: sibling projections that models feed the same input (attention q/k/v, SwiGLU gate/up)
SHARED_INPUT_NAMES: tuple[frozenset[str], ...] = (
    frozenset({"q_proj", "k_proj", "v_proj"}),
    frozenset({"query", "key", "value"}),
    frozenset({"gate_proj", "up_proj"}),
    frozenset({"w1", "w3"}),
)


class SharedInputGroup:
    """Sibling ``LoRALinear`` layers that read the same input, run as one autograd node
    (``kernels.lora.SharedInputLoRAFunction``): the first member called on ``x`` computes every
    member's output; the others, called next on the very same tensor (identity and version: an
    in-place change in between is seen), take theirs. Anything else -- a member called on a
    different tensor (cross-attention), twice, merged, dropout in training, a base that trains,
    torch.compile tracing -- runs the layers alone, so results never depend on the grouping;
    a sibling that did not come for its output turns the group off for good (no more wasted work).
    """

    def __init__(self, members: list[LoRALinear]) -> None:
        self.members = members
        self.active = True
        self._pending: tuple[torch.Tensor, int, dict[int, torch.Tensor]] | None = None

    def forward(self, layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # traced graphs are fused by the compiler itself
            return layer.forward_alone(x)
        pending = self._pending
        if pending is not None:
            self._pending = None
            if pending[0] is x and pending[1] == x._version and id(layer) in pending[2]:
                outputs = pending[2]
                out = outputs.pop(id(layer))
                if outputs:
                    self._pending = pending
                return out
            self.active = False  # a computed output nobody came for: these layers do not share inputs
        index = next((i for i, m in enumerate(self.members) if m is layer), None)
        if not self.active or index is None:  # (a copy of a member made after grouping runs alone)
            return layer.forward_alone(x)
        # one pass over the members: collect the operands, or run alone where one node cannot
        tensors: list[torch.Tensor | None] = []
        scales: list[float] = []
        for m in self.members:
            if m.merged or (m.training and m.dropout > 0.0):
                return layer.forward_alone(x)
            operands = m.operands()
            if operands[0].requires_grad or (operands[1] is not None and operands[1].requires_grad):
                return layer.forward_alone(x)
            tensors += operands
            scales.append(m.scale)
        outs = SharedInputLoRAFunction.apply(x, tuple(scales), self.members[0].recompute_input, *tensors)
        others = {id(m): o for m, o in zip(self.members, outs) if m is not layer}
        self._pending = (x, x._version, others)
        return outs[index]


def shared_input_groups(layers: dict[str, nn.Module]) -> list[list[LoRALinear]]:
    """Groups of sibling fused ``LoRALinear`` layers (same parent, names in one
    ``SHARED_INPUT_NAMES`` set, same input width, dtype and device), in name order."""
    by_parent: dict[tuple[str, frozenset[str]], list[tuple[str, LoRALinear]]] = {}
    for name, layer in layers.items():
        if not isinstance(layer, LoRALinear) or not layer._fused:
            continue
        parent, _, leaf = name.rpartition(".")
        for names in SHARED_INPUT_NAMES:
            if leaf in names:
                by_parent.setdefault((parent, names), []).append((name, layer))
    groups = []
    for members in by_parent.values():
        layers_ = [layer for _, layer in sorted(members, key=lambda item: item[0])]
        first = layers_[0].base_layer.weight
        same = all(
            (m.in_features, m.base_layer.weight.dtype, m.base_layer.weight.device) == (layers_[0].in_features, first.dtype, first.device)
            for m in layers_
        )
        if len(layers_) > 1 and same and len({m.recompute_input for m in layers_}) == 1:
            groups.append(layers_)
    return groups


class _UngroupHandle:
    """``remove_adapter``'s handle: the layers run alone again."""

    def __init__(self, layers: list[LoRALinear]) -> None:
        self.layers = layers

    def remove(self) -> None:
        for layer in self.layers:
            layer._group = None


class LoRA(AdapterSpec):
    """Low-rank adaptation of linear layers.

    Args:
        rank: ``r``, the rank of the update (``1 <= r <= min(d_in, d_out)``).
        alpha: scaling numerator; the update is scaled by ``alpha / r`` (``alpha / sqrt(r)``
            with ``use_rslora``).
        target_modules: see ``AdapterSpec`` (names, ``"re:..."`` regexes, a regex string,
            ``"all-linear"``).
        exclude_modules: names never adapted.
        module_path: only inject below this submodule.
        dropout: dropout on the adapter's input (training only).
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
        init: ``"kaiming"`` (uniform, as ``nn.Linear``; peft's default) or ``"gaussian"``
            (``N(0, 1/r)``) for ``A``; ``B`` always starts at zero.
        rank_pattern: per-module ranks, ``{name pattern: rank}`` (same matching as targets).
        alpha_pattern: per-module alphas, ``{name pattern: alpha}``.
        recompute_input: recompute the adapter input in backward from its producer's saved
            tensors instead of saving it (exact up to rounding; saves memory).
        group_shared_inputs: run sibling projections that read the same input (``q_proj`` /
            ``k_proj`` / ``v_proj``, ``query`` / ``key`` / ``value``, ``gate_proj`` / ``up_proj``)
            as one autograd node: one read of the input for their concatenated ``A``s, one
            saved input, one set of host work. An execution detail (same results, files stay
            per module); the grouping switches itself off where the inputs differ. Off by
            default: on the CPU host-cost benchmark it measured ~10% slower than separate
            layers (docs/performance.md).
    """

    kind = "lora"

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
        group_shared_inputs: bool = False,
    ) -> None:
        super().__init__(target_modules, exclude_modules, module_path)
        check_positive("rank", rank, int)
        check_positive("alpha", alpha, float)
        check_float("dropout", dropout, 0.0, 1.0, high_open=True)
        check_bool("use_rslora", use_rslora)
        check_choice("init", init, ("kaiming", "gaussian"))
        check_mapping("rank_pattern", rank_pattern, lambda key, v: check_int(key, v, low=1))
        check_mapping("alpha_pattern", alpha_pattern, lambda key, v: check_float(key, v, low=0.0, low_open=True))
        check_bool("recompute_input", recompute_input)
        check_bool("group_shared_inputs", group_shared_inputs)
        self.group_shared_inputs = group_shared_inputs
        self.rank, self.alpha, self.dropout, self.use_rslora, self.init = rank, float(alpha), float(dropout), use_rslora, init
        self.rank_pattern = dict(rank_pattern or {})
        self.alpha_pattern = {k: float(v) for k, v in (alpha_pattern or {}).items()}
        self.recompute_input = recompute_input

    def rank_for(self, name: str) -> int:
        key = first_match(name, self.rank_pattern)
        return self.rank if key is None else self.rank_pattern[key]

    def alpha_for(self, name: str) -> float:
        key = first_match(name, self.alpha_pattern)
        return self.alpha if key is None else self.alpha_pattern[key]

    def supports(self, module: nn.Module) -> bool:
        # nn.MultiheadAttention applies its q/k/v/out weights itself: adapted by lora_mha
        return isinstance(module, (nn.Linear, nn.MultiheadAttention))

    def check(self, name: str, module: nn.Module) -> None:
        """Raise if ``module`` cannot take this adapter (called before anything changes)."""
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{type(self).__name__} cannot adapt {name!r}: it is a {type(module).__name__}, not an nn.Linear")
        rank, limit = self.rank_for(name), min(module.in_features, module.out_features)
        if rank > limit:
            raise ValueError(
                f"rank {rank} is larger than {name!r} allows: min(in_features={module.in_features}, "
                f"out_features={module.out_features}) = {limit}. Use rank <= {limit} (or a rank_pattern entry for this module)."
            )

    def attach(self, model: nn.Module, layers: dict[str, nn.Module]) -> list[Any]:
        if not self.group_shared_inputs:
            return []
        grouped: list[LoRALinear] = []
        for members in shared_input_groups(layers):
            group = SharedInputGroup(members)
            for layer in members:
                layer._group = group
            grouped += members
        return [_UngroupHandle(grouped)] if grouped else []

    def layer_kwargs(self, name: str) -> dict[str, Any]:
        """The ``LoRALinear`` arguments this spec gives module ``name`` (QLoRA, DoRA, QDoRA too)."""
        return {
            "rank": self.rank_for(name),
            "alpha": self.alpha_for(name),
            "dropout": self.dropout,
            "use_rslora": self.use_rslora,
            "init": self.init,
            "recompute_input": self.recompute_input,
            "spec": self,
        }

    def wrap(self, name: str, module: nn.Module) -> nn.Module:
        # lora_mha imports this module: import it where it is used
        from lightning_peft.adapters.lora_mha import wrap_attention

        attention = wrap_attention(self, name, module)
        if attention is not None:
            return attention
        self.check(name, module)
        return LoRALinear(module, **self.layer_kwargs(name))
