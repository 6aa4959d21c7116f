"""BaRA vs LoRA in the low-data regime: BBC News topics with the pretrained MiniLM encoder, CPU.

Setting (same for both methods): all-MiniLM-L6-v2 (frozen), mean pooling, a trainable 5-way
linear head; articles truncated to ``--max-length``
tokens (64); AdamW (lr 5e-3, no weight decay; BaRA's gate logits at 5e-2), batch 16, a fixed
number of steps per data size (50 / 75 / 100). To fit the CPU budget the first 4 encoder layers
run once over all articles (frozen, no adapters there: their outputs are cached) and the
adapters sit on ``query``/``value`` of the last 2 layers.

* ``lora``: ``LoRA(rank=8, alpha=16)``;
* ``bara``: ``BaRA(max_rank=16, alpha=32, prior=0.2, local_gate=True)`` with the ELBO's
  per-example KL weight ``kl_weight = 1 / N_train``; evaluated with the expected gate
  (``bara``) and as a model-level predictive mean over ``samples=4`` gate draws (``bara_mc``).

Training sets: the first ``n`` articles per class (``n`` = 16, 64, 256) of a seed-shuffled pool;
the test set is a fixed 40 articles per class held out from every pool. Metrics on the test set:
accuracy, expected calibration error (torchmetrics ``MulticlassCalibrationError``, 15 bins,
L1), negative log-likelihood (nats), and BaRA's learned effective ranks (per layer, averaged:
``global_rank = sum pi``, ``joint_rank = E_tokens[sum pi z_local]``, over the test tokens).
3 seeds (adapter init, data choice and order, gate noise); mean and sample std.

Overhead, on the full encoder (embeddings and all 6 layers, adapters on every ``query``/``value``,
batch 16 x 64 tokens): step time (forward + backward + AdamW) of BaRA over LoRA rank 8 (the
quality baseline) and over LoRA rank 16 (BaRA's pool size), median of interleaved repeats in the
same process, and the activation bytes saved for backward (saved-tensor meter).

One thread (``torch.set_num_threads(1)``) on a shared 2-core machine. The full run took 28 min of
wall time there with other jobs running (``--quick``: one seed, 16 and 64 per class, 10 steps,
3 overhead repeats; about 5 min).

    python benchmarks/bara.py [--quick] [--out benchmarks/results/bara.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

TARGETS = ["query", "value"]
TEST_PER_CLASS = 40
CACHED = 4  # the frozen first layers run once; adapters train on the last 6 - CACHED layers
BATCH = 16
LR = 5e-3
GATE_LR = 5e-2
SAMPLES = 4


# --------------------------------------------------------------------------------------------
# Data and model
# --------------------------------------------------------------------------------------------
def load_data(max_length: int) -> tuple[dict[str, torch.Tensor], list[list[int]], list[int]]:
    """BBC News as the frozen encoder's hidden states after its first ``CACHED`` layers
    (``hidden [2225, T, 384]``, computed once), the per-class train pools and the test indices.
    Every article is longer than 64 tokens, so no padding and no attention mask is needed."""
    from transformers import AutoModel

    from lightning_peft.datamodules.text import default_text_model_path, load_bbc_news, load_tokenizer

    texts, labels, _ = load_bbc_news()
    tok = load_tokenizer(default_text_model_path())
    ids = tok(texts, max_length=max_length, truncation=True, padding="max_length", return_tensors="pt")["input_ids"]
    encoder = AutoModel.from_pretrained(default_text_model_path(), local_files_only=True).eval()
    chunks = []
    with torch.no_grad():
        for start in range(0, len(ids), 64):
            h = encoder.embeddings(input_ids=ids[start : start + 64])
            for layer in encoder.encoder.layer[:CACHED]:
                h = _layer(layer, h)
            chunks.append(h)
    data = {"hidden": torch.cat(chunks), "input_ids": ids, "labels": torch.tensor(labels)}
    g = torch.Generator().manual_seed(1234)
    pools, test = [], []
    for c in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == c]
        idx = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
        test += idx[:TEST_PER_CLASS]
        pools.append(idx[TEST_PER_CLASS:])
    return data, pools, test


def _layer(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
    out = layer(h)
    return out[0] if isinstance(out, tuple) else out


class Classifier(nn.Module):
    """The encoder's layers from ``first`` on (``first=CACHED``: the top layers over cached
    hidden states; ``first=0``: embeddings and all layers, for the overhead measurement), mean
    pooling and a 5-way head."""

    def __init__(self, first: int) -> None:
        super().__init__()
        from transformers import AutoModel

        from lightning_peft.datamodules.text import default_text_model_path

        encoder = AutoModel.from_pretrained(default_text_model_path(), local_files_only=True)
        for module in encoder.modules():  # no dropout in the frozen encoder (as the quickstart)
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        self.embeddings = encoder.embeddings if first == 0 else None
        self.layers = nn.ModuleList(encoder.encoder.layer[first:])
        self.classifier = nn.Linear(encoder.config.hidden_size, 5)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        h = self.embeddings(input_ids=hidden) if self.embeddings is not None else hidden
        for layer in self.layers:
            h = _layer(layer, h)
        return self.classifier(h.mean(dim=1))


def build(method: str, n_train: int, seed: int, first: int = -1, lora_rank: int = 8) -> nn.Module:
    from lightning_peft import BaRA, LoRA, apply_adapter

    torch.manual_seed(seed)
    model = Classifier(CACHED if first < 0 else first)
    if method == "lora":
        spec = LoRA(rank=lora_rank, alpha=2.0 * lora_rank, target_modules=TARGETS)
    else:
        spec = BaRA(max_rank=16, alpha=32.0, prior=0.2, kl_weight=1.0 / n_train, samples=SAMPLES, target_modules=TARGETS)
    apply_adapter(model, spec, trainable_modules=["classifier"], check_gradients=False)
    return model


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, labels: torch.Tensor, bara: bool) -> float:
    from lightning_peft.adapters.bara import add_kl_gradients

    loss = F.cross_entropy(model(x), labels)
    loss.backward()
    if bara:
        add_kl_gradients(model)  # the plain-loop form of what BaRACallback does
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW at ``LR``; BaRA's global gate logits at ``GATE_LR`` (Adam moves a parameter about
    ``lr`` per step whatever its gradient's size, so at ``LR`` the logits could move only ~0.3 in
    100 steps and the learned rank would mostly be the initial one)."""
    gates = [p for n, p in model.named_parameters() if n.endswith("gate_logit")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("gate_logit")]
    groups = [{"params": rest}] + ([{"params": gates, "lr": GATE_LR}] if gates else [])
    return torch.optim.AdamW(groups, lr=LR, weight_decay=0.0)


# --------------------------------------------------------------------------------------------
# Quality
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(model: nn.Module, data: dict[str, torch.Tensor], test: list[int], forwards: int = 1) -> torch.Tensor:
    """Class probabilities ``[N, 5]`` (mean of ``forwards`` softmaxes: BaRA's predictive mean)."""
    from lightning_peft.adapters.bara import monte_carlo

    model.eval()
    out = []
    for start in range(0, len(test), 50):
        h = data["hidden"][test[start : start + 50]]
        if forwards == 1:
            out.append(model(h).softmax(-1))
        else:
            with monte_carlo(model):
                out.append(torch.stack([model(h).softmax(-1) for _ in range(forwards)]).mean(0))
    model.train()
    return torch.cat(out)


def scores(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    from torchmetrics.classification import MulticlassCalibrationError

    ece = MulticlassCalibrationError(num_classes=5, n_bins=15, norm="l1")
    return {
        "accuracy": float((probs.argmax(-1) == labels).float().mean()),
        "ece": float(ece(probs, labels)),
        "nll": float(F.nll_loss(probs.clamp_min(1e-12).log(), labels)),
    }


def run_setting(method: str, n: int, seed: int, steps: int, data: dict, pools: list, test: list) -> dict[str, Any]:
    from lightning_peft.adapters.bara import effective_ranks, reset_rank_stats

    g = torch.Generator().manual_seed(seed)
    train = [i for pool in pools for i in [pool[j] for j in torch.randperm(len(pool), generator=g).tolist()][:n]]
    model = build(method, len(train), seed)
    opt = optimizer(model)
    order: list[int] = []
    t0 = time.perf_counter()
    losses = []
    for _ in range(steps):
        if len(order) < BATCH:
            order += [train[j] for j in torch.randperm(len(train), generator=g).tolist()]
        idx, order = order[:BATCH], order[BATCH:]
        losses.append(train_step(model, opt, data["hidden"][idx], data["labels"][idx], method == "bara"))
    train_s = time.perf_counter() - t0
    labels = data["labels"][test]
    out: dict[str, Any] = {"train_s": round(train_s, 1), "final_train_loss": statistics.fmean(losses[-5:])}
    if method == "bara":
        reset_rank_stats(model)
        out["bara"] = scores(predict(model, data, test), labels)
        ranks = effective_ranks(model)  # over the test tokens of the expected-gate pass
        out["global_rank"] = statistics.fmean(r["global_rank"] for r in ranks.values())
        out["joint_rank"] = statistics.fmean(r["joint_rank"] for r in ranks.values())
        out["bara_mc"] = scores(predict(model, data, test, forwards=SAMPLES), labels)
    else:
        out["lora"] = scores(predict(model, data, test), labels)
    return out


# --------------------------------------------------------------------------------------------
# Overhead
# --------------------------------------------------------------------------------------------
def overhead(data: dict, pools: list, repeats: int) -> dict[str, Any]:
    from lightning_peft.memory.meters import SavedTensorMeter

    """Full encoder (embeddings and all 6 layers, adapters on every query/value), batch 16."""
    models = {
        "lora": build("lora", 80, 0, first=0),
        "lora16": build("lora", 80, 0, first=0, lora_rank=16),
        "bara": build("bara", 80, 0, first=0),
    }
    opts = {m: optimizer(models[m]) for m in models}
    idx = [p[i] for p in pools for i in range(BATCH // len(pools) + 1)][:BATCH]
    x, labels = data["input_ids"][idx], data["labels"][idx]
    times: dict[str, list[float]] = {m: [] for m in models}
    for rep in range(repeats + 2):  # interleaved; the first two rounds are warm-up
        for m in models:
            t = time.perf_counter()
            train_step(models[m], opts[m], x, labels, m == "bara")
            if rep >= 2:
                times[m].append(time.perf_counter() - t)
    saved = {}
    for m, model in models.items():
        with SavedTensorMeter(model) as meter:
            loss = F.cross_entropy(model(x), labels)
        loss.backward()
        model.zero_grad(set_to_none=True)
        saved[m] = meter.bytes
    med = {m: statistics.median(t) for m, t in times.items()}
    return {
        "repeats": repeats,
        "step_s_median": med,
        "step_time_ratio_bara_over_lora": med["bara"] / med["lora"],
        "step_time_ratio_bara_over_lora16": med["bara"] / med["lora16"],
        "saved_activation_bytes": saved,
        "memory_ratio_bara_over_lora": saved["bara"] / saved["lora"],
        "memory_ratio_bara_over_lora16": saved["bara"] / saved["lora16"],
        "trainable_parameters": {m: sum(p.numel() for p in model.parameters() if p.requires_grad) for m, model in models.items()},
    }


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in sorted({r["n_per_class"] for r in runs}):
        row: dict[str, Any] = {}
        for variant in ("lora", "bara", "bara_mc"):
            vals = [r[variant] for r in runs if r["n_per_class"] == n and variant in r]
            row[variant] = {k: _mean_std([v[k] for v in vals]) for k in ("accuracy", "ece", "nll")}
        for key in ("global_rank", "joint_rank"):
            row[key] = _mean_std([r[key] for r in runs if r["n_per_class"] == n and key in r])
        out[str(n)] = row
    return out


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [int(n) for n in summary]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, metric in zip(axes[:3], ("accuracy", "ece", "nll")):
        for variant, style in (("lora", "o-"), ("bara", "s-"), ("bara_mc", "^--")):
            m = [summary[str(n)][variant][metric]["mean"] for n in ns]
            s = [summary[str(n)][variant][metric]["std"] for n in ns]
            ax.errorbar(ns, m, yerr=s, fmt=style, capsize=3, label=variant)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training examples per class")
        ax.set_title(metric)
        ax.legend()
    for key, style in (("global_rank", "s-"), ("joint_rank", "^-")):
        axes[3].errorbar(
            ns, [summary[str(n)][key]["mean"] for n in ns], yerr=[summary[str(n)][key]["std"] for n in ns], fmt=style, capsize=3, label=key
        )
    axes[3].axhline(16, color="grey", lw=0.8, ls=":", label="max_rank")
    axes[3].set_xscale("log", base=2)
    axes[3].set_xlabel("training examples per class")
    axes[3].set_title("BaRA effective rank (mean over layers)")
    axes[3].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, two sizes, 10 steps (~5 min on the shared machine)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = {16: 10, 64: 10} if args.quick else {16: 50, 64: 75, 256: 100}  # n per class -> steps
    seeds = args.seeds[:1] if args.quick else args.seeds
    out_path = Path(args.out or f"benchmarks/results/bara{'_quick' if args.quick else ''}.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data, pools, test = load_data(args.max_length)
    runs = []
    for n, steps in sizes.items():
        for seed in seeds:
            for method in ("lora", "bara"):
                r = {
                    "n_per_class": n,
                    "seed": seed,
                    "method": method,
                    "steps": steps,
                    **run_setting(method, n, seed, steps, data, pools, test),
                }
                runs.append(r)
                print(json.dumps(r), flush=True)
    over = overhead(data, pools, repeats=3 if args.quick else 10)
    print(json.dumps(over), flush=True)
    summary = summarise(runs)
    result = {
        "benchmark": "bara",
        "setting": {
            "model": "all-MiniLM-L6-v2 (frozen) + mean pooling + linear head",
            "targets": TARGETS,
            "lora": "LoRA(rank=8, alpha=16)",
            "bara": "BaRA(max_rank=16, alpha=32, prior=0.2, kl_weight=1/N_train, local_gate=True)",
            "bara_mc": f"the same BaRA models, predictive mean of {SAMPLES} forwards with sampled gates",
            "max_length": args.max_length,
            "batch": BATCH,
            "lr": LR,
            "optimizer": f"AdamW, weight_decay 0; BaRA gate logits at lr {GATE_LR}",
            "steps_per_setting": {str(k): v for k, v in sizes.items()},
            "test_examples": len(test),
            "seeds": seeds,
            "ece": "torchmetrics MulticlassCalibrationError(n_bins=15, norm='l1')",
        },
        "threads": torch.get_num_threads(),
        "machine": "shared 2-core CPU machine (other jobs running); times are indicative, ratios from interleaved repeats",
        "quick": args.quick,
        "summary": summary,
        "overhead": over,
        "runs": runs,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    out_path.write_text(json.dumps(result, indent=2))
    plot(summary, out_path.with_suffix(".png"))
    print(f"wrote {out_path} and {out_path.with_suffix('.png')} in {result['wall_s']} s")


if __name__ == "__main__":
    main()
