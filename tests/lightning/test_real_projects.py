"""The one-callback promise on LightningModules shaped like public projects (end to end).

Each project (``tests/scripts/third_party_models.py``) is used unchanged; only an
``AdapterCallback`` is added. Checked for each: ``fit`` ends cleanly with the default
``export_weights="best"``; the live module holds its last step's weights afterwards; the export
holds the best checkpoint's tensors; a resume from an epoch-end checkpoint and an export loaded
onto a fresh base both reproduce the trained model's eval outputs (BatchNorm statistics
included).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from third_party_models import (  # noqa: E402
    digits_loader,
    eval_outputs,
    masked_lm_module,
    mnist_module,
    token_loader,
    transformer_module,
)

from lightning_peft import AdapterCallback, LoRA, load_adapter  # noqa: E402


def without_dropout(module: pl.LightningModule) -> pl.LightningModule:
    """Lightning does not restore the global RNG on resume: an exact resume needs no dropout."""
    for sub in module.modules():
        if isinstance(sub, torch.nn.Dropout):
            sub.p = 0.0
        if isinstance(sub, torch.nn.MultiheadAttention):
            sub.dropout = 0.0
    return module


@dataclass
class Project:
    name: str
    build: Callable[[], pl.LightningModule]
    loader: Callable[[], torch.utils.data.DataLoader]
    callback: Callable[..., AdapterCallback]
    fit_kwargs: dict[str, Any]  # what the user passes to fit to resume (pickled hparams need weights_only=False)


PROJECTS = {
    "hydra_mnist_batchnorm": Project(
        "hydra_mnist_batchnorm",
        mnist_module,
        lambda: digits_loader("train", batch_size=64),  # 4 steps per epoch
        lambda **kw: AdapterCallback(LoRA(rank=4, alpha=8), **kw),  # all-linear
        {"weights_only": False},  # the user's own checkpoint pickles `net` and a partial: Lightning needs the opt-in
    ),
    "lightning_demo_transformer": Project(
        "lightning_demo_transformer",
        lambda: without_dropout(transformer_module()),
        lambda: token_loader(n=12, batch_size=4),  # 3 steps per epoch
        lambda **kw: AdapterCallback(LoRA(rank=4, alpha=8, target_modules="all-linear"), **kw),
        {},
    ),
    "bert_masked_lm_tied": Project(
        "bert_masked_lm_tied",
        masked_lm_module,
        lambda: token_loader(n=12, batch_size=4),
        lambda **kw: AdapterCallback(LoRA(rank=4, alpha=8, target_modules=["query", "value"]), trainable_modules=["decoder"], **kw),
        {},
    ),
}


def trainer(root: Path, callbacks: list[Callback], epochs: int, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        limit_val_batches=0,
        deterministic=True,
        **kwargs,
    )


def probe(project: Project) -> tuple[torch.Tensor, ...]:
    return next(iter(project.loader()))


def trained_state(module: pl.LightningModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_outputs_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * scale)


class ScoreBestAtFirstEpoch(Callback):
    """Logs a score that is best after epoch 0 and keeps the whole state then and at train end."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.log("score", -float(trainer.current_epoch))
        if trainer.current_epoch == 0:
            self.best = trained_state(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.last = trained_state(pl_module)


@pytest.fixture(params=sorted(PROJECTS), scope="module")
def project(request: pytest.FixtureRequest) -> Project:
    return PROJECTS[request.param]


def test_fit_ends_cleanly_keeps_the_last_step_and_exports_the_best(project: Project, tmp_path: Path) -> None:
    module = project.build()
    callback = project.callback(export_dir="adapter")  # export_weights="best" by default
    score = ScoreBestAtFirstEpoch()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="score", mode="max")
    trainer(tmp_path, [callback, score, ckpt], epochs=2).fit(module, project.loader())
    assert "epoch=0" in ckpt.best_model_path

    # the live module holds its last step's weights, as plain Lightning leaves it
    after = trained_state(module)
    assert set(after) == set(score.last)
    for key, value in score.last.items():
        assert torch.equal(after[key], value), key
    assert any(not torch.equal(score.best[k], score.last[k]) for k in score.last)

    # the export is the best checkpoint's model: a fresh base + export == the state at epoch 0
    loaded = load_adapter(project.build(), callback.export_path)
    best_model = project.build()
    load_adapter(best_model, callback.export_path)  # same injection, then the epoch-0 state
    best_model.load_state_dict(score.best)
    assert_outputs_close(eval_outputs(loaded, probe(project)), eval_outputs(best_model, probe(project)))


def test_no_export_reads_no_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_peft.callbacks.adapter as adapter_callback

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a checkpoint was read although nothing is exported")

    monkeypatch.setattr(adapter_callback, "load_checkpoint_tensors", refuse)
    project = PROJECTS["hydra_mnist_batchnorm"]
    module = project.build()
    score = ScoreBestAtFirstEpoch()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="score", mode="max")
    trainer(tmp_path, [project.callback(), score, ckpt], epochs=2).fit(module, project.loader())
    for key, value in score.last.items():
        assert torch.equal(module.state_dict()[key], value), key


def test_resume_from_an_epoch_end_checkpoint_gives_the_uninterrupted_outputs(project: Project, tmp_path: Path) -> None:
    straight = project.build()
    trainer(tmp_path / "straight", [project.callback()], epochs=3).fit(straight, project.loader())

    first = project.build()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, [project.callback(), ckpt], epochs=2).fit(first, project.loader())
    resumed = project.build()  # a new process rebuilds the base from its own weights
    trainer(tmp_path, [project.callback()], epochs=3).fit(
        resumed, project.loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), **project.fit_kwargs
    )
    assert_outputs_close(eval_outputs(resumed, probe(project)), eval_outputs(straight, probe(project)))


def test_export_onto_a_fresh_base_reproduces_the_trained_outputs(project: Project, tmp_path: Path) -> None:
    module = project.build()
    base_buffers = {k: v.clone() for k, v in module.named_buffers()}
    callback = project.callback(export_dir="adapter", export_weights="last")
    trainer(tmp_path, [callback], epochs=2).fit(module, project.loader())
    running = {k: v for k, v in module.named_buffers() if ".running_" in k}
    assert all(not torch.equal(v, base_buffers[k]) for k, v in running.items())  # the statistics trained
    loaded = load_adapter(project.build(), callback.export_path)
    assert_outputs_close(eval_outputs(loaded, probe(project)), eval_outputs(module, probe(project)))


def test_frozen_norm_statistics_stay_the_base_ones_and_are_not_saved(tmp_path: Path) -> None:
    project = PROJECTS["hydra_mnist_batchnorm"]
    module = project.build()
    base_buffers = {k: v.clone() for k, v in module.named_buffers()}
    callback = project.callback(export_dir="adapter", export_weights="last", norm_stats="freeze")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, [callback, ckpt], epochs=2).fit(module, project.loader())
    for key, value in module.named_buffers():
        assert torch.equal(value, base_buffers[key]), key
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]  # our own test file
    assert not any("running_" in k or "num_batches" in k for k in saved)
    loaded = load_adapter(project.build(), callback.export_path)
    assert_outputs_close(eval_outputs(loaded, probe(project)), eval_outputs(module, probe(project)))
    # the loaded model keeps its statistics frozen too: a train-mode forward leaves them unchanged
    loaded.train()
    loaded(probe(project)[0])
    for key, value in loaded.named_buffers():
        assert torch.equal(value, base_buffers[key]), key


def test_batchnorm_statistics_are_checkpointed_and_reported(tmp_path: Path) -> None:
    project = PROJECTS["hydra_mnist_batchnorm"]
    module = project.build()
    callback = project.callback()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, [callback, ckpt], epochs=1).fit(module, project.loader())
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    expected = {f"net.model.{i}.{b}" for i in (1, 4) for b in ("running_mean", "running_var", "num_batches_tracked")}
    assert expected <= set(saved)
    for key in expected:
        assert torch.equal(saved[key], module.state_dict()[key]), key
    assert "net.model.1.running_mean" in str(callback.report)
