"""apply_adapter: matching rules, freezing, the report, and validation without side effects."""

import pytest
import torch
from torch import nn

from lightning_peft import BitFit, FullFineTune, LoRA, QLoRA, apply_adapter
from lightning_peft.adapters.lora import LoRALinear


class Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.query = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        h = self.norm(x)
        return x + self.query(h) * self.value(h).sigmoid() + self.mlp(h)


class Net(nn.Module):
    def __init__(self, d=16, depth=2):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def adapted(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))


def test_suffix_names_regex_and_all_linear():
    model = Net()
    apply_adapter(model, LoRA(rank=2, target_modules=["query", "value"]))
    assert adapted(model) == [f"blocks.{i}.{n}" for i in range(2) for n in ("query", "value")]

    model = Net()
    apply_adapter(model, LoRA(rank=2, target_modules=r"blocks\.1\.mlp\.\d"))
    assert adapted(model) == ["blocks.1.mlp.0", "blocks.1.mlp.2"]

    model = Net()
    apply_adapter(model, LoRA(rank=2, target_modules=["re:blocks\\.0\\..*"]))
    assert adapted(model) == ["blocks.0.mlp.0", "blocks.0.mlp.2", "blocks.0.query", "blocks.0.value"]

    model = Net()
    apply_adapter(model, LoRA(rank=2, target_modules="all-linear", exclude_modules=["value"]))
    assert "head" not in adapted(model)  # the output head is left to trainable_modules
    assert len(adapted(model)) == 6 and not any(n.endswith("value") for n in adapted(model))

    model = Net()
    apply_adapter(model, LoRA(rank=2, target_modules="all-linear", module_path="blocks.1"))
    assert all(n.startswith("blocks.1.") for n in adapted(model)) and len(adapted(model)) == 4


def test_freezing_and_report():
    model = Net()
    report = apply_adapter(model, LoRA(rank=2, target_modules=["query"], rank_pattern={"blocks.1.query": 4}), trainable_modules=["head"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "blocks.0.query.lora_A.weight",
        "blocks.0.query.lora_B.weight",
        "blocks.1.query.lora_A.weight",
        "blocks.1.query.lora_B.weight",
        "head.weight",
        "head.bias",
    }
    assert model.blocks[1].query.rank == 4 and model.blocks[0].query.rank == 2
    expected = 2 * (16 + 16) + 4 * (16 + 16) + 16 * 3 + 3
    assert report.trainable == expected
    assert report.total == sum(p.numel() for p in model.parameters())
    text = str(report)
    assert "blocks.1.query" in text and "rank=4" in text and f"trainable {expected:,}" in text


def test_bitfit_and_full_fine_tune():
    model = Net()
    report = apply_adapter(model, BitFit())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n, _ in model.named_parameters() if n.endswith("bias")}
    assert report.trainable == sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias"))
    model = Net()
    report = apply_adapter(model, FullFineTune())
    assert report.trainable == report.total == sum(p.numel() for p in model.parameters())


def test_target_that_matches_nothing_lists_nearest_names():
    model = Net()
    with pytest.raises(ValueError, match=r"'qeury' matches no module.*'query'"):
        apply_adapter(model, LoRA(target_modules=["qeury"]))
    with pytest.raises(ValueError, match="matches only \\['Sequential'\\].*blocks.0.mlp.0"):
        apply_adapter(model, LoRA(target_modules=["mlp"]))
    with pytest.raises(ValueError, match="trainable_modules entry 'haed'.*'head'"):
        apply_adapter(model, LoRA(target_modules=["query"]), trainable_modules=["haed"])
    with pytest.raises(ValueError, match="module_path 'blocks.7'"):
        apply_adapter(model, LoRA(target_modules=["query"], module_path="blocks.7"))


def test_failures_leave_the_model_untouched():
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    cases = [
        LoRA(rank=20, target_modules=["query"]),  # rank > min(16, 16)
        [LoRA(target_modules=["query"]), LoRA(target_modules=["blocks.0.query"])],  # claimed twice
        QLoRA(target_modules=["norm"]),  # a LayerNorm cannot be quantized
    ]
    for spec in cases:
        with pytest.raises((ValueError, TypeError)):
            apply_adapter(model, spec)
        assert not adapted(model)
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="both adapted"):
        apply_adapter(model, LoRA(target_modules=["head"]), trainable_modules=["head"])
    apply_adapter(model, LoRA(target_modules=["query"]))
    with pytest.raises(ValueError, match="already has adapters"):
        apply_adapter(model, LoRA(target_modules=["value"]))


def test_several_specs_in_one_call():
    model = Net()
    apply_adapter(model, [LoRA(rank=2, target_modules=["query"]), LoRA(rank=4, target_modules=["mlp.0"], dropout=0.1)])
    assert model.blocks[0].query.rank == 2 and model.blocks[0].mlp[0].rank == 4 and model.blocks[0].mlp[0].dropout == 0.1


def test_training_changes_only_trainable_parameters():
    torch.manual_seed(0)
    model = Net()
    apply_adapter(model, LoRA(rank=2, target_modules="all-linear"), trainable_modules=["head"])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 5, 16)).square().mean().backward()
        opt.step()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert all(not torch.equal(params[n], v) for n, v in trained.items())
