"""``lightning-peft fit`` (``cli_main``) with ``strategy=ddp`` on 2 CPU processes (gloo), a few
steps of ``configs/vit_digits.yaml``: ``python cli_ddp.py OUT_DIR``.

Lightning relaunches this script once per extra rank with the same arguments. Each rank writes
``OUT_DIR/rank{r}.json``: whether a process group is still initialised once ``cli_main`` returned
(the CLI closes it: barrier, then ``destroy_process_group``), and the world size it trained in.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch.distributed as dist  # noqa: E402

from lightning_peft.cli import cli_main  # noqa: E402

if __name__ == "__main__":
    out = Path(sys.argv[1])
    fast = ["--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1"]
    fast += ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    ddp = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp", f"--trainer.default_root_dir={out}"]
    cli = cli_main(["fit", "--config", str(ROOT / "configs" / "vit_digits.yaml"), *fast, *ddp])
    report = {"initialized_after": dist.is_initialized(), "world_size": cli.trainer.world_size}
    (out / f"rank{cli.trainer.global_rank}.json").write_text(json.dumps(report))
