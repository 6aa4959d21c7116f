"""EPnG on 2 CPU processes (gloo): ``python epng_ddp.py OUT_DIR [ddp|fsdp2]`` -- plain
``strategy="ddp"`` (default) or ``AdapterFSDP2Strategy`` (FSDP2: expert factors sharded over the
expert dimension, rank changes written shard-locally).

Lightning's launcher re-runs this script for rank 1. Each process sees different batches
(DistributedSampler), so its local router statistics differ; the callback all-reduces them, so
both must take the same prune/grow decisions and end with identical ranks, importance and
adapter weights. Each rank writes ``OUT_DIR/rank{r}.json``.

The helpers (tiny OLMoE causal LM, token data) are shared with ``tests/adapters/test_epng.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

TINY_OLMOE: dict[str, Any] = {
    "model_type": "olmoe",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 64,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


class Tokens(Dataset):
    """Deterministic token sequences with some structure (repeated n-grams), causal-LM batches."""

    def __init__(self, n: int = 32, length: int = 16, seed: int = 0, vocab: int = 64) -> None:
        g = torch.Generator().manual_seed(seed)
        base = torch.randint(3, vocab, (n, length // 2), generator=g)
        self.ids = torch.cat([base, base.flip(1)], dim=1)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def loader(n: int = 32, batch_size: int = 4, seed: int = 0) -> DataLoader:
    return DataLoader(Tokens(n, seed=seed), batch_size=batch_size, shuffle=False)


def make_module(seed: int = 0, lr: float = 1e-2, schedule: str = "constant", warmup: int = 0) -> Any:
    from lightning_peft.modules.causal_lm import CausalLM

    torch.manual_seed(seed)
    module = CausalLM(config=dict(TINY_OLMOE), lr=lr, schedule=schedule, warmup_steps=warmup)  # type: ignore[arg-type]
    # sharper routers than the 0.02 default init, so that experts' router probabilities differ clearly
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(std=0.5)
    return module


def digest(module: torch.nn.Module) -> str:
    from lightning_peft.adapters.rank_ops import full_tensor

    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters()):
        if p.requires_grad:  # full_tensor: all-gathers FSDP2 shards (every rank calls it)
            h.update(name.encode())
            h.update(full_tensor(p.detach()).cpu().double().numpy().tobytes())
    return h.hexdigest()[:16]


def main(out: Path, strategy_name: str = "ddp") -> None:
    import lightning.pytorch as pl

    from lightning_peft import AdapterCallback, ExpertImportanceCallback, ExpertLoRA, LoRA
    from lightning_peft.adapters.experts import expert_layers

    pl.seed_everything(0)
    module = make_module()
    epng = ExpertImportanceCallback(prune_fraction=0.25, grow_fraction=0.25, warmup_steps=2, interval=2, heatmap=False)
    adapter = AdapterCallback([ExpertLoRA(rank=2, max_rank=4), LoRA(rank=2, target_modules=["q_proj"])])
    strategy: Any = "ddp"
    if strategy_name == "fsdp2":
        from lightning_peft import AdapterFSDP2Strategy

        strategy = AdapterFSDP2Strategy(process_group_backend="gloo")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=8,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(out),
        callbacks=[adapter, epng],
    )
    trainer.fit(module, train_dataloaders=loader(n=64))
    rank = trainer.global_rank
    result = {
        "rank": rank,
        "history": epng.history,
        "importance": [t.tolist() for t in epng.importance],
        "ranks": [l.ranks for l in expert_layers(module).values()],
        "digest": digest(module),
        "world_size": trainer.world_size,
        "sharded": any(type(p).__name__ == "DTensor" for p in module.parameters()),
        "budget_ok": all(h["trainable"] <= epng.initial_budget for h in epng.history),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "ddp")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ddp_exit import finish_distributed

    finish_distributed()
