"""Buffers that change in training: running statistics and watched persistent buffers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_peft import LoRA, apply_adapter, load_adapter, save_adapter
from lightning_peft.targeting import trainable_state_keys


class CountingNet(nn.Module):
    """A BatchNorm net with a persistent buffer of its own that forward updates in training,
    and a non-persistent one that must never be kept."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.out = nn.Linear(4, 2)
        self.register_buffer("ema", torch.zeros(4))
        self.register_buffer("scratch", torch.zeros(4), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.fc(x))
        if self.training:
            with torch.no_grad():
                self.ema.mul_(0.9).add_(0.1 * h.mean(0))
                self.scratch.add_(1.0)
        return self.out(torch.relu(h))


def net(seed: int = 0) -> CountingNet:
    torch.manual_seed(seed)
    return CountingNet()


def train_steps(model: nn.Module, steps: int = 3) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 4, generator=g)).square().mean().backward()
        opt.step()


def test_running_statistics_are_trained_state_from_injection() -> None:
    model = net()
    apply_adapter(model, LoRA(rank=2, alpha=4, target_modules=["fc", "out"]), check_gradients=False)
    keys = trainable_state_keys(model)
    assert {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"} <= set(keys)
    assert "ema" not in keys and "scratch" not in keys  # not seen changing yet


def test_a_persistent_buffer_seen_changing_is_exported_and_restored(tmp_path: Path) -> None:
    model = net()
    apply_adapter(model, LoRA(rank=2, alpha=4, target_modules=["fc", "out"]), check_gradients=False)
    train_steps(model)
    save_adapter(model, tmp_path / "adapter")
    assert "ema" in trainable_state_keys(model) and "scratch" not in trainable_state_keys(model)

    loaded = load_adapter(net(), tmp_path / "adapter")
    for name in ("ema", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        assert torch.equal(loaded.get_buffer(name), model.get_buffer(name)), name
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-6, atol=1e-6)


def test_frozen_statistics_never_update_and_are_not_kept(tmp_path: Path) -> None:
    model = net()
    before = model.bn.running_mean.clone()
    report = apply_adapter(model, LoRA(rank=2, alpha=4, target_modules=["fc", "out"]), norm_stats="freeze", check_gradients=False)
    assert "norm_stats='freeze'" in str(report)
    train_steps(model)
    assert torch.equal(model.bn.running_mean, before) and int(model.bn.num_batches_tracked) == 0
    assert not any(k.startswith("bn.running") for k in trainable_state_keys(model))
    assert model.bn.training is False  # normalises with the stored statistics, as in eval mode


def test_report_lists_the_kept_statistics_and_bad_norm_stats_changes_nothing() -> None:
    model = net()
    report = apply_adapter(model, LoRA(rank=2, alpha=4, target_modules=["fc", "out"]), check_gradients=False)
    assert "bn.running_mean" in str(report) and "bn.num_batches_tracked" in str(report)
    other = net()
    state = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="norm_stats must be one of 'train', 'freeze'"):
        apply_adapter(other, LoRA(rank=2, alpha=4, target_modules=["fc"]), norm_stats="frozen")
    assert all(torch.equal(v, state[k]) for k, v in other.state_dict().items())
    assert not any(type(m).__name__ == "LoRALinear" for m in other.modules())
