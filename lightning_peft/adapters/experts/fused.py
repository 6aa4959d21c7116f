"""ExpertLoRA on fused 3-D experts (transformers 5.x OLMoE, Qwen2-MoE, Mixtral ...): the
experts' forward replaced by grouped matmuls over the routed tokens only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_peft.adapters.base import AdapterSpec
from lightning_peft.adapters.experts.layer import ExpertsLoRALayer
from lightning_peft.adapters.experts.layouts import fused_layout
from lightning_peft.adapters.kernels.experts import expert_linear
from lightning_peft.adapters.kernels.grouped import sort_by_expert


class FusedExpertsLoRA(ExpertsLoRALayer):
    """ExpertLoRA on a fused experts module (3-D ``gate_up_proj``/``up_proj`` and ``down_proj``),
    called as ``(hidden [N, H], top_k_index [N, K], top_k_weights [N, K]) -> [N, H]``.
    ``projections=None`` adapts every projection."""

    def __init__(
        self,
        base_layer: nn.Module,
        projections: Sequence[str] | None,
        rank: int,
        alpha: float,
        max_rank: int,
        use_rslora: bool = False,
        init: str = "kaiming",
        recompute_input: bool = True,
        spec: AdapterSpec | None = None,
    ) -> None:
        layout = fused_layout(base_layer)
        if layout is None:
            raise TypeError(f"{type(base_layer).__name__} is not a fused experts module")
        self.layout = layout
        shapes = {p: s for p, s in layout["shapes"].items() if projections is None or p in projections}
        weight = getattr(base_layer, layout["up"])
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        super().__init__(
            base_layer,
            num_experts=layout["num_experts"],
            shapes=shapes,
            rank=rank,
            alpha=alpha,
            max_rank=max_rank,
            use_rslora=use_rslora,
            init=init,
            recompute_input=recompute_input,
            spec=spec,
            device=weight.device,
            dtype=dtype,
        )

    def _w_io(self, name: str) -> torch.Tensor:
        weight = getattr(self.base_layer, name)
        return weight if self.layout["transposed"] else weight.transpose(1, 2)

    def _project(
        self, name: str, x: torch.Tensor, gather: torch.Tensor | None, offs: torch.Tensor, sorted_ids: torch.Tensor
    ) -> torch.Tensor:
        a = b = None
        if name in self.shapes:
            a, b = self.factors(name)
        out = expert_linear(x, gather, offs, self._w_io(name), a, b, self.scale, self.recompute_input)
        if self.layout["bias"]:
            out = out + getattr(self.base_layer, f"{name}_bias")[sorted_ids].to(out.dtype)
        return out

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self.merged:
            return base(hidden_states, top_k_index, top_k_weights)
        num_tokens, k = top_k_index.shape[0], top_k_index.shape[-1]
        perm, sorted_ids, offs = sort_by_expert(top_k_index, self.num_experts)
        token = perm // k
        h = self._project(self.layout["up"], hidden_states, token, offs, sorted_ids)
        if self.layout["gate"]:
            apply_gate = getattr(base, "_apply_gate", None)
            if apply_gate is not None:
                h = apply_gate(h)
            else:
                gate, up = h.chunk(2, dim=-1)
                h = base.act_fn(gate) * up
        else:
            h = base.act_fn(h)
        y = self._project("down_proj", h, None, offs, sorted_ids)
        if self.layout["post_norm"]:
            y = base.post_expert_norm(y)
        y = y * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        # deterministic reduction over the K choices of each token (as transformers' grouped_mm path)
        return y[inverse].view(num_tokens, k, -1).sum(dim=1).to(hidden_states.dtype)

    def _weights(self) -> dict[str, list[tuple[torch.Tensor, bool]]]:
        return {p: [(getattr(self.base_layer, p), self.layout["transposed"])] for p in self.shapes}

    # peft: one ParamWrapper per adapted parameter, nested in parameter registration order
    # (the last one is outermost); lora_A [r*E, d_in] expert-major, lora_B [d_out, r*E] rank-major.
    def _peft_prefixes(self) -> dict[str, str]:
        order = [n for n, _ in self.base_layer.named_parameters(recurse=False) if n in self.shapes]
        return {p: "base_layer." * (len(order) - 1 - i) for i, p in enumerate(order)}

    def peft_config_entry(self, name: str, use_rslora: bool = False) -> dict[str, Any] | None:
        r_pad = max(1, max(self.ranks))
        keys = [f"{name}.{p}" for p in self._peft_prefixes()]
        return {
            "target_parameters": keys,
            "rank_pattern": {k: r_pad for k in keys},
            "alpha_pattern": {k: self._peft_alpha(r_pad, use_rslora) for k in keys},
        }

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for proj, prefix in self._peft_prefixes().items():
            ca, cb, r_pad = self._compact(proj)
            out[f"{prefix}lora_A.weight"] = ca.reshape(self.num_experts * r_pad, -1)
            out[f"{prefix}lora_B.weight"] = cb.permute(1, 2, 0).reshape(cb.shape[1], r_pad * self.num_experts)
        return out

    def from_peft_state_dict(self, tensors: dict[str, torch.Tensor], entry: dict[str, Any]) -> dict[str, torch.Tensor]:
        ranks = entry["ranks"]
        out = {"rank_mask": self._mask_from(ranks)}
        for proj, prefix in self._peft_prefixes().items():
            a, b = tensors[f"{prefix}lora_A.weight"], tensors[f"{prefix}lora_B.weight"]
            r_pad = a.shape[0] // self.num_experts
            ca = a.reshape(self.num_experts, r_pad, -1)
            cb = b.reshape(b.shape[0], r_pad, self.num_experts).permute(2, 0, 1)
            out.update(self._expand(proj, ca, cb, ranks))
        return out
