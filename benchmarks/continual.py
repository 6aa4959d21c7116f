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

    python benchmarks/continual.py [--jobs 6] [--l0-weights 0.3 1.0]   # full: 3 seeds, both sequences
    python benchmarks/continual.py --quick    # 1 seed, few steps (smoke run, ~2 min)
"""

from __future__ import annotations

import argparse
import dataclasses
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

import continual_data as cd  # noqa: E402
import torch  # noqa: E402
from continual_methods import METHODS, Budget, run_method  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

BUDGETS = {
    "vision": Budget(steps=40, batch=32, lr=5e-3, full_lr=1e-3, gate_lr=0.15),
    "text": Budget(steps=20, batch=16, lr=5e-3, full_lr=5e-4, gate_lr=0.3),
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


def labels(methods: list[str], l0_weights: list[float]) -> list[str]:
    """Method labels: ``litelora`` once per L0 weight (``litelora_l0=<w>``), the others as they are."""
    return [f"litelora_l0={w:g}" for w in l0_weights] * ("litelora" in methods) + [m for m in methods if m != "litelora"]


def method_of(label: str, budget: Budget) -> tuple[str, Budget]:
    if label.startswith("litelora_l0="):
        return "litelora", dataclasses.replace(budget, l0_weight=float(label.split("=", 1)[1]))
    return label, budget


def run_cell(name: str, seed: int, methods: list[str], budget: Budget) -> tuple[list[str], list[dict[str, Any]]]:
    """Every method label on one sequence and seed (one process of the pool runs one cell)."""
    torch.set_num_threads(1)
    base, tasks, width = sequence(name, seed)
    results = []
    for label in methods:
        method, method_budget = method_of(label, budget)
        results.append({**run_method(method, base, tasks, method_budget, seed, width), "label": label})
    return [t.name for t in tasks], results


def run_sequences(names: list[str], seeds: list[int], methods: list[str], budgets: dict[str, Budget], jobs: int, log) -> dict[str, Any]:
    """All ``(sequence, seed)`` cells, ``jobs`` at a time in worker processes (``1``: in this one)."""
    cells = [(name, seed) for name in names for seed in seeds]
    outputs: dict[tuple[str, int], tuple[list[str], list[dict[str, Any]]]] = {}
    if jobs == 1:
        for name, seed in cells:
            outputs[name, seed] = run_cell(name, seed, methods, budgets[name])
            log(_cell_line(name, seed, outputs[name, seed][1]))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(run_cell, name, seed, methods, budgets[name]): (name, seed) for name, seed in cells}
            for future in as_completed(futures):
                name, seed = futures[future]
                outputs[name, seed] = future.result()
                log(_cell_line(name, seed, outputs[name, seed][1]))
    sequences = {}
    for name in names:
        runs = {m: [outputs[name, s][1][k] for s in seeds] for k, m in enumerate(methods)}
        seq = {
            "tasks": outputs[name, seeds[0]][0],
            "budget": vars(budgets[name]),
            "methods": {m: summarize(r) for m, r in runs.items()},
            "runs": runs,
        }
        seq["anchor"] = anchor_reading(seq)
        sequences[name] = seq
    return sequences


def _cell_line(name: str, seed: int, results: list[dict[str, Any]]) -> str:
    return f"[{name}] seed {seed}: " + "; ".join(
        f"{r['label']} final {[round(a, 2) for a in r['acc'][-1]]} kept {r['adapters_kept']} ({r['seconds']:.0f} s)" for r in results
    )


def anchor_reading(seq: dict[str, Any]) -> dict[str, Any]:
    """LiteLoRA's adapters kept and accuracy against one adapter per task (the paper's comparison)."""
    per_task = seq["methods"].get("lora_per_task")
    out: dict[str, Any] = {"paper_anchor": "20-70% fewer active adapters at matched accuracy"}
    for label, lite in seq["methods"].items():
        if per_task is None or not label.startswith("litelora"):
            continue
        out[label] = {
            "fewer_adapters_than_per_task": 1.0 - lite["adapters_kept"]["mean"] / per_task["adapters_kept"]["mean"],
            "bytes_ratio_vs_per_task": lite["adapter_bytes"]["mean"] / per_task["adapter_bytes"]["mean"],
            "accuracy_gap_vs_per_task": lite["average_accuracy"]["mean"] - per_task["average_accuracy"]["mean"],
        }
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sequences = list(results["sequences"])
    fig, axes = plt.subplots(len(sequences), 2, figsize=(11, 4 * len(sequences)), squeeze=False)
    fixed = {"lora_per_task": "tab:blue", "shared_lora": "tab:orange", "full_ft": "tab:gray"}
    lite = [m for m in results["sequences"][sequences[0]]["methods"] if m not in fixed]
    colors = {**fixed, **{m: plt.cm.Reds(0.45 + 0.5 * k / max(1, len(lite) - 1)) for k, m in enumerate(lite)}}
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
                s["adapter_bytes"]["mean"],
                s["average_accuracy"]["mean"],
                yerr=s["average_accuracy"]["std"],
                fmt="o",
                color=colors[m],
                label=m,
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
    parser.add_argument("--l0-weights", type=float, nargs="+", default=[0.3, 1.0], help="LiteLoRA runs, one per L0 weight")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes, one (sequence, seed) cell each")
    parser.add_argument("--activate-only", action="store_true", help="only the activate-vs-full-reload timing (continual_activate.json)")
    parser.add_argument("--skip-activate", action="store_true", help="skip the activate-vs-full-reload timing")
    parser.add_argument("--activate-repeats", type=int, default=None)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/continual[_quick].json); the PNG goes beside it")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    default = "continual_activate.json" if args.activate_only else "continual_quick.json" if args.quick else "continual.json"
    out = Path(args.out) if args.out else RESULTS / default
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    results: dict[str, Any] = {"quick": args.quick, "seeds": seeds, "threads": 1, "sequences": {}}
    if args.activate_only:
        from continual_activate import run as activate_run

        results = {"threads": 1, "activate_vs_full_reload": activate_run(args.activate_repeats or 9)}
        out.write_text(json.dumps(results, indent=1))
        log(f"wrote {out}")
        return results
    budgets = {n: Budget(**{**vars(BUDGETS[n]), "steps": QUICK_STEPS[n]}) if args.quick else BUDGETS[n] for n in args.sequences}
    results["sequences"] = run_sequences(args.sequences, seeds, labels(args.methods, args.l0_weights), budgets, args.jobs, log)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))  # the training results survive a later failure
    from continual_activate import run as activate_run

    if not args.skip_activate:
        results["activate_vs_full_reload"] = activate_run(args.activate_repeats or (3 if args.quick else 9))
        log(
            "activate vs full reload: "
            + ", ".join(f"{r['base']}: {r['reload_over_activate']:.1f}x" for r in results["activate_vs_full_reload"])
        )
    results["wall_seconds"] = time.perf_counter() - started
    out.write_text(json.dumps(results, indent=1))
    if not args.quick:
        plot(results, out.with_suffix(".png"))
    log(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
