"""QLoRA (``lightning_peft.adapters.quantized``): LoRA over a bitsandbytes-quantized frozen base
(4-bit NF4/FP4 and 8-bit LLM.int8), on the CPU."""

from __future__ import annotations

import copy
from pathlib import Path

import bitsandbytes  # noqa: F401  (a test dependency: fail loudly if missing)
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft import QLoRA, apply_adapter, load_adapter, save_adapter
from lightning_peft.adapters.lora import LoRALinear, dequantized_weight
from lightning_peft.io import merge_adapter, unmerge_adapter
from lightning_peft.validation import InvalidArgumentError

QUANT_TYPES = ["nf4", "fp4", "int8"]
PACKED = {"nf4": ("Linear4bit", "Params4bit", torch.uint8), "fp4": ("Linear4bit", "Params4bit", torch.uint8)}
PACKED["int8"] = ("Linear8bitLt", "Int8Params", torch.int8)
# relative Frobenius error of the dequantized weight: 4-bit rounds to 16 levels per block, 8-bit to 255
# levels per row; a wrong scale (e.g. a factor 2 or a missing absmax) would give an error of order 1
WEIGHT_RTOL = {"nf4": 0.2, "fp4": 0.25, "int8": 0.02}
# the same for a two-layer model's output (measured: nf4 0.14, fp4 0.16, int8 0.005; a factor-2 weight scale gives ~1)
OUTPUT_RTOL = {"nf4": 0.3, "fp4": 0.3, "int8": 0.02}


def _dense(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    # widths the CPU 4-bit kernel handles (in % 64 == 0, out % 32 == 0)
    return nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32))


def _inputs(seed: int = 1, n: int = 8, d: int = 64) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _qlora(quant_type: str, **kwargs) -> QLoRA:
    return QLoRA(rank=4, alpha=8, target_modules=["0", "2"], quant_type=quant_type, compute_dtype="float32", **kwargs)


def _adapted(quant_type: str, seed: int = 0) -> tuple[nn.Sequential, nn.Sequential]:
    dense = _dense(seed)
    model = copy.deepcopy(dense)
    apply_adapter(model, _qlora(quant_type))
    return dense, model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


# --------------------------------------------------------------------------------------------
# Spec validation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["int4", "NF4", "", 4, None])
def test_bad_quant_type_is_refused(bad):
    with pytest.raises((InvalidArgumentError, TypeError), match="quant_type"):
        QLoRA(quant_type=bad)


@pytest.mark.parametrize("bad", ["float64", "fp16", "int8", torch.float16, None])
def test_bad_compute_dtype_is_refused(bad):
    with pytest.raises((InvalidArgumentError, TypeError), match="compute_dtype"):
        QLoRA(compute_dtype=bad)


def test_bad_double_quant_and_quant_storage_are_refused():
    with pytest.raises((InvalidArgumentError, TypeError), match="double_quant"):
        QLoRA(double_quant="yes")
    with pytest.raises((InvalidArgumentError, TypeError), match="quant_storage"):
        QLoRA(quant_storage="int8")


def test_valid_spec_keeps_its_settings():
    spec = QLoRA(quant_type="fp4", compute_dtype="float16", double_quant=False, quant_storage="bfloat16")
    assert (spec.quant_type, spec.compute_dtype, spec.double_quant, spec.quant_storage) == ("fp4", "float16", False, "bfloat16")
    assert spec.kind == "qlora"


def test_already_quantized_layer_is_refused():
    _, model = _adapted("nf4")
    spec = _qlora("nf4")
    quantized = model[0].base_layer
    assert isinstance(quantized, nn.Linear) and not spec.supports(quantized)
    with pytest.raises(TypeError, match="already quantized"):
        spec.check("0", quantized)
    with pytest.raises(TypeError, match="only plain nn.Linear"):
        spec.check("1", nn.GELU())


# --------------------------------------------------------------------------------------------
# Injection and the quantized base
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_apply_replaces_linears_by_lora_over_a_quantized_base(quant_type):
    dense, model = _adapted(quant_type)
    layer_cls, param_cls, dtype = PACKED[quant_type]
    for i in (0, 2):
        layer = model[i]
        assert isinstance(layer, LoRALinear)
        assert type(layer.base_layer).__name__ == layer_cls
        assert type(layer.base_layer.weight).__name__ == param_cls and layer.base_layer.weight.dtype == dtype
        assert layer.lora_A.weight.shape == (4, dense[i].in_features) and layer.lora_B.weight.shape == (dense[i].out_features, 4)
        assert layer.lora_A.weight.dtype == torch.float32 and torch.count_nonzero(layer.lora_B.weight) == 0
        assert layer.scale == pytest.approx(2.0)
        # dense bias copied exactly, dequantized weight close to the dense one (scale-aware)
        assert torch.equal(layer.base_layer.bias, dense[i].bias)
        assert _rel(dequantized_weight(layer.base_layer).float(), dense[i].weight) < WEIGHT_RTOL[quant_type]
    assert isinstance(model[1], nn.GELU)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {f"{i}.lora_{f}.weight" for i in (0, 2) for f in "AB"}
    # the original dense model is left untouched (quantize copies)
    assert all(type(m) is not LoRALinear for m in dense.modules())
    assert dense[0].weight.dtype == torch.float32 and type(dense[0].weight) is nn.Parameter


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_quant_type_and_double_quant_reach_bitsandbytes(quant_type):
    dense = _dense()
    single = copy.deepcopy(dense)
    apply_adapter(single, _qlora(quant_type, double_quant=False))
    double = copy.deepcopy(dense)
    apply_adapter(double, _qlora(quant_type, double_quant=True))
    assert single[0].base_layer.weight.quant_state.quant_type == quant_type
    assert not single[0].base_layer.weight.quant_state.nested and double[0].base_layer.weight.quant_state.nested
    # nested statistics change the stored scales only slightly
    w_single, w_double = dequantized_weight(single[0].base_layer), dequantized_weight(double[0].base_layer)
    assert _rel(w_double, w_single) < 0.05


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_output_at_start_equals_the_quantized_base(quant_type):
    dense, model = _adapted(quant_type)
    x = _inputs()
    with torch.no_grad():
        hidden = model[0].base_layer(x)
        expected = model[2].base_layer(F.gelu(hidden))
        out = model(x)
    assert torch.equal(model[0](x), hidden)  # B = 0: the update adds exactly nothing
    assert torch.equal(out, expected)
    # and close to the dense model: loose enough for 4-bit rounding, an order below a wrong scale
    with torch.no_grad():
        reference = dense(x)
    assert _rel(out, reference) < OUTPUT_RTOL[quant_type]
    # the base matmul is the dequantized weight's (1e-5 relative: float32 accumulation order)
    w = dequantized_weight(model[0].base_layer).float()
    torch.testing.assert_close(hidden, F.linear(x, w, model[0].base_layer.bias), rtol=1e-4, atol=1e-5 * float(hidden.abs().max()))


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_optimizer_step_moves_lora_factors_and_keeps_packed_weights(quant_type):
    _, model = _adapted(quant_type)
    packed = {i: model[i].base_layer.weight.data.clone() for i in (0, 2)}
    biases = {i: model[i].base_layer.bias.detach().clone() for i in (0, 2)}
    stats = {i: getattr(model[i].base_layer.weight, "quant_state", None) for i in (0, 2)}
    absmax = {i: s.absmax.clone() for i, s in stats.items() if s is not None}
    factors = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = _inputs()
    for _ in range(2):
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        for i in (0, 2):
            assert model[i].base_layer.weight.grad is None and model[i].base_layer.bias.grad is None
        optimizer.step()
    for i in (0, 2):
        assert torch.equal(model[i].base_layer.weight.data, packed[i])
        assert torch.equal(model[i].base_layer.bias, biases[i])
        if i in absmax:
            assert torch.equal(stats[i].absmax, absmax[i])
    for name, before in factors.items():
        assert not torch.equal(model.get_parameter(name), before), name


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_trained_output_is_quantized_base_plus_scaled_update(quant_type):
    _, model = _adapted(quant_type)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for i in (0, 2):
            model[i].lora_B.weight.copy_(0.1 * torch.randn(model[i].lora_B.weight.shape, generator=gen))
    x = _inputs()
    layer = model[0]
    with torch.no_grad():
        out = layer(x)
        expected = layer.base_layer(x) + layer.scale * (x @ layer.lora_A.weight.t() @ layer.lora_B.weight.t())
    assert not torch.equal(out, layer.base_layer(x))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_odd_widths_run_a_dequantized_matmul_without_grad():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(48, 24))  # not a width the CPU 4-bit kernel handles
    model = copy.deepcopy(dense)
    apply_adapter(model, QLoRA(rank=2, alpha=2, target_modules=["0"], compute_dtype="float32"))
    assert model[0].dequantize_without_grad
    x = _inputs(d=48)
    with torch.no_grad():
        no_grad = model(x)
    with_grad = model(x)
    torch.testing.assert_close(no_grad, with_grad.detach(), rtol=1e-5, atol=1e-5 * float(no_grad.abs().max()))
    assert _rel(no_grad, dense(x).detach()) < OUTPUT_RTOL["nf4"]
    # an 8-bit base never needs it
    int8 = copy.deepcopy(dense)
    apply_adapter(int8, QLoRA(rank=2, alpha=2, target_modules=["0"], quant_type="int8", compute_dtype="float32"))
    assert not int8[0].dequantize_without_grad


# --------------------------------------------------------------------------------------------
# Merge and save/load
# --------------------------------------------------------------------------------------------
def _trained(quant_type: str) -> tuple[nn.Sequential, nn.Sequential]:
    dense, model = _adapted(quant_type)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for i in (0, 2):
            model[i].lora_B.weight.copy_(0.1 * torch.randn(model[i].lora_B.weight.shape, generator=gen))
    return dense, model


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_merge_into_dense_copy_matches_unmerged_and_keeps_quantized_weights(quant_type):
    _, model = _trained(quant_type)
    x = _inputs()
    packed = {i: model[i].base_layer.weight.data.clone() for i in (0, 2)}
    with torch.no_grad():
        unmerged = model(x)
        assert merge_adapter(model) == 2
        merged = model(x)
    for i in (0, 2):
        layer = model[i]
        assert layer.merged and type(layer._merged_module) is nn.Linear
        assert torch.equal(layer.base_layer.weight.data, packed[i])  # the quantized weights are untouched
        expected = (dequantized_weight(layer.base_layer).float() + layer.delta_weight()).detach()
        torch.testing.assert_close(layer._merged_module.weight, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5 * float(unmerged.abs().max()))
    with torch.no_grad():
        unmerge_adapter(model)
        again = model(x)
    assert not model[0].merged and model[0]._merged_module is None
    assert torch.equal(again, unmerged)
    for i in (0, 2):
        assert torch.equal(model[i].base_layer.weight.data, packed[i])


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_save_and_load_onto_the_dense_base_round_trips_lora(quant_type, tmp_path: Path):
    dense, model = _trained(quant_type)
    save_adapter(model, tmp_path / "adapter")
    fresh = copy.deepcopy(dense)
    load_adapter(fresh, tmp_path / "adapter")
    layer_cls, param_cls, _ = PACKED[quant_type]
    for i in (0, 2):
        assert isinstance(fresh[i], LoRALinear)
        assert type(fresh[i].base_layer).__name__ == layer_cls and type(fresh[i].base_layer.weight).__name__ == param_cls
        for factor in ("lora_A", "lora_B"):
            saved = getattr(model[i], factor).weight
            loaded = getattr(fresh[i], factor).weight
            assert loaded.dtype == saved.dtype and torch.equal(loaded, saved), (i, factor)
        # quantizing the same dense weights again gives the same packed weights
        assert torch.equal(fresh[i].base_layer.weight.data, model[i].base_layer.weight.data)
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_load_refuses_a_different_dense_base(tmp_path: Path):
    _, model = _trained("nf4")
    save_adapter(model, tmp_path / "adapter")
    other = _dense(seed=7)
    with pytest.raises(ValueError, match="fingerprint|base"):
        load_adapter(other, tmp_path / "adapter")
    assert all(type(m) is not LoRALinear for m in other.modules())  # left exactly as it was
