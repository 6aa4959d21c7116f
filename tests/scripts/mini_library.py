"""A minimal in-memory stand-in for ``AdapterLibrary`` (the API15 subset the continual core uses),
for tests written before the real library landed."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_peft import LoRA, apply_adapter, load_adapter, remove_adapter
from lightning_peft.io import adapter_layers


class MiniLibrary:
    def __init__(self, root: Any, base: nn.Module) -> None:
        self.root, self.model, self.active = Path(root), base, None
        self._plain = copy.deepcopy(base)
        self._entries: dict[str, tuple[str, Any]] = {}

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, name: str, source: Any, overwrite: bool = False) -> dict:
        if name in self and not overwrite:
            raise ValueError(f"entry {name!r} exists")
        model = copy.deepcopy(self._plain)
        load_adapter(model, source)
        layers = adapter_layers(model)
        factors = {n: (l.lora_A.weight.detach().clone(), l.lora_B.weight.detach().clone(), float(l.scale)) for n, l in layers.items()}
        self._entries[name] = ("adapter", factors)
        return {}

    def add_combination(self, name: str, weights: dict, overwrite: bool = False) -> dict:
        if name in self and not overwrite:
            raise ValueError(f"entry {name!r} exists")
        bad = [n for n in weights if self._entries.get(n, ("",))[0] != "adapter"]
        if bad:
            raise ValueError(f"unknown adapter entries {bad}; known: {self.names}")
        self._entries[name] = ("combination", copy.deepcopy(weights))
        return {}

    def lora_factors(self, name: str) -> dict:
        kind, value = self._entries.get(name, ("", None))
        if kind != "adapter":
            raise ValueError(f"{name!r} is not an adapter entry; known: {self.names}")
        return value

    def remove(self, name: str) -> None:
        del self._entries[name]

    def deactivate(self) -> nn.Module:
        if adapter_layers(self.model):
            remove_adapter(self.model)
        self.active = None
        return self.model

    def activate(self, name: str) -> nn.Module:
        self.deactivate()
        kind, value = self._entries[name]
        weights = {name: 1.0} if kind == "adapter" else value
        per_module: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for entry, w in weights.items():
            for module, (a, b, s) in self.lora_factors(entry).items():
                scale = w.get(module, 0.0) if isinstance(w, dict) else w
                per_module.setdefault(module, []).append((a, scale * s * b))
        if per_module:
            ranks = {"re:" + m.replace(".", r"\."): sum(a.shape[0] for a, _ in f) for m, f in per_module.items()}
            alphas = {k: float(v) for k, v in ranks.items()}  # scale 1: the weights are folded into B
            apply_adapter(self.model, LoRA(target_modules=list(ranks), rank_pattern=ranks, alpha_pattern=alphas), check_gradients=False)
            with torch.no_grad():
                for module, factors in per_module.items():
                    layer = self.model.get_submodule(module)
                    layer.lora_A.weight.copy_(torch.cat([a for a, _ in factors], 0))
                    layer.lora_B.weight.copy_(torch.cat([b for _, b in factors], 1))
        self.active = name
        return self.model
