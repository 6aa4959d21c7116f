"""Buffers that change in training: normalisation running statistics, and any other
persistent buffer seen to change.

Freezing every parameter does not freeze a ``BatchNorm``: in train mode it still updates
``running_mean``, ``running_var`` and ``num_batches_tracked``, which eval-mode outputs depend
on. Those buffers are part of what training produced, so adapter-only checkpoints and exports
must carry them. Two ways to handle them (``norm_stats`` of ``apply_adapter``):

* ``"train"`` (default, what plain fine-tuning does): the statistics update as usual and are
  kept in checkpoints and exports;
* ``"freeze"``: every normalisation layer with running statistics always normalises with its
  stored statistics (as in eval mode) and never updates them, so nothing but the adapter
  changes and the base's statistics stay valid for other adapters on the same base.

Other persistent buffers are watched: ``BufferWatch`` keeps a host copy of each at injection,
and a buffer found changed at a save joins the kept set from then on.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

NormStats = Literal["train", "freeze"]


def tracks_running_stats(module: nn.Module) -> bool:
    """A BatchNorm/InstanceNorm-like layer whose train-mode forward updates running statistics."""
    return isinstance(module, _NormBase) and module.track_running_stats and module.running_mean is not None


def _use_running_stats(module: nn.Module, args: tuple) -> None:
    # a forward pre-hook (a module-level function, so the model stays picklable): runs before
    # every call, after any `model.train()`, and makes this layer behave as in eval mode
    module.training = False


def freeze_running_stats(model: nn.Module) -> list[str]:
    """Make every normalisation layer of ``model`` with running statistics normalise with them
    and never update them (``norm_stats="freeze"``); returns the layers' names."""
    names = []
    for name, module in model.named_modules():
        if tracks_running_stats(module):
            module.register_forward_pre_hook(_use_running_stats)
            names.append(name)
    return names


def running_stat_buffers(model: nn.Module) -> list[str]:
    """State-dict names of the running statistics that training updates (frozen layers excluded)."""
    names = []
    for name, module in model.named_modules():
        if tracks_running_stats(module) and _use_running_stats not in module._forward_pre_hooks.values():
            prefix = f"{name}." if name else ""
            own = dict(module.named_buffers(recurse=False))
            names += [prefix + k for k in module.state_dict(keep_vars=True) if k in own]
    return names


def persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every registered buffer that ``model.state_dict()`` holds, by name (other state-dict
    entries, e.g. a quantized weight's packed statistics, are the owning layer's business)."""
    saved = model.state_dict(keep_vars=True)
    return {k: v for k, v in model.named_buffers() if k in saved}


class BufferWatch:
    """Host copies of ``model``'s persistent buffers (except ``ignore``) at creation, to tell
    later which ones training changed. Not a module, never in a state dict."""

    def __init__(self, model: nn.Module, ignore: set[str]) -> None:
        self.initial = {k: v.detach().to("cpu", copy=True) for k, v in persistent_buffers(model).items() if k not in ignore}

    def changed(self, model: nn.Module) -> list[str]:
        """Names of watched buffers whose value differs now; they are no longer watched."""
        current = persistent_buffers(model)
        changed = [
            k
            for k, v in self.initial.items()
            if k in current and (current[k].shape != v.shape or not torch.equal(current[k].detach().cpu(), v))
        ]
        for k in changed:
            del self.initial[k]
        return changed
