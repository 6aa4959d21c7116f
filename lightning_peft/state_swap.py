"""Read a module as if some of its tensors had other values, without writing to it."""

from __future__ import annotations

from collections.abc import Generator, Mapping
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def tensors_swapped_in(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> Generator[None, None, None]:
    """Inside the context, each parameter or buffer of ``module`` named (by its state-dict
    name) in ``tensors`` is replaced by that value (moved to the original's device and dtype;
    a parameter keeps its ``requires_grad``). On exit the original tensor objects are put back:
    their values were never written, and optimizers holding them are unaffected."""
    swapped: list[tuple[nn.Module, str, bool, torch.Tensor]] = []
    try:
        for key, value in tensors.items():
            owner_name, _, attr = key.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            if attr in owner._parameters:
                original = owner._parameters[attr]
                assert original is not None
                replacement: torch.Tensor = nn.Parameter(
                    value.detach().to(original.device, original.dtype), requires_grad=original.requires_grad
                )
                swapped.append((owner, attr, True, original))
                owner._parameters[attr] = replacement  # type: ignore[assignment]
            elif attr in owner._buffers:
                original = owner._buffers[attr]
                assert original is not None
                swapped.append((owner, attr, False, original))
                owner._buffers[attr] = value.detach().to(original.device, original.dtype)
            else:
                raise KeyError(f"{key!r} is neither a parameter nor a buffer of {type(module).__name__}")
        yield
    finally:
        for owner, attr, is_param, original in reversed(swapped):
            (owner._parameters if is_param else owner._buffers)[attr] = original  # type: ignore[assignment]
