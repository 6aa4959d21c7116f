"""AdapterCallback in an unchanged Lightning project (contract 1), single process on CPU.

The model (``tests/scripts/adapter_models.py``) is an ordinary LightningModule: a tiny
pre-LayerNorm transformer with a head, deterministic data, AdamW and a StepLR schedule.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from adapter_models import HEAD, LORA_TARGETS, Classifier, base_name, lora_callback, make_loader, probe_input  # noqa: E402

from lightning_peft import AdapterCallback, BitFit, FullFineTune, LoRA, QLoRA, apply_adapter, load_adapter  # noqa: E402
from lightning_peft.callbacks.adapter import AtomicCheckpointIO  # noqa: E402


def make_trainer(tmp_path: Path, callbacks: list, epochs: int = 1, max_steps: int = -1, ckpt: bool = False) -> pl.Trainer:
    if ckpt:
        # the best-so-far (here: latest) epoch checkpoint plus last.ckpt, written at every epoch end
        callbacks = [*callbacks, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)]
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )


def loader() -> torch.utils.data.DataLoader:
    return make_loader(n=32, batch_size=8)  # 4 steps per epoch


class Snapshot(Callback):
    """Every parameter right after injection (the callback injects at setup)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


class Crash(Callback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def fresh_model(seed: int = 0, **kwargs) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(**kwargs)


# ------------------------------------------------------------------------------------------
# What trains, what is saved
# ------------------------------------------------------------------------------------------
def test_base_bit_identical_only_adapter_and_head_change_checkpoint_adapter_only(tmp_path: Path) -> None:
    model = fresh_model(optimize_all=True)  # careless user code: AdamW over every parameter
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    snapshot = Snapshot()
    make_trainer(tmp_path, [lora_callback(), snapshot], ckpt=True).fit(model, loader())

    params = dict(model.named_parameters())
    frozen = {n for n, p in params.items() if not p.requires_grad}
    trainable = set(params) - frozen
    assert trainable == {n for n in params if ".lora_" in n or n.startswith("model.head.")}
    for name in frozen:  # weight decay and momentum never touched the base
        assert torch.equal(params[name], base[base_name(name)]), name
    changed = {n for n in trainable if not torch.equal(params[n], snapshot.params[n])}
    assert changed == trainable

    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert set(checkpoint["state_dict"]) == trainable
    for name, value in checkpoint["state_dict"].items():
        assert torch.equal(value, params[name])
    assert len(checkpoint["optimizer_states"]) == 1 and checkpoint["lr_schedulers"]
    assert checkpoint["global_step"] == 4


def test_interrupted_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    # uninterrupted: 3 epochs x 4 steps
    straight = fresh_model()
    make_trainer(tmp_path / "straight", [lora_callback()], epochs=3).fit(straight, loader())

    # interrupted: crashes in the third epoch; the last checkpoint is the end of epoch 2
    crashed = fresh_model()
    with pytest.raises(RuntimeError, match="simulated crash"):
        make_trainer(tmp_path, [lora_callback(), Crash(at_step=10)], epochs=3, ckpt=True).fit(crashed, loader())
    last = tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 8

    resumed = fresh_model()  # a new process would rebuild the base from its own weights
    trainer = make_trainer(tmp_path, [lora_callback()], epochs=3)
    trainer.fit(resumed, loader(), ckpt_path=str(last))
    assert trainer.global_step == 12
    assert resumed.losses == pytest.approx(straight.losses[8:], abs=1e-6)
    expected = trainable_state(straight)
    got = trainable_state(resumed)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0)
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 12  # the schedule resumed too


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    make_trainer(root, [lora_callback()], ckpt=True).fit(fresh_model(), loader())
    return root / "ckpt" / "last.ckpt"


@pytest.mark.parametrize(
    "callback, match",
    [
        (lambda: lora_callback(rank=2), "trained with adapter"),
        (lambda: lora_callback(targets=["q", "v"]), "trained with adapter"),
        (lambda: AdapterCallback(LoRA(rank=4, alpha=8, target_modules=LORA_TARGETS), trainable_modules=[]), "trained with adapter"),
    ],
    ids=["other-rank", "other-targets", "no-head"],
)
def test_resume_with_another_adapter_config_fails_clearly(trained_checkpoint: Path, tmp_path: Path, callback, match) -> None:  # type: ignore[no-untyped-def]
    model = fresh_model()
    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path, [callback()], epochs=2).fit(model, loader(), ckpt_path=str(trained_checkpoint))


def test_resume_checkpoint_without_callback_state_checks_tensors(trained_checkpoint: Path, tmp_path: Path) -> None:
    # a checkpoint whose callback state was stripped still fails on its tensors, before loading
    checkpoint = torch.load(trained_checkpoint, weights_only=False)
    checkpoint["callbacks"] = {}
    stripped = tmp_path / "stripped.ckpt"
    torch.save(checkpoint, stripped)
    with pytest.raises(ValueError, match=r"different adapter configuration.*another shape"):
        make_trainer(tmp_path, [lora_callback(rank=2)], epochs=2).fit(fresh_model(), loader(), ckpt_path=str(stripped))


def test_resume_on_another_base_fails_clearly(trained_checkpoint: Path, tmp_path: Path) -> None:
    other_base = fresh_model(seed=1)
    with pytest.raises(ValueError, match="different base model"):
        make_trainer(tmp_path, [lora_callback()], epochs=2).fit(other_base, loader(), ckpt_path=str(trained_checkpoint))


# ------------------------------------------------------------------------------------------
# Loud failures
# ------------------------------------------------------------------------------------------
def test_adapter_without_gradient_warns_naming_the_module(tmp_path: Path) -> None:
    model = fresh_model(unused_layer=True)
    callback = lora_callback(targets=["q", "unused"])
    with pytest.warns(UserWarning, match=r"NO gradient.*'model\.unused'"):
        make_trainer(tmp_path, [callback], max_steps=2).fit(model, loader())


def test_no_warning_when_every_adapter_gets_a_gradient(tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [lora_callback()], max_steps=1).fit(fresh_model(), loader())
    assert not [w for w in caught if "lightning-peft" in str(w.message)]


# ------------------------------------------------------------------------------------------
# Atomic checkpoints
# ------------------------------------------------------------------------------------------
def test_checkpoints_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = fresh_model()
    trainer = make_trainer(tmp_path, [lora_callback()], ckpt=True)
    trainer.fit(model, loader())
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    ckpt_dir = tmp_path / "ckpt"
    files = sorted(os.listdir(ckpt_dir))
    assert files == ["epoch=0-step=4.ckpt", "last.ckpt"]  # no temporary files left
    last = ckpt_dir / "last.ckpt"
    before = last.read_bytes()

    real_save = torch.save

    def save_half_then_fail(obj, f, *args, **kwargs):  # type: ignore[no-untyped-def]
        real_save({"partial": torch.zeros(1000)}, f)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint(last)
    monkeypatch.setattr(torch, "save", real_save)
    assert last.read_bytes() == before  # the previous checkpoint is intact
    assert sorted(os.listdir(ckpt_dir)) == files
    assert set(torch.load(last, weights_only=False)["state_dict"]) == set(trainable_state(model))


# ------------------------------------------------------------------------------------------
# Export at the end of fit
# ------------------------------------------------------------------------------------------
def test_export_at_fit_end_reloads_to_the_same_outputs(tmp_path: Path) -> None:
    model = fresh_model()
    callback = lora_callback(export_dir="adapter")
    make_trainer(tmp_path, [callback]).fit(model, loader())
    assert callback.export_path == tmp_path / "adapter"
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(callback.export_path))

    model.eval()
    reloaded = load_adapter(fresh_model().eval(), callback.export_path)
    x = probe_input()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), atol=1e-6, rtol=0)

    with pytest.raises(ValueError, match="base weights differ"):
        load_adapter(fresh_model(seed=1), callback.export_path)  # an export made for another base


class ScoreBestAtFirstEpoch(Callback):
    """Logs a score that is best after epoch 0 and remembers the trainable weights then."""

    def on_train_epoch_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        pl_module.log("score", -float(trainer.current_epoch))
        if trainer.current_epoch == 0:
            self.weights = trainable_state(pl_module)


@pytest.mark.parametrize("export_weights", ["best", "last"])
def test_export_holds_the_best_checkpoint_weights_and_merge_survives_testing_best(tmp_path: Path, export_weights: str) -> None:
    model = fresh_model()
    callback = lora_callback(export_dir="adapter", export_weights=export_weights, merge_on_fit_end=True)
    best = ScoreBestAtFirstEpoch()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="score", mode="max")
    trainer = make_trainer(tmp_path, [callback, best, checkpoint], epochs=2)
    trainer.fit(model, loader())
    assert "epoch=0" in checkpoint.best_model_path
    final = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n or n.startswith("model.head.")}
    assert all(m.merged for m in model.modules() if hasattr(m, "merged") and hasattr(m, "base_layer"))
    exported = load_adapter(fresh_model(), callback.export_path)
    expected = best.weights if export_weights == "best" else final
    for name, value in trainable_state(exported).items():
        torch.testing.assert_close(value, expected[name], atol=0, rtol=0)
    # loading an (unmerged) checkpoint into the merged model unmerges first instead of corrupting it
    model.on_load_checkpoint(torch.load(checkpoint.best_model_path, weights_only=False))
    assert not any(getattr(m, "merged", False) for m in model.modules())


def test_export_into_another_adapter_config_fails(tmp_path: Path) -> None:
    callback = lora_callback(export_dir="adapter")
    make_trainer(tmp_path, [callback], max_steps=1).fit(fresh_model(), loader())
    other = fresh_model()
    apply_adapter(other, LoRA(rank=2, alpha=8, target_modules=LORA_TARGETS), trainable_modules=HEAD)
    with pytest.raises(ValueError, match="shape"):
        load_adapter(other, callback.export_path)


# ------------------------------------------------------------------------------------------
# Other adapters through the callback
# ------------------------------------------------------------------------------------------
def _run_and_compare(tmp_path: Path, callback: AdapterCallback, steps: int = 3) -> tuple[Classifier, dict, dict, dict]:
    model = fresh_model()
    snapshot = Snapshot()
    make_trainer(tmp_path, [callback, snapshot], max_steps=steps, ckpt=True).fit(model, loader())
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    return model, snapshot.params, after, checkpoint["state_dict"]


def test_bitfit_trains_only_biases(tmp_path: Path) -> None:
    model, before, after, saved = _run_and_compare(tmp_path, AdapterCallback(BitFit(target_modules=["fc1", "fc2"])))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.blocks.{i}.{m}.bias" for i in range(2) for m in ("fc1", "fc2")}
    for name in after:
        assert torch.equal(after[name], before[name]) != (name in trainable), name
    assert set(saved) == trainable


def test_full_fine_tune_trains_everything(tmp_path: Path) -> None:
    model, before, after, saved = _run_and_compare(tmp_path, AdapterCallback(FullFineTune()))
    assert all(p.requires_grad for p in model.parameters())
    # every parameter that takes part in the loss changed (LayerNorm biases included)
    assert {n for n in after if torch.equal(after[n], before[n])} == set()
    assert set(saved) == set(after)


def test_qlora_trains_adapter_keeps_quantized_base(tmp_path: Path) -> None:
    import bitsandbytes  # noqa: F401  (a test dependency: fail loudly if missing)

    callback = AdapterCallback(QLoRA(rank=4, alpha=8, target_modules=["fc1", "fc2"], compute_dtype="float32"), trainable_modules=HEAD)
    model, before, after, saved = _run_and_compare(tmp_path, callback)
    weight = model.model.blocks[0].fc1.base_layer.weight
    assert type(weight).__name__ == "Params4bit" and weight.dtype == torch.uint8
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in after if ".lora_" in n or n.startswith("model.head.")}
    for name in after:
        assert torch.equal(after[name], before[name]) != (name in trainable), name
    assert set(saved) == trainable  # no packed 4-bit weights in the checkpoint
