"""HRM with balanced-truncation calibration under ``strategy="ddp"`` on 2 CPU processes (gloo):
run as ``python hrm_ddp.py OUT_DIR``. The ranks get different batches (DistributedSampler), so
their own calibrations differ; rank 0's result is broadcast. Each rank writes
``OUT_DIR/rank{r}.pt``: its HRM tensors at the first training batch, and the report's site names.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning.pytorch as pl  # noqa: E402
from hrm_models import LLAMA_CONFIG, token_loader  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from lightning_peft import HRM, AdapterCallback  # noqa: E402
from lightning_peft.callbacks.hrm import HRMCalibrationCallback  # noqa: E402
from lightning_peft.modules.causal_lm import CausalLM  # noqa: E402

OUT = Path(sys.argv[1])
RANK = int(os.environ.get("LOCAL_RANK", "0"))


class Probe(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        if batch_idx == 0:
            cal = next(c for c in trainer.callbacks if isinstance(c, HRMCalibrationCallback))
            tensors = {n: p.detach().clone() for n, p in pl_module.named_parameters() if "mlp" in n and "base_layer" not in n}
            torch.save({"tensors": tensors, "sites": [s.name for s in cal.report.sites], "tokens": cal.report.sites[0].tokens},
                       OUT / f"rank{RANK}.pt")  # fmt: skip


def main() -> None:
    torch.manual_seed(0)
    model = CausalLM(config=dict(LLAMA_CONFIG))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=2,
        callbacks=[AdapterCallback(HRM(state_dim=4, input_dim=4, fit_lags=2, calibration_batches=2)), Probe()],
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, default_root_dir=OUT,
    )  # fmt: skip
    trainer.fit(model, token_loader(n=32, batch_size=4, shuffle=True))


if __name__ == "__main__":
    main()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ddp_exit import finish_distributed

    finish_distributed()
