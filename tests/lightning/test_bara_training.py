"""BaRA in Lightning: AdapterCallback adds BaRACallback, the KL gradient reaches the gate logits
once per optimizer step, the effective ranks are logged, seeded runs repeat exactly, and the
config runs from the CLI."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft import AdapterCallback, BaRA
from lightning_peft.adapters.bara import bara_layers
from lightning_peft.callbacks.bara import BaRACallback

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
QUIET = ".*(val_dataloader|LeafSpec|does not have many workers|num_workers|GPU available|TPU available|HPU available|log_every_n_steps).*"


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def loader(n: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)), batch_size=8)


class FirstGradients(Callback):
    """The gate-logit gradients of the first optimizer step (the optimizer has used them; they
    are cleared only before the next step's backward)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] | None = None
        self.logits: dict[str, torch.Tensor] | None = None

    def on_train_start(self, trainer, pl_module):
        self.logits = {n: l.gate_logit.detach().clone() for n, l in bara_layers(pl_module).items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.grads is None and trainer.global_step == 1:
            self.grads = {n: l.gate_logit.grad.clone() for n, l in bara_layers(pl_module).items()}


def fit(tmp_path, spec: BaRA, *extra: Callback, seed: int = 0, **trainer_kw) -> tuple[pl.Trainer, Tiny]:
    pl.seed_everything(seed, verbose=False)
    module = Tiny()
    kw = {"max_steps": 3, "logger": pl.loggers.CSVLogger(tmp_path), "enable_checkpointing": False, "enable_progress_bar": False}
    kw.update(trainer_kw)
    trainer = pl.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", enable_model_summary=False, callbacks=[AdapterCallback(spec), *extra], **kw
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=QUIET)
        trainer.fit(module, train_dataloaders=loader())
    return trainer, module


@pytest.mark.parametrize("accumulate", [1, 2])
def test_adapter_callback_adds_bara_callback_and_the_kl_gradient_reaches_the_gates(tmp_path, accumulate):
    spec = BaRA(max_rank=4, prior=0.1, kl_weight=0.7, init_prob=0.6, target_modules=["net.0", "net.2"])
    recorder = FirstGradients()
    trainer, module = fit(tmp_path, spec, recorder, accumulate_grad_batches=accumulate)
    assert sum(isinstance(c, BaRACallback) for c in trainer.callbacks) == 1
    # B starts at zero, so at the first step the task gives the gates no gradient: what they got is
    # exactly kl_weight * dKL/dlogit = 0.7 pi (1 - pi) (logit - logit(prior)), once per optimizer step
    # however many micro-batches were accumulated
    for name, grad in recorder.grads.items():
        logit = recorder.logits[name]
        pi = torch.sigmoid(logit)
        want = 0.7 * pi * (1 - pi) * (logit - math.log(0.1 / 0.9))
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7)
        assert torch.count_nonzero(grad) == grad.numel()
    metrics = trainer.callback_metrics
    assert {"bara/kl", "bara/global_rank", "bara/joint_rank", "bara/net.0/joint_rank", "bara/net.2/global_rank"} <= set(metrics)
    assert 0 < float(metrics["bara/joint_rank"]) <= float(metrics["bara/global_rank"]) <= 4


def test_the_logger_receives_the_effective_ranks(tmp_path):
    trainer, _ = fit(tmp_path, BaRA(max_rank=4, target_modules=["net.0", "net.2"]), max_steps=4, log_every_n_steps=1)
    rows = (Path(trainer.logger.log_dir) / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert {"bara/kl", "bara/joint_rank", "bara/net.0/global_rank"} <= set(header)
    assert len(rows) >= 5


def test_seeded_runs_repeat_exactly_and_the_prior_moves_the_gates(tmp_path):
    spec = BaRA(max_rank=4, prior=0.05, kl_weight=1.0, target_modules=["net.0", "net.2"])
    _, a = fit(tmp_path / "a", spec, max_steps=6)
    _, b = fit(tmp_path / "b", spec, max_steps=6)
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, rtol=0, atol=0)
    _, c = fit(tmp_path / "c", spec, max_steps=6, seed=1)
    assert not torch.equal(c.net[0].lora_A, a.net[0].lora_A)
    for layer in bara_layers(a).values():
        assert float(torch.sigmoid(layer.gate_logit).max()) < 0.5  # pulled from init_prob 0.5 toward the prior


def test_merge_on_fit_end_with_local_gates_is_refused_before_training(tmp_path):
    pl.seed_everything(0, verbose=False)
    module = Tiny()
    cb = AdapterCallback(BaRA(max_rank=4, target_modules=["net.0"]), merge_on_fit_end=True)
    trainer = pl.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, callbacks=[cb]
    )
    with pytest.raises(ValueError, match="local_gate=False"):
        trainer.fit(module, train_dataloaders=loader())
    assert trainer.global_step == 0


def test_merge_on_fit_end_without_local_gates_merges(tmp_path):
    pl.seed_everything(0, verbose=False)
    module = Tiny()
    cb = AdapterCallback(BaRA(max_rank=4, local_gate=False, target_modules=["net.0"]), merge_on_fit_end=True)
    trainer = pl.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, callbacks=[cb]
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=QUIET)
        trainer.fit(module, train_dataloaders=loader())
    assert all(layer.merged for layer in bara_layers(module).values())


def test_bara_callback_without_bara_layers_says_what_to_add(tmp_path):
    trainer = pl.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, callbacks=[BaRACallback()]
    )
    with pytest.raises(ValueError, match="found no BaRA layers"):
        trainer.fit(Tiny(), train_dataloaders=loader())


def test_bara_config_runs_a_few_steps(tmp_path, monkeypatch):
    from lightning_peft.cli import cli_main

    monkeypatch.setattr("sys.argv", ["lightning-peft"])
    monkeypatch.chdir(tmp_path)
    cli = cli_main(
        [
            "fit",
            "--config",
            str(CONFIGS / "bara_bbc.yaml"),
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=1",
            "--trainer.limit_test_batches=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.log_every_n_steps=1",
            "--data.init_args.max_per_class=10",
            "--data.init_args.max_length=32",
            "--data.init_args.batch_size=4",
        ]
    )
    assert cli.trainer.global_step == 2
    assert any(isinstance(c, BaRACallback) for c in cli.trainer.callbacks)
    logged = (Path(cli.trainer.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"bara/joint_rank", "bara/encoder.encoder.layer.5.attention.self.value/joint_rank"} <= set(logged)
    assert len(bara_layers(cli.model)) == 12  # query and value of 6 layers
    export = Path(cli.trainer.log_dir) / "adapter"
    assert json.loads((export / "adapter_config.json").read_text())["peft_type"] == "LIGHTNING_PEFT"
    assert cli.test_results and "test_acc" in cli.test_results[0]


@pytest.mark.slow
def test_ddp_ranks_draw_their_own_noise_but_parameters_stay_identical(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from two_ranks import run_two_ranks

    run_two_ranks("bara_ddp.py", tmp_path)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert rank0["noise"] != rank1["noise"]  # each process its own gate noise
    assert rank0["losses"] != rank1["losses"]  # and its own batches
    final0, final1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert any(n.endswith("gate_logit") for n in final0)
    for name in final0:
        assert torch.equal(final0[name], final1[name]), name  # DDP + the same KL gradient keep them synchronised
