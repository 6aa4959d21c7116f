"""LiteLoRA (pure torch): the layer against a plain-ops reference (outputs and gradients), the
frozen bank's exact contribution, the hard-concrete gate's formulas (L0, E[gamma]) against
sampling, global ties, merge, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_peft import LiteLoRA, apply_adapter, merge_adapter, remove_adapter, unmerge_adapter
from lightning_peft.adapters.litelora import HardConcreteGate, LiteLoRALinear, litelora_gates, litelora_layers
from lightning_peft.adapters.registry import spec_from_config


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 12), nn.GELU(), nn.Linear(12, 4))


def bank_for(model: nn.Module, k: int, ranks=(2, 3), seed: int = 5) -> dict[str, list]:
    """``k`` random frozen adapters on modules "0" and "2" ("2" lacks the second adapter)."""
    g = torch.Generator().manual_seed(seed)
    bank = {}
    for name in ("0", "2"):
        layer = model.get_submodule(name)
        entries = []
        for i in range(k):
            r = ranks[i % len(ranks)]
            a = torch.randn(r, layer.in_features, generator=g)
            b = torch.randn(layer.out_features, r, generator=g)
            entries.append(None if (name == "2" and i == 1) else (a, b, 0.5 + i))
        bank[name] = entries
    return bank


def adapted(k: int = 3, seed: int = 0, **kw) -> tuple[nn.Module, nn.Module, dict[str, list]]:
    base = mlp(seed)
    model = mlp(seed)
    bank = bank_for(model, k)
    spec = LiteLoRA(rank=2, alpha=4.0, target_modules=["0", "2"], **kw).with_bank([f"t{i}" for i in range(k)], bank)
    apply_adapter(model, spec, check_gradients=False)
    return base, model, bank


def randomise(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in litelora_layers(model).values():
            layer.lora_B.add_(0.3 * torch.randn(layer.lora_B.shape, generator=g))
            if layer.coefficients is not None:
                layer.coefficients.copy_(torch.randn(layer.coefficients.shape, generator=g))


def close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * max(1.0, float(want.detach().abs().max())))


def reference(layer: LiteLoRALinear, bank: list, x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``W0 x + b + sum_i c_i s_i B_i A_i x + gamma s B A x`` with plain ops, one term at a time."""
    y = x @ layer.base_layer.weight.T + layer.base_layer.bias
    for i, factors in enumerate(bank):
        if factors is not None:
            a, b, s = factors
            y = y + layer.coefficients[i] * s * (x @ a.T @ b.T)
    return y + gamma * layer.scale * (x @ layer.lora_A.T @ layer.lora_B.T)


def test_starts_at_base_and_bank_contribution_is_exact():
    base, model, bank = adapted()
    x = torch.randn(5, 8)
    model.eval()
    close(model(x), base(x))  # c = 0 and B = 0: the plain base
    randomise(model)
    for name in ("0", "2"):
        layer = model.get_submodule(name).double()
        h = torch.randn(7, layer.in_features, dtype=torch.float64)
        want = sum(
            layer.coefficients[i] * f[2] * (h @ f[0].double().T @ f[1].double().T) for i, f in enumerate(bank[name]) if f is not None
        )
        torch.testing.assert_close(layer.bank_output(h), want, rtol=1e-12, atol=1e-12)


def test_output_and_gradients_match_plain_ops_reference():
    _, model, bank = adapted(gate_scope="per_module", log_alpha_init=0.0)
    randomise(model)
    layer = model.get_submodule("2")
    layer.train()
    x = torch.randn(6, layer.in_features, requires_grad=True)
    # a seed whose draw is inside (0, 1): a clamped draw passes no gradient to log_alpha
    seed = next(s for s in range(100) if 0 < float(torch.manual_seed(s) and layer.gate.draw().detach()) < 1)
    torch.manual_seed(seed)
    y = layer(x)
    torch.manual_seed(seed)
    gamma = layer.gate.draw()
    want = reference(layer, bank["2"], x, gamma)
    close(y, want)
    grad_out = torch.randn_like(y)
    params = [x, layer.lora_A, layer.lora_B, layer.coefficients, layer.gate.log_alpha]
    got = torch.autograd.grad(y, params, grad_out)
    expected = torch.autograd.grad(want, params, grad_out)
    for g, e in zip(got, expected):
        close(g, e)
    assert float(got[4].abs()) > 0 and float(got[3][0].abs()) > 0  # the gate and the coefficients learn
    assert float(got[3][1]) == 0.0  # the second bank adapter does not touch module "2"


def test_frozen_bank_gets_no_gradient_and_is_not_saved():
    _, model, _ = adapted()
    randomise(model)
    model.train()
    model(torch.randn(4, 8)).square().sum().backward()
    for layer in litelora_layers(model).values():
        assert not layer.bank_A.requires_grad and not layer.bank_B.requires_grad and layer.bank_A.grad is None
        assert not layer.base_layer.weight.requires_grad and layer.base_layer.weight.grad is None
        assert layer.lora_B.grad is not None and layer.coefficients.grad is not None
        assert not any(k.startswith("bank_") for k in layer.adapter_state_dict())  # the library holds the bank
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}  # the one global gate counted once
    assert trainable == {"0.lora_A", "0.lora_B", "0.coefficients", "0.gate.log_alpha", "2.lora_A", "2.lora_B", "2.coefficients"}


def test_global_scope_ties_one_gate_and_one_sample_per_forward():
    _, model, _ = adapted(coefficients="global", gate_scope="global")
    layers = list(litelora_layers(model).values())
    assert layers[0].gate is layers[1].gate and layers[0].coefficients is layers[1].coefficients
    assert len(litelora_gates(model)) == 1
    seen = []
    for layer in layers:
        layer.register_forward_hook(lambda m, a, o: seen.append(m.gate_value()))
    model.train()
    model(torch.randn(2, 8))
    assert seen[0] is seen[1]  # the shared draw of this forward
    assert layers[0].gate.shared_sample is None  # forgotten after the forward
    model(torch.randn(2, 8))
    assert not torch.equal(seen[0], seen[2])  # a new draw per forward
    model.eval()
    model(torch.randn(2, 8))
    assert torch.equal(seen[-1], layers[0].gate.deterministic())


def test_per_module_scope_has_a_gate_per_module():
    _, model, _ = adapted(gate_scope="per_module", coefficients="per_module")
    layers = list(litelora_layers(model).values())
    assert layers[0].gate is not layers[1].gate and layers[0].coefficients is not layers[1].coefficients
    assert len(litelora_gates(model)) == 2


@pytest.mark.parametrize("log_alpha, temperature", [(2.0, 2 / 3), (-1.0, 2 / 3), (0.3, 0.5)])
def test_l0_and_expected_gate_match_sampling(log_alpha, temperature):
    gate = HardConcreteGate(log_alpha, temperature, -0.1, 1.1)
    torch.manual_seed(0)
    n = 40_000
    with torch.no_grad():
        samples = torch.stack([gate.draw() for _ in range(n)])
    open_fraction = float((samples > 0).float().mean())
    want_l0 = 1 / (1 + math.exp(-(log_alpha - temperature * math.log(0.1 / 1.1))))
    assert float(gate.open_probability().detach()) == pytest.approx(want_l0, rel=1e-6)
    se = math.sqrt(want_l0 * (1 - want_l0) / n)
    assert abs(open_fraction - want_l0) < 5 * se + 1e-4
    mean, spread = float(samples.mean()), float(samples.std())
    assert abs(float(gate.expected().detach()) - mean) < 5 * spread / math.sqrt(n) + 1e-4
    assert 0.0 <= float(gate.deterministic().detach()) <= 1.0
    assert float(gate.deterministic().detach()) == pytest.approx(min(1, max(0, 1.2 / (1 + math.exp(-log_alpha)) - 0.1)), rel=1e-6)
    gate.open_probability().backward()
    assert float(gate.log_alpha.grad) > 0  # the L0 penalty pushes log_alpha down


def test_merge_is_exact_in_eval_and_unmerge_restores():
    _, model, _ = adapted()
    randomise(model)
    model.eval()
    x = torch.randn(5, 8)
    want = model(x)
    weights = {n: model.get_submodule(n).base_layer.weight.clone() for n in ("0", "2")}
    assert merge_adapter(model) == 2
    close(model(x), want)
    unmerge_adapter(model)
    for n, w in weights.items():
        assert torch.equal(model.get_submodule(n).base_layer.weight, w)
    close(model(x), want)


def test_first_task_has_no_gate_and_starts_at_base():
    base = mlp()
    model = mlp()
    apply_adapter(model, LiteLoRA(rank=2, target_modules=["0"]), check_gradients=False)
    layer = model.get_submodule("0")
    assert layer.gate is None and layer.coefficients is None and layer.eval_gate() == 1.0
    x = torch.randn(3, 8)
    close(model(x), base(x))
    gated = mlp()
    apply_adapter(gated, LiteLoRA(rank=2, target_modules=["0"], gate_first_task=True), check_gradients=False)
    assert gated.get_submodule("0").gate is not None
    assert remove_adapter(gated) == 1 and isinstance(gated.get_submodule("0"), nn.Linear)


def test_silent_layer_is_reported_loudly():
    model = nn.ModuleDict({"used": nn.Linear(4, 4), "unused": nn.Linear(4, 4)})
    apply_adapter(model, LiteLoRA(rank=2, target_modules=["used", "unused"]))
    with pytest.warns(UserWarning, match="unused"):
        for _ in range(3):
            model["used"](torch.randn(2, 4)).sum().backward()


def test_spec_round_trips_through_the_registry():
    spec = LiteLoRA(rank=4, coefficients="global", gate_scope="per_module", l0_weight=0.5, target_modules=["0"])
    again = spec_from_config(spec.to_config())
    assert isinstance(again, LiteLoRA) and again == spec and again.to_config()["class_path"].endswith("litelora.LiteLoRA")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"coefficients": "shared"}, "coefficients"),
        ({"gate_scope": "layer"}, "gate_scope"),
        ({"stretch_low": 0.1}, "stretch_low"),
        ({"stretch_high": 0.9}, "stretch_high"),
        ({"temperature": 0.0}, "temperature"),
        ({"gate_threshold": 1.0}, "gate_threshold"),
        ({"l0_weight": float("nan")}, "l0_weight"),
        ({"rank": 0}, "rank"),
    ],
)
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LiteLoRA(**kwargs)


def test_bank_that_does_not_fit_is_refused_before_the_model_changes():
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = LiteLoRA(rank=2, target_modules=["0"]).with_bank(["t0"], {"0": [(torch.randn(2, 9), torch.randn(16, 2), 1.0)]})
    with pytest.raises(ValueError, match="do not fit"):
        apply_adapter(model, spec)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not litelora_layers(model)
    with pytest.raises(ValueError, match="2 entries for 1 bank adapters"):
        LiteLoRA().with_bank(["t0"], {"0": [None, None]})
    with pytest.raises(ValueError, match="rank 32 is larger"):
        apply_adapter(mlp(), LiteLoRA(rank=32, target_modules=["0"]))
