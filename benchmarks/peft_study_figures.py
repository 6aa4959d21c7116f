"""Figures and markdown tables of the five-regime study (``benchmarks/peft_study.py``)."""

from __future__ import annotations

from typing import Any

REGIME_LABEL = {"full": "Full FT", "lora": "LoRA", "adalora": "AdaLoRA", "qlora": "QLoRA", "bitfit": "BitFit", "probe": "Probe"}
COLORS = {"full": "tab:red", "lora": "tab:blue", "adalora": "tab:cyan", "qlora": "tab:purple", "bitfit": "tab:green", "probe": "tab:gray"}
MARKERS = {"none": "o", "static": "s", "adaptive": "^"}


def _m(cell: dict[str, Any], name: str) -> float | None:
    s = cell.get(name)
    return None if s is None else s["mean"]


def _pm(cell: dict[str, Any], name: str, scale: float = 1.0, digits: int = 3) -> str:
    s = cell.get(name)
    if s is None:
        return "unavailable"
    if s["n"] > 1:
        return f"{s['mean'] * scale:.{digits}f} ± {s['std'] * scale:.{digits}f}"
    return f"{s['mean'] * scale:.{digits}f}"


def _ratio(cell: dict[str, Any], name: str) -> str:
    v = _m(cell, name)
    return "" if v is None else f" ({v:.2f}x)"


def markdown_tables(state: dict[str, Any]) -> str:
    """One table per backbone: mean ± std over seeds, ratios against Full FT / none in brackets."""
    energy = state.get("energy_measured")
    est = " (estimate)" if state.get("energy_estimated") else ""
    lines = []
    for backbone, budget in sorted(state["budget"].items()):
        enabled = ", ".join(budget["fit_only_with_adaptive"]) or "none"
        lines += [
            f"**{backbone}** (budget {budget['budget_mib']:.2f} MiB; fit only with adaptive: {enabled})",
            "",
            f"| regime | ckpt | test acc | train s | peak MiB | fits | energy J{est} | trainable | MMACs | NS | NS-M | NS-E | NS# |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for key, c in state["cells"].items():
            if c["backbone"] != backbone:
                continue
            if not c["seeds_ok"]:
                why = "infeasible at the budget" if c["infeasible"] else "failed"
                lines.append(f"| {REGIME_LABEL[c['regime']]} | {c['checkpointing']} | {why} |" + " |" * 10)
                continue
            fit = budget["fits"].get(key)
            lines.append(
                f"| {REGIME_LABEL[c['regime']]} | {c['checkpointing']} | {_pm(c, 'test_acc')} | "
                f"{_pm(c, 'fit_seconds', digits=1)}{_ratio(c, 'time_vs_full')} | "
                f"{_pm(c, 'fit_peak_memory_mib', digits=2)}{_ratio(c, 'peak_memory_vs_full')} | {'yes' if fit else 'no'} | "
                f"{_pm(c, 'fit_energy_joules', digits=1) if energy else 'unavailable'} | {int(_m(c, 'trainable_params') or 0):,} | "
                f"{(_m(c, 'macs_per_sample') or 0) / 1e6:.2f} | {_pm(c, 'netscore', digits=1)} | {_pm(c, 'ns_m', digits=1)} | "
                f"{_pm(c, 'ns_e', digits=1)} | {_pm(c, 'ns_sharp', digits=1)} |"
            )
        lines.append("")
    return "\n".join(lines)


def _front_line(ax: Any, pts: list[tuple[float, float]]) -> None:
    pts = sorted(pts)
    if len(pts) > 1:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "--", color="black", lw=1, zorder=1, label="Pareto front")


def _panel(ax: Any, cells: list[tuple[str, dict[str, Any]]], xname: str, yname: str, front: list[str], yscale: float = 1.0) -> None:
    pts = []
    for key, c in cells:
        x, y = _m(c, xname), _m(c, yname)
        if x is None or y is None:
            continue
        on = key in front
        xs, ys = c.get(xname) or {}, c.get(yname) or {}
        if xs.get("n", 0) > 1:  # spread over seeds
            ax.errorbar(x, y * yscale, xerr=xs["std"], yerr=ys["std"] * yscale, color=COLORS[c["regime"]], alpha=0.35, lw=1, zorder=1)
        ax.scatter(
            x,
            y * yscale,
            color=COLORS[c["regime"]],
            marker=MARKERS[c["checkpointing"]],
            s=70 if on else 40,
            edgecolors="black" if on else "none",
            linewidths=1.2,
            zorder=2,
        )
        if on:
            pts.append((x, y * yscale))
    _front_line(ax, pts)


def draw(state: dict[str, Any], png: str) -> None:
    """Per backbone: accuracy against energy (train time where energy is unavailable) and peak
    training memory against train time; one point per cell (mean over seeds, bars: one standard
    deviation), Pareto front marked (outlined points, dashed line), the memory budget as a
    horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    backbones = sorted(state["budget"])
    energy = bool(state.get("energy_measured"))
    fig, axes = plt.subplots(len(backbones), 2, figsize=(11, 4.2 * len(backbones)), squeeze=False)
    for row, backbone in zip(axes, backbones):
        cells = [(k, c) for k, c in state["cells"].items() if c["backbone"] == backbone and c["seeds_ok"]]
        fr = state["pareto"][backbone]
        xname = "fit_energy_joules" if energy else "fit_seconds"
        acc_key = f"accuracy_vs_{'energy' if energy else 'time'}"
        _panel(row[0], cells, xname, "test_acc", fr[acc_key])
        est = " (estimate)" if state.get("energy_estimated") else ""
        row[0].set_xlabel(f"training energy, J{est}" if energy else "training time, s (energy unavailable)")
        row[0].set_ylabel("test accuracy (digits 5-9)")
        row[0].set_title(f"{backbone}: accuracy vs {'energy' if energy else 'time'}")
        _panel(row[1], cells, "fit_seconds", "fit_peak_memory_mib", fr["peak_memory_vs_time"])
        budget = state["budget"][backbone]["budget_mib"]
        row[1].axhline(budget, color="tab:orange", lw=1, label=f"budget {budget:.1f} MiB")
        row[1].set_xlabel("training time, s")
        mem_label = "CPU estimate" if any(r.get("memory_estimated") for r in state["records"] if not r.get("failed")) else "CUDA allocator"
        row[1].set_ylabel(f"peak training memory, MiB ({mem_label})")
        row[1].set_title(f"{backbone}: peak memory vs time")
        row[1].legend(loc="upper right", fontsize=8)
    handles = [Line2D([], [], color=c, marker="o", ls="", label=REGIME_LABEL[r]) for r, c in COLORS.items()]
    handles += [Line2D([], [], color="black", marker=m, ls="", mfc="white", label=f"ckpt {k}") for k, m in MARKERS.items()]
    handles.append(Line2D([], [], color="black", ls="--", label="Pareto front (outlined)"))
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=8, frameon=False)
    where = state.get("environment", {}).get("cuda_device") or "2 shared CPU cores"
    fig.suptitle(f"Five-regime study on {where}: mean over seeds per cell (bars: std)", fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fig.savefig(png, dpi=110)
    plt.close(fig)
