"""HRM through AdapterCallback: the calibration callback is added and runs at fit start from the
train dataloader, training moves the adapter, resuming skips calibration, the export reloads,
merging at fit end is refused by name, and under DDP every rank starts from rank 0's calibration."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from hrm_models import LLAMA_CONFIG, layers, token_loader  # noqa: E402
from two_ranks import run_two_ranks  # noqa: E402

from lightning_peft import HRM, AdapterCallback, LoRA, load_adapter  # noqa: E402
from lightning_peft.callbacks.hrm import HRMCalibrationCallback  # noqa: E402
from lightning_peft.modules.causal_lm import CausalLM  # noqa: E402


def trainer(root: Path, callbacks: list, max_steps: int = 3, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, callbacks=callbacks, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root, num_sanity_val_steps=0, **kwargs,
    )  # fmt: skip


def module(seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(config=dict(LLAMA_CONFIG), lr=1e-2)


def test_fit_calibrates_from_the_train_dataloader_then_trains(tmp_path: Path) -> None:
    model = module()
    spec = HRM(state_dim=4, input_dim=4, fit_lags=2, calibration_batches=2)
    callback = AdapterCallback([spec, LoRA(rank=2, target_modules=["q_proj"])], export_dir="export")
    run = trainer(tmp_path, [callback], enable_checkpointing=False)
    run.fit(model, token_loader(shuffle=True))
    cal = next(c for c in run.callbacks if isinstance(c, HRMCalibrationCallback))  # added automatically
    assert [s.name for s in cal.report.sites] == ["model.model.layers.0.mlp", "model.model.layers.1.mlp"]
    assert cal.report.batches == 2 and cal.report.sites[0].tokens == 2 * 4 * 16 - 4 * 3  # two batches, padding left out
    for layer in layers(model):
        assert layer.calibrated.item() == 1 and layer.p_out.abs().sum() > 0  # calibrated, then trained
    fresh = module()
    load_adapter(fresh, tmp_path / "export")
    batch = next(iter(token_loader()))
    with torch.no_grad():
        expected = model(batch["input_ids"], batch["attention_mask"]).logits
        assert torch.allclose(fresh(batch["input_ids"], batch["attention_mask"]).logits, expected, atol=1e-5)


def test_resuming_never_recalibrates_over_trained_weights(tmp_path: Path) -> None:
    spec = HRM(state_dim=4, input_dim=4, fit_lags=2, calibration_batches=2)
    first = trainer(tmp_path, [AdapterCallback(spec), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)], max_steps=2)
    first.fit(module(), token_loader())
    second = trainer(tmp_path, [AdapterCallback(spec), ModelCheckpoint(dirpath=tmp_path / "ckpt2")], max_steps=4)
    resumed = module(seed=1)
    second.fit(resumed, token_loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    cal = next(c for c in second.callbacks if isinstance(c, HRMCalibrationCallback))
    assert cal.report is None  # the checkpoint's layers were calibrated: not run again
    assert second.global_step == 4


def test_random_init_needs_no_calibration_and_merge_at_fit_end_is_refused(tmp_path: Path) -> None:
    run = trainer(tmp_path, [AdapterCallback(HRM(state_dim=4, input_dim=4, init="random"), merge_on_fit_end=True)], max_steps=1)
    with pytest.raises(ValueError, match="cannot be merged"):
        run.fit(module(), token_loader())
    cal = next(c for c in run.callbacks if isinstance(c, HRMCalibrationCallback))
    assert cal.report is None


class FirstBatch(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        if batch_idx == 0:
            self.ids = batch["input_ids"].clone()


@pytest.mark.parametrize("init", ["balanced_truncation", "random"])
def test_calibration_leaves_the_shuffled_training_order_unchanged(tmp_path: Path, init: str) -> None:
    seen = {}
    for mode in (init, "random"):
        probe = FirstBatch()
        model = module()
        torch.manual_seed(5)
        trainer(tmp_path, [AdapterCallback(HRM(state_dim=4, input_dim=4, fit_lags=2, init=mode)), probe], max_steps=1).fit(
            model, token_loader(shuffle=True)
        )
        seen[mode] = probe.ids
    assert torch.equal(seen[init], seen["random"])


@pytest.mark.slow
def test_ddp_ranks_start_from_rank_zeros_calibration(tmp_path: Path) -> None:
    run_two_ranks("hrm_ddp.py", tmp_path)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert rank0["sites"] == rank1["sites"] == ["model.model.layers.0.mlp", "model.model.layers.1.mlp"]
    assert rank0["tensors"].keys() == rank1["tensors"].keys()
    for name, value in rank0["tensors"].items():
        assert torch.equal(value, rank1["tensors"][name]), name
