"""The continual core on a library: begin_task's bank, l0_penalty, end_task's recruit/reuse
decisions and library writes (exact: activating the task's entry computes what the trained layers
computed in eval mode), bytes, and refusals that change nothing."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_peft import LiteLoRA
from lightning_peft.adapters.base import AdapterLayer
from lightning_peft.adapters.litelora import litelora_gates, litelora_layers
from lightning_peft.continual import begin_task, end_task, l0_penalty
from lightning_peft.library import AdapterLibrary

TARGETS = ["0", "2"]


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 12), nn.GELU(), nn.Linear(12, 4))


def close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * max(1.0, float(want.detach().abs().max())))


def train_a_little(model: nn.Module, seed: int, steps: int = 3) -> None:
    """A few SGD steps on random targets (task loss + L0), so every trained tensor moves."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    model.train()
    for _ in range(steps):
        loss = (model(x) - y).square().mean() + l0_penalty(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def set_gate(model: nn.Module, log_alpha: float) -> None:
    with torch.no_grad():
        for gate in litelora_gates(model).values():
            gate.log_alpha.fill_(log_alpha)


@pytest.fixture
def library(tmp_path):
    return AdapterLibrary(tmp_path / "lib", base=mlp())


def first_task(library, spec: LiteLoRA) -> None:
    begin_task(library.model, library, spec, "t0")
    train_a_little(library.model, seed=0)
    end_task(library.model, library, "t0")


@pytest.mark.parametrize("coefficients", ["per_module", "global"])
def test_recruit_then_reuse_and_entries_compute_what_was_trained(library, coefficients):
    spec = LiteLoRA(rank=2, alpha=4.0, target_modules=TARGETS, coefficients=coefficients)
    model, x = library.model, torch.randn(5, 8)
    base_out = model(x)
    begin_task(model, library, spec, "t0")
    layer = model.get_submodule("0")
    assert layer.gate is None and layer.num_bank == 0  # the first task: nothing to reuse, always recruited
    train_a_little(model, seed=0)
    model.eval()
    want0 = model(x)
    first = end_task(model, library, "t0")
    assert first.recruited and first.adapter == "t0_adapter" and first.gate == 1.0 and first.coefficients == {}
    assert library.names == ["t0", "t0_adapter"]
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())  # the plain base again
    close(model(x), base_out)
    # bytes: r (d_in + d_out) fp32 values per module, no coefficients
    assert first.bytes == 4 * (2 * (8 + 16) + 2 * (16 + 12))
    close(library.activate("t0")(x), want0)
    library.deactivate()

    # task 1, gate forced shut: reuse; the entry is the bank mixture only
    begin_task(model, library, spec, "t1")
    layers = litelora_layers(model)
    assert {n: l.num_bank for n, l in layers.items()} == {"0": 1, "2": 1}
    train_a_little(model, seed=1)
    set_gate(model, -8.0)
    model.eval()
    with torch.no_grad():
        bank_only = model(x)  # gamma_eval = 0 at log_alpha = -8: only the bank acts
    assert all(l.eval_gate() == 0.0 for l in layers.values())
    c0 = {n: float(l.coefficients.detach()[0]) for n, l in layers.items()}
    second = end_task(model, library, "t1")
    assert not second.recruited and second.adapter is None and second.gate < spec.gate_threshold
    if coefficients == "global":
        assert c0["0"] == c0["2"] and second.coefficients == {"t0_adapter": pytest.approx(c0["0"])}
        assert second.bytes == 4
    else:
        assert second.coefficients == {"t0_adapter": {"0": pytest.approx(c0["0"]), "2": pytest.approx(c0["2"])}}
        assert second.bytes == 4 * 2
    assert library.names == ["t0", "t0_adapter", "t1"]
    close(library.activate("t1")(x), bank_only)
    library.deactivate()


def test_an_open_gate_is_folded_into_the_recruited_adapter(library):
    spec = LiteLoRA(rank=2, alpha=4.0, target_modules=TARGETS, log_alpha_init=0.4)
    first_task(library, spec)
    model, x = library.model, torch.randn(5, 8)
    begin_task(model, library, spec, "t1")
    train_a_little(model, seed=1)
    model.eval()
    gamma = model.get_submodule("0").eval_gate()
    assert 0.1 < gamma < 1.0  # a partial gate: folding it matters
    want = model(x)
    decision = end_task(model, library, "t1")
    assert decision.recruited and decision.gate_eval == pytest.approx(gamma) and decision.gate >= spec.gate_threshold
    assert decision.bytes == 4 * (2 * (8 + 16) + 2 * (16 + 12)) + 4 * 2
    assert library.names == ["t0", "t0_adapter", "t1", "t1_adapter"]
    close(library.activate("t1")(x), want)
    library.deactivate()
    # the next task's bank holds both recruited adapters, not the combinations
    begin_task(model, library, spec, "t2")
    assert model.get_submodule("2").num_bank == 2 and model.get_submodule("0").spec.bank_names == ["t0_adapter", "t1_adapter"]


def test_per_module_gates_keep_only_open_modules(library):
    spec = LiteLoRA(rank=2, target_modules=TARGETS, gate_scope="per_module")
    first_task(library, spec)
    model = library.model
    begin_task(model, library, spec, "t1")
    train_a_little(model, seed=1)
    with torch.no_grad():
        model.get_submodule("0").gate.log_alpha.fill_(5.0)
        model.get_submodule("2").gate.log_alpha.fill_(-8.0)
    decision = end_task(model, library, "t1")
    assert decision.recruited and decision.modules_recruited == ["0"] and set(decision.gates) == {"0", "2"}
    factors = library.lora_factors("t1_adapter")  # one target set for the library's combinations: "2" stored as zeros
    assert set(factors) == {"0", "2"} and torch.count_nonzero(factors["0"][1]) > 0 and torch.count_nonzero(factors["2"][1]) == 0
    library.activate("t1")  # combinable with the bank


def test_bank_modules_outside_the_targets_are_adapted_too(library):
    first_task(library, LiteLoRA(rank=2, target_modules=TARGETS))
    begin_task(library.model, library, LiteLoRA(rank=2, target_modules=["4"]), "t1")
    assert set(litelora_layers(library.model)) == {"0", "2", "4"}
    assert library.model.get_submodule("4").num_bank == 1 and library.model.get_submodule("4").bank_A.shape[0] == 0


def test_l0_penalty_is_the_weighted_open_probability(library):
    spec = LiteLoRA(rank=2, target_modules=TARGETS, gate_scope="per_module", l0_weight=0.3, log_alpha_init=0.5)
    first_task(library, spec)
    model = library.model
    begin_task(model, library, spec, "t1")
    penalty = l0_penalty(model)
    want = 0.3 * 2 / (1 + math.exp(-(0.5 - (2 / 3) * math.log(0.1 / 1.1))))
    assert float(penalty.detach()) == pytest.approx(want, rel=1e-6)
    penalty.backward()
    assert all(float(g.log_alpha.grad) > 0 for g in litelora_gates(model).values())
    end_task(model, library, "t1")
    with pytest.raises(ValueError, match="no LiteLoRA layers"):
        l0_penalty(model)


def test_first_task_penalty_is_zero_without_a_gate(library):
    begin_task(library.model, library, LiteLoRA(rank=2, target_modules=TARGETS), "t0")
    penalty = l0_penalty(library.model)
    assert float(penalty) == 0.0 and not penalty.requires_grad


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_refusals_change_nothing(library):
    spec = LiteLoRA(rank=2, target_modules=TARGETS)
    first_task(library, spec)
    model = library.model
    before, names = snapshot(model), list(library.names)
    with pytest.raises(ValueError, match="already has an entry 't0'"):
        begin_task(model, library, spec, "t0")
    with pytest.raises(ValueError, match=r"\['nope'\] are not LoRA adapter entries.*\['t0_adapter'\]"):
        begin_task(model, library, spec, "t1", bank=["nope"])
    with pytest.raises(ValueError, match="not LoRA adapter entries"):
        begin_task(model, library, spec, "t1", bank=["t0"])  # a combination is not a bank member
    with pytest.raises(TypeError, match="LiteLoRA spec"):
        begin_task(model, library, object(), "t1")
    with pytest.raises(ValueError, match="no LiteLoRA layers"):
        end_task(model, library, "t1")
    assert not litelora_layers(model) and library.names == names
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    library.activate("t0")
    with pytest.raises(ValueError, match="deactivate"):
        begin_task(model, library, spec, "t1")
    library.deactivate()
    begin_task(model, library, spec, "t1")
    with pytest.raises(ValueError, match=r"already has entries \['t0_adapter'\]"):
        end_task(model, library, "t1", adapter_name="t0_adapter")
    assert len(litelora_layers(model)) == 2 and library.names == names  # still training, nothing written
    assert end_task(model, library, "t1", adapter_name="t1_new").adapter in (None, "t1_new")


def test_a_failed_write_is_rolled_back(library, monkeypatch):
    spec = LiteLoRA(rank=2, target_modules=TARGETS)
    model = library.model
    begin_task(model, library, spec, "t0")

    def refuse(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(library, "add_combination", refuse)
    with pytest.raises(OSError, match="disk full"):
        end_task(model, library, "t0")
    assert library.names == [] and len(litelora_layers(model)) == 2  # the adapter entry was removed again; layers kept
