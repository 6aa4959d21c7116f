"""BitFit: train only the biases of the base; every weight stays frozen."""

from __future__ import annotations

from torch import nn

from lightning_peft.adapters.base import AdapterSpec


class BitFit(AdapterSpec):
    """Bias-only fine-tuning. ``target_modules=None`` selects every module with a bias."""

    kind = "bitfit"
    trains_base = True

    def supports(self, module: nn.Module) -> bool:
        return isinstance(getattr(module, "bias", None), nn.Parameter)

    def default_targets(self) -> str:
        return "re:.*"

    def base_parameters_to_train(self, name: str, module: nn.Module) -> list[str]:
        return ["bias"]
