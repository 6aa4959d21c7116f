"""Continual fine-tuning benchmark: LiteLoRA against one adapter per task, one shared adapter and a
full fine-tune, on two offline task sequences; plus the adapter library's ``activate`` against
re-loading a full model copy.

Sequences (``benchmarks/continual_data.py``; task-incremental, one 2-way head per task):

* ``vision``: digits pairs (0,1) (2,3) (4,5) (6,7) (8,9), 40 train images per class, 50 test; a
  tiny timm ViT pretrained here on other images of digits 0-4;
* ``text``: BBC News topic one-vs-rest (5 tasks), 48 + 48 train articles, 40 + 40 test; the last
  MiniLM layer over the cached first five layers (48 tokens).

Methods (``benchmarks/continual_methods.py``): ``litelora`` (``lightning_peft.continual``
begin_task / l0_penalty / end_task into an ``AdapterLibrary``), ``lora_per_task`` (a new LoRA per
task into the library, no reuse), ``shared_lora`` (one LoRA trained sequentially),
``full_ft`` (all backbone weights trained sequentially). LoRA/LiteLoRA rank 4, alpha 8, on every
linear layer of the backbone. Same steps, batches and head init for every method.

Per method and sequence, over seeds (mean, sample std, per-seed values): the accuracy matrix
``acc[i][j]``, average accuracy, forgetting and backward transfer (``continual_metrics``),
adapters kept and adapter bytes (LiteLoRA: its ``TaskDecision.bytes``, i.e. recruited factors plus
4 bytes per stored coefficient; full fine-tune: the one full backbone copy), head bytes apart.

One thread (``torch.set_num_threads(1)``) on a shared 2-core machine.

    python benchmarks/continual.py            # full: 3 seeds, both sequences, ~20 min
    python benchmarks/continual.py --quick    # 1 seed, few steps (smoke run, ~2 min)
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import continual_data as cd  # noqa: E402
from continual_methods import METHODS, Budget, run_method  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

BUDGETS = {
    "vision": Budget(steps=60, batch=32, lr=5e-3, full_lr=1e-3, gate_lr=0.1),
    "text": Budget(steps=30, batch=16, lr=5e-3, full_lr=5e-4, gate_lr=0.2),
}
QUICK_STEPS = {"vision": 8, "text": 4}


def sequence(name: str, seed: int) -> tuple[Any, list[cd.Task], int]:
    """``(backbone, tasks, feature width)`` of a sequence for one seed."""
    if name == "vision":
        return cd.pretrained_vit(), cd.vision_tasks(seed), 64
    if name == "text":
        return cd.text_tail(), cd.text_tasks(seed), 384
    raise ValueError(f"unknown sequence {name!r}; choose 'vision' or 'text'")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean / sample std / values over seeds of the continual metrics and storage figures."""
    from lightning_peft.continual import continual_metrics

    per_seed = [continual_metrics(r["acc"]) for r in runs]

    def stat(values: list[float]) -> dict[str, Any]:
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}

    out = {key: stat([m[key] for m in per_seed]) for key in ("average_accuracy", "forgetting", "backward_transfer")}
    out["adapters_kept"] = stat([float(r["adapters_kept"]) for r in runs])
    out["adapter_bytes"] = stat([float(r["adapter_bytes"]) for r in runs])
    tasks = len(runs[0]["acc"])
    out["accuracy_matrix_mean"] = [[statistics.fmean(r["acc"][i][j] for r in runs) for j in range(i + 1)] for i in range(tasks)]
    out["head_bytes"] = runs[0]["head_bytes"]
    out["backbone_bytes"] = runs[0]["backbone_bytes"]
    out["seconds"] = stat([r["seconds"] for r in runs])
    return out


def run_sequence(name: str, seeds: list[int], methods: list[str], budget: Budget, log) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for seed in seeds:
        base, tasks, width = sequence(name, seed)
        for method in methods:
            result = run_method(method, base, tasks, budget, seed, width)
            runs[method].append(result)
            final = result["acc"][-1]
            log(f"[{name}] seed {seed} {method}: final row {[round(a, 3) for a in final]} kept {result['adapters_kept']} ({result['seconds']:.0f} s)")
    return {
        "tasks": [t.name for t in tasks],
        "train_examples_per_task": len(tasks[0].x_train),
        "test_examples_per_task": len(tasks[0].x_test),
        "budget": vars(budget),
        "methods": {m: summarize(r) for m, r in runs.items()},
        "runs": runs,
    }


def anchor_reading(seq: dict[str, Any]) -> dict[str, Any]:
    """LiteLoRA's adapters kept and accuracy against one adapter per task (the paper's comparison)."""
    lite, per_task = seq["methods"].get("litelora"), seq["methods"].get("lora_per_task")
    if lite is None or per_task is None:
        return {}
    fewer = 1.0 - lite["adapters_kept"]["mean"] / per_task["adapters_kept"]["mean"]
    return {
        "fewer_adapters_than_per_task": fewer,
        "bytes_ratio_vs_per_task": lite["adapter_bytes"]["mean"] / per_task["adapter_bytes"]["mean"],
        "accuracy_gap_vs_per_task": lite["average_accuracy"]["mean"] - per_task["average_accuracy"]["mean"],
        "paper_anchor": "20-70% fewer active adapters at matched accuracy",
    }


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sequences = list(results["sequences"])
    fig, axes = plt.subplots(len(sequences), 2, figsize=(11, 4 * len(sequences)), squeeze=False)
    colors = {"litelora": "tab:red", "lora_per_task": "tab:blue", "shared_lora": "tab:orange", "full_ft": "tab:gray"}
    for row, name in enumerate(sequences):
        methods = results["sequences"][name]["methods"]
        ax = axes[row][0]
        xs = range(len(methods))
        for k, (m, s) in enumerate(methods.items()):
            ax.bar(k - 0.2, s["average_accuracy"]["mean"], 0.4, yerr=s["average_accuracy"]["std"], color=colors[m], label=m)
            ax.bar(k + 0.2, s["forgetting"]["mean"], 0.4, yerr=s["forgetting"]["std"], color=colors[m], alpha=0.4, hatch="//")
        ax.set_xticks(list(xs), list(methods), rotation=15)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{name}: average accuracy (solid) and forgetting (hatched)")
        ax = axes[row][1]
        for m, s in methods.items():
            ax.errorbar(
                s["adapter_bytes"]["mean"], s["average_accuracy"]["mean"], yerr=s["average_accuracy"]["std"], fmt="o", color=colors[m], label=m
            )
            ax.annotate(f"{s['adapters_kept']['mean']:.1f} kept", (s["adapter_bytes"]["mean"], s["average_accuracy"]["mean"]), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("bytes kept (adapters / coefficients / full copy; heads apart)")
        ax.set_ylabel("average accuracy")
        ax.set_title(f"{name}: accuracy vs storage (mean ± std over seeds)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, few steps: a smoke run")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--sequences", nargs="+", default=["vision", "text"], choices=["vision", "text"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--activate-repeats", type=int, default=None)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/continual[_quick].json); the PNG goes beside it")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    out = Path(args.out) if args.out else RESULTS / ("continual_quick.json" if args.quick else "continual.json")
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    results: dict[str, Any] = {"quick": args.quick, "seeds": seeds, "threads": 1, "sequences": {}}
    for name in args.sequences:
        budget = BUDGETS[name]
        if args.quick:
            budget = Budget(**{**vars(budget), "steps": QUICK_STEPS[name]})
        results["sequences"][name] = run_sequence(name, seeds, args.methods, budget, log)
        results["sequences"][name]["anchor"] = anchor_reading(results["sequences"][name])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))  # partial results survive a later failure
    from continual_activate import run as activate_run

    results["activate_vs_full_reload"] = activate_run(args.activate_repeats or (3 if args.quick else 9))
    log("activate vs full reload: " + ", ".join(f"{r['base']}: {r['reload_over_activate']:.1f}x" for r in results["activate_vs_full_reload"]))
    results["wall_seconds"] = time.perf_counter() - started
    out.write_text(json.dumps(results, indent=1))
    if not args.quick:
        plot(results, out.with_suffix(".png"))
    log(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
