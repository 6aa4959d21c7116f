"""Switching off the checkpointing that transformers and timm models do on their own.

:class:`~lightning_peft.callbacks.adaptive_checkpoint.AdaptiveCheckpointCallback` decides what
is checkpointed, so a model's own gradient checkpointing (which would wrap every block again)
is disabled, and transformers' KV cache is turned off (a cache mutated inside a checkpointed
block would be updated twice by the recomputation).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["disable_library_checkpointing"]


def disable_library_checkpointing(model: nn.Module, warn: Callable[[str], None]) -> None:
    """Disable transformers' and timm's own checkpointing in every submodule of ``model``."""
    for module in model.modules():
        # transformers: newer versions name the flag is_activation_checkpointing
        hf_flag = "is_activation_checkpointing" if hasattr(type(module), "is_activation_checkpointing") else ("is_gradient_checkpointing")
        if hasattr(module, "gradient_checkpointing_disable") and getattr(module, hf_flag, False):
            module.gradient_checkpointing_disable()
            warn("AdaptiveCheckpointCallback: disabled transformers' gradient checkpointing (this callback decides what is checkpointed).")
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "use_cache", False) and hasattr(module, "generate"):
            config.use_cache = False
        # timm: its own grad_checkpointing wraps all blocks in checkpoint_seq
        if getattr(module, "grad_checkpointing", False) is True and hasattr(module, "set_grad_checkpointing"):
            module.set_grad_checkpointing(False)
            warn("AdaptiveCheckpointCallback: disabled timm's grad_checkpointing (this callback decides what is checkpointed).")
