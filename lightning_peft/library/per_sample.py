"""Mixed batches of an adapter library: sample ``n`` of a batch runs with adapter
``names[n]`` (``None``: the plain base), in one forward pass.

Per LoRA layer the factors of the distinct adapters named are stacked, zero-padded to their
largest rank, with each adapter's scale folded into its ``B`` and slot 0 all zeros (the base);
:func:`lightning_peft.adapters.kernels.lora_mixed.mixed_lora_delta` gathers each sample's
factors. Exact: zero-padded rank columns add nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from lightning_peft.adapters.kernels.lora_mixed import MixedLoRA
from lightning_peft.adapters.lora import LoRALinear
from lightning_peft.library.factors import Factors

__all__ = ["clear_mixed", "mixed_stacks", "set_mixed"]


def mixed_stacks(
    names: Sequence[str | None], factors: Mapping[str, Factors]
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[int]]:
    """``({module: (A [K+1, r, d_in], B [K+1, d_out, r])}, slot per sample)`` for the distinct
    adapters of ``names`` (slot 0 = base, then first-seen order)."""
    distinct = list(dict.fromkeys(n for n in names if n is not None))
    slots = [0 if n is None else 1 + distinct.index(n) for n in names]
    modules = list(dict.fromkeys(m for n in distinct for m in factors[n]))  # the union, first-seen order
    stacks = {}
    for module in modules:
        parts = [factors[n].get(module) for n in distinct]
        present = [p for p in parts if p is not None]
        rank = max(a.shape[0] for a, _, _ in present)
        (a0, b0, _) = present[0]
        d_in, d_out = a0.shape[1], b0.shape[0]
        a_stack = torch.zeros(len(distinct) + 1, rank, d_in, dtype=a0.dtype, device=a0.device)
        b_stack = torch.zeros(len(distinct) + 1, d_out, rank, dtype=b0.dtype, device=b0.device)
        for k, part in enumerate(parts, start=1):
            if part is None:  # this adapter leaves the module alone: its slot stays zeros, as the base's
                continue
            a, b, scale = part
            a_stack[k, : a.shape[0]] = a
            b_stack[k, :, : b.shape[1]] = b * scale
        stacks[module] = (a_stack, b_stack)
    return stacks, slots


def set_mixed(model: nn.Module, stacks: Mapping[str, tuple[torch.Tensor, torch.Tensor]], slots: Sequence[int]) -> None:
    """Put the stacks on each live LoRA layer (the caller checked they are all there)."""
    for module, (a_stack, b_stack) in stacks.items():
        layer = model.get_submodule(module)
        assert isinstance(layer, LoRALinear)
        weight = layer.lora_A.weight
        index = torch.tensor(list(slots), dtype=torch.long, device=weight.device)
        layer.mixed_lora = MixedLoRA(a_stack.to(weight.device, weight.dtype), b_stack.to(weight.device, weight.dtype), index)


def clear_mixed(model: nn.Module) -> None:
    for layer in model.modules():
        if isinstance(layer, LoRALinear) and "mixed_lora" in layer.__dict__:
            del layer.__dict__["mixed_lora"]
