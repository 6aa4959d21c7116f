"""Read a module as if some of its tensors had other values, without writing to it."""

from __future__ import annotations

from collections.abc import Generator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


@contextmanager
def tensors_swapped_in(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> Generator[None, None, None]:
    """Inside the context, each parameter or buffer of ``module`` named (by its state-dict
    name) in ``tensors`` is replaced by that value (moved to the original's device and dtype;
    a parameter keeps its ``requires_grad``). A tensor shared by several modules (tied weights)
    is replaced in all of them by one new tensor, so the tie holds. On exit the original tensor
    objects are put back: their values were never written, and optimizers holding them are
    unaffected."""
    named = {**dict(module.named_buffers(remove_duplicate=False)), **dict(module.named_parameters(remove_duplicate=False))}
    unknown = [k for k in tensors if k not in named]
    if unknown:
        raise KeyError(f"{unknown[:4]} are neither parameters nor buffers of {type(module).__name__}")
    replacement: dict[int, torch.Tensor] = {}
    for key, value in tensors.items():
        original = named[key]
        new = value.detach().to(original.device, original.dtype)
        replacement[id(original)] = nn.Parameter(new, requires_grad=original.requires_grad) if isinstance(original, nn.Parameter) else new
    swapped: list[tuple[dict[str, Any], str, torch.Tensor]] = []
    try:
        for sub in module.modules():
            for slots in (sub._parameters, sub._buffers):
                for attr, original in slots.items():
                    if original is not None and id(original) in replacement:
                        swapped.append((slots, attr, original))
                        slots[attr] = replacement[id(original)]
        yield
    finally:
        for slots, attr, original in reversed(swapped):
            slots[attr] = original
