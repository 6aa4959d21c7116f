"""AdapterFSDP2Strategy on 2 CPU processes (gloo): run as ``python fsdp2_adapter.py OUT_DIR``.

Lightning's launcher re-runs this script for rank 1. Each rank writes its findings to
``OUT_DIR/rank{r}.json``; rank 0 also writes the sharded model's probe logits. Runs:

A. LoRA + trained head for one epoch (4 steps per rank) with an adapter-only checkpoint and an
   export at fit end; the optimizer is built over *all* parameters (the strategy must drop the
   frozen ones).
B. A fresh model resumed from A's end-of-epoch checkpoint for a second epoch; C. an
   uninterrupted two-epoch run (same seed): B and C must end with the same weights.
D. frozen base stored in bf16 with bf16 compute, adapters kept as fp32 master weights.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning.pytorch as pl  # noqa: E402
from adapter_models import Classifier, base_name, count_checkpoint_writes, full, lora_callback, make_loader, probe_input  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from lightning_peft import AdapterFSDP2Strategy  # noqa: E402

OUT = Path(sys.argv[1])
RANK = int(os.environ.get("LOCAL_RANK", "0"))
WRITES = count_checkpoint_writes()


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full copies of the trainable tensors (collective, every rank)."""
    return {n: full(p) for n, p in module.named_parameters() if p.requires_grad}


class Snapshot(Callback):
    """The trainable tensors after injection."""

    def on_train_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        self.trainable = trainable_state(pl_module)


def trainer(epochs: int, strategy: AdapterFSDP2Strategy, callbacks: list, ckpt_dir: Path | None = None, max_steps: int = -1) -> pl.Trainer:
    if ckpt_dir is not None:
        callbacks = [*callbacks, ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0)]
    return pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        callbacks=callbacks,
        max_epochs=epochs,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=OUT,
        num_sanity_val_steps=0,
    )


def main() -> None:
    report: dict = {}

    # --- A: train, checkpoint, export -------------------------------------------------------
    torch.manual_seed(0)
    model = Classifier(optimize_all=True)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    snapshot = Snapshot()
    callback = lora_callback(export_dir=str(OUT / "export"))
    strategy = AdapterFSDP2Strategy()
    t = trainer(1, strategy, [callback, snapshot], OUT / "ckpt")
    t.fit(model, make_loader())
    report["units"] = strategy.sharded_units
    report["global_step"] = t.global_step
    report["losses"] = model.losses
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    report["frozen_all_dtensor"] = all(isinstance(p, DTensor) for p in frozen.values())
    report["trainable_all_dtensor"] = all(isinstance(p, DTensor) for p in trainable.values())
    report["frozen_sharded"] = all(p.to_local().shape[0] < p.shape[0] for p in frozen.values() if p.shape[0] >= 2)
    report["frozen_unchanged"] = all(torch.equal(full(p), initial[base_name(n)]) for n, p in frozen.items())
    report["n_frozen"], report["n_trainable"] = len(frozen), len(trainable)
    report["trainable_names"] = sorted(trainable)
    report["changed"] = sorted(n for n, p in trainable.items() if not torch.equal(full(p), snapshot.trainable[n]))
    optimizer = t.optimizers[0]
    report["optimizer_params"] = sum(len(g["params"]) for g in optimizer.param_groups)
    report["writes"] = WRITES.copy()
    model.eval()
    with torch.no_grad():
        logits = model(probe_input())
    if RANK == 0:
        torch.save({"logits": logits, "trainable": trainable_state(model)}, OUT / "sharded_A.pt")
    else:
        trainable_state(model)  # the gathers are collectives: every rank takes part

    # --- B: resume from A's checkpoint for a second epoch; C: two epochs straight -----------------
    torch.manual_seed(0)
    resumed = Classifier(optimize_all=True)
    t = trainer(2, AdapterFSDP2Strategy(), [lora_callback()])
    t.fit(resumed, make_loader(), ckpt_path=str(OUT / "ckpt" / "last.ckpt"))
    report["resumed_global_step"] = t.global_step
    report["resumed_losses"] = resumed.losses
    resumed_state = trainable_state(resumed)

    torch.manual_seed(0)
    straight = Classifier(optimize_all=True)
    t = trainer(2, AdapterFSDP2Strategy(), [lora_callback()])
    t.fit(straight, make_loader())
    straight_state = trainable_state(straight)
    report["straight_losses"] = straight.losses
    report["resume_max_diff"] = max((resumed_state[n] - straight_state[n]).abs().max().item() for n in straight_state)

    # --- D: frozen base in bf16, adapters fp32 ----------------------------------------------
    torch.manual_seed(0)
    mixed = Classifier()
    strategy = AdapterFSDP2Strategy(frozen_dtype="bfloat16", param_dtype="bfloat16", reduce_dtype="float32")
    snapshot = Snapshot()
    t = trainer(1, strategy, [lora_callback(), snapshot], max_steps=3)
    t.fit(mixed, make_loader())
    report["mixed_frozen_dtypes"] = sorted({str(p.dtype) for p in mixed.parameters() if not p.requires_grad})
    report["mixed_trainable_dtypes"] = sorted({str(p.dtype) for p in mixed.parameters() if p.requires_grad})
    state = t.optimizers[0].state
    report["mixed_optimizer_dtypes"] = sorted({str(v.dtype) for s in state.values() for k, v in s.items() if k != "step"})
    report["mixed_losses"] = mixed.losses
    report["mixed_changed"] = sum(not torch.equal(full(p), snapshot.trainable[n]) for n, p in mixed.named_parameters() if p.requires_grad)

    (OUT / f"rank{RANK}.json").write_text(json.dumps(report, indent=1))
    dist.barrier()


if __name__ == "__main__":
    main()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ddp_exit import finish_distributed

    finish_distributed()
