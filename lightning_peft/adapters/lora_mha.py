"""LoRA on ``nn.MultiheadAttention``, whose projections are not called as child modules.

``nn.MultiheadAttention`` keeps its query/key/value projections as one packed parameter
``in_proj_weight [3E, E]`` (or ``q_proj_weight [E, E]``, ``k_proj_weight [E, kdim]``,
``v_proj_weight [E, vdim]`` when ``kdim``/``vdim`` differ from ``embed_dim``) and reads
``out_proj.weight [E, E]`` itself inside ``F.multi_head_attention_forward``: there is no
``nn.Linear`` call to wrap. LoRA is applied to the weights instead, with the same math as
``LoRALinear``: for each adapted projection ``p`` with frozen ``W0_p [d_out, d_in]``::

    W_p = W0_p + s * B_p A_p,      A_p [r, d_in], B_p [d_out, r],  s = alpha / r  (rsLoRA: alpha / sqrt(r))

``B_p`` starts at zero, so the adapted module starts equal to the base.

* ``LoRAMultiheadAttention`` replaces the whole attention module and adapts any of ``q``, ``k``,
  ``v``, ``out``. Its forward runs the base module's own ``forward`` (masks, ``batch_first``,
  ``need_weights``, its fused inference path) with the effective weights substituted
  (``torch.func.functional_call``), so gradients reach ``A`` and ``B`` and nothing of the
  attention itself is re-implemented.
* ``LoRAOutProjection`` replaces only ``out_proj`` (when that alone is targeted). It is a
  ``LoRALinear`` that also exposes the effective ``weight``/``bias``: what the parent reads.

Adapter dropout cannot be applied: ``dropout(x) A^T B^T`` has no effective-weight form, and the
projections run inside torch's attention. Both layers skip it and warn once at wrap time.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from lightning_peft.adapters.base import (
    AdapterLayer,
    AdapterSpec,
    add_to_weight,
    check_positive,
    restore_weight,
)
from lightning_peft.adapters.lora import LoRA, LoRAEffectiveWeightLinear

Projection = Literal["q", "k", "v", "out"]
PROJECTIONS: tuple[str, ...] = ("q", "k", "v", "out")

#: attributes of the base attention module that parents read (``nn.TransformerEncoderLayer``
#: checks ``batch_first``, ``in_proj_bias``, ``_qkv_same_embed_dim`` and ``num_heads``); the
#: adapter layer answers them for the base because LoRA changes none of them
_DELEGATED = (
    "embed_dim", "kdim", "vdim", "num_heads", "head_dim", "batch_first", "_qkv_same_embed_dim",
    "dropout", "in_proj_bias", "bias_k", "bias_v", "add_zero_attn",
)  # fmt: skip
#: weights the adapter changes: reading them from the wrapper would silently give base weights
_ADAPTED_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj")


def projection_shapes(mha: nn.MultiheadAttention) -> dict[str, tuple[int, int]]:
    """``{projection: (d_out, d_in)}`` of an attention module's four projections."""
    e = mha.embed_dim
    return {"q": (e, e), "k": (e, mha.kdim), "v": (e, mha.vdim), "out": (e, e)}


def _init_pair(d_in: int, d_out: int, rank: int, init: str, like: torch.Tensor) -> tuple[nn.Parameter, nn.Parameter]:
    dtype = like.dtype if like.is_floating_point() else torch.float32
    a = torch.empty(rank, d_in, device=like.device, dtype=dtype)
    if init == "gaussian":
        nn.init.normal_(a, std=1.0 / rank)
    else:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear, as LoRALinear
    return nn.Parameter(a), nn.Parameter(torch.zeros(d_out, rank, device=like.device, dtype=dtype))


class LoRAMultiheadAttention(AdapterLayer):
    """A frozen ``nn.MultiheadAttention`` plus LoRA factors on some of its projections.

    Tensors: ``lora_A.<p> [r, d_in]`` and ``lora_B.<p> [d_out, r]`` for each ``p`` in
    ``projections`` (shapes from ``projection_shapes``: ``d_in`` is ``embed_dim``, ``kdim`` or
    ``vdim``, ``d_out`` is ``embed_dim``). The call signature and outputs are those of
    ``nn.MultiheadAttention.forward``; the effective weights are ``W0_p + s B_p A_p``.
    """

    def __init__(
        self,
        base_layer: nn.MultiheadAttention,
        rank: int,
        alpha: float,
        projections: tuple[Projection, ...] | list[Projection] = PROJECTIONS,  # type: ignore[assignment]
        use_rslora: bool = False,
        init: Literal["kaiming", "gaussian"] = "kaiming",
        spec: AdapterSpec | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.MultiheadAttention):
            raise TypeError(f"LoRAMultiheadAttention wraps an nn.MultiheadAttention, got {type(base_layer).__name__}")
        if not isinstance(base_layer.out_proj, nn.Linear):
            raise TypeError(f"out_proj of this attention module is a {type(base_layer.out_proj).__name__}, not an nn.Linear")
        check_positive("rank", rank, int)
        check_positive("alpha", alpha, float)
        wanted = list(dict.fromkeys(projections))
        unknown = [p for p in wanted if p not in PROJECTIONS]
        if not wanted or unknown:
            raise ValueError(f"projections must be a non-empty subset of {list(PROJECTIONS)}, got {list(projections)!r}")
        self.base_layer = base_layer
        self.projections = tuple(p for p in PROJECTIONS if p in wanted)  # canonical order
        self.rank, self.alpha, self.use_rslora, self.init = rank, float(alpha), use_rslora, init
        self.scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        like = base_layer.out_proj.weight
        shapes = projection_shapes(base_layer)
        too_small = {p: min(shapes[p]) for p in self.projections if rank > min(shapes[p])}
        if too_small:
            raise ValueError(f"rank {rank} is larger than these projections allow (min(d_out, d_in)): {too_small}; use a smaller rank")
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for p in self.projections:
            d_out, d_in = shapes[p]
            self.lora_A[p], self.lora_B[p] = _init_pair(d_in, d_out, rank, init, like)
        if spec is None:
            spec = LoRA(rank=rank, alpha=alpha, use_rslora=use_rslora, init=init)
        self.spec = spec
        self._originals: dict[str, torch.Tensor | None] = {}

    # --- what parents read ---------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in _DELEGATED:
                return getattr(super().__getattr__("base_layer"), name)
            if name in _ADAPTED_WEIGHTS:
                raise AttributeError(
                    f"LoRAMultiheadAttention has no {name!r}: the adapted weights are base_layer.{name} plus the LoRA "
                    "update; read effective_weights() (or merge the adapter) instead"
                ) from None
            raise

    def merge_masks(self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, query: torch.Tensor) -> Any:
        return self.base_layer.merge_masks(attn_mask, key_padding_mask, query)

    @property
    def in_features(self) -> int:
        """``embed_dim`` (the query side; what the adapter file's shape check compares)."""
        return self.base_layer.embed_dim

    @property
    def out_features(self) -> int:
        return self.base_layer.embed_dim

    @property
    def base_shape(self) -> list[int] | None:
        return [self.out_features, self.in_features]

    # --- math ----------------------------------------------------------------------------
    def _weight_names(self) -> dict[str, str]:
        """Projection -> parameter name in the base module (``functional_call`` keys)."""
        if self.base_layer._qkv_same_embed_dim:
            return {"out": "out_proj.weight"}  # q, k, v live in rows of in_proj_weight
        return {"q": "q_proj_weight", "k": "k_proj_weight", "v": "v_proj_weight", "out": "out_proj.weight"}

    def _effective(self, p: str, w0: torch.Tensor) -> torch.Tensor:
        """``W0_p + s B_p A_p`` (differentiable in ``A_p``, ``B_p``), in ``W0``'s dtype."""
        return torch.addmm(w0, self.lora_B[p].to(w0.dtype), self.lora_A[p].to(w0.dtype), alpha=self.scale)

    def effective_weights(self) -> dict[str, torch.Tensor]:
        """The adapted weights, keyed by the base module's parameter names."""
        base = self.base_layer
        out: dict[str, torch.Tensor] = {}
        names = self._weight_names()
        if base._qkv_same_embed_dim and any(p in self.projections for p in ("q", "k", "v")):
            rows = base.in_proj_weight.chunk(3, dim=0)  # [3E, E] -> q, k, v rows
            out["in_proj_weight"] = torch.cat([self._effective(p, w) if p in self.projections else w for p, w in zip("qkv", rows)])
        for p, name in names.items():
            if p in self.projections:
                out[name] = self._effective(p, base.get_parameter(name))
        return out

    def delta_weight(self, p: str) -> torch.Tensor:
        """``s * B_p A_p`` in fp32, shape ``[d_out, d_in]``."""
        return self.scale * (self.lora_B[p].float() @ self.lora_A[p].float())

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        kwargs = {
            "key_padding_mask": key_padding_mask, "need_weights": need_weights, "attn_mask": attn_mask,
            "average_attn_weights": average_attn_weights, "is_causal": is_causal,
        }  # fmt: skip
        if self.merged:
            return self.base_layer(query, key, value, **kwargs)
        # the base's own forward with W0 + sBA in place of W0: same masks, layouts and fused
        # inference path (taken only without grad, where the substituted weights are exact)
        return torch.func.functional_call(self.base_layer, self.effective_weights(), (query, key, value), kwargs, strict=False)

    # --- merge ---------------------------------------------------------------------------
    def _merge_targets(self) -> dict[str, tuple[torch.Tensor, Any]]:
        """Base parameter name -> (parameter, fp32 delta factory)."""
        base = self.base_layer
        targets: dict[str, tuple[torch.Tensor, Any]] = {}
        if base._qkv_same_embed_dim and any(p in self.projections for p in "qkv"):
            shapes = projection_shapes(base)

            def packed() -> torch.Tensor:
                device = base.in_proj_weight.device
                rows = [self.delta_weight(p).to(device) if p in self.projections else torch.zeros(shapes[p], device=device) for p in "qkv"]
                return torch.cat(rows)

            targets["in_proj_weight"] = (base.in_proj_weight, packed)
        for p, name in self._weight_names().items():
            if p in self.projections:
                targets[name] = (base.get_parameter(name), lambda p=p: self.delta_weight(p))
        return targets

    @torch.no_grad()
    def merge(self, keep_original: bool = True) -> None:
        """Fold ``s B_p A_p`` into each adapted base weight. With ``keep_original`` the exact
        base weights are kept in host memory so that ``unmerge`` restores them bit for bit."""
        if self.merged:
            return
        for name, (weight, delta) in self._merge_targets().items():
            self._originals[name] = add_to_weight(weight, delta(), keep_original)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        for name, (weight, delta) in self._merge_targets().items():
            restore_weight(weight, self._originals.get(name), delta)
        self._originals = {}
        self.merged = False

    def peft_metadata(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "projections": ",".join(self.projections)}

    def extra_repr(self) -> str:
        return f"projections={list(self.projections)}, rank={self.rank}, alpha={self.alpha}, scale={self.scale:.4g}"


class LoRAOutProjection(LoRAEffectiveWeightLinear):
    """``LoRALinear`` on an attention module's ``out_proj``, exposing the effective weight.

    ``nn.MultiheadAttention`` never calls ``out_proj``; it reads ``out_proj.weight`` and
    ``out_proj.bias``, which return ``W0 + s B A`` (differentiable in ``A``, ``B``) and the base
    bias (``LoRAEffectiveWeightLinear``), so the parent computes the adapted projection.
    """

    # peft adapts an attention module's out_proj differently: exported in our own format only
    def peft_scaling(self) -> tuple[bool, float] | None:
        return None

    def peft_config_entry(self, name: str, use_rslora: bool = False) -> dict[str, Any] | None:
        return None


def _warn_dropout(name: str, dropout: float) -> None:
    if dropout > 0:
        warnings.warn(
            f"LoRA dropout={dropout} is not applied in {name!r}: nn.MultiheadAttention applies its projection weights "
            "itself, so the update is folded into them (W0 + s*B*A) and has no separate input to drop. "
            "Set dropout=0 to silence this, or exclude the module.",
            stacklevel=3,
        )


def wrap_attention(spec: Any, name: str, module: nn.Module) -> nn.Module | None:
    """The LoRA layer for ``module`` when it is an attention module (q, k, v and out adapted)
    or its ``out_proj`` (out only), else ``None``; ``LoRA.wrap`` routes here first. ``spec`` is
    a ``LoRA``; its rank is checked per projection before anything is built."""
    if isinstance(module, nn.MultiheadAttention):
        rank = spec.rank_for(name)
        for p, (d_out, d_in) in projection_shapes(module).items():
            if rank > min(d_out, d_in):
                raise ValueError(
                    f"rank {rank} is larger than the {p!r} projection of {name!r} allows: min({d_out}, {d_in}) = {min(d_out, d_in)}. "
                    "Use a smaller rank (or a rank_pattern entry for this module)."
                )
        _warn_dropout(name, spec.dropout)
        return LoRAMultiheadAttention(module, rank, spec.alpha_for(name), PROJECTIONS, spec.use_rslora, spec.init, spec=spec)
    if type(module) is NonDynamicallyQuantizableLinear:  # torch uses it only as attention out_proj
        spec.check(name, module)
        _warn_dropout(name, spec.dropout)
        return LoRAOutProjection(
            module,
            rank=spec.rank_for(name),
            alpha=spec.alpha_for(name),
            dropout=0.0,
            use_rslora=spec.use_rslora,
            init=spec.init,
            recompute_input=spec.recompute_input,
            spec=spec,
        )
    return None
