"""NA-LoRA in Lightning: AdapterCallback adds NALoRACallback, masked rows stay put in real
training, an interrupted run resumes exactly (statistics in the checkpoint), the config runs
from the CLI, and a model without a gated FFN says NA-LoRA is inactive."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from adapter_models import LORA_TARGETS, Classifier, make_loader  # noqa: E402

from lightning_peft import AdapterCallback, NALoRA  # noqa: E402
from lightning_peft.callbacks.nalora import NALoRACallback  # noqa: E402
from lightning_peft.modules import CausalLM  # noqa: E402

CONFIG = {
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}


def lm(seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    module = CausalLM(config=CONFIG, lr=1e-2, weight_decay=0.1)
    with torch.no_grad():  # spread the gate pre-activations so that the groups are not all one bin
        for layer in module.model.model.layers:
            layer.mlp.gate_proj.weight.normal_(0, 0.5)
    return module


def batches(n: int = 16, t: int = 12) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[::2, -3:] = 0  # padded tail on every other sequence
    labels = ids.masked_fill(mask == 0, -100)
    rows = [{"input_ids": i, "attention_mask": m, "labels": y} for i, m, y in zip(ids, mask, labels)]
    return torch.utils.data.DataLoader(rows, batch_size=4)


def spec() -> NALoRA:
    return NALoRA(rank=4, warmup_steps=2, refresh_every=2)


def trainer(root: Path, callbacks: list, max_steps: int, checkpoint: bool = False) -> pl.Trainer:
    if checkpoint:
        callbacks = [*callbacks, ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_train_steps=4)]
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=checkpoint,
        default_root_dir=root,
    )


class RowWatch(Callback):
    """Checks in every step that the gate rows masked in that step did not change."""

    def __init__(self) -> None:
        self.masked_steps = 0

    def _gates(self, trainer: pl.Trainer):  # type: ignore[no-untyped-def]
        return next(c for c in trainer.callbacks if isinstance(c, NALoRACallback)).controller.gates

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.before = {n: g.weight.detach().clone() for n, g in self._gates(trainer).items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        for name, g in self._gates(trainer).items():
            masked = ~g.mask
            assert torch.equal(g.weight[masked], self.before[name][masked]), (name, trainer.global_step)
            assert not torch.equal(g.weight[~masked], self.before[name][~masked])
            self.masked_steps += int(bool(masked.any()))


def test_adapter_callback_adds_the_controller_and_masked_rows_stay(tmp_path: Path) -> None:
    watch = RowWatch()
    t = trainer(tmp_path, [AdapterCallback(spec()), watch], max_steps=6)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(val_dataloader|does not have many workers|num_workers|step scaling).*")
        t.fit(lm(), batches())
    callbacks = [c for c in t.callbacks if isinstance(c, NALoRACallback)]
    assert len(callbacks) == 1
    ctl = callbacks[0].controller
    assert sorted(ctl.gates) == [f"model.model.layers.{i}.mlp.gate_proj" for i in range(2)]
    assert ctl.metrics()["nalora/kept_fraction"] == 0.5
    assert watch.masked_steps == 2 * 4  # steps 2..5, both layers
    assert ctl.used_token_mask  # the batches' attention_mask weighted the statistics


def run(root: Path, max_steps: int, ckpt_path: str | None = None, checkpoint: bool = False) -> tuple[CausalLM, NALoRACallback]:
    pl.seed_everything(0)
    module = lm()
    t = trainer(root, [AdapterCallback(spec())], max_steps=max_steps, checkpoint=checkpoint)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(val_dataloader|does not have many workers|num_workers|step scaling).*")
        t.fit(module, batches(n=16), ckpt_path=ckpt_path)  # 4 steps an epoch: the checkpoint is at an epoch end
    return module, next(c for c in t.callbacks if isinstance(c, NALoRACallback))


def test_interrupted_run_resumes_exactly(tmp_path: Path) -> None:
    straight, straight_cb = run(tmp_path / "a", 8)
    run(tmp_path / "b", 4, checkpoint=True)
    ckpt = tmp_path / "b" / "ckpt" / "epoch=0-step=4.ckpt"
    saved = torch.load(ckpt, weights_only=False)["callbacks"]
    assert any("NALoRACallback" in k and v.get("layers") for k, v in saved.items())
    resumed, resumed_cb = run(tmp_path / "c", 8, ckpt_path=str(ckpt))
    for (n, p), (_, q) in zip(resumed.named_parameters(), straight.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)
    a, b = straight_cb.controller.state_dict(), resumed_cb.controller.state_dict()
    assert a["last_step"] == b["last_step"] == 7
    for name, layer in a["layers"].items():
        assert torch.equal(layer["mask"], b["layers"][name]["mask"]) and torch.equal(layer["groups"], b["layers"][name]["groups"])
        torch.testing.assert_close(layer["importance"], b["layers"][name]["importance"], atol=1e-6, rtol=0)


def test_model_without_gated_ffn_reports_nalora_inactive(tmp_path: Path) -> None:
    torch.manual_seed(0)
    t = trainer(tmp_path, [AdapterCallback(NALoRA(rank=2, target_modules=LORA_TARGETS), trainable_modules=["model.head"])], max_steps=1)
    with pytest.warns(UserWarning, match="NA-LoRA is inactive: no NA-LoRA gate projection of a gated FFN"):
        t.fit(Classifier(), make_loader(n=8, batch_size=4))


def test_config_runs_a_few_steps_from_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_peft.cli import cli_main

    monkeypatch.setattr("sys.argv", ["lightning-peft"])
    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[2] / "configs" / "nalora_lm.yaml"
    fast = ["--trainer.max_steps=3", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"]
    small = ["--data.init_args.max_articles=40", "--data.init_args.seq_len=64", "--data.init_args.batch_size=8"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = cli_main(["fit", "--config", str(config), *fast, *small])
    assert cli.trainer.global_step == 3
    assert sum(isinstance(c, NALoRACallback) for c in cli.trainer.callbacks) == 1
    export = Path(cli.trainer.log_dir) / "adapter"
    assert json.loads((export / "adapter_config.json").read_text())["peft_type"] == "LORA"
