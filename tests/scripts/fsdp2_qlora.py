"""QLoRA under AdapterFSDP2Strategy on 2 CPU processes (gloo): ``python fsdp2_qlora.py OUT_DIR``.

The 4-bit base weights are left whole (FSDP cannot split their packing and quantization
state); everything else is sharded. Each rank writes ``OUT_DIR/rank{r}.json``; rank 0 writes the
sharded model's probe logits and the checkpoint.
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
from adapter_models import HEAD, Classifier, full, make_loader, probe_input  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from lightning_peft import AdapterCallback, AdapterFSDP2Strategy, QLoRA  # noqa: E402

OUT = Path(sys.argv[1])
RANK = int(os.environ.get("LOCAL_RANK", "0"))


class Snapshot(Callback):
    def on_train_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        self.params = {n: full(p) for n, p in pl_module.named_parameters()}


def main() -> None:
    torch.manual_seed(0)
    model = Classifier()
    snapshot = Snapshot()
    strategy = AdapterFSDP2Strategy()
    callback = AdapterCallback(QLoRA(rank=4, alpha=8, target_modules=["fc1", "fc2"], compute_dtype="float32"), trainable_modules=HEAD)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        callbacks=[callback, snapshot, ModelCheckpoint(dirpath=OUT / "ckpt", save_last=True, save_top_k=0)],
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=OUT,
    )
    trainer.fit(model, make_loader())
    params = dict(model.named_parameters())
    quantized = sorted(n for n, p in params.items() if type(p).__name__ == "Params4bit")
    report = {
        "unsharded": strategy.unsharded_parameters,
        "quantized": quantized,
        "quantized_whole": all(not isinstance(params[n], DTensor) for n in quantized),
        "others_sharded": all(isinstance(p, DTensor) for n, p in params.items() if n not in quantized),
        "changed": sorted(n for n, p in params.items() if not torch.equal(full(p), snapshot.params[n])),
        "trainable": sorted(n for n, p in params.items() if p.requires_grad),
        "losses": model.losses,
    }
    # train mode (the model has no dropout): bitsandbytes' CPU eval path repacks 4-bit weights
    # in place and fails for in_features < its block size (64)
    with torch.no_grad():
        logits = model(probe_input())
    if RANK == 0:
        torch.save(logits, OUT / "logits.pt")
    (OUT / f"rank{RANK}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ddp_exit import finish_distributed

    finish_distributed()
