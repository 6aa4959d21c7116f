"""Plain ``strategy="ddp"`` + ``AdapterCallback(BaRA(...))`` on 2 CPU processes (gloo): run as
``python bara_ddp.py OUT_DIR``. Each rank seeds its own RNG differently (so its gate noise
differs), trains 4 steps, and writes ``OUT_DIR/rank{r}.json`` (the gate noise it drew first,
its losses) and ``OUT_DIR/rank{r}.pt`` (its final trainable tensors)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning.pytorch as pl  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_peft import AdapterCallback, BaRA  # noqa: E402
from lightning_peft.adapters.bara import bara_layers  # noqa: E402

OUT = Path(sys.argv[1])
RANK = int(os.environ.get("LOCAL_RANK", "0"))


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 3))

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=0.05)


class FirstNoise(Callback):
    def on_train_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        torch.manual_seed(100 + trainer.global_rank)  # each rank its own gate-noise stream
        state = torch.get_rng_state()
        self.noise = bara_layers(pl_module)["net.0"]._concrete((2,), torch.float32).tolist()
        torch.set_rng_state(state)


def main() -> None:
    torch.manual_seed(0)  # the same base and adapter init on every rank
    module = Tiny()
    module.losses = []
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g))
    noise = FirstNoise()
    spec = BaRA(max_rank=4, prior=0.1, kl_weight=0.1, target_modules=["net.0", "net.2"])
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=4,
        callbacks=[AdapterCallback(spec), noise],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(data, batch_size=8))
    OUT.mkdir(parents=True, exist_ok=True)
    trained = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    torch.save(trained, OUT / f"rank{RANK}.pt")
    (OUT / f"rank{RANK}.json").write_text(json.dumps({"noise": noise.noise, "losses": module.losses, "names": sorted(trained)}))


if __name__ == "__main__":
    main()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ddp_exit import finish_distributed

    finish_distributed()
