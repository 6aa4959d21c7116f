#!/usr/bin/env python
"""The five-regime study (Toktassyn & Park, arXiv 2607.02158) at the scale of 2 CPU cores.

Regimes: Full FT, LoRA, AdaLoRA, QLoRA (bitsandbytes NF4), BitFit, and a frozen backbone +
linear probe (the paper's training-free baseline in our form). Checkpointing: none, static (every
block) and adaptive (``AdaptiveCheckpointCallback`` at a memory budget); the probe trains no
block, so it runs without checkpointing only. Backbones (``peft_study_models.py``): a
ViT-S-shaped and a TinyViT-shaped timm model, and optionally a Vim-style Mamba backbone
(transformers' pure-PyTorch selective scan). Each backbone is pretrained once on digits 0-4 and
every cell adapts it to digits 5-9 (scikit-learn digits, offline), over several seeds.

Per cell (``peft_study_cells.run_cell``; ``EfficiencyCallback`` measures): test accuracy, train
time, energy (or "unavailable"), peak memory (CPU: the labelled estimate, parameters + buffers +
gradients + optimizer state + saved activations; CUDA: the allocator), trainable parameters,
MACs, NetScore, NS-E, NS-M, NS#. Ratios are against Full FT without checkpointing of the same
seed round, measured in the same run.

The memory budget, as in the paper: per backbone ``budget = --budget-fraction x`` the training
peak of Full FT without checkpointing (seed 0, measured first in the run). An adaptive cell gets
the part of the budget its activations may use: on CPU ``budget - (parameters + buffers +
gradients + optimizer state)`` of the same regime's no-checkpointing cell (the meter counts
activations only), on CUDA the whole budget (the allocator sees everything). A cell "fits" when
its training peak is within the budget.

    python benchmarks/peft_study.py                    # the full study, ~25 min on 2 shared cores
    python benchmarks/peft_study.py --quick            # smoke run, ~3 min
    python benchmarks/peft_study.py --device cuda      # NVML energy, CUDA allocator peaks
    python benchmarks/peft_study.py --backbones vision_mamba --out benchmarks/results/peft_study_mamba.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (str(ROOT), str(HERE)):  # run from a checkout without installing the package
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402
from peft_study_cells import CHECKPOINTING, REGIMES, Cell, run_cell  # noqa: E402

MIB = 1024**2
STATIC_PARTS = ("parameters", "buffers", "gradients", "optimizer_state")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, a few steps per cell")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--backbones", default="vit_s,tiny_vit", help="comma list of vit_s, tiny_vit, vision_mamba")
    p.add_argument("--regimes", default=",".join(REGIMES))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=None, help="adaptation epochs per cell (default 6; quick: 1)")
    p.add_argument("--pretrain-epochs", type=int, default=None, help="default 30; quick: 2")
    p.add_argument("--max-steps", type=int, default=None, help="cap on the steps of a cell (quick: 6)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--budget-fraction", type=float, default=0.65, help="memory budget / Full-FT no-checkpointing peak")
    p.add_argument("--energy", default="auto", choices=["auto", "nvml", "rapl", "tdp", "none"])
    p.add_argument("--tdp-watts", type=float, default=None, help="a stated power for a labelled estimate (never the default)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/peft_study[_quick][_cuda].json)")
    p.add_argument("--png", default=None, help="figure path (default: the JSON path with .png)")
    p.add_argument("--work-dir", default=None, help="where bases and per-cell efficiency.json go (default: a temp dir)")
    p.add_argument("--report", default=None, metavar="JSON", help="only redo the tables, comparison and figure of a finished run's JSON")
    args = p.parse_args(argv)
    if args.epochs is None:
        args.epochs = 1 if args.quick else 6
    if args.pretrain_epochs is None:
        args.pretrain_epochs = 2 if args.quick else 30
    if args.max_steps is None:
        args.max_steps = 6 if args.quick else -1
    if args.quick:
        args.seeds = min(args.seeds, 1)
    if args.out is None:
        suffix = ("_quick" if args.quick else "") + ("_cuda" if args.device.startswith("cuda") else "")
        args.out = str(HERE / "results" / f"peft_study{suffix}.json")
    args.png = args.png or str(Path(args.out).with_suffix(".png"))
    return args


def cell_plan(backbone: str, regimes: list[str], seeds: int) -> list[tuple[str, str, int]]:
    """``(regime, checkpointing, seed)`` in run order: seed rounds (so drift hits every cell of a
    round alike), Full FT without checkpointing first in each round (the ratios' baseline, and
    seed 0's sets the budget); within a regime none, static, adaptive (adaptive reads none's
    static bytes)."""
    order = ["full"] + [r for r in regimes if r != "full"]
    plan = []
    for seed in range(seeds):
        for regime in order:
            for ckpt in ("none",) if regime == "probe" else CHECKPOINTING:
                plan.append((regime, ckpt, seed))
    return plan


def static_bytes(record: dict[str, Any]) -> int | None:
    parts = record.get("fit_memory_breakdown_bytes") or {}
    if not parts:
        return None
    return int(sum(parts.get(k, 0) for k in STATIC_PARTS))


def activation_budget(args: argparse.Namespace, budget: int, none_record: dict[str, Any] | None) -> int | None:
    """The adaptive cell's budget in the memory source's units (see the module doc)."""
    if args.device.startswith("cuda"):
        return budget
    if none_record is None or static_bytes(none_record) is None:
        return None
    return budget - static_bytes(none_record)


def failed_record(cell: Cell, error: BaseException) -> dict[str, Any]:
    from lightning_peft.memory import BudgetTooSmallError

    infeasible = isinstance(error, BudgetTooSmallError)
    return {
        "cell": asdict(cell),
        "key": cell.key,
        "failed": True,
        "infeasible": infeasible,
        "error": f"{type(error).__name__}: {error}",
        "traceback": None if infeasible else traceback.format_exc(limit=8),
    }


def run_backbone(args: argparse.Namespace, backbone: str, work: Path, state: dict[str, Any], save) -> None:
    """Pretrain ``backbone`` once, then run its cells, appending records to ``state``."""
    from peft_study_cells import pretrain

    base = work / f"{backbone}_base.pt"
    info = pretrain(backbone, base, args.pretrain_epochs, args.device, max_steps=args.max_steps * 3 if args.quick else -1)
    state["pretrain"][backbone] = info
    print(f"[{backbone}] pretrained on digits 0-4: test_acc {info['test_acc']:.3f} in {info['seconds']:.0f} s", flush=True)
    budget: int | None = None
    none_cells: dict[tuple[str, int], dict[str, Any]] = {}
    for regime, ckpt, seed in cell_plan(backbone, args.regimes.split(","), args.seeds):
        act_budget = None
        if ckpt == "adaptive":
            act_budget = activation_budget(args, budget, none_cells.get((regime, seed))) if budget else None
        cell = Cell(backbone, regime, ckpt, seed, args.epochs, args.batch_size, args.max_steps, act_budget, args.device)
        t0 = time.perf_counter()
        try:
            if ckpt == "adaptive" and (act_budget is None or act_budget <= 0):
                raise_budget(cell, budget, act_budget)
            record = run_cell(cell, base, args.energy, work, tdp_watts=args.tdp_watts)
        except Exception as error:  # a failed cell is reported, not fatal to the study
            record = failed_record(cell, error)
        record["memory_budget_bytes"] = budget
        record["cell_wall_seconds"] = time.perf_counter() - t0
        state["records"].append(record)
        if ckpt == "none" and not record.get("failed"):
            none_cells[(regime, seed)] = record
            if regime == "full" and seed == 0:
                budget = int(args.budget_fraction * record["fit_peak_memory_mib"] * MIB)
                state["memory_budget_bytes"][backbone] = budget
        print(progress_line(record), flush=True)
        save()


def raise_budget(cell: Cell, budget: int | None, act_budget: int | None) -> None:
    from lightning_peft.memory import BudgetTooSmallError

    if budget is None:
        raise RuntimeError(f"{cell.key}: no memory budget (the Full FT no-checkpointing cell of seed 0 failed)")
    if act_budget is None:
        raise RuntimeError(f"{cell.key}: no static bytes to subtract (this regime's no-checkpointing cell failed)")
    raise BudgetTooSmallError(max(act_budget or 0, 0), 1, f"{cell.key}: parameters, gradients and optimizer state alone exceed the budget")


def progress_line(r: dict[str, Any]) -> str:
    c = r["cell"]
    if r.get("failed"):
        return f"  {r['key']} seed {c['seed']}: {'infeasible' if r['infeasible'] else 'FAILED'}: {r['error'][:160]}"
    return (
        f"  {r['key']} seed {c['seed']}: acc {r['test_acc']:.3f}, train {r['fit_seconds']:.1f} s, "
        f"peak {r['fit_peak_memory_mib']:.2f} MiB, ckpt {list(r.get('checkpointed_blocks_by_shape', {}).values())}, "
        f"trainable {r['trainable_params']:,}, NS {r['netscore']:.1f}  ({r['cell_wall_seconds']:.0f} s)"
    )


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import lightning
    import timm

    return {
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": args.device,
        "cuda_device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None,
        "machine_shared": "yes: 2 cores shared with other jobs; times are noisy, ratios are per seed round",
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def report_only(path: str, png: str | None) -> dict[str, Any]:
    """Recompute the aggregates, ratios, budget table, paper comparison and figure of ``path``."""
    from peft_study_report import finish

    state = json.loads(Path(path).read_text())
    finish(state, png or str(Path(path).with_suffix(".png")))
    Path(path).write_text(json.dumps(state, indent=1, default=str))
    return state


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.report:
        return report_only(args.report, args.png if args.png != str(Path(args.out).with_suffix(".png")) else None)
    torch.set_num_threads(args.threads)
    from peft_study_report import finish

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {
        "benchmark": "peft_study",
        "args": vars(args),
        "environment": environment(args),
        "pretrain": {},
        "memory_budget_bytes": {},
        "records": [],
    }

    def save() -> None:
        out.write_text(json.dumps(state, indent=1, default=str))

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="peft_study_") as tmp:
        work = Path(args.work_dir or tmp)
        for backbone in args.backbones.split(","):
            run_backbone(args, backbone, work, state, save)
    state["wall_seconds"] = time.perf_counter() - t0
    finish(state, args.png)
    save()
    print(f"wrote {out} and {args.png} ({state['wall_seconds'] / 60:.1f} min)")
    return state


if __name__ == "__main__":
    main()
