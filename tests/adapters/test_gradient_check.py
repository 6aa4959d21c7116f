"""No silent no-ops: adapter layers whose gradients stay None or zero are named, in plain
PyTorch (``apply_adapter``'s hooks, ``check_adapter_gradients``) and under ``AdapterCallback``.

``Net``: ``x [B, 4]`` -> ``a`` -> ``h``; ``b(h)`` is added back (or, by ``mode``, multiplied by 0,
detached, or multiplied by 0 only at the first call) -> ``head`` -> logits ``[B, 2]``. LoRA on
``a`` and ``b``; ``head`` trains fully.
"""

from __future__ import annotations

import copy
import pickle
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from adapter_models import Classifier, lora_callback, make_loader  # noqa: E402

from lightning_peft import LoRA, apply_adapter  # noqa: E402
from lightning_peft.callbacks.adapter import AdapterCallback  # noqa: E402
from lightning_peft.gradient_check import GradientCheck, check_adapter_gradients, gradient_flags  # noqa: E402


class Net(nn.Module):
    def __init__(self, mode: str = "plain") -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.mode, self.calls = mode, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        z = self.b(h)
        if self.mode == "zero" or (self.mode == "late" and self.calls == 0):
            z = z * 0
        elif self.mode == "detach":
            z = z.detach()
        self.calls += 1
        return self.head(h + z)


def adapted(mode: str = "plain", seed: int = 0, **kwargs) -> Net:  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    net = Net(mode)
    apply_adapter(net, LoRA(rank=2, alpha=4, target_modules=["a", "b"]), trainable_modules=["head"], **kwargs)
    return net


def train(net: nn.Module, steps: int) -> list[str]:
    """The usual loop, ``steps`` times; returns the lightning-peft warnings it raised."""
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            opt.zero_grad()
            loss = net(torch.randn(8, 4, generator=g)).square().mean()
            loss.backward()
            opt.step()
    return [str(w.message) for w in caught if "lightning-peft" in str(w.message)]


def hook_count(net: nn.Module) -> int:
    return sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in net.parameters())


# ------------------------------------------------------------------------------------------
# plain PyTorch: apply_adapter's hooks
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["zero", "detach"])
def test_silent_adapter_is_named_once_after_three_backward_passes(mode: str) -> None:
    net = adapted(mode)
    assert train(net, 2) == []  # the window is 3 backward passes
    [message] = train(net, 4)
    assert "1 of 2 adapter layers received NO gradient" in message and "['b']" in message
    assert "first 3 backward passes" in message and "target_modules" in message
    assert hook_count(net) == 0  # all hooks removed: nothing runs afterwards


def test_plain_lora_and_late_gradients_are_not_warned() -> None:
    # plain LoRA: B = 0 at the start, so dA = 0 at step 1; dB is not: the layer is fine
    net = adapted("plain")
    assert train(net, 4) == []
    assert hook_count(net) == 0
    # 'late': b's gradient is exactly zero at step 1, non-zero from step 2
    net = adapted("late")
    train(net, 1)
    assert check_adapter_gradients(net) == ["b"]
    assert train(net, 3) == []
    assert hook_count(net) == 0


def test_check_gradients_false_installs_nothing() -> None:
    net = adapted("zero", check_gradients=False)
    assert hook_count(net) == 0
    assert train(net, 4) == []
    with pytest.raises(TypeError, match="check_gradients must be True or False"):
        adapted("zero", check_gradients="yes")


def test_check_adapter_gradients_names_silent_layers_after_a_backward() -> None:
    net = adapted("zero", check_gradients=False)
    assert check_adapter_gradients(net) == ["a", "b"]  # no backward yet: every .grad is None
    net(torch.randn(3, 4)).sum().backward()
    assert check_adapter_gradients(net) == ["b"]
    names, flags = gradient_flags(net)
    assert names == ["a", "b"] and flags.dtype == torch.bool and flags.tolist() == [True, False]


def test_a_copy_or_pickle_of_the_model_works_and_carries_no_hooks() -> None:
    net = adapted("zero")
    assert hook_count(net) > 0
    clone = copy.deepcopy(net)
    restored = pickle.loads(pickle.dumps(net))
    for other in (clone, restored):
        assert hook_count(other) == 0
        assert train(other, 4) == []  # trains; the copies have no check of their own
        assert torch.isfinite(other(torch.ones(1, 4))).all()
    [message] = train(net, 3)  # the original's check is unaffected
    assert "['b']" in message


def test_hooks_survive_torch_compile() -> None:
    net = adapted("zero")
    compiled = torch.compile(net, backend="aot_eager")
    [message] = train(compiled, 3)
    assert "['b']" in message and hook_count(net) == 0


def test_gradient_check_validates_steps_and_counts_passes_with_a_detached_adapter_only() -> None:
    with pytest.raises(ValueError, match="steps must be a positive int"):
        GradientCheck(nn.Linear(2, 2), steps=0)
    net = adapted("detach", check_gradients=False)
    stale = GradientCheck(net)
    before = hook_count(net)
    check = GradientCheck(net, steps=1)  # the head's hooks count the pass: b never fires
    assert stale.done and hook_count(net) == before  # a new check replaces an unfinished one
    with pytest.warns(UserWarning, match=r"first 1 backward pass and will not train: \['b'\]"):
        net(torch.randn(2, 4)).sum().backward()
    assert check.done and check.silent == ["b"] and check.backward_passes == 1


# ------------------------------------------------------------------------------------------
# Lightning: the callback checks .grad itself
# ------------------------------------------------------------------------------------------
class Zeroed(nn.Module):
    """A linear layer whose output is multiplied by zero (its adapter gets exact-zero grads)."""

    def __init__(self, inner: nn.Linear) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * 0


def fit(tmp_path: Path, model: pl.LightningModule, callback: AdapterCallback, max_steps: int) -> list[str]:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, make_loader(n=48, batch_size=8))
    return [str(w.message) for w in caught if "NO gradient" in str(w.message)]


def test_callback_warns_exactly_once_about_a_zero_output_adapter(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Classifier()
    model.model.blocks[0].fc2 = Zeroed(model.model.blocks[0].fc2)
    callback = lora_callback(targets=["q", "v", "fc2.inner"])
    [message] = fit(tmp_path, model, callback, max_steps=5)
    assert "1 of 5 adapter layers" in message and "['model.blocks.0.fc2.inner']" in message
    assert "first 3 optimizer steps" in message
    assert hook_count(model) == 0  # the callback's injection installs no hooks (no double warning)


def test_callback_run_shorter_than_the_window_is_judged_at_train_end(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Classifier(unused_layer=True)
    [message] = fit(tmp_path, model, lora_callback(targets=["q", "unused"]), max_steps=2)
    assert "first 2 optimizer steps" in message and "['model.unused']" in message
    torch.manual_seed(0)
    assert fit(tmp_path, Classifier(), lora_callback(), max_steps=2) == []  # plain LoRA: nothing
    with pytest.raises(ValueError, match="gradient_check_steps must be an int >= 1"):
        lora_callback(gradient_check_steps=0)


def test_a_layer_pruned_to_rank_zero_is_not_silent_by_mistake() -> None:
    from lightning_peft import AdaLoRA

    torch.manual_seed(0)
    net = Net("plain")
    apply_adapter(net, AdaLoRA(init_rank=2, target_rank=1, target_modules=["a", "b"], total_steps=10), trainable_modules=["head"])
    net.b.rank_mask.fill_(False)  # the allocator gave b no rank: its gradients are zero by design
    assert train(net, 4) == []
    assert check_adapter_gradients(net) == []
    names, flags = gradient_flags(net)
    assert names == ["a", "b"] and flags.tolist() == [True, True]
