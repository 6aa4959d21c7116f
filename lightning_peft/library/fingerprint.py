"""Fingerprints of a library's base: the core's per-module scheme
(:func:`~lightning_peft.targeting.module_fingerprint`) over every module holding parameters."""

from __future__ import annotations

from torch import nn

from lightning_peft.adapters.base import AdapterLayer
from lightning_peft.targeting import combine_fingerprints, module_fingerprint

__all__ = ["model_fingerprint", "module_fingerprints"]


def module_fingerprints(model: nn.Module) -> dict[str, str]:
    """``{module name: fingerprint of its base weights}`` for every module that holds
    parameters, so the entry of an adapted layer is the ``base_fingerprint`` of what it wraps,
    under the plain layer's name, and equals what ``save_adapter`` records for that layer."""
    out: dict[str, str] = {}
    wrapped: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(w + ".") for w in wrapped):
            continue  # inside an adapter layer: its base is fingerprinted as a whole
        if isinstance(module, AdapterLayer):
            out[name] = module.base_fingerprint
            wrapped.append(name)
        elif next(module.parameters(recurse=False), None) is not None:
            out[name] = module_fingerprint(module)
    return out


def model_fingerprint(model: nn.Module) -> str:
    """The fingerprint of a model's base weights: its per-module fingerprints combined
    (:func:`~lightning_peft.targeting.combine_fingerprints`). Buffers are not part of it."""
    return combine_fingerprints(module_fingerprints(model))
