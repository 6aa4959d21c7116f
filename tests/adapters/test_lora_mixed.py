"""The mixed-batch LoRA math (``kernels/lora_mixed.py``) and its one-attribute hook in LoRALinear."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_peft.adapters.kernels.lora_mixed import MixedLoRA, mixed_lora_delta
from lightning_peft.adapters.lora import LoRALinear


def test_each_sample_gets_its_own_slot_and_slot_zero_is_the_base() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 2, 5, generator=gen)
    b = torch.randn(3, 4, 2, generator=gen)
    a[0], b[0] = 0.0, 0.0
    x = torch.randn(4, 3, 6, 5, generator=gen)  # [N, ..., d_in]: two inner dims
    index = torch.tensor([2, 0, 1, 2])
    delta = mixed_lora_delta(x, MixedLoRA(a, b, index))
    assert delta.shape == (4, 3, 6, 4)
    for n, k in enumerate(index.tolist()):
        torch.testing.assert_close(delta[n], x[n] @ a[k].T @ b[k].T)
    assert torch.count_nonzero(delta[1]) == 0
    with pytest.raises(ValueError, match="set up for 4 samples.*batch size 3"):
        mixed_lora_delta(x[:3], MixedLoRA(a, b, index))


def test_lora_linear_uses_the_mixed_factors_only_while_they_are_set() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(5, 4), rank=2, alpha=2.0)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 5)
    own = layer(x)
    a = torch.stack([torch.zeros(2, 5), layer.lora_A.weight.detach()])
    b = torch.stack([torch.zeros(4, 2), layer.scale * layer.lora_B.weight.detach()])
    layer.mixed_lora = MixedLoRA(a, b, torch.tensor([1, 0]))
    mixed = layer(x)
    torch.testing.assert_close(mixed[0], own[0])
    torch.testing.assert_close(mixed[1], layer.base_layer(x[1:]).squeeze(0))
    del layer.mixed_lora
    torch.testing.assert_close(layer(x), own)
