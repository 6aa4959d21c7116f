"""LightningModules: forward/backward shapes, optimizers, base checkpoints, fast_dev_run fits."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from lightning_peft.datamodules import BBCLanguageModelingDataModule, BBCNewsDataModule, DigitsDataModule
from lightning_peft.modules import CausalLM, ImageClassifier, TextClassifier, configure_adamw

VIT_KWARGS = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "in_chans": 1}
TINY_BERT = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}
TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 258,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}


def _trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        fast_dev_run=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


# --------------------------------------------------------------------------------------------
# ImageClassifier
# --------------------------------------------------------------------------------------------
def test_image_forward_backward_shapes():
    torch.manual_seed(0)
    model = ImageClassifier(num_classes=7, model_kwargs=VIT_KWARGS)
    x = torch.randn(3, 1, 16, 16)
    logits = model(x)
    assert logits.shape == (3, 7)
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 6]))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert hasattr(model, "model") and model.model.head.out_features == 7


def test_image_fast_dev_run(tmp_path):
    model = ImageClassifier(num_classes=10, model_kwargs=VIT_KWARGS)
    trainer = _trainer(tmp_path)
    trainer.fit(model, DigitsDataModule(batch_size=16))
    assert {"train_loss", "train_acc", "val_loss", "val_acc"} <= set(trainer.callback_metrics)
    trainer.test(model, datamodule=DigitsDataModule(batch_size=16), verbose=False)
    assert "test_acc" in trainer.callback_metrics


def test_image_learns_digits(tmp_path):
    """A few epochs of plain training beat chance by far (real data, real learning)."""
    L.seed_everything(0)
    model = ImageClassifier(num_classes=5, model_kwargs=VIT_KWARGS, lr=3e-3)
    dm = DigitsDataModule(classes=[0, 1, 2, 3, 4], batch_size=32)
    trainer = _trainer(tmp_path, fast_dev_run=False, max_epochs=4, enable_checkpointing=False)
    trainer.fit(model, dm)
    result = trainer.test(model, datamodule=dm, verbose=False)[0]
    assert result["test_acc"] > 0.6


@pytest.mark.parametrize("kind", ["state_dict", "lightning_ckpt", "safetensors"])
def test_image_base_checkpoint_skips_head(tmp_path, kind, capsys):
    torch.manual_seed(0)
    base = ImageClassifier(num_classes=5, model_kwargs=VIT_KWARGS)
    if kind == "state_dict":
        path = tmp_path / "base.pt"
        torch.save(base.model.state_dict(), path)
    elif kind == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "base.safetensors"
        save_file({k: v.contiguous() for k, v in base.model.state_dict().items()}, str(path))
    else:
        path = tmp_path / "base.ckpt"
        trainer = _trainer(tmp_path, fast_dev_run=False, max_steps=1, limit_val_batches=0, enable_checkpointing=False)
        trainer.fit(base, DigitsDataModule(classes=[0, 1, 2, 3, 4], batch_size=8))
        trainer.save_checkpoint(path)
    adapted = ImageClassifier(num_classes=3, model_kwargs=VIT_KWARGS, base_checkpoint=str(path))
    for name, tensor in base.model.state_dict().items():
        if name.startswith("head."):
            assert adapted.model.state_dict()[name].shape != tensor.shape
        else:
            assert torch.equal(adapted.model.state_dict()[name], tensor), name


def test_image_base_checkpoint_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ImageClassifier(model_kwargs=VIT_KWARGS, base_checkpoint=str(tmp_path / "missing.pt"))
    torch.save({"something.else": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="shares no tensor"):
        ImageClassifier(model_kwargs=VIT_KWARGS, base_checkpoint=str(tmp_path / "other.pt"))


def test_image_bad_arguments():
    with pytest.raises(ValueError, match="no model named"):
        ImageClassifier(model_name="not_a_model")
    with pytest.raises(ValueError, match="pretrained"):
        ImageClassifier(model_kwargs={"pretrained": True})
    with pytest.raises(ValueError, match="lr"):
        ImageClassifier(model_kwargs=VIT_KWARGS, lr=0.0)


def test_image_head_smaller_than_data_fails(tmp_path):
    model = ImageClassifier(num_classes=3, model_kwargs=VIT_KWARGS)
    with pytest.raises(ValueError, match="num_classes: 10"):
        _trainer(tmp_path).fit(model, DigitsDataModule())


# --------------------------------------------------------------------------------------------
# TextClassifier
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_text_forward_backward_shapes(pooling):
    torch.manual_seed(0)
    model = TextClassifier(config=TINY_BERT, num_classes=4, pooling=pooling)
    ids = torch.randint(0, 1000, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    logits = model(ids, mask)
    assert logits.shape == (3, 4)
    logits.sum().backward()
    assert model.classifier.weight.grad is not None
    assert model.encoder.pooler is None  # unused by our pooling; dropped
    assert all(p.grad is not None for p in model.parameters())


def test_text_mean_pooling_ignores_padding():
    torch.manual_seed(0)
    model = TextClassifier(config=TINY_BERT, num_classes=2).eval()
    ids = torch.randint(1000, 2000, (1, 6))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 4)], dim=1).long()
    ref = model(ids)  # padding changes the attention sums' order: tolerance scaled to the logits
    torch.testing.assert_close(model(padded, mask), ref, atol=1e-5 * max(1.0, float(ref.abs().max())), rtol=1e-5)


def test_text_encoder_dropout_override():
    model = TextClassifier(config=TINY_BERT, encoder_dropout=0.0)
    probs = {m.p for m in model.encoder.modules() if isinstance(m, torch.nn.Dropout)}
    assert probs == {0.0}
    # with no dropout left, train mode is deterministic
    ids = torch.randint(1000, 2000, (2, 8), generator=torch.Generator().manual_seed(0))
    model.train()
    torch.testing.assert_close(model(ids), model(ids))
    default = TextClassifier(config=TINY_BERT)
    assert {m.p for m in default.encoder.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}


def test_text_pretrained_default_is_minilm():
    model = TextClassifier(num_classes=5)
    assert model.encoder.config.hidden_size == 384
    assert model.classifier.in_features == 384
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert {"query", "value"} <= names


def test_text_fast_dev_run(tmp_path):
    model = TextClassifier(config=TINY_BERT, num_classes=5)
    dm = BBCNewsDataModule(max_per_class=10, batch_size=4, max_length=32)
    trainer = _trainer(tmp_path)
    trainer.fit(model, dm)
    assert {"train_loss", "train_acc", "val_loss", "val_acc"} <= set(trainer.callback_metrics)
    trainer.test(model, datamodule=dm, verbose=False)
    assert "test_acc" in trainer.callback_metrics


def test_text_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        TextClassifier(model_path="x", config=TINY_BERT)
    with pytest.raises(ValueError, match="model_type"):
        TextClassifier(config={"hidden_size": 32})
    with pytest.raises(ValueError, match="does not exist"):
        TextClassifier(model_path=str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="encoder_dropout"):
        TextClassifier(config=TINY_BERT, encoder_dropout=1.5)


# --------------------------------------------------------------------------------------------
# CausalLM
# --------------------------------------------------------------------------------------------
def test_causal_lm_default_config_matches_byte_vocab():
    model = CausalLM()
    assert model.vocab_size == 258 == BBCLanguageModelingDataModule().vocab_size
    assert model.model.config.hidden_size == 128
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert {"q_proj", "v_proj", "gate_proj", "up_proj", "down_proj", "lm_head"} <= names


def test_causal_lm_forward_backward_shapes():
    torch.manual_seed(0)
    model = CausalLM(config=TINY_LLAMA)
    ids = torch.randint(0, 258, (2, 12))
    out = model(ids, torch.ones_like(ids), ids)
    assert out.logits.shape == (2, 12, 258)
    # an untrained model is near-uniform: loss ~ log(vocab)
    assert abs(out.loss.item() - math.log(258)) < 0.5
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_causal_lm_fast_dev_run(tmp_path):
    model = CausalLM(config=TINY_LLAMA)
    dm = BBCLanguageModelingDataModule(seq_len=32, batch_size=4, max_articles=20)
    trainer = _trainer(tmp_path)
    trainer.fit(model, dm)
    metrics = trainer.callback_metrics
    assert {"train_loss", "train_ppl", "val_loss", "val_ppl"} <= set(metrics)
    torch.testing.assert_close(metrics["val_ppl"], torch.exp(metrics["val_loss"]))


def test_causal_lm_vocab_mismatch_fails(tmp_path):
    model = CausalLM(config={**TINY_LLAMA, "vocab_size": 100})
    with pytest.raises(ValueError, match="vocab_size: 258"):
        _trainer(tmp_path).fit(model, BBCLanguageModelingDataModule(seq_len=32, max_articles=10))


# --------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------
def test_optimizer_only_trainable_and_no_decay_on_biases():
    model = ImageClassifier(num_classes=3, model_kwargs=VIT_KWARGS, weight_decay=0.1)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("model.head."))
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(params) == 2  # head weight and bias
    decays = {tuple(p.shape): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decays == {(3, 32): 0.1, (3,): 0.0}
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad"):
        model.configure_optimizers()


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_warmup_and_schedule(tmp_path, schedule):
    model = ImageClassifier(num_classes=10, model_kwargs=VIT_KWARGS, warmup_steps=2, schedule=schedule)
    trainer = _trainer(tmp_path, fast_dev_run=False, max_steps=6, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(model, DigitsDataModule(batch_size=8))
    config = configure_adamw(model, 1.0, 0.0, warmup_steps=2, schedule=schedule)
    scheduler = config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(6):
        lrs.append(scheduler.get_last_lr()[0])
        config["optimizer"].step()
        scheduler.step()
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
    if schedule == "constant":
        assert lrs[3:] == pytest.approx([1.0] * 3)
    elif schedule == "linear":
        assert lrs[2:] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    else:
        assert lrs[2:] == pytest.approx([1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2])


# --------------------------------------------------------------------------------------------
# With the adapter callback (the modules never inject adapters themselves)
# --------------------------------------------------------------------------------------------
def _lora_callback(targets, trainable):
    from lightning_peft import AdapterCallback, LoRA

    return AdapterCallback(adapter=LoRA(rank=2, alpha=4, target_modules=targets), trainable_modules=trainable)


@pytest.mark.parametrize(
    "make_model, make_data, targets, trainable",
    [
        (lambda: ImageClassifier(num_classes=10, model_kwargs=VIT_KWARGS), lambda: DigitsDataModule(batch_size=16), "all-linear", ["head"]),
        (
            lambda: TextClassifier(config=TINY_BERT),
            lambda: BBCNewsDataModule(max_per_class=10, batch_size=4, max_length=32),
            ["query", "value"],
            ["classifier"],
        ),
        (
            lambda: CausalLM(config=TINY_LLAMA),
            lambda: BBCLanguageModelingDataModule(seq_len=32, batch_size=4, max_articles=20),
            "all-linear",
            None,
        ),
    ],
    ids=["image", "text", "causal_lm"],
)
def test_fast_dev_run_with_lora_callback(tmp_path, make_model, make_data, targets, trainable):
    model = make_model()
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _trainer(tmp_path, callbacks=[_lora_callback(targets, trainable)])
    trainer.fit(model, make_data())
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or any(f".{t}." in f".{n}" for t in (trainable or [])) for n in trained)
    # the optimizer holds exactly the trainable parameters
    in_optimizer = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    # frozen base weights did not move
    for name, p in model.named_parameters():
        base_name = name.replace(".base_layer.", ".")
        if not p.requires_grad and base_name in frozen_before:
            assert torch.equal(p, frozen_before[base_name]), name


def _multiplier(step: int, warmup: int, schedule: str, total: int | None) -> float:
    """The schedule as a formula (what a hand-written LambdaLR computed before torch's schedulers)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total is None:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


# constant without warm-up builds no scheduler at all (configure_adamw returns the optimizer alone)
SCHEDULES = [(s, w) for s in ("constant", "linear", "cosine") for w in (0, 1, 2, 5) if (s, w) != ("constant", 0)]


@pytest.mark.parametrize("schedule, warmup", SCHEDULES)
@pytest.mark.parametrize("total", [1, 3, 10, 37])
def test_torch_schedulers_give_the_multiplier_formula(schedule, warmup, total):
    from lightning_peft.modules import warmup_schedule

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = warmup_schedule(optimizer, warmup, schedule, None if schedule == "constant" else total)
    for step in range(total):
        assert scheduler.get_last_lr()[0] == pytest.approx(2.0 * _multiplier(step, warmup, schedule, total), abs=1e-9)
        optimizer.step()
        scheduler.step()


def test_accuracy_is_a_torchmetrics_metric_outside_the_state_dict():
    from torchmetrics.classification import MulticlassAccuracy

    model = ImageClassifier(num_classes=3, model_kwargs=VIT_KWARGS)
    assert all(isinstance(m, MulticlassAccuracy) for m in model.accuracy.values())
    assert not [k for k in model.state_dict() if k.startswith("accuracy")]
    metric = model.accuracy["val_acc"]
    metric(torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), torch.tensor([0, 2]))
    metric(torch.tensor([[0.0, 0.0, 3.0]]), torch.tensor([2]))
    assert float(metric.compute()) == pytest.approx(2 / 3)  # correct / total over the epoch, not a mean of batch means
