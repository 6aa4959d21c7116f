"""BaRA (pure torch): gated rank-1 factors, the KL to the sparse prior and its gradient, the
effective ranks, evaluation modes, merge (exact without a local gate, refused with one), files
and bad input."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft import BaRA, apply_adapter, load_adapter, merge_adapter, save_adapter, unmerge_adapter
from lightning_peft.adapters.bara import (
    UNDRIVEN_FORWARDS,
    BaRALinear,
    add_kl_gradients,
    bara_kl,
    bara_layers,
    bernoulli_kl,
    effective_ranks,
    monte_carlo,
    reset_rank_stats,
)
from lightning_peft.adapters.registry import spec_from_config


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4))


def adapted(seed: int = 0, **kw) -> nn.Module:
    model = mlp(seed)
    apply_adapter(model, BaRA(max_rank=4, target_modules=["0", "2"], **kw), check_gradients=False)
    return model


def randomise(model: nn.Module, seed: int = 1) -> None:
    """Non-zero B and local-gate weights, so outputs depend on every adapter tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in bara_layers(model).values():
            for p in layer.adapter_parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * max(1.0, float(want.detach().abs().max())))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_starts_at_base_and_matches_the_formula():
    base, model = mlp(), adapted()
    x = torch.randn(6, 8)
    model.eval()
    close(model(x), base(x))  # B = 0
    randomise(model)
    layer = model[0]
    u = x @ layer.lora_A.T
    z = torch.sigmoid(layer.gate_logit) * torch.sigmoid(u @ layer.gate_weight.T + layer.gate_bias)
    want = x @ layer.base_layer.weight.T + layer.base_layer.bias + layer.scale * (u * z) @ layer.lora_B.T
    close(layer(x), want)


def test_training_samples_are_seeded_per_example_and_differ_between_draws():
    model = adapted()
    randomise(model)
    x = torch.randn(5, 3, 8)  # 5 examples of 3 tokens
    torch.manual_seed(7)
    a = model(x)
    torch.manual_seed(7)
    close(model(x), a, rel=0.0)  # same seed, same noise
    assert not torch.allclose(model(x), a)  # a fresh draw
    gate = model[0].global_gate(x)
    assert gate.shape == (5, 1, 4)  # one draw per example, shared by its tokens
    assert ((gate > 0) & (gate < 1)).all()


def test_concrete_gate_is_on_with_probability_pi():
    layer = adapted()[0]
    with torch.no_grad():
        layer.gate_logit.copy_(torch.tensor([-2.0, 0.0, 1.0, 3.0]))
    torch.manual_seed(0)
    samples = layer._concrete((20000,), torch.float32)
    # P(z > 1/2) = sigmoid(logit) for any temperature: what "expected gate" pi means
    close((samples > 0.5).float().mean(0), torch.sigmoid(layer.gate_logit.detach()), rel=0.02)


def test_kl_matches_the_bernoulli_formula_and_is_zero_at_the_prior():
    logit = torch.tensor([-3.0, -1.0, 0.0, 2.0])
    pi = torch.sigmoid(logit)
    want = pi * torch.log(pi / 0.2) + (1 - pi) * torch.log((1 - pi) / 0.8)
    close(bernoulli_kl(logit, 0.2), want)
    assert float(bernoulli_kl(torch.tensor([math.log(0.2 / 0.8)]), 0.2).abs()) < 1e-6


def test_add_kl_gradients_gives_the_gate_logits_the_kl_gradient():
    model = adapted(kl_weight=0.5, prior=0.1)
    x = torch.randn(4, 8)
    model(x).sum().backward()  # B = 0: the task gives the gate logits exactly zero gradient
    for layer in bara_layers(model).values():
        assert torch.count_nonzero(layer.gate_logit.grad) == 0
    kl = add_kl_gradients(model)
    for layer in bara_layers(model).values():
        logit = layer.gate_logit.detach()
        pi = torch.sigmoid(logit)
        # d KL / d logit = pi (1 - pi) (logit - logit(prior))
        want = 0.5 * pi * (1 - pi) * (logit - math.log(0.1 / 0.9))
        close(layer.gate_logit.grad, want)
    close(torch.tensor(kl), bara_kl(model, weighted=False).detach())
    close(bara_kl(model).detach(), 0.5 * bara_kl(model, weighted=False).detach())


def test_kl_alone_drives_the_gates_to_the_prior():
    model = adapted(kl_weight=1.0, prior=0.1, init_prob=0.9)
    opt = torch.optim.SGD([layer.gate_logit for layer in bara_layers(model).values()], lr=20.0)
    for _ in range(200):
        add_kl_gradients(model)
        opt.step()
        opt.zero_grad()
    for stats in effective_ranks(model).values():
        assert stats["global_rank"] == pytest.approx(4 * 0.1, abs=1e-3)


def test_effective_ranks_global_and_joint():
    model = adapted()
    layer = model[0]
    with torch.no_grad():
        layer.gate_logit.copy_(torch.tensor([-1.0, 0.0, 1.0, 2.0]))
        layer.gate_bias.copy_(torch.tensor([0.0, 1.0, -1.0, 3.0]))  # G = 0: the local gate is sigmoid(c) everywhere
    reset_rank_stats(model)
    model.eval()
    model(torch.randn(7, 3, 8))
    pi, local = torch.sigmoid(layer.gate_logit.detach()), torch.sigmoid(layer.gate_bias.detach())
    stats = effective_ranks(model)["0"]
    assert stats["global_rank"] == pytest.approx(float(pi.sum()), rel=1e-6)
    assert stats["joint_rank"] == pytest.approx(float((pi * local).sum()), rel=1e-5)
    reset_rank_stats(model)
    assert effective_ranks(model)["0"]["joint_rank"] == pytest.approx(stats["global_rank"])  # no tokens yet
    plain = adapted(local_gate=False)
    plain(torch.randn(3, 8))
    assert effective_ranks(plain)["0"]["joint_rank"] == pytest.approx(4 * 0.5)


def test_eval_modes_expected_sampled_and_monte_carlo():
    x = torch.randn(5, 8)
    expected, sampled = adapted(), adapted(eval_gate="sampled", samples=64)
    for m in (expected, sampled):
        randomise(m)
        m.eval()
    close(expected(x), expected(x), rel=0.0)  # deterministic
    torch.manual_seed(3)
    a = sampled(x)
    torch.manual_seed(3)
    close(sampled(x), a, rel=0.0)  # reproducible under a seed
    assert not torch.allclose(a, expected(x))  # the mean of concrete draws is not pi
    with monte_carlo(expected):
        assert not torch.allclose(expected(x), expected(x))  # a fresh draw per forward
        assert all(layer.monte_carlo for layer in bara_layers(expected).values())
    assert not any(layer.monte_carlo for layer in bara_layers(expected).values())
    close(expected(x), expected(x), rel=0.0)


def test_merge_without_local_gate_is_exact_and_unmerge_restores():
    model = adapted(local_gate=False)
    randomise(model)
    model.eval()
    x = torch.randn(6, 8)
    before, weights = model(x), snapshot(model)
    assert merge_adapter(model) == 2
    close(model(x), before)
    unmerge_adapter(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0)


def test_merge_with_local_gate_is_refused_naming_the_reason_and_changes_nothing():
    model = adapted()
    randomise(model)
    weights = snapshot(model)
    with pytest.raises(ValueError, match="depends on the input"):
        merge_adapter(model)
    assert not any(layer.merged for layer in bara_layers(model).values())
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0)


def test_merge_with_sampled_eval_warns():
    model = adapted(local_gate=False, eval_gate="sampled")
    with pytest.warns(UserWarning, match="expected gate"):
        merge_adapter(model)


def test_save_load_round_trip_in_our_own_format(tmp_path):
    model = adapted(prior=0.3, kl_weight=0.01, temperature=0.5)
    randomise(model)
    model.eval()
    x = torch.randn(4, 8)
    want = model(x)
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LIGHTNING_PEFT"  # peft cannot represent the gates
    fresh = mlp()
    load_adapter(fresh, tmp_path / "a")
    fresh.eval()
    close(fresh(x), want)
    spec = bara_layers(fresh)["0"].spec
    assert (spec.prior, spec.kl_weight, spec.temperature) == (0.3, 0.01, 0.5)
    assert "_rank_sum" not in bara_layers(fresh)["0"].adapter_state_dict()  # statistics are not saved


def test_spec_config_round_trip_and_registry_names():
    spec = BaRA(max_rank=8, prior=0.1, samples=2, local_gate=False, target_modules=["q"])
    assert spec_from_config(spec.to_config()) == spec
    assert spec_from_config({"class_path": "BaRA", "init_args": {}}) == BaRA()
    assert BaRA.training_callbacks == ("lightning_peft.callbacks.bara.BaRACallback",)


def test_undriven_layers_warn_that_the_prior_never_acts():
    model = adapted()
    x = torch.randn(2, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(UNDRIVEN_FORWARDS + 1):
            model(x)
    assert any("KL term" in str(w.message) for w in caught)
    quiet = adapted()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(UNDRIVEN_FORWARDS + 1):
            quiet(x)
            add_kl_gradients(quiet)


def test_gradients_reach_every_adapter_tensor():
    model = adapted()
    randomise(model)
    F.mse_loss(model(torch.randn(5, 8)), torch.randn(5, 4)).backward()
    for layer in bara_layers(model).values():
        for name, p in layer.named_parameters():
            if not name.startswith("base_layer."):
                assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_rank": 9}, ValueError, "max_rank 9 is larger than"),
        ({"kl_weight": -0.1}, ValueError, "kl_weight"),
        ({"samples": 0}, ValueError, "samples"),
        ({"samples": 2.0}, TypeError, "samples"),
        ({"prior": 0.0}, ValueError, "prior"),
        ({"prior": 1.0}, ValueError, "prior"),
        ({"prior": 1.5}, ValueError, "prior"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"init_prob": 1.0}, ValueError, "init_prob"),
        ({"eval_gate": "mean"}, ValueError, "eval_gate"),
        ({"local_gate": "false"}, TypeError, "local_gate"),
    ],
)
def test_bad_input_is_refused_and_the_model_untouched(kwargs, error, match):
    # max_rank 9 fits the first target (16 x 16) but not the second (min(16, 8) = 8): refused
    # after the first passed its check, before either is wrapped
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 8), nn.Linear(8, 4))
    weights = snapshot(model)
    with pytest.raises(error, match=match):
        apply_adapter(model, BaRA(**{"max_rank": 4, "target_modules": ["0", "1"], **kwargs}), check_gradients=False)
    assert not any(isinstance(m, BaRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0)
