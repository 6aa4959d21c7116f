"""The padding mask of the forward pass in progress, for adapter layers that mix positions (HRM).

A block's MLP never sees the model's ``attention_mask``, yet a recurrent residual there must not
let padded positions feed its state. ``attach_mask_capture(model, sites)`` registers a forward
pre-hook on the model and on every module above the sites (the callers a mask can arrive
through: a LightningModule, the transformers model, its decoder stack). Each hook reads the
mask argument (``attention_mask`` by default; positional or keyword) and shares it through one
:class:`SequenceMask` that the sites read.

Which mask counts, per call tree (a call that starts with nothing of this model running):

* the first 2-D mask ``[batch, length]`` seen in the tree wins (the outermost caller's, usually
  the user's own); 4-D masks (the causal/extended masks transformers builds for its layers)
  are ignored;
* the tree starts with no mask, unless it starts *below* the module that provided the last
  one: then the last mask stays. This keeps the right mask when activation checkpointing
  recomputes a single block in backward, since the recomputed block receives only a 4-D mask.
  (So: calling an inner module directly after the full model, without a mask, reuses the full
  model's last mask. Pass the mask at that level too, or call the full model.)

Values: ``bool`` masks as they are, others ``mask != 0``, with ``True`` a real token. Pure torch.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["SequenceMask", "attach_mask_capture"]


class SequenceMask:
    """The shared state: ``mask`` (``[batch, length]`` bool or ``None``), the call depth, and the
    depth of the module that provided the last mask."""

    def __init__(self, argument: str = "attention_mask") -> None:
        self.argument = argument
        self.mask: torch.Tensor | None = None
        self.active = 0
        self.provider_level: int | None = None
        self._tree_has_mask = False

    def enter(self, level: int, value: Any) -> None:
        if self.active == 0:
            self._tree_has_mask = False
            if self.provider_level is None or level <= self.provider_level:
                self.mask = None
        if isinstance(value, torch.Tensor) and value.dim() == 2 and not self._tree_has_mask:
            self.mask = value if value.dtype == torch.bool else value != 0
            self._tree_has_mask = True
            self.provider_level = level if self.provider_level is None else min(level, self.provider_level)
        self.active += 1

    def leave(self) -> None:
        self.active = max(0, self.active - 1)


class _Enter:
    """Forward pre-hook (with kwargs) of one module: passes its mask argument on. A class, not a
    closure, so that deep copies of the model get hooks bound to their own ``SequenceMask``."""

    def __init__(self, shared: SequenceMask, level: int, index: int | None) -> None:
        self.shared, self.level, self.index = shared, level, index

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        value = kwargs.get(self.shared.argument)
        if value is None and self.index is not None and len(args) > self.index:
            value = args[self.index]
        self.shared.enter(self.level, value)


class _Leave:
    def __init__(self, shared: SequenceMask) -> None:
        self.shared = shared

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        self.shared.leave()


def _argument_index(module: nn.Module, argument: str) -> int | None:
    """Position of ``argument`` among ``module.forward``'s positional parameters (``None``: only
    as a keyword, or absent)."""
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return positional.index(argument) if argument in positional else None


def attach_mask_capture(model: nn.Module, sites: list[str], shared: SequenceMask) -> list[RemovableHandle]:
    """Hook ``model`` and every module above ``sites`` (names relative to ``model``; containers
    such as ``nn.ModuleList`` are never called, so they get none) so that ``shared.mask`` holds
    the mask of the forward in progress. Returns the hook handles."""
    names: dict[str, int] = {"": 0}
    for site in sites:
        parts = site.split(".")
        for depth in range(1, len(parts)):
            names[".".join(parts[:depth])] = depth
    handles: list[RemovableHandle] = []
    for name, level in sorted(names.items(), key=lambda item: item[1]):
        module = model.get_submodule(name) if name else model
        if isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)):
            continue
        index = _argument_index(module, shared.argument)
        handles.append(module.register_forward_pre_hook(_Enter(shared, level, index), with_kwargs=True))
        handles.append(module.register_forward_hook(_Leave(shared), with_kwargs=True, always_call=True))
    return handles
