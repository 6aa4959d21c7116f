"""Adapter files: round trips, Hugging Face peft interop, refusals, atomic writes, merging."""

import json

import peft
import pytest
import torch
import transformers
from safetensors import safe_open
from torch import nn

from lightning_peft import BitFit, LoRA, QLoRA, apply_adapter, load_adapter, merge_adapter, save_adapter, unmerge_adapter
from lightning_peft.io import CONFIG_NAME, EXTRA_NAME, WEIGHTS_NAME, state_mismatch


def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100, num_labels=3
    )
    return config, transformers.BertForSequenceClassification(config).eval()


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=100
    )
    return config, transformers.LlamaForCausalLM(config).eval()


def tiny_t5():
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2)
    return config, transformers.T5ForConditionalGeneration(config).eval()


def clone(model_fn):
    config, model = model_fn()
    copy = type(model)(config).eval()
    copy.load_state_dict(model.state_dict())
    return model, copy


def randomize_trainable(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)


@pytest.mark.parametrize("model_fn, targets, extra", [(tiny_bert, ["query", "value"], ["classifier"]), (tiny_llama, "all-linear", [])])
def test_peft_loads_our_export_with_identical_outputs(tmp_path, model_fn, targets, extra):
    model, base_copy = clone(model_fn)
    apply_adapter(
        model,
        LoRA(rank=4, alpha=8, target_modules=targets, rank_pattern={"layers.1.mlp.down_proj": 2, "layer.1.attention.self.value": 2}),
        trainable_modules=extra,
    )
    randomize_trainable(model)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    ids = torch.randint(0, 100, (2, 9))
    peft_model = peft.PeftModel.from_pretrained(base_copy, tmp_path / "adapter").eval()
    torch.testing.assert_close(peft_model(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_t5_all_linear_adapts_wo_whose_parent_reads_its_weight_and_peft_loads_it(tmp_path):
    from lightning_peft.adapters.lora import LoRAEffectiveWeightLinear

    model, base_copy = clone(tiny_t5)
    apply_adapter(model, LoRA(rank=4, alpha=8, target_modules="all-linear"))
    # T5DenseActDense reads self.wo.weight (its dtype) besides calling wo: it is served W0 + s B A
    wo = model.encoder.block[0].layer[1].DenseReluDense.wo
    assert isinstance(wo, LoRAEffectiveWeightLinear) and wo.weight.dtype == wo.base_layer.weight.dtype
    randomize_trainable(model)
    ids, decoder_ids = torch.randint(0, 100, (2, 7)), torch.randint(0, 100, (2, 5))
    ours = model(input_ids=ids, decoder_input_ids=decoder_ids).logits
    save_adapter(model, tmp_path / "a")
    peft_model = peft.PeftModel.from_pretrained(base_copy, tmp_path / "a").eval()
    torch.testing.assert_close(peft_model(input_ids=ids, decoder_input_ids=decoder_ids).logits, ours, atol=1e-5, rtol=1e-5)
    _, fresh = tiny_t5()
    load_adapter(fresh, tmp_path / "a")
    assert isinstance(fresh.encoder.block[0].layer[1].DenseReluDense.wo, LoRAEffectiveWeightLinear)
    torch.testing.assert_close(fresh.eval()(input_ids=ids, decoder_input_ids=decoder_ids).logits, ours, atol=1e-5, rtol=1e-5)
    model.train()
    model(input_ids=ids, decoder_input_ids=decoder_ids, labels=decoder_ids).loss.backward()
    assert wo.lora_A.weight.grad.abs().sum() > 0 and wo.lora_B.weight.grad.abs().sum() > 0


def test_round_trip_into_fresh_model_and_into_already_adapted_model(tmp_path):
    model, fresh = clone(tiny_bert)
    spec = LoRA(rank=4, target_modules=["query", "value"], dropout=0.1, use_rslora=True)
    apply_adapter(model, spec, trainable_modules=["classifier"])
    randomize_trainable(model)
    save_adapter(model, tmp_path / "a")
    ids = torch.randint(0, 100, (2, 7))
    load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits)
    assert fresh.bert.encoder.layer[0].attention.self.query.use_rslora
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {n for n, p in model.named_parameters() if p.requires_grad}
    _, again = clone(tiny_bert)
    apply_adapter(again, LoRA(rank=4, target_modules=["query", "value"], dropout=0.1, use_rslora=True), trainable_modules=["classifier"])
    load_adapter(again, tmp_path / "a")
    torch.testing.assert_close(again(ids).logits, model(ids).logits)


def test_refuses_other_base_and_other_shapes_without_changing_the_model(tmp_path):
    model, _ = clone(tiny_bert)
    apply_adapter(model, LoRA(rank=4, target_modules=["query"]))
    save_adapter(model, tmp_path / "a")
    torch.manual_seed(5)
    other = transformers.BertForSequenceClassification(model.config)  # same shapes, other weights
    with pytest.raises(ValueError, match="base weights differ.*Load it into the base"):
        load_adapter(other, tmp_path / "a")
    assert not any(p.requires_grad is False for p in other.parameters())  # untouched: nothing frozen or injected
    load_adapter(other, tmp_path / "a", strict_base=False)  # on purpose: allowed
    wide = transformers.BertForSequenceClassification(
        transformers.BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    )
    with pytest.raises(ValueError, match=r"shape \[out=48, in=48\] != saved \[32, 32\]"):
        load_adapter(wide, tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="adapter export directory"):
        load_adapter(other, tmp_path / "missing")


def test_export_next_to_a_transformers_model_puts_outside_tensors_aside(tmp_path):
    class Classifier(nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder
            self.classifier = nn.Linear(32, 5)

        def forward(self, ids):
            return self.classifier(self.encoder(ids).last_hidden_state.mean(1))

    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    encoder = transformers.BertModel(config).eval()
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    model = Classifier(encoder)
    apply_adapter(model, LoRA(rank=2, target_modules=["query", "value"]), trainable_modules=["classifier"])
    randomize_trainable(model)
    save_adapter(model, tmp_path / "a")
    with safe_open(str(tmp_path / "a" / WEIGHTS_NAME), "pt") as f:
        assert all(k.startswith("base_model.model.encoder.layer.0.attention.self.") for k in f.keys())  # relative to the HF model
    assert (tmp_path / "a" / EXTRA_NAME).is_file()
    # peft loads the encoder part; our loader restores everything
    bare = transformers.BertModel(config).eval()
    bare.load_state_dict(state)
    ids = torch.randint(0, 100, (2, 6))
    peft_model = peft.PeftModel.from_pretrained(bare, tmp_path / "a").eval()
    torch.testing.assert_close(peft_model(ids).last_hidden_state, model.encoder(ids).last_hidden_state)
    fresh_encoder = transformers.BertModel(config).eval()
    fresh_encoder.load_state_dict(state)
    fresh = Classifier(fresh_encoder)
    load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(fresh(ids), model(ids))


def test_bitfit_export_uses_our_format_and_round_trips(tmp_path):
    model, fresh = clone(tiny_bert)
    apply_adapter(model, BitFit())
    randomize_trainable(model)
    save_adapter(model, tmp_path / "b")
    assert json.loads((tmp_path / "b" / CONFIG_NAME).read_text())["peft_type"] == "LIGHTNING_PEFT"
    load_adapter(fresh, tmp_path / "b")
    ids = torch.randint(0, 100, (2, 5))
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits)


def test_save_is_atomic(tmp_path, monkeypatch):
    model, _ = clone(tiny_bert)
    apply_adapter(model, LoRA(rank=2, target_modules=["query"]))
    save_adapter(model, tmp_path / "a")
    before = (tmp_path / "a" / WEIGHTS_NAME).read_bytes()
    randomize_trainable(model)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lightning_peft.io.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path / "a")
    assert (tmp_path / "a" / WEIGHTS_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary directory left


def test_merge_unmerge_whole_model_and_refuse_saving_merged(tmp_path):
    model, _ = clone(tiny_llama)
    apply_adapter(model, LoRA(rank=4, target_modules="all-linear"))
    randomize_trainable(model)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    ids = torch.randint(0, 100, (2, 8))
    expected = model(ids).logits
    assert merge_adapter(model) == 14
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="unmerge_adapter"):
        save_adapter(model, tmp_path / "m")
    unmerge_adapter(model)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if "base_layer" in n)


def test_qlora_trains_merges_and_round_trips(tmp_path):
    import bitsandbytes  # noqa: F401  (a test dependency: fail loudly if missing)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8))
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    report = apply_adapter(model, QLoRA(rank=4, target_modules=["0"], compute_dtype="float32"), trainable_modules=["2"])
    assert type(model[0].base_layer).__name__ == "Linear4bit"
    assert report.total == sum(v.numel() for v in dense.values()) + 4 * (64 + 64)
    x = torch.randn(16, 64)
    model(x).square().mean().backward()
    assert model[0].lora_B.weight.grad is not None and model[0].lora_B.weight.grad.abs().sum() > 0
    randomize_trainable(model)
    expected = model(x)
    merge_adapter(model)
    torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-4)
    unmerge_adapter(model)
    save_adapter(model, tmp_path / "q")
    fresh = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8))
    fresh.load_state_dict(dense)
    load_adapter(fresh, tmp_path / "q")
    torch.testing.assert_close(fresh(x), expected)
    for quant_type in ("fp4", "int8"):
        other = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8))
        apply_adapter(other, QLoRA(rank=4, target_modules=["0"], quant_type=quant_type, compute_dtype="float32"))
        out = other(x)
        assert out.shape == (16, 8) and torch.isfinite(out).all()


def test_qlora_eval_without_grad_on_widths_the_cpu_kernel_cannot_run():
    import bitsandbytes  # noqa: F401  (a test dependency: fail loudly if missing)

    for d_in, d_out in [(64, 40), (40, 64), (96, 32)]:
        model = nn.Sequential(nn.Linear(d_in, d_out))
        apply_adapter(model, QLoRA(rank=2, target_modules=["0"], compute_dtype="float32"))
        assert model[0].dequantize_without_grad
        x = torch.randn(3, d_in)
        expected = model(x)
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected)


def test_state_mismatch_names_missing_unexpected_and_shape():
    current = {"a": torch.zeros(2, 3), "b": torch.zeros(4), "c": torch.zeros(1)}
    assert state_mismatch(current, dict(current)) == ""
    saved = {"a": torch.zeros(3, 2), "b": torch.zeros(4), "z": torch.zeros(1)}
    assert state_mismatch(current, saved) == "missing ['c']; unexpected ['z']; shape ['a: saved (3, 2) != model (2, 3)']"
    assert state_mismatch(current, saved, required=["b"]) == "unexpected ['z']; shape ['a: saved (3, 2) != model (2, 3)']"


def test_save_on_a_full_disk_names_the_path_and_keeps_the_previous_export(tmp_path, monkeypatch):
    import errno

    model, _ = clone(tiny_bert)
    apply_adapter(model, LoRA(rank=2, target_modules=["query"]))
    save_adapter(model, tmp_path / "a")
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    randomize_trainable(model)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("lightning_peft.io.save_file", full)
    with pytest.raises(OSError, match="the disk is full") as error:
        save_adapter(model, tmp_path / "a")
    assert error.value.errno == errno.ENOSPC and str(tmp_path / "a") in str(error.value)
    assert "previous export there is unchanged" in str(error.value)
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_atomic_write_file_on_a_full_disk_names_the_path(tmp_path):
    import errno

    from lightning_peft.io import atomic_write_file

    target = tmp_path / "last.ckpt"
    target.write_bytes(b"previous")

    def full(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=r"could not write .*last\.ckpt.*the disk is full.*previous file there is unchanged"):
        atomic_write_file(target, full)
    assert target.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_checkpoint_save_on_a_full_disk_names_the_path(tmp_path, monkeypatch):
    """torch.save reports a full disk as a RuntimeError raised while handling the OSError."""
    import errno

    from lightning_peft.callbacks.adapter import AtomicCheckpointIO

    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, target)
    previous = target.read_bytes()

    class FullDisk:
        def __reduce__(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    def torch_like_save(obj, f):
        try:
            pickle_bytes = __import__("pickle").dumps(obj)  # the OSError, as a failed write raises it
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")  # noqa: B904
        f.write(pickle_bytes)

    monkeypatch.setattr("torch.save", torch_like_save)
    with pytest.raises(OSError, match=r"could not write .*last\.ckpt.*the disk is full") as error:
        AtomicCheckpointIO().save_checkpoint({"step": 2, "x": FullDisk()}, target)
    assert error.value.errno == errno.ENOSPC
    assert target.read_bytes() == previous and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_bitfit_export_records_its_frozen_base_and_refuses_another(tmp_path):
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    fresh, other = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        other[2].weight.add_(0.5)  # another base: a frozen weight differs, the trained biases do not matter
    apply_adapter(model, BitFit())
    randomize_trainable(model)
    save_adapter(model, tmp_path / "bitfit")
    meta = json.loads(safe_open(str(tmp_path / "bitfit" / WEIGHTS_NAME), "pt").metadata()["lightning_peft"])
    assert meta["targets"] and all("fingerprint" in e for e in meta["targets"].values())
    x = torch.randn(4, 6)
    torch.testing.assert_close(load_adapter(fresh, tmp_path / "bitfit")(x), model(x), rtol=1e-6, atol=1e-6)
    state = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"'2': frozen base weights differ.*strict_base=False"):
        load_adapter(other, tmp_path / "bitfit")
    assert all(torch.equal(v, state[k]) for k, v in other.state_dict().items())  # refused before any change
    load_adapter(other, tmp_path / "bitfit", strict_base=False)  # changed on purpose: the biases load
    assert torch.equal(other[2].bias, model[2].bias)
