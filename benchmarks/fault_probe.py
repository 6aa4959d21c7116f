"""Fault probe: does an ``AdapterCallback`` run survive ``kill -9``, a full disk and out-of-memory
steps with nothing lost? (The issue's "keep the fault figures": 10/10, 3/3, 6/6.)

(a) ``--runs`` times: a small training script (a subprocess: the tiny transformer classifier of
    ``tests/scripts/adapter_models.py``, LoRA + trained head, AdamW + StepLR, a checkpoint at
    every epoch end) is killed with SIGKILL at a random moment (seeded: a random step, then a
    random fraction of a step), then resumed from its ``last.ckpt`` (from scratch when none was
    written yet); its final adapter tensors are compared bit for bit with an uninterrupted run.
(b) ``--disk-runs`` times (in this process): at a chosen epoch end every write into the
    checkpoint directory raises ``OSError(ENOSPC)`` after a chosen fraction of the file was
    written; the previous ``last.ckpt`` must be byte-identical, loadable with
    ``weights_only=True``, no temporary file may remain, and a resume from it must reach the
    uninterrupted run's final tensors bit for bit.
(c) ``--oom-steps`` out-of-memory errors (half in forward, half in backward) injected by
    ``SimulatedMemorySource`` under ``AdaptiveCheckpointCallback``: each step is retried, no
    batch is skipped, and the final tensors are compared with a run without errors.

Writes ``benchmarks/results/fault_probe.json`` and prints a summary table. CPU only, ~3-5 min
for the defaults on two cores (most of it is starting subprocesses).

    python benchmarks/fault_probe.py                 # --runs 10 --disk-runs 3 --oom-steps 6
    python benchmarks/fault_probe.py --runs 2 --disk-runs 1 --oom-steps 2 --out /tmp/quick.json
"""

from __future__ import annotations

import argparse
import builtins
import errno
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "scripts")]

import torch  # noqa: E402

EPOCHS, SAMPLES, BATCH = 10, 32, 8  # 4 steps per epoch, 40 steps
STEPS = EPOCHS * SAMPLES // BATCH


# --------------------------------------------------------------------------------------------
# the training script (worker) and shared pieces
# --------------------------------------------------------------------------------------------
def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Bit-exact equality of two tensor dicts, and the largest difference when not."""
    same_keys = set(a) == set(b)
    diffs = [float((a[k].double() - b[k].double()).abs().max()) for k in a if k in b]
    exact = same_keys and all(torch.equal(a[k], b[k]) for k in a)
    return {"bit_exact": bool(exact), "same_keys": same_keys, "max_abs_diff": max(diffs, default=float("nan"))}


def make_trainer(root: Path, max_epochs: int, extra: list[Any]) -> Any:
    import lightning.pytorch as pl
    from adapter_models import lora_callback
    from lightning.pytorch.callbacks import ModelCheckpoint

    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        num_sanity_val_steps=0,
        # export_weights="last": the live model is the result (nothing reloads a checkpoint at fit end)
        callbacks=[lora_callback(export_weights="last"), ModelCheckpoint(dirpath=root / "ckpt", save_last=True), *extra],
    )


def fresh_model() -> Any:
    from adapter_models import Classifier

    torch.manual_seed(0)
    return Classifier(dim=16, depth=2)


def loader() -> Any:
    from adapter_models import make_loader

    return make_loader(n=SAMPLES, batch_size=BATCH)


def worker(args: argparse.Namespace) -> None:
    """Train (or resume) in ``args.worker``; report each finished step to ``progress``; save the
    final trainable tensors to ``final.pt``."""
    import lightning.pytorch as pl

    torch.set_num_threads(1)  # one reduction order in every process: bit-exact comparisons
    root = Path(args.worker)
    progress = root / "progress"

    class Progress(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
            progress.write_text(str(trainer.global_step))
            time.sleep(args.step_sleep)  # stretch the run so that a kill lands at a random moment

    model = fresh_model()
    make_trainer(root, EPOCHS, [Progress()]).fit(model, loader(), ckpt_path=args.resume)
    torch.save(trainable_state(model), root / "final.pt")


def run_worker(root: Path, step_sleep: float, resume: Path | None = None) -> subprocess.Popen:
    root.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--worker", str(root), "--step-sleep", str(step_sleep)]
    if resume is not None:
        cmd += ["--resume", str(resume)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(root / "stderr.txt", "ab"))


def read_step(progress: Path) -> int:
    try:
        return int(progress.read_text() or -1)
    except (FileNotFoundError, ValueError):
        return -1


# --------------------------------------------------------------------------------------------
# (a) kill -9 at a random moment, then resume
# --------------------------------------------------------------------------------------------
def probe_kill(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    ref_dir = work / "reference"
    t0 = time.perf_counter()
    ref = run_worker(ref_dir, args.step_sleep)
    if ref.wait() != 0:
        raise RuntimeError(f"the reference run failed: {(ref_dir / 'stderr.txt').read_text()[-2000:]}")
    reference = torch.load(ref_dir / "final.pt", weights_only=True)
    rng = random.Random(args.seed)
    runs = []
    for i in range(args.runs):
        root = work / f"kill_{i}"
        kill_after = rng.randint(0, STEPS - 2)  # after this many finished steps ...
        fraction = rng.random()  # ... plus this fraction of a step
        proc = run_worker(root, args.step_sleep)
        while read_step(root / "progress") < kill_after and proc.poll() is None:
            time.sleep(0.002)
        time.sleep(fraction * args.step_sleep)
        finished_first = proc.poll() is not None
        if not finished_first:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed_at = read_step(root / "progress")
        last = root / "ckpt" / "last.ckpt"
        record: dict[str, Any] = {
            "run": i,
            "kill_after_steps": kill_after,
            "step_fraction": round(fraction, 3),
            "finished_before_kill": finished_first,
            "steps_done_when_killed": killed_at,
            "returncode": proc.returncode,
            "temp_files_left": sorted(p.name for p in (root / "ckpt").glob(".*tmp*")) if (root / "ckpt").exists() else [],
        }
        resume = None
        if last.exists():
            try:
                checkpoint = torch.load(last, weights_only=True)
                record["checkpoint_step"] = int(checkpoint["global_step"])
                record["checkpoint_loadable"] = True
                resume = last
            except Exception as err:  # noqa: BLE001 - a damaged last.ckpt is exactly what we look for
                record["checkpoint_loadable"] = False
                record["checkpoint_error"] = f"{type(err).__name__}: {err}"[:300]
        else:
            record["checkpoint_step"] = None  # killed before the first epoch end: start again
            record["checkpoint_loadable"] = None
        (root / "progress").unlink(missing_ok=True)
        again = run_worker(root, 0.0, resume)
        record["resume_returncode"] = again.wait()
        if record["resume_returncode"] == 0:
            record.update(compare(torch.load(root / "final.pt", weights_only=True), reference))
        else:
            record.update(bit_exact=False, error=(root / "stderr.txt").read_text()[-1000:])
        record["ok"] = bool(record["bit_exact"] and record["checkpoint_loadable"] is not False)
        runs.append(record)
        print(
            f"  kill run {i}: killed after {killed_at} steps, checkpoint step {record.get('checkpoint_step')}, "
            f"bit-exact {record['bit_exact']}",
            flush=True,
        )
    return {"runs": runs, "ok": sum(r["ok"] for r in runs), "total": len(runs), "seconds": round(time.perf_counter() - t0, 1)}


# --------------------------------------------------------------------------------------------
# (b) disk full mid-write
# --------------------------------------------------------------------------------------------
class _FullDiskFile:
    """A real file that raises ``OSError(ENOSPC)`` once ``limit`` bytes were written to it."""

    def __init__(self, file: Any, limit: int) -> None:
        self._file, self._limit, self._written = file, limit, 0

    def write(self, data: Any) -> int:
        room = self._limit - self._written
        if len(data) > room:
            self._file.write(bytes(memoryview(data)[: max(room, 0)]))
            self._written = self._limit
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._written += len(data)
        return self._file.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def __enter__(self) -> _FullDiskFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._file.close()


class _FullDisk:
    """Patch ``open``/``io.open`` so that every binary write under ``directory`` fails after
    ``limit`` bytes (the rest of the process writes normally)."""

    def __init__(self, directory: Path, limit: int) -> None:
        self.directory, self.limit, self.hits = directory.resolve(), limit, 0
        self._saved = (builtins.open, io.open)

    def _open(self, file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        real = self._saved[0](file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax") and "b" in mode:
            if Path(file).resolve().is_relative_to(self.directory):
                self.hits += 1
                return _FullDiskFile(real, self.limit)
        return real

    def __enter__(self) -> _FullDisk:
        builtins.open = io.open = self._open  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: Any) -> None:
        builtins.open, io.open = self._saved  # type: ignore[assignment]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def probe_disk_full(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import lightning.pytorch as pl

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    reference_model = fresh_model()
    make_trainer(work / "disk_reference", EPOCHS, []).fit(reference_model, loader())
    reference = trainable_state(reference_model)

    class DiskFullAt(pl.Callback):
        """At the end of epoch ``epoch`` the disk fills: the checkpoint saves that follow fail."""

        def __init__(self, root: Path, epoch: int, fraction: float) -> None:
            self.root, self.epoch, self.fraction = root, epoch, fraction
            self.disk: _FullDisk | None = None
            self.before: str | None = None

        def on_train_epoch_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
            if trainer.current_epoch == self.epoch:  # runs before ModelCheckpoint's save (Lightning orders it last)
                last = self.root / "ckpt" / "last.ckpt"
                self.before = sha256(last)
                self.disk = _FullDisk(self.root / "ckpt", int(self.fraction * last.stat().st_size)).__enter__()

    rng = random.Random(args.seed + 1)
    runs = []
    for i in range(args.disk_runs):
        root = work / f"disk_{i}"
        epoch, fraction = rng.randint(1, EPOCHS - 2), round(rng.uniform(0.05, 0.95), 3)
        full = DiskFullAt(root, epoch, fraction)
        record: dict[str, Any] = {"run": i, "full_at_epoch_end": epoch, "write_fraction": fraction}
        try:
            make_trainer(root, EPOCHS, [full]).fit(fresh_model(), loader())
            record["error"] = None
        except Exception as err:  # noqa: BLE001 - torch.save's zip writer may mask the OSError with a RuntimeError
            record["error"] = f"{type(err).__name__}: {err}"[:300]
            chain, cause = [], err
            while cause is not None and len(chain) < 10:
                chain.append(cause)
                cause = cause.__cause__ or cause.__context__
            record["enospc"] = any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in chain)
            record["error_chain"] = [type(e).__name__ for e in chain]
        finally:
            if full.disk is not None:
                full.disk.__exit__()
        last = root / "ckpt" / "last.ckpt"
        record["patched_writes"] = full.disk.hits if full.disk else 0
        record["previous_intact"] = full.before is not None and sha256(last) == full.before
        record["temp_files_left"] = sorted(p.name for p in (root / "ckpt").iterdir() if p.name.startswith("."))
        checkpoint = torch.load(last, weights_only=True)
        record["checkpoint_step"] = int(checkpoint["global_step"])
        record["loadable"] = record["checkpoint_step"] == epoch * SAMPLES // BATCH  # the previous epoch's end
        resumed = fresh_model()
        make_trainer(root, EPOCHS, []).fit(resumed, loader(), ckpt_path=str(last))
        record.update(compare(trainable_state(resumed), reference))
        record["ok"] = bool(
            record.get("enospc")
            and record["previous_intact"]
            and record["loadable"]
            and not record["temp_files_left"]
            and record["bit_exact"]
        )
        runs.append(record)
        print(
            f"  disk-full run {i}: epoch {epoch} at {fraction:.0%} of the file: previous intact "
            f"{record['previous_intact']}, resumed bit-exact {record['bit_exact']}",
            flush=True,
        )
    return {"runs": runs, "ok": sum(r["ok"] for r in runs), "total": len(runs), "seconds": round(time.perf_counter() - t0, 1)}


# --------------------------------------------------------------------------------------------
# (c) out-of-memory steps under AdaptiveCheckpointCallback
# --------------------------------------------------------------------------------------------
def probe_oom(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import lightning.pytorch as pl
    from adapter_models import Classifier

    from lightning_peft import AdaptiveCheckpointCallback
    from lightning_peft.memory import SimulatedMemorySource

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    epochs = 4  # 16 steps

    def run(cb: AdaptiveCheckpointCallback, root: Path, max_epochs: int = epochs) -> tuple[Any, list[tuple[int, int]], pl.Trainer]:
        torch.manual_seed(0)
        model = Classifier(dim=16, depth=4)  # four blocks: room for partial plans
        seen: list[tuple[int, int]] = []

        class Seen(pl.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
                seen.append((trainer.current_epoch, batch_idx))

        trainer = make_trainer(root, max_epochs, [cb, Seen()])
        trainer.fit(model, loader())
        return model, seen, trainer

    # the uninterrupted run (no checkpointing), whose peak sets a budget that needs a partial plan
    none = AdaptiveCheckpointCallback(mode="none", verbose=False)
    reference, ref_seen, _ = run(none, work / "oom_reference")
    budget = int(0.6 * max(h["measured_peak_bytes"] for h in none.history))
    results = []
    forward = (args.oom_steps + 1) // 2
    for phase, count, first in (("forward", forward, 1), ("backward", args.oom_steps - forward, 2)):
        if count == 0:
            continue
        # attempt indices (a retry is an attempt too), 5 apart so the plan can relax in between;
        # a backward-phase error fires while a checkpointed block is recomputed
        source = SimulatedMemorySource(oom_on_starts=[first + 5 * k for k in range(count)], oom_phase=phase)
        cb = AdaptiveCheckpointCallback(budget=budget, headroom=0.0, relax_after=2, memory_source=source, verbose=False)
        model, seen, trainer = run(cb, work / f"oom_{phase}")
        record = {
            "phase": phase,
            "injected": count,
            "oom_raised": source.ooms,
            "oom_retries": cb.counters["oom_retries"],
            "optimizer_steps": trainer.global_step,
            "expected_steps": len(ref_seen),
            "budget_bytes": budget,
            "batches_done_in_order": seen == ref_seen,
            "counters": dict(cb.counters),
            **compare(trainable_state(model), trainable_state(reference)),
        }
        complete = record["batches_done_in_order"] and record["optimizer_steps"] == record["expected_steps"]
        scale = max(float(p.abs().max()) for p in trainable_state(reference).values())
        record["close_to_reference"] = bool(record["max_abs_diff"] <= 1e-5 * scale)
        record["retried_no_batch_lost"] = min(source.ooms, cb.counters["oom_retries"]) if complete and record["close_to_reference"] else 0
        results.append(record)
        print(
            f"  oom {phase}: {source.ooms} raised, {cb.counters['oom_retries']} retried, steps "
            f"{trainer.global_step}/{len(ref_seen)}, bit-exact {record['bit_exact']}",
            flush=True,
        )
    ok = sum(r["retried_no_batch_lost"] for r in results)
    return {"runs": results, "ok": ok, "total": args.oom_steps, "seconds": round(time.perf_counter() - t0, 1)}


# --------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="kill -9 runs")
    parser.add_argument("--disk-runs", type=int, default=3)
    parser.add_argument("--oom-steps", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step-sleep", type=float, default=0.05, help="seconds added to each step of a killed run")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fault_probe.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--resume", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    for name in ("runs", "disk_runs", "oom_steps"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")

    import logging
    import tempfile
    import warnings

    import lightning.pytorch  # noqa: F401  (configures its loggers on import: quiet them after)

    warnings.filterwarnings("ignore")  # Lightning's hints (num_workers, ...) are not what this measures
    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="fault_probe_") as tmp:
        work = args.work or Path(tmp)
        print(f"(a) kill -9 at a random moment, then resume ({args.runs} runs)", flush=True)
        kill = probe_kill(args, work)
        print(f"(b) disk full mid-write ({args.disk_runs} runs)", flush=True)
        disk = probe_disk_full(args, work)
        print(f"(c) out-of-memory steps ({args.oom_steps})", flush=True)
        oom = probe_oom(args, work)
    result = {
        "config": {
            "epochs": EPOCHS,
            "steps": STEPS,
            "batch": BATCH,
            "seed": args.seed,
            "step_sleep": args.step_sleep,
            "torch": torch.__version__,
        },
        "kill9": kill,
        "disk_full": disk,
        "oom": oom,
        "summary": {
            "kill9_resumed_bit_exact": f"{kill['ok']}/{kill['total']}",
            "disk_full_previous_kept": f"{disk['ok']}/{disk['total']}",
            "oom_steps_retried_no_batch_lost": f"{oom['ok']}/{oom['total']}",
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print()
    print(f"{'fault':<40} {'survived':>9}  {'seconds':>7}")
    print(f"{'kill -9, resumed bit-exactly':<40} {kill['ok']:>4}/{kill['total']:<4}  {kill['seconds']:>7}")
    print(f"{'disk full, previous checkpoint kept':<40} {disk['ok']:>4}/{disk['total']:<4}  {disk['seconds']:>7}")
    print(f"{'out of memory, retried, no batch lost':<40} {oom['ok']:>4}/{oom['total']:<4}  {oom['seconds']:>7}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
