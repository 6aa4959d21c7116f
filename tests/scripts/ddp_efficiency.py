"""``strategy="ddp"`` on 2 CPU processes (gloo) with EfficiencyCallback: ``python ddp_efficiency.py OUT_DIR``.

Each rank has a constant 10 W source on a step clock (every interval lasts 1 s), writes its
``callback.results`` to ``OUT_DIR/rank{r}.json`` and points the callback's ``output_dir`` at
``OUT_DIR/eff{r}``, so the test sees which ranks wrote ``efficiency.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from fake_devices import StepClock  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_peft import EfficiencyCallback  # noqa: E402
from lightning_peft.metrics import ConstantPowerSource  # noqa: E402

OUT = Path(sys.argv[1])
RANK = int(os.environ.get("LOCAL_RANK", "0"))


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(6, 3)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(-1) == y).float().mean(), on_epoch=True, sync_dist=True, batch_size=len(y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 6, generator=g)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)


if __name__ == "__main__":
    pl.seed_everything(0)
    callback = EfficiencyCallback(energy_source=ConstantPowerSource(10.0, clock=StepClock(1.0)), output_dir=str(OUT / f"eff{RANK}"))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=2,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=OUT,
    )
    model = Tiny()
    trainer.fit(model, loader())
    trainer.test(model, loader())
    (OUT / f"rank{trainer.global_rank}.json").write_text(json.dumps(callback.results, default=str))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ddp_exit import finish_distributed

    finish_distributed()
