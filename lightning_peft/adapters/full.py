"""Full fine-tuning: every parameter trains. The baseline every benchmark compares to."""

from __future__ import annotations

from torch import nn

from lightning_peft.adapters.base import AdapterSpec


class FullFineTune(AdapterSpec):
    """Train everything (``target_modules=None``) or every parameter of the matched modules."""

    kind = "full"
    trains_base = True

    def supports(self, module: nn.Module) -> bool:
        return any(True for _ in module.parameters(recurse=False))

    def default_targets(self) -> str:
        return "re:.*"

    def base_parameters_to_train(self, name: str, module: nn.Module) -> list[str]:
        return [n for n, _ in module.named_parameters(recurse=False)]
