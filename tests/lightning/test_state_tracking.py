"""StateTrackingDataModule (seeded DFA strings) and SequenceClassifier (last-real-token head)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_peft.datamodules.state_tracking import (
    BOS,
    EOS,
    PAD,
    SYMBOL_OFFSET,
    TASKS,
    StateTrackingDataModule,
    builtin_dfa,
)
from lightning_peft.modules.sequence_classifier import SequenceClassifier

BUILTIN = [t for t in TASKS if t != "custom"]

# What each task means, written without its transition table (so a wrong table fails).
MEANING = {
    "parity": lambda s: s.count(1) % 2 == 1,
    "mod3": lambda s: s.count(0) % 3 == 0,
    "tomita5": lambda s: s.count(0) % 2 == 0 and s.count(1) % 2 == 0,
    "tomita6": lambda s: (s.count(0) - s.count(1)) % 3 == 0,
    "cycle5": lambda s: (s.count(0) - s.count(1)) % 5 == 0,
}


def _strings(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """Symbols of each row, read back from the tokens between BOS and EOS."""
    rows = []
    for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
        n = sum(mask)
        assert ids[0] == BOS and ids[n - 1] == EOS
        rows.append([t - SYMBOL_OFFSET for t in ids[1 : n - 1]])
    return rows


def _dm(**kwargs) -> StateTrackingDataModule:
    args = {"train_size": 96, "val_size": 32, "test_size": 32, "min_length": 3, "max_length": 12, "batch_size": 8, **kwargs}
    return StateTrackingDataModule(**args)


def test_same_arguments_same_tensors_and_splits_are_independent():
    a, b = _dm(seed=3), _dm(seed=3)
    for split in ("train", "val", "test"):
        ta, tb = a.split_tensors(split), b.split_tensors(split)
        assert ta.keys() == tb.keys() == {"input_ids", "attention_mask", "labels"}
        for key in ta:
            assert torch.equal(ta[key], tb[key]), (split, key)
    assert not torch.equal(a.split_tensors("train")["input_ids"], _dm(seed=4).split_tensors("train")["input_ids"])
    # more training data leaves the held-out sets as they were
    bigger = _dm(seed=3, train_size=200)
    assert torch.equal(bigger.split_tensors("test")["input_ids"], a.split_tensors("test")["input_ids"])
    assert not torch.equal(a.split_tensors("train")["input_ids"][:32], a.split_tensors("val")["input_ids"])


def test_training_order_is_seeded():
    a, b = _dm(seed=1), _dm(seed=1)
    a.setup(), b.setup()
    assert torch.equal(next(iter(a.train_dataloader()))["input_ids"], next(iter(b.train_dataloader()))["input_ids"])


@pytest.mark.parametrize("task", BUILTIN)
def test_accept_labels_match_a_brute_force_run(task):
    dm = _dm(task=task, max_length=20)
    batch = dm.split_tensors("train")
    dfa = builtin_dfa(task)
    strings = _strings(batch)
    for symbols, label in zip(strings, batch["labels"].tolist()):
        assert label == int(dfa.accepts(symbols))
        if task in MEANING:
            assert label == int(MEANING[task](symbols)), (task, symbols)
    assert batch["labels"].float().mean().item() == pytest.approx(0.5, abs=1e-6)  # balanced
    assert {len(s) for s in strings} == set(range(3, 21))  # every length occurs (variable lengths)


@pytest.mark.parametrize("task", ["parity", "cycle5", "pdfa"])
def test_state_labels_are_the_states_after_each_symbol(task):
    batch = _dm(task=task, target="state").split_tensors("val")
    dfa = builtin_dfa(task)
    for symbols, labels, mask in zip(_strings(batch), batch["labels"].tolist(), batch["attention_mask"].tolist()):
        n = len(symbols)
        assert labels[1 : n + 1] == dfa.run(symbols)
        assert all(v == -100 for v in [labels[0], *labels[n + 1 :]])  # BOS, EOS and padding
        assert sum(mask) == n + 2


def test_masks_padding_and_next_token_labels():
    dm = _dm(target="next_token", max_length=10)
    batch = dm.split_tensors("train")
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape == (96, 12)
    lengths = mask.sum(1)
    # right padding: ones then zeros, PAD exactly where the mask is 0, one EOS per row at the end
    assert torch.equal(mask, (torch.arange(12)[None] < lengths[:, None]).long())
    assert torch.equal(ids == PAD, mask == 0)
    assert torch.equal((ids == EOS).nonzero()[:, 1], lengths - 1)
    assert torch.equal(labels, torch.where(mask.bool(), ids, torch.full_like(ids, -100)))
    assert dm.vocab_size == SYMBOL_OFFSET + 2 and dm.num_classes == dm.vocab_size


def test_unbalanced_keeps_the_natural_rate_and_custom_dfa():
    # "ends with symbol 1" over {0, 1}: accepted about half the time, state = last symbol
    dm = _dm(task="custom", transitions=[[0, 1], [0, 1]], accept_states=[1], balance=False, train_size=400)
    batch = dm.split_tensors("train")
    for symbols, label in zip(_strings(batch), batch["labels"].tolist()):
        assert label == int(symbols[-1] == 1)
    assert 0.4 < batch["labels"].float().mean().item() < 0.6
    mod5 = _dm(task="cycle5", balance=False, train_size=2000).split_tensors("train")["labels"].float().mean().item()
    assert 0.12 < mod5 < 0.3  # about 1/5 accepted without balancing


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"min_length": 9, "max_length": 4}, ValueError, "min_length"),
        ({"task": "dyck"}, ValueError, "task must be one of"),
        ({"target": "label"}, ValueError, "target must be one of"),
        ({"task": "custom"}, ValueError, "needs transitions"),
        ({"task": "custom", "transitions": [[0, 1], [0]], "accept_states": [0]}, ValueError, "rectangular"),
        ({"task": "custom", "transitions": [[0, 2], [0, 1]], "accept_states": [0]}, ValueError, r"transitions\[0\]\[1\]"),
        ({"task": "custom", "transitions": [[0, 1], [0, 1]]}, ValueError, "accept_states"),
        ({"task": "parity", "transitions": [[0]]}, ValueError, "for task=.custom. only"),
        ({"train_size": 0}, ValueError, "train_size"),
        ({"balance": "yes"}, TypeError, "balance"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        _dm(**kwargs)


def test_balance_impossible_says_so():
    dm = _dm(task="custom", transitions=[[0, 0]], accept_states=[0], train_size=8)  # accepts everything
    with pytest.raises(ValueError, match="never accepts or never rejects"):
        dm.split_tensors("train")


TINY = {"model_type": "llama", "vocab_size": 6, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
TINY |= {"num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64, "pad_token_id": 0}


def test_sequence_head_reads_the_last_real_token():
    torch.manual_seed(0)
    model = SequenceClassifier(config=TINY).eval()
    batch = _dm(max_length=8).split_tensors("train")
    ids, mask = batch["input_ids"][:6], batch["attention_mask"][:6]
    logits = model(ids, mask)
    # more padding changes nothing; the hidden state at each row's EOS gives the logits
    pad = torch.zeros(6, 5, dtype=torch.long)
    assert torch.allclose(model(torch.cat([ids, pad], 1), torch.cat([mask, pad], 1)), logits, atol=1e-5)
    hidden = model.model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    last = mask.sum(1) - 1
    assert torch.allclose(model.model.score(hidden[torch.arange(6), last]), logits, atol=1e-5)


def test_token_head_and_base_checkpoint(tmp_path):
    from lightning_peft.modules.causal_lm import CausalLM

    torch.manual_seed(0)
    lm = CausalLM(config=TINY)
    path = tmp_path / "base.pt"
    torch.save(lm.model.state_dict(), path)
    model = SequenceClassifier(config=TINY, num_classes=5, head="token", base_checkpoint=str(path))
    assert torch.equal(model.model.model.layers[0].mlp.up_proj.weight, lm.model.model.layers[0].mlp.up_proj.weight)
    batch = _dm(task="cycle5", target="state").split_tensors("val")
    assert model(batch["input_ids"], batch["attention_mask"]).shape == (32, 14, 5)
    loss = model._step(batch, "val")
    assert torch.isfinite(loss)


def test_fit_a_few_steps_and_head_target_mismatch(tmp_path):
    torch.manual_seed(0)
    trainer_args = {"max_steps": 3, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    trainer_args |= {"enable_model_summary": False, "limit_val_batches": 1, "default_root_dir": tmp_path}
    model = SequenceClassifier(config=TINY, lr=1e-2)
    before = model.model.score.weight.clone()
    L.Trainer(**trainer_args).fit(model, datamodule=_dm())
    assert not torch.equal(model.model.score.weight, before)
    with pytest.raises(ValueError, match="set model head: token"):
        L.Trainer(**trainer_args).fit(SequenceClassifier(config=TINY, num_classes=5), datamodule=_dm(task="cycle5", target="state"))


@pytest.fixture
def _plain_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["lightning-peft"])  # LightningCLI warns about pytest's own argv


def test_cli_pretrain_then_hrm_parity(tmp_path, monkeypatch, capsys, _plain_argv):
    """configs/state_tracking_pretrain.yaml -> base.ckpt -> configs/hrm_parity.yaml: HRM calibrated at
    fit start from the pretrained base, trained a few steps, exported; test accuracy printed."""
    from pathlib import Path

    from lightning_peft.cli import cli_main
    from lightning_peft.hrm_calibration import hrm_layers

    configs = Path(__file__).resolve().parents[2] / "configs"
    fast = ["--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1"]
    fast += ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--data.init_args.train_size=256"]
    monkeypatch.chdir(tmp_path)
    cli_main(["fit", "--config", str(configs / "state_tracking_pretrain.yaml"), *fast, "--test_after_fit=false"])
    base = tmp_path / "runs" / "state_tracking_pretrain" / "checkpoints" / "base.ckpt"
    assert base.is_file()
    cli = cli_main(["fit", "--config", str(configs / "hrm_parity.yaml"), *fast, f"--model.init_args.base_checkpoint={base}"])
    assert cli.trainer.global_step == 2
    layers = hrm_layers(cli.model)
    assert sorted(layers) == ["model.model.layers.0.mlp", "model.model.layers.1.mlp"]
    assert all(bool(layer.calibrated) for layer in layers.values())  # balanced truncation ran at fit start
    pretrained = torch.load(base, map_location="cpu", weights_only=True)["state_dict"]
    weight = "model.model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(cli.model.state_dict()[weight], pretrained[weight])  # the frozen base is the pretrained one
    export = Path(cli.trainer.log_dir) / "adapter"
    assert (export / "adapter_config.json").is_file()
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("test_acc: ")
