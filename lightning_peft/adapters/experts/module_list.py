"""ExpertLoRA on an ``nn.ModuleList`` of experts built from ``nn.Linear``: the list stays in
place and each expert's update is added by a forward hook on its linears."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_peft.adapters.base import AdapterSpec
from lightning_peft.adapters.experts.layer import ExpertsLoRALayer
from lightning_peft.adapters.experts.layouts import chosen_paths, expert_linears, linear_shapes
from lightning_peft.adapters.kernels.lora import lora_forward
from lightning_peft.allocation.rank_ops import masked


class _ExpertHook:
    """Forward hook on expert ``e``'s linear ``proj``: adds ``s x A_e^T B_e^T`` to its output.
    Holds its layer strongly so that ``copy.deepcopy`` of the model re-targets it correctly."""

    def __init__(self, owner: ModuleListExpertsLoRA, proj: str, expert: int) -> None:
        self.owner, self.proj, self.expert = owner, proj, expert

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        owner = self.owner
        if owner.merged or self.proj not in owner.shapes:
            return None
        e = self.expert
        mask = owner.rank_mask[e : e + 1]  # [1, R]
        a = masked(owner.lora_A[self.proj][e], mask, None, 0)  # [R, d_in]
        b = masked(owner.lora_B[self.proj][e], mask, None, 1)  # [d_out, R]
        delta = lora_forward(args[0], None, None, a, b, owner.scale, 0.0, owner.recompute_input)
        return output + delta.to(output.dtype)


class ModuleListExpertsLoRA(ExpertsLoRALayer):
    """ExpertLoRA on an ``nn.ModuleList`` of experts made of ``nn.Linear`` layers. The list stays
    in place as ``base_layer`` (indexing, ``len`` and iteration pass through), so the MoE block's
    own routing code runs unchanged and each update sees only the tokens routed to its expert."""

    def __init__(
        self,
        base_layer: nn.ModuleList,
        projections: Sequence[str] | None,
        rank: int,
        alpha: float,
        max_rank: int,
        use_rslora: bool = False,
        init: str = "kaiming",
        recompute_input: bool = True,
        spec: AdapterSpec | None = None,
    ) -> None:
        linears = expert_linears(base_layer)
        if linears is None:
            raise TypeError("not a list of identically shaped experts with nn.Linear layers")
        self.paths = chosen_paths(linears, projections)
        first = base_layer[0]
        shapes = linear_shapes(first, self.paths)
        weight = first.get_submodule(next(iter(self.paths.values()))).weight
        super().__init__(
            base_layer,
            num_experts=len(base_layer),
            shapes=shapes,
            rank=rank,
            alpha=alpha,
            max_rank=max_rank,
            use_rslora=use_rslora,
            init=init,
            recompute_input=recompute_input,
            spec=spec,
            device=weight.device,
            dtype=weight.dtype,
        )
        self._handles = [
            expert.get_submodule(path).register_forward_hook(_ExpertHook(self, key, e))
            for e, expert in enumerate(base_layer)
            for key, path in self.paths.items()
        ]

    def __getitem__(self, index: int) -> nn.Module:
        return self.base_layer[index]

    def __len__(self) -> int:
        return len(self.base_layer)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.base_layer)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("an nn.ModuleList of experts is indexed, not called (index the experts as before)")

    def _weights(self) -> dict[str, list[tuple[torch.Tensor, bool]]]:
        return {k: [(expert.get_submodule(self.paths[k]).weight, False) for expert in self.base_layer] for k in self.shapes}

    # peft: plain LoRA on each expert's linears (pruned experts are left out), keys relative to the list
    def _peft_key(self, e: int, key: str) -> str:
        path = self.paths[key]
        return f"{e}.{path}" if path else str(e)

    def peft_config_entry(self, name: str, use_rslora: bool = False) -> dict[str, Any] | None:
        targets = {f"{name}.{self._peft_key(e, k)}": r for e, r in enumerate(self.ranks) if r > 0 for k in self.shapes}
        return {
            "target_modules": list(targets),
            "rank_pattern": targets,
            "alpha_pattern": {t: self._peft_alpha(r, use_rslora) for t, r in targets.items()},
        }

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for key in self.shapes:
            ca, cb, _ = self._compact(key)
            for e, r in enumerate(self.ranks):
                if r > 0:
                    out[f"{self._peft_key(e, key)}.lora_A.weight"] = ca[e, :r].contiguous()
                    out[f"{self._peft_key(e, key)}.lora_B.weight"] = cb[e][:, :r].contiguous()
        return out

    def from_peft_state_dict(self, tensors: dict[str, torch.Tensor], entry: dict[str, Any]) -> dict[str, torch.Tensor]:
        ranks = entry["ranks"]
        out = {"rank_mask": self._mask_from(ranks)}
        r_max = max(1, max(ranks))
        for key in self.shapes:
            d_out, d_in = self.shapes[key]
            ca = torch.zeros(self.num_experts, r_max, d_in)
            cb = torch.zeros(self.num_experts, d_out, r_max)
            for e, r in enumerate(ranks):
                if r > 0:
                    ca[e, :r] = tensors[f"{self._peft_key(e, key)}.lora_A.weight"]
                    cb[e, :, :r] = tensors[f"{self._peft_key(e, key)}.lora_B.weight"]
            out.update(self._expand(key, ca, cb, ranks))
        return out
