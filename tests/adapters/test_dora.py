"""DoRA (``lightning_peft.adapters.dora``): math and gradients against plain-op references and
against Hugging Face peft, the efficient norm, merge/unmerge, peft-loadable export, a bitsandbytes
base (QDoRA), activation memory, and refusals."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from lightning_peft import DoRA, LoRA, QDoRA, apply_adapter, load_adapter, merge_adapter, save_adapter, unmerge_adapter
from lightning_peft.adapters.dora import DoRALinear
from lightning_peft.adapters.kernels.dora import adapted_row_norms, dora_magnitude
from lightning_peft.adapters.lora import dequantized_weight, lora_forward
from lightning_peft.io import CONFIG_NAME
from lightning_peft.memory import SavedTensorMeter
from lightning_peft.validation import InvalidArgumentError


def dense_reference(x, weight, bias, a, b, m, scale):
    """``m / ||W0 + s B A||_row (detached) * x (W0 + s B A)^T + b`` on plain ops (the paper's eq. 5)."""
    adapted = weight + scale * b @ a
    norm = adapted.norm(dim=1).detach()
    out = (m / norm) * (x @ adapted.t())
    return out if bias is None else out + bias


def make_layer(d_in=16, d_out=12, rank=4, dtype=torch.float64, bias=True, **kwargs) -> DoRALinear:
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=bias).to(dtype).requires_grad_(False)
    layer = DoRALinear(base, rank, alpha=8.0, **kwargs).to(dtype)
    with torch.no_grad():  # non-zero B and a magnitude away from ||W0|| so every gradient path is exercised
        nn.init.normal_(layer.lora_B.weight, std=0.3)
        layer.lora_magnitude_vector.mul_(torch.rand(d_out, dtype=dtype) + 0.5)
    return layer


def layer_params(layer: DoRALinear) -> list[torch.Tensor]:
    return [layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector]


def reference_of(layer: DoRALinear, x: torch.Tensor) -> torch.Tensor:
    base = layer.base_layer
    return dense_reference(x, base.weight, base.bias, *layer_params(layer)[:2], layer.lora_magnitude_vector, layer.scale)


# --------------------------------------------------------------------------------------------
# Math and gradients
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("producer", [lambda x: x, F.gelu, lambda x: F.layer_norm(x, x.shape[-1:])], ids=["leaf", "gelu", "layernorm"])
def test_forward_and_gradients_equal_the_dense_reference(producer, bias):
    layer = make_layer(bias=bias)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    params = [x, *layer_params(layer)]
    ours, ref = layer(producer(x)), reference_of(layer, producer(x))
    torch.testing.assert_close(ours, ref)
    grad = torch.randn_like(ref)
    for g_ours, g_ref in zip(torch.autograd.grad(ours, params, grad), torch.autograd.grad(ref, params, grad)):
        torch.testing.assert_close(g_ours, g_ref)


def test_gradcheck_of_the_nodes_in_float64():
    layer = make_layer()
    w = layer.base_layer.weight
    x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    a, b, m = (p.detach().clone().requires_grad_(True) for p in layer_params(layer))
    bias = layer.base_layer.bias.detach().clone().requires_grad_(True)
    inv_norm = (1.0 / (w + layer.scale * b @ a).norm(dim=1)).detach()  # the norm is a constant of backward

    def fused(x, a, b, m, bias):
        return dora_magnitude(lora_forward(F.gelu(x), w, None, a, b, layer.scale), m, inv_norm, bias)

    assert torch.autograd.gradcheck(fused, (x, a, b, m, bias))
    # the base weight trains too (LoRA's node then returns its gradient)
    w2 = w.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w2, m: dora_magnitude(lora_forward(x, w2, None, a, b, 2.0), m, inv_norm, None), (x, w2, m))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_efficient_norm_equals_the_norm_of_the_formed_weight(dtype, tol):
    torch.manual_seed(0)
    weight, a, b = torch.randn(48, 40), torch.randn(6, 40) * 0.2, torch.randn(48, 6) * 0.2
    weight, a, b = weight.to(dtype), a.to(dtype), b.to(dtype)
    sq = weight.double().square().sum(1).to(torch.float64 if dtype == torch.float64 else torch.float32)
    ours = adapted_row_norms(weight, sq, a, b, 1.5)
    dense = (weight.double() + 1.5 * b.double() @ a.double()).norm(dim=1)
    torch.testing.assert_close(ours.double(), dense, rtol=tol, atol=0)


def test_starts_equal_to_the_base_with_magnitude_the_row_norms():
    base = nn.Linear(16, 8)
    layer = DoRALinear(base, rank=4, alpha=8.0)
    torch.testing.assert_close(layer.lora_magnitude_vector.detach(), base.weight.detach().norm(dim=1))
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(layer(x), base(x))
    assert layer.lora_magnitude_vector.requires_grad


def test_cached_norms_follow_changed_factors_and_base_weight():
    layer = make_layer()
    x = torch.randn(5, 16, dtype=torch.float64)
    layer(x)
    for tensor in (layer.lora_A.weight, layer.lora_B.weight, layer.base_layer.weight):  # an optimizer step, a load
        with torch.no_grad():
            tensor.mul_(1.7)
        torch.testing.assert_close(layer(x), reference_of(layer, x))
    layer.lora_B.weight.data = layer.lora_B.weight.data * 0.5  # a new storage
    torch.testing.assert_close(layer(x), reference_of(layer, x))


def _peft_twin(layer: DoRALinear, dropout: float) -> nn.Module:
    """peft's own DoRA layer on a copy of ``layer``'s base with ``layer``'s tensors."""
    model = peft.get_peft_model(
        nn.Sequential(copy.deepcopy(layer.base_layer)),
        peft.LoraConfig(r=layer.rank, lora_alpha=layer.alpha, target_modules=["0"], use_dora=True, lora_dropout=dropout),
    )
    twin = model.base_model.model[0]
    with torch.no_grad():
        twin.lora_A["default"].weight.copy_(layer.lora_A.weight)
        twin.lora_B["default"].weight.copy_(layer.lora_B.weight)
        twin.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude_vector)
    return model


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_training_forward_and_gradients_equal_peft_dora(dropout):
    layer = make_layer(dtype=torch.float32, dropout=dropout)
    model = _peft_twin(layer, dropout).train()
    twin = model.base_model.model[0]
    x = torch.randn(6, 16, requires_grad=True)
    torch.manual_seed(3)
    ours = layer.train()(x)
    torch.manual_seed(3)  # the same dropout mask
    theirs = model(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(ours)
    mine = torch.autograd.grad(ours, [x, *layer_params(layer)], grad)
    peft_params = [twin.lora_A["default"].weight, twin.lora_B["default"].weight, twin.lora_magnitude_vector["default"].weight]
    for g_ours, g_peft in zip(mine, torch.autograd.grad(theirs, [x, *peft_params], grad)):
        torch.testing.assert_close(g_ours, g_peft, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_runs_in_bf16_and_keeps_fp32_parameter_gradients():
    layer = make_layer(d_in=32, d_out=24, dtype=torch.float32)
    x = torch.randn(8, 32)
    ref = reference_of(layer, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item())
    out.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer_params(layer))


def test_a_later_in_place_change_of_the_output_fails_loudly():
    layer = make_layer(dtype=torch.float32)
    out = layer(torch.randn(4, 16))
    F.relu(out, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


# --------------------------------------------------------------------------------------------
# Memory: what one forward keeps for backward, against LoRA (deterministic byte counts)
# --------------------------------------------------------------------------------------------
def test_saved_activations_equal_loras_when_the_next_op_saves_the_output():
    def model_with(spec):
        torch.manual_seed(0)
        model = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
        apply_adapter(model, spec)
        return model

    x = torch.randn(32, 64)
    saved = {}
    for name, spec in {"lora": LoRA(rank=8, target_modules=["1", "3"]), "dora": DoRA(rank=8, target_modules=["1", "3"])}.items():
        model = model_with(spec)
        with SavedTensorMeter(model) as meter:
            model(x).sum()
        saved[name] = meter.bytes
    # layer 1's output is the GELU's saved input: kept for free. Layer 3's output is the model's
    # output (nothing saves it): DoRA keeps it, [32, 64] fp32; plus 1 / n of each layer ([128], [64])
    assert saved["dora"] == saved["lora"] + 32 * 64 * 4 + (128 + 64) * 4


# --------------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------------
def test_merge_equals_the_adapted_output_and_unmerge_restores_bit_for_bit():
    layer = make_layer(dtype=torch.float32)
    original = layer.base_layer.weight.detach().clone()
    x = torch.randn(5, 16)
    expected = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.base_layer.weight, dense_merged(layer, original), rtol=1e-6, atol=1e-6)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, original)
    torch.testing.assert_close(layer(x), expected)
    layer.merge(keep_original=False)  # no copy kept: unmerge inverts the merge (exact up to rounding)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, original, rtol=1e-5, atol=1e-6)


def dense_merged(layer: DoRALinear, weight: torch.Tensor) -> torch.Tensor:
    adapted = weight + layer.scale * layer.lora_B.weight.detach() @ layer.lora_A.weight.detach()
    return layer.lora_magnitude_vector.detach().unsqueeze(1) * adapted / adapted.norm(dim=1, keepdim=True)


# --------------------------------------------------------------------------------------------
# Files and Hugging Face peft
# --------------------------------------------------------------------------------------------
def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=100
    )
    return config, transformers.LlamaForCausalLM(config).eval()


def randomize_trainable(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(p * (1 + 0.2 * torch.randn_like(p)) if "magnitude" in name else 0.1 * torch.randn_like(p))


def test_peft_loads_the_export_with_identical_outputs_and_it_round_trips(tmp_path):
    config, model = tiny_llama()
    base_copy = type(model)(config).eval()
    base_copy.load_state_dict(model.state_dict())
    fresh = copy.deepcopy(base_copy)
    spec = DoRA(rank=4, alpha=8, target_modules="all-linear", rank_pattern={"layers.1.mlp.down_proj": 2}, alpha_pattern={"v_proj": 4.0})
    apply_adapter(model, spec)
    assert model.model.layers[1].mlp.down_proj.rank == 2 and model.model.layers[0].self_attn.v_proj.alpha == 4.0
    randomize_trainable(model)
    ids = torch.randint(0, 100, (2, 9))
    expected = model(ids).logits
    save_adapter(model, tmp_path / "adapter")
    written = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert written["peft_type"] == "LORA" and written["use_dora"] is True and written["rank_pattern"] == {"model.layers.1.mlp.down_proj": 2}
    peft_model = peft.PeftModel.from_pretrained(base_copy, tmp_path / "adapter").eval()
    torch.testing.assert_close(peft_model(ids).logits, expected, atol=1e-5, rtol=1e-5)
    load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(fresh(ids).logits, expected)
    merge_adapter(model)
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-4, rtol=1e-4)
    unmerge_adapter(model)


def test_lora_and_dora_together_use_our_own_format(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4))
    apply_adapter(model, [LoRA(rank=2, target_modules=["0"]), DoRA(rank=2, target_modules=["2"])])
    randomize_trainable(model)
    x = torch.randn(3, 16)
    expected = model(x)
    save_adapter(model, tmp_path / "mixed")
    assert json.loads((tmp_path / "mixed" / CONFIG_NAME).read_text())["peft_type"] == "LIGHTNING_PEFT"  # peft: one use_dora for all
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4))
    load_adapter(fresh, tmp_path / "mixed")
    torch.testing.assert_close(fresh(x), expected)


# --------------------------------------------------------------------------------------------
# A bitsandbytes base
# --------------------------------------------------------------------------------------------
def test_qdora_on_a_4bit_base_matches_the_dequantized_reference_trains_merges_and_round_trips(tmp_path):
    import bitsandbytes  # noqa: F401  (a test dependency: fail loudly if missing)

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32))
    state = copy.deepcopy(dense.state_dict())
    apply_adapter(dense, QDoRA(rank=4, alpha=8, target_modules=["0", "2"], compute_dtype="float32"))
    layer = dense[0]
    assert type(layer.base_layer).__name__ == "Linear4bit" and isinstance(layer, DoRALinear)
    w0 = dequantized_weight(layer.base_layer).float()
    torch.testing.assert_close(layer.lora_magnitude_vector.detach(), w0.norm(dim=1))  # m = ||dequant(q(W0))||
    randomize_trainable(dense)
    x = torch.randn(8, 64)
    out = layer(x)
    ref = dense_reference(x, w0, layer.base_layer.bias, layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector, layer.scale)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    grads = torch.autograd.grad(out.square().sum(), layer_params(layer))
    ref_grads = torch.autograd.grad(ref.square().sum(), layer_params(layer))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-4)
    expected = dense(x)
    merge_adapter(dense)
    torch.testing.assert_close(dense(x), expected, atol=1e-4, rtol=1e-4)
    unmerge_adapter(dense)
    torch.testing.assert_close(dense(x), expected)
    save_adapter(dense, tmp_path / "qdora")
    fresh = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32))
    fresh.load_state_dict(state)
    load_adapter(fresh, tmp_path / "qdora")
    torch.testing.assert_close(fresh(x), expected)
    with torch.no_grad():  # eval without grad: a dense matmul (bitsandbytes' CPU kernel would repack the weight)
        torch.testing.assert_close(dense.eval()(x), expected)
        torch.testing.assert_close(dense(x), expected)


def test_qdora_eval_without_grad_on_widths_the_cpu_kernel_cannot_run():
    for d_in, d_out in [(64, 40), (40, 64)]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(d_in, d_out))
        apply_adapter(model, QDoRA(rank=2, target_modules=["0"], compute_dtype="float32"))
        randomize_trainable(model)
        x = torch.randn(3, d_in)
        expected = model(x)
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), expected)


def test_dora_adapts_an_already_quantized_layer():
    import bitsandbytes as bnb

    torch.manual_seed(0)
    dense = nn.Linear(64, 32)
    quantized = QDoRA(compute_dtype="float32").quantize(dense)
    assert isinstance(quantized, bnb.nn.Linear4bit)
    model = nn.Sequential(quantized)
    apply_adapter(model, DoRA(rank=2, target_modules=["0"]))
    x = torch.randn(4, 64)
    torch.testing.assert_close(model(x), quantized(x), rtol=1e-4, atol=1e-4)  # starts equal to the base


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message", [({"rank": 0}, "rank"), ({"dropout": 1.0}, "dropout"), ({"rank_pattern": {"a": 0}}, "rank_pattern")]
)
def test_bad_spec_arguments_are_refused(kwargs, message):
    with pytest.raises((InvalidArgumentError, ValueError, TypeError), match=message):
        DoRA(**kwargs)


def test_zero_weight_rows_and_too_large_ranks_are_refused_before_anything_changes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    with torch.no_grad():
        model[1].weight[3].zero_()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"'1'.*rows are all zero.*exclude_modules"):
        apply_adapter(model, DoRA(rank=2, target_modules=["0", "1"]))
    with pytest.raises(ValueError, match="rank 9 is larger"):
        apply_adapter(model, DoRA(rank=9, target_modules=["0"]))
    assert isinstance(model[0], nn.Linear) and isinstance(model[1], nn.Linear)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    apply_adapter(model, DoRA(rank=2, target_modules=r"\d", exclude_modules=["1"]))  # the fix the message names
    assert isinstance(model[0], DoRALinear) and isinstance(model[1], nn.Linear)


def test_the_spec_round_trips_through_its_config_and_the_registry():
    from lightning_peft.adapters.registry import adapter_class, spec_from_config

    spec = DoRA(rank=4, alpha=8.0, target_modules=["q"], rank_pattern={"k": 2})
    assert spec_from_config(spec.to_config()) == spec
    assert adapter_class("dora") is DoRA and adapter_class("QDoRA") is QDoRA and adapter_class("lightning_peft.DoRA") is DoRA


def test_attention_out_proj_is_refused_naming_the_fix():
    # nn.MultiheadAttention reads out_proj.weight itself: a DoRA layer there would be a silent no-op
    model = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    with pytest.raises(ValueError, match=r"self_attn\.out_proj.*exclude_modules=\['self_attn\.out_proj'\].*not changed"):
        apply_adapter(model, DoRA(rank=2, target_modules="all-linear"))
    assert type(model.self_attn.out_proj).__name__ == "NonDynamicallyQuantizableLinear"
    apply_adapter(model, DoRA(rank=2, target_modules="all-linear", exclude_modules=["self_attn.out_proj"]))
    assert isinstance(model.linear1, DoRALinear)
