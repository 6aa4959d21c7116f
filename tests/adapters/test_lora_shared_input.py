"""Shared-input groups: sibling LoRA projections that read the same tensor run as one node, with
the same values and gradients as separate layers, and fall back to separate layers wherever the
inputs differ (cross-attention, in-place changes, merge, dropout)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft import LoRA, apply_adapter
from lightning_peft.adapters.kernels import lora as lora_kernels
from lightning_peft.adapters.lora import LoRALinear
from lightning_peft.memory import SavedTensorMeter

D = 16


class Block(nn.Module):
    """A Llama-like block: q/k/v read one normalised input, gate/up read another."""

    def __init__(self, cross: bool = False, inplace: bool = False) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(D, D) for _ in range(4))
        self.gate_proj, self.up_proj = nn.Linear(D, 2 * D, bias=False), nn.Linear(D, 2 * D, bias=False)
        self.down_proj = nn.Linear(2 * D, D, bias=False)
        self.cross, self.inplace = cross, inplace

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(x)
        q = self.q_proj(h)
        if self.inplace:
            h.mul_(2.0)  # k and v read a changed tensor: the pending outputs must not be used
        kv_in = memory if self.cross and memory is not None else h
        k, v = self.k_proj(kv_in), self.v_proj(kv_in)
        att = torch.softmax(q @ k.transpose(-1, -2) / D**0.5, -1) @ v
        x = x + self.o_proj(att)
        h = self.norm2(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


def adapted(block: nn.Module, **kwargs) -> nn.Module:
    kwargs.setdefault("group_shared_inputs", True)
    model = copy.deepcopy(block)
    torch.manual_seed(1)  # the same A in every copy
    apply_adapter(model, LoRA(rank=4, alpha=8.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"], **kwargs))
    torch.manual_seed(1)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            nn.init.normal_(module.lora_B.weight, std=0.5)
    return model


def run(model: nn.Module, x: torch.Tensor, memory: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    y = model(x, memory)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(y.square().sum(), [x, *params])
    return y.detach(), list(grads)


def assert_same(a: tuple[torch.Tensor, list[torch.Tensor]], b: tuple[torch.Tensor, list[torch.Tensor]]) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
    assert len(a[1]) == len(b[1])
    for ga, gb in zip(a[1], b[1]):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5 * max(1.0, gb.abs().max().item()))


@pytest.fixture
def inputs():
    torch.manual_seed(0)
    return Block(), torch.randn(2, 5, D)


def test_groups_run_as_one_node_with_the_values_and_gradients_of_separate_layers(inputs):
    block, x = inputs
    grouped, separate = adapted(block), adapted(block, group_shared_inputs=False)
    assert grouped.q_proj._group is grouped.k_proj._group is grouped.v_proj._group is not None
    assert grouped.gate_proj._group is grouped.up_proj._group is not None and grouped.o_proj._group is None
    assert all(getattr(m, "_group", None) is None for m in separate.modules())
    h = grouped.norm1(x)
    assert type(grouped.q_proj(h).grad_fn).__name__ == "SharedInputLoRAFunctionBackward"
    assert grouped.k_proj(h).grad_fn is grouped.v_proj(h).grad_fn  # taken from the same node
    assert_same(run(grouped, x), run(separate, x))
    assert grouped.q_proj._group.active and grouped.gate_proj._group.active
    assert grouped.q_proj.adapter_state_dict().keys() == separate.q_proj.adapter_state_dict().keys()
    lone = copy.deepcopy(grouped.q_proj)  # a copy of one member (its group copied with it) gives the same values
    torch.testing.assert_close(lone(h), separate.q_proj(h), rtol=1e-5, atol=1e-5)


def test_group_lora_b_gradients_in_the_transposed_form_match_separate_layers(inputs, monkeypatch):
    block, _ = inputs
    x = torch.randn(2, 80, D)  # 160 rows: above thin_outer's row floor
    separate = run(adapted(block, group_shared_inputs=False), x)  # dB as dy^T u
    monkeypatch.setattr(lora_kernels, "THIN_OUTER_MIN_ELEMENTS", 0)  # dB as (u^T dy)^T, u a column slice
    assert_same(run(adapted(block), x), separate)


def test_group_saves_the_shared_input_once_and_recomputes_it_from_the_layer_norm(inputs):
    block, x = inputs
    saved = {}
    for flag in (True, False):
        model = adapted(block, group_shared_inputs=flag)
        with SavedTensorMeter(model) as meter:
            model(x.clone().requires_grad_(True))
        saved[flag] = meter.bytes
    assert saved[True] <= saved[False]


def test_members_reading_different_tensors_run_alone_with_the_same_results():
    torch.manual_seed(0)
    block = Block(cross=True)
    x, memory = torch.randn(2, 5, D), torch.randn(2, 7, D)
    grouped, separate = adapted(block), adapted(block, group_shared_inputs=False)
    for _ in range(2):  # the first call finds out, the second runs alone
        assert_same(run(grouped, x, memory), run(separate, x, memory))
    assert not grouped.q_proj._group.active and grouped.gate_proj._group.active


def test_an_input_changed_in_place_between_members_is_not_served_from_the_group():
    torch.manual_seed(0)
    block = Block(inplace=True)
    x = torch.randn(2, 5, D)
    grouped, separate = adapted(block), adapted(block, group_shared_inputs=False)
    with torch.no_grad():  # (with autograd on, the in-place change would break the saved input)
        torch.testing.assert_close(grouped(x), separate(x), rtol=1e-5, atol=1e-5)
    assert not grouped.q_proj._group.active


def test_merge_dropout_and_removal_fall_back_to_separate_layers(inputs):
    block, x = inputs
    grouped, separate = adapted(block, dropout=0.1), adapted(block, dropout=0.1, group_shared_inputs=False)
    grouped.eval(), separate.eval()
    assert_same(run(grouped, x), run(separate, x))  # eval: no dropout, grouped
    grouped.train()
    h = grouped.norm1(x)
    assert type(grouped.q_proj(h).grad_fn).__name__ == "LoRAFunctionBackward"  # training dropout: alone
    grouped.eval(), separate.eval()
    for model in (grouped, separate):
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.merge()
    with torch.no_grad():
        torch.testing.assert_close(grouped(x), separate(x), rtol=1e-5, atol=1e-5)
    from lightning_peft.io import remove_adapter

    model = adapted(block)
    layers = [model.q_proj, model.k_proj]
    remove_adapter(model)
    assert all(layer._group is None for layer in layers)


def test_group_option_is_validated_and_off_by_default():
    assert LoRA().group_shared_inputs is False
    with pytest.raises((TypeError, ValueError), match="group_shared_inputs"):
        LoRA(group_shared_inputs="yes")
