"""Aggregation, ratios, the memory-budget table, the paper comparison and the figures of the
five-regime study (``benchmarks/peft_study.py``). Works on the study's JSON state in place."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any

MIB = 1024**2
METRICS = (
    "test_acc",
    "fit_seconds",
    "fit_energy_joules",
    "fit_peak_memory_mib",
    "infer_seconds",
    "infer_energy_joules",
    "infer_peak_memory_mib",
    "params",
    "trainable_params",
    "macs_per_sample",
    "netscore",
    "ns_e",
    "ns_m",
    "ns_sharp",
    "recompute_fraction_mean",
)
RATIOS = (("fit_seconds", "time"), ("fit_energy_joules", "energy"), ("fit_peak_memory_mib", "peak_memory"))
PAPER = {
    "source": "Toktassyn & Park, arXiv 2607.02158 (ViT-S baselines, CIFAR-100/DTD, a 2 GB VRAM budget, a GPU)",
    "qlora_bitfit_energy_change_pct": [-30, -20],
    "qlora_bitfit_accuracy_change_points": [-2, -1],
    "adaptive_peak_memory_change_pct": [-79, -43],
    "adaptive_energy_change_pct": [9, 30],
    "probe_vs_finetune_accuracy": {"probe (frozen DINOv2)": 0.917, "fine-tuned (ViT-S full FT)": 0.897},
}


def ok(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if not r.get("failed")]


def stats(values: list[float | None]) -> dict[str, Any] | None:
    """Mean, sample standard deviation, min, max and n of the non-missing values (``None`` if none)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
    }


def fix_qlora_macs(records: list[dict[str, Any]]) -> None:
    """torch's FlopCounterMode does not see bitsandbytes' 4-bit matmul (a custom operator), so a
    QLoRA cell's counted MACs miss every quantized layer. Its matmul shapes are exactly LoRA's
    (same targets, same rank), so QLoRA takes the LoRA cell's count (kept: ``macs_per_sample_counted``)
    and its NetScore is recomputed with it."""
    from lightning_peft.metrics import netscore

    lora = {(r["cell"]["backbone"], r["cell"]["seed"]): r["macs_per_sample"] for r in ok(records) if r["cell"]["regime"] == "lora"}
    for r in ok(records):
        c = r["cell"]
        if c["regime"] != "qlora" or (c["backbone"], c["seed"]) not in lora or "macs_per_sample_counted" in r:
            continue
        r["macs_per_sample_counted"] = r["macs_per_sample"]
        r["macs_per_sample"] = lora[(c["backbone"], c["seed"])]
        r["macs_note"] = "LoRA's count: FlopCounterMode misses bitsandbytes' 4-bit matmuls (same shapes as LoRA)"
        if r.get("accuracy") and r.get("params") and r["macs_per_sample"]:
            r["netscore"] = netscore(r["accuracy"], r["params"] / 1e6, r["macs_per_sample"] / 1e6)


def add_ratios(records: list[dict[str, Any]]) -> None:
    """Per record, ratios against Full FT without checkpointing of the same backbone and seed
    (measured in the same run) and the accuracy change in points."""
    base = {(r["cell"]["backbone"], r["cell"]["seed"]): r for r in ok(records) if r["key"].endswith("/full/none")}
    for r in ok(records):
        b = base.get((r["cell"]["backbone"], r["cell"]["seed"]))
        if b is None:
            continue
        for key, name in RATIOS:
            r[f"{name}_vs_full"] = r[key] / b[key] if r.get(key) is not None and b.get(key) else None
        r["acc_change_points_vs_full"] = 100.0 * (r["test_acc"] - b["test_acc"])


def aggregate(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per cell key (backbone/regime/checkpointing): mean/std/min/max/n of every metric and ratio."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[r["key"]].append(r)
    out = {}
    for key, rs in groups.items():
        good = ok(rs)
        cell = {"backbone": rs[0]["cell"]["backbone"], "regime": rs[0]["cell"]["regime"], "checkpointing": rs[0]["cell"]["checkpointing"]}
        cell["seeds_ok"], cell["seeds_failed"] = len(good), len(rs) - len(good)
        cell["infeasible"] = any(r.get("infeasible") for r in rs)
        cell["errors"] = sorted({r["error"][:300] for r in rs if r.get("failed")})
        names = [*METRICS, *(f"{n}_vs_full" for _, n in RATIOS), "acc_change_points_vs_full"]
        cell.update({name: stats([r.get(name) for r in good]) for name in names})
        cell["checkpointed_blocks_final"] = [r["checkpointed_blocks_final"] for r in good]
        out[key] = cell
    return out


def mean(cell: dict[str, Any] | None, name: str) -> float | None:
    s = (cell or {}).get(name)
    return None if s is None else s["mean"]


def budget_table(state: dict[str, Any], cells: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per backbone: the budget, which cells fit it (mean training peak), and which regimes fit
    only with adaptive checkpointing."""
    out = {}
    for backbone, budget in state["memory_budget_bytes"].items():
        mib = budget / MIB
        fits, enabled = {}, []
        for key, c in cells.items():
            if c["backbone"] != backbone:
                continue
            peak = mean(c, "fit_peak_memory_mib")
            fits[key] = None if peak is None else peak <= mib * (1 + 1e-9)
        for regime in {c["regime"] for c in cells.values() if c["backbone"] == backbone}:
            none_fit = fits.get(f"{backbone}/{regime}/none")
            if none_fit is False and fits.get(f"{backbone}/{regime}/adaptive"):
                enabled.append(regime)
        out[backbone] = {"budget_mib": mib, "fits": fits, "fit_only_with_adaptive": sorted(enabled)}
    return out


def pct(ratio: float | None) -> float | None:
    return None if ratio is None else 100.0 * (ratio - 1.0)


def paper_comparison(cells: dict[str, dict[str, Any]], energy_measured: bool) -> dict[str, Any]:
    """Our figures beside the paper's headline claims (energy where measured, else train time)."""
    cost = "energy" if energy_measured else "time"
    out: dict[str, Any] = {"paper": PAPER, "cost_measure": cost, "backbones": {}}
    for backbone in sorted({c["backbone"] for c in cells.values()}):

        def get(regime: str, ckpt: str, backbone: str = backbone) -> dict[str, Any] | None:
            return cells.get(f"{backbone}/{regime}/{ckpt}")

        row: dict[str, Any] = {}
        for regime in ("qlora", "bitfit"):
            c = get(regime, "none")
            row[f"{regime}_vs_full"] = {
                f"{cost}_change_pct": pct(mean(c, f"{cost}_vs_full")),
                "accuracy_change_points": mean(c, "acc_change_points_vs_full"),
                "accuracy_change_points_std": ((c or {}).get("acc_change_points_vs_full") or {}).get("std"),
            }
        for strategy in ("adaptive", "static"):
            per = {}
            for regime in ("full", "lora", "adalora", "qlora", "bitfit"):
                n, s = get(regime, "none"), get(regime, strategy)
                if n and s and mean(n, "fit_peak_memory_mib") and mean(s, "fit_peak_memory_mib"):
                    per[regime] = {
                        "peak_memory_change_pct": pct(mean(s, "fit_peak_memory_mib") / mean(n, "fit_peak_memory_mib")),
                        f"{cost}_change_pct": pct(mean(s, f"{cost}_vs_full") / mean(n, f"{cost}_vs_full"))
                        if mean(n, f"{cost}_vs_full")
                        else None,
                    }
            row[f"{strategy}_vs_none"] = per
        probe = mean(get("probe", "none"), "test_acc")
        tuned = {r: mean(get(r, "none"), "test_acc") for r in ("full", "lora", "adalora", "qlora", "bitfit")}
        tuned = {r: a for r, a in tuned.items() if a is not None}
        best = max(tuned.items(), key=lambda kv: kv[1]) if tuned else None
        row["probe_vs_finetune"] = {"probe_acc": probe, "full_ft_acc": tuned.get("full"), "best_finetuned": best}
        out["backbones"][backbone] = row
    return out


def pareto(points: list[tuple[str, float, float]], maximize_y: bool) -> list[str]:
    """Keys of the points no other point dominates (x lower is better; y higher if ``maximize_y``
    else lower)."""

    def dominates(o: tuple[str, float, float], x: float, y: float) -> bool:
        return o[1] <= x and (o[2] >= y if maximize_y else o[2] <= y) and (o[1], o[2]) != (x, y)

    return [key for key, x, y in points if not any(dominates(o, x, y) for o in points if o[0] != key)]


def finish(state: dict[str, Any], png: str | None) -> None:
    """Add the QLoRA MAC fix, ratios, aggregates, budget table, paper comparison and Pareto
    fronts to ``state``, and draw the figure."""
    records = state["records"]
    fix_qlora_macs(records)
    add_ratios(records)
    cells = aggregate(records)
    energy_measured = any(r.get("fit_energy_joules") is not None for r in ok(records))
    state["cells"] = cells
    state["energy_measured"] = energy_measured
    state["energy_estimated"] = any(r.get("energy_estimated") for r in ok(records))
    state["budget"] = budget_table(state, cells)
    state["paper_comparison"] = paper_comparison(cells, energy_measured)
    state["pareto"] = fronts(cells, energy_measured)
    from peft_study_figures import draw, markdown_tables

    state["markdown"] = markdown_tables(state)
    print(state["markdown"])
    if png:
        draw(state, png)


def fronts(cells: dict[str, dict[str, Any]], energy_measured: bool) -> dict[str, Any]:
    cost = "fit_energy_joules" if energy_measured else "fit_seconds"
    out = {}
    for backbone in sorted({c["backbone"] for c in cells.values()}):
        mine = {k: c for k, c in cells.items() if c["backbone"] == backbone and c["seeds_ok"]}
        acc = [(k, mean(c, cost), mean(c, "test_acc")) for k, c in mine.items()]
        mem = [(k, mean(c, "fit_seconds"), mean(c, "fit_peak_memory_mib")) for k, c in mine.items()]
        acc = [p for p in acc if None not in p and not any(isinstance(v, float) and math.isnan(v) for v in p[1:])]
        mem = [p for p in mem if None not in p]
        out[backbone] = {
            f"accuracy_vs_{'energy' if energy_measured else 'time'}": pareto(acc, maximize_y=True),
            "peak_memory_vs_time": pareto(mem, maximize_y=False),
        }
    return out
