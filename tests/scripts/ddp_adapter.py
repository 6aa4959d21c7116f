"""Plain ``strategy="ddp"`` + AdapterCallback on 2 CPU processes (gloo), LoRA with non-reentrant
activation checkpointing in the model's forward: run as ``python ddp_adapter.py OUT_DIR``.

Lightning's launcher re-runs this script for rank 1. Each rank writes ``OUT_DIR/rank{r}.json``
(its training losses, the loss of one fixed probe batch after every step, how many checkpoint
files it wrote, DDP's settings) and ``OUT_DIR/rank{r}.pt`` (its final trainable tensors).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning.pytorch as pl  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from adapter_models import Classifier, base_name, count_checkpoint_writes, lora_callback, make_loader, probe_input  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402

OUT = Path(sys.argv[1])
RANK = int(os.environ.get("LOCAL_RANK", "0"))
WRITES = count_checkpoint_writes()


class Probe(Callback):
    """Loss of one fixed batch (the same on every rank) after every optimizer step: equal on
    all ranks only if every adapter gradient was synchronised."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        x = probe_input()
        self.batch = (x, torch.arange(x.shape[0]) % 4)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        with torch.no_grad():
            self.losses.append(F.cross_entropy(pl_module(self.batch[0]), self.batch[1]).item())
        pl_module.log("score", -float(trainer.global_step))  # best after the first step

    def on_train_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        self.last = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_train_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        self.ddp = trainer.strategy.model
        self.initial = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def main() -> None:
    torch.manual_seed(0)
    model = Classifier(activation_checkpointing=True, scheduler=False)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    probe = Probe()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        callbacks=[
            lora_callback(export_dir=str(OUT / "adapter")),  # exports the best checkpoint's weights
            probe,
            # the first ModelCheckpoint is trainer.checkpoint_callback, whose best the export holds
            ModelCheckpoint(dirpath=OUT / "best", monitor="score", mode="max", every_n_train_steps=1),
            ModelCheckpoint(dirpath=OUT / "ckpt", save_last=True, save_top_k=0),
        ],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=OUT,
    )
    trainer.fit(model, make_loader())
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    report = {
        "losses": model.losses,
        "probe_losses": probe.losses,
        "writes": WRITES,
        "find_unused_parameters": bool(getattr(probe.ddp, "find_unused_parameters", None)),
        "ddp_wrapped": type(probe.ddp).__name__,
        "base_unchanged": all(torch.equal(p, base[base_name(n)]) for n, p in frozen.items()),
        "trainable_changed": sorted(n for n, p in trainable.items() if not torch.equal(p, probe.initial[n])),
        "trainable": sorted(trainable),
        "live_is_last_step": all(torch.equal(p, probe.last[n]) for n, p in trainable.items()),
    }
    torch.save(trainable, OUT / f"rank{RANK}.pt")
    (OUT / f"rank{RANK}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ddp_exit import finish_distributed

    finish_distributed()
