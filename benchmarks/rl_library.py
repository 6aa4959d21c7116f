"""Policy libraries with LoRA (paper 5): bytes per policy, library savings, and return of LoRA
against full fine-tuning on related tasks, all measured in one run.

    python benchmarks/rl_library.py                      # everything, ~12 min of one core
    python benchmarks/rl_library.py --skip-returns       # bytes and savings only (seconds)
    python benchmarks/rl_library.py --seeds 2 --finetune-rollouts 20   # a shorter study

Sections of the JSON (default ``runs/benchmarks/rl_library.json``):

``bytes``
    For each policy architecture (task's observation/action sizes x hidden sizes) and LoRA rank
    ``r`` (on every linear layer of the policy and value network, ``r`` capped at
    ``min(d_in, d_out)`` per layer): the adapter's tensor bytes and file bytes as stored by
    :class:`~lightning_peft.PolicyLibrary`, the bytes of a full copy of the policy, and their
    ratio.
``library``
    Real libraries of 10 and 50 policies (a CartPole pole-length family) per architecture and
    rank: bytes on disk (base + adapters + index) against 10 / 50 full copies, the saving, and
    the median time of ``activate(task)`` against loading a full copy's state dict.
``base_training``
    PPO from scratch on CartPole-v1 (until the 100-episode mean return reaches 475, gymnasium's
    solved threshold) and on Acrobot-v1 (until -100): wall and CPU seconds, environment steps.
``returns``
    For each task pair (base task -> target task) and seed: the base's zero-shot return on the
    target, then LoRA (rank 8, capped per layer), full fine-tuning with the same PPO settings,
    and full fine-tuning with a third of the learning rate -- all from the same base with the
    same number of environment steps -- each evaluated on 20 greedy and 20 sampled episodes of
    the target. Mean and standard deviation over seeds, the LoRA - full differences with their
    standard errors and Welch's t-test p-values. The first LoRA run of each pair also goes
    through a PolicyLibrary (add, activate with merge) and is evaluated again.

All runs use one torch thread (``torch.set_num_threads(1)``); CPU seconds are
``time.process_time`` of this process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning.pytorch.callbacks import Callback  # noqa: E402

from lightning_peft.rl.ppo import PPO  # noqa: E402
from lightning_peft.rl.rollout import RLDataModule, evaluate_policy  # noqa: E402

# PPO settings shared by every run of one environment (base training and both fine-tunings).
PPO_SETTINGS: dict[str, dict[str, Any]] = {
    "CartPole-v1": dict(learning_rate=1e-3, gamma=0.98, gae_lambda=0.8, normalize_observations=False),
    "Acrobot-v1": dict(learning_rate=1e-3, gamma=0.98, gae_lambda=0.8, normalize_observations=True),
}
SOLVED = {"CartPole-v1": 475.0, "Acrobot-v1": -100.0}
PAIRS = [
    ("CartPole-v1", "CartPole-v1/long-pole"),  # pole 2x longer
    ("CartPole-v1", "CartPole-v1?length=2"),  # pole 4x longer
    ("Acrobot-v1", "Acrobot-v1/heavy-link"),  # second link 2x heavier
]


def lora_for(model: PPO, rank: int, alpha_per_rank: float = 2.0) -> Any:
    """LoRA on every linear layer of ``model``, rank capped at ``min(d_in, d_out)`` per layer,
    ``alpha = alpha_per_rank * rank`` so the scale ``alpha / r`` is the same everywhere."""
    from lightning_peft import LoRA

    ranks, alphas = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            r = min(rank, module.in_features, module.out_features)
            if r != rank:
                ranks[name] = r
                alphas[name] = alpha_per_rank * r
    return LoRA(
        rank=rank,
        alpha=alpha_per_rank * rank,
        target_modules="all-linear",
        rank_pattern=ranks,
        alpha_pattern=alphas,
    )


def tensor_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())


# ------------------------------------------------------------------------------ bytes
def adapted_copy(base_path: Path, task: str, rank: int, seed: int) -> PPO:
    from lightning_peft import apply_adapter

    torch.manual_seed(seed)
    model = PPO.from_policy_file(base_path, task=task)
    apply_adapter(model, lora_for(model, rank))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.02)
    return model


def measure_bytes(work: Path, ranks: list[int], architectures: list[tuple[str, list[int]]]) -> list[dict[str, Any]]:
    from lightning_peft import PolicyLibrary

    rows = []
    for task, hidden in architectures:
        tag = "x".join(map(str, hidden))
        base = PPO(task, hidden_sizes=hidden)
        base_path = Path(base.save_policy(work / f"base_{task}_{tag}.safetensors"))
        full = tensor_bytes(base.state_dict())
        for rank in ranks:
            lib = PolicyLibrary(work / f"bytes_{task}_{tag}_r{rank}", base=base_path)
            entry = lib.add(task, adapted_copy(base_path, task, rank, seed=rank))
            rows.append(
                {
                    "task": task,
                    "hidden_sizes": hidden,
                    "observation_dim": base.observation_dim,
                    "action": [base.action_kind, base.action_dim],
                    "rank": rank,
                    "ranks_per_layer": entry["ranks"],
                    "adapter_tensor_bytes": entry["tensor_bytes"],
                    "adapter_file_bytes": entry["file_bytes"],
                    "full_copy_tensor_bytes": full,
                    "full_copy_file_bytes": base_path.stat().st_size,
                    "ratio": full / entry["tensor_bytes"],
                    "ratio_files": base_path.stat().st_size / entry["file_bytes"],
                }
            )
    return rows


def measure_library(work: Path, sizes: list[int], ranks: list[int], hidden_list: list[list[int]]) -> list[dict[str, Any]]:
    from safetensors.torch import load_file

    from lightning_peft import PolicyLibrary
    from lightning_peft.rl.tasks import task_family

    rows = []
    for hidden in hidden_list:
        base = PPO("CartPole-v1", hidden_sizes=hidden, normalize_observations=False)
        tag = "x".join(map(str, hidden))
        base_path = Path(base.save_policy(work / f"lib_base_{tag}.safetensors"))
        full_file = base_path.stat().st_size
        for rank in ranks:
            for n in sizes:
                root = work / f"library_{tag}_r{rank}_n{n}"
                lib = PolicyLibrary(root, base=base_path)
                tasks = task_family("CartPole-v1", "length", [0.3 + 0.02 * i for i in range(n)])
                template = adapted_copy(base_path, tasks[0], rank, seed=0)
                for task in tasks:
                    with torch.no_grad():  # a different adapter per task, one model built
                        for p in template.parameters():
                            if p.requires_grad:
                                p.normal_(0.0, 0.02)
                    lib.add(task, template)
                disk = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
                report = lib.report()
                # activation from memory: every adapter read once, then switch between tasks
                for task in tasks:
                    lib.activate(task)
                cached = _timed(lambda i: lib.activate(tasks[i % n]), 100)  # noqa: B023 - timed at once, inside this iteration
                cold_lib = PolicyLibrary(root, cache=False)  # every activation reads its file
                cold_lib.activate(tasks[0])
                cold = _timed(lambda i: cold_lib.activate(tasks[i % n]), 100)  # noqa: B023 - timed at once, inside this iteration
                state = {k: v.clone() for k, v in base.state_dict().items()}
                full_mem = _timed(lambda i: base.load_state_dict(state), 100)  # noqa: B023 - timed at once, inside this iteration
                full_disk = _timed(lambda i: base.load_state_dict(load_file(str(base_path))), 100)  # noqa: B023 - timed at once, inside this iteration
                rows.append(
                    {
                        "hidden_sizes": hidden,
                        "rank": rank,
                        "policies": n,
                        "library_disk_bytes": disk,
                        "full_copies_disk_bytes": n * full_file,
                        "savings_disk": 1 - disk / (n * full_file),
                        "library_tensor_bytes": report["library_bytes"],
                        "full_copies_tensor_bytes": report["full_copies_bytes"],
                        "savings": report["savings"],
                        "adapter_tensor_bytes": report["mean_adapter_bytes"],
                        "ratio": report["mean_ratio"],
                        "formula_1_minus_1/N_minus_1/f": 1 - 1 / n - 1 / report["mean_ratio"],
                        "activate_cached_median_us": cached,
                        "activate_from_disk_median_us": cold,
                        "load_full_copy_from_memory_median_us": full_mem,
                        "load_full_copy_from_disk_median_us": full_disk,
                    }
                )
    return rows


def measure_activation_scaling(work: Path, hidden_list: list[list[int]], rank: int) -> list[dict[str, Any]]:
    """``activate`` (cached adapters) against copying a full policy in, as the policy grows."""
    from lightning_peft import PolicyLibrary

    rows = []
    for hidden in hidden_list:
        tag = "x".join(map(str, hidden))
        base = PPO("CartPole-v1", hidden_sizes=hidden, normalize_observations=False)
        base_path = Path(base.save_policy(work / f"scaling_base_{tag}.safetensors"))
        lib = PolicyLibrary(work / f"scaling_{tag}", base=base_path)
        tasks = ["CartPole-v1/long-pole", "CartPole-v1/heavy-pole", "CartPole-v1/moon"]
        model = adapted_copy(base_path, tasks[0], rank, seed=0)
        for task in tasks:
            lib.add(task, model)
        for task in tasks:
            lib.activate(task)
        state = {k: v.clone() for k, v in base.state_dict().items()}
        rows.append(
            {
                "hidden_sizes": hidden,
                "rank": rank,
                "adapter_tensor_bytes": lib.report()["mean_adapter_bytes"],
                "full_copy_tensor_bytes": tensor_bytes(state),
                "activate_cached_median_us": _timed(lambda i: lib.activate(tasks[i % 3]), 50),  # noqa: B023 - timed at once, inside this iteration
                "activate_merged_median_us": _timed(lambda i: lib.activate(tasks[i % 3], merge=True), 20),  # noqa: B023 - timed at once, inside this iteration
                "copy_full_policy_median_us": _timed(lambda i: base.load_state_dict(state), 20),  # noqa: B023 - timed at once, inside this iteration
            }
        )
        lib.activate_base()
    return rows


def _timed(fn: Any, repeats: int) -> float:
    """Median microseconds of ``fn(i)`` over ``repeats`` calls."""
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


# ------------------------------------------------------------------------------ training
def _trainer(max_steps: int, callbacks: list[Any]) -> Any:
    import lightning as L

    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


class _Curve(Callback):
    """Records (env steps, mean return) after each rollout."""

    def __init__(self, dm: RLDataModule) -> None:
        self.dm = dm
        self.points: list[list[Any]] = []

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        stats = self.dm.dataset.stats()
        self.points.append([int(stats["env_steps"]), stats.get("episode_return")])


def train_base(task: str, out: Path, max_rollouts: int, seed: int) -> dict[str, Any]:
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping

    L.seed_everything(seed, verbose=False)
    model = PPO(task, lr_schedule="linear", export_path=str(out), **PPO_SETTINGS[task])
    dm = RLDataModule(task, num_envs=8, rollout_steps=128, minibatch_size=256, update_epochs=10, seed=seed)
    stop = EarlyStopping(
        "rollout/episode_return",
        mode="max",
        stopping_threshold=SOLVED[task],
        patience=10**9,
        check_on_train_epoch_end=True,
        strict=False,
    )
    curve = _Curve(dm)
    trainer = _trainer(max_rollouts * dm.steps_per_rollout, [stop, curve])
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.fit(model, dm)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    stats = dm.dataset.stats()
    solved = stats.get("episode_return", -math.inf) >= SOLVED[task]
    return {
        "task": task,
        "seed": seed,
        "solved": bool(solved),
        "threshold": SOLVED[task],
        "final_mean_return_100_episodes": stats.get("episode_return"),
        "env_steps": int(stats["env_steps"]),
        "optimizer_steps": trainer.global_step,
        "wall_s": wall,
        "cpu_s": cpu,
        "greedy_eval_20_episodes": evaluate_policy(model, task, episodes=20, seed=50_000)["mean_return"],
        "curve": curve.points,
    }


def finetune(base_path: Path, source: str, target: str, method: str, seed: int, rollouts: int, rank: int) -> tuple[PPO, dict[str, Any]]:
    import lightning as L

    from lightning_peft import AdapterCallback

    L.seed_everything(seed, verbose=False)
    settings = dict(PPO_SETTINGS[source])
    if method == "full_low_lr":  # full fine-tuning with a third of the learning rate
        settings["learning_rate"] = settings["learning_rate"] / 3
    model = PPO(target, base_checkpoint=str(base_path), lr_schedule="linear", **settings)
    dm = RLDataModule(target, num_envs=8, rollout_steps=128, minibatch_size=256, update_epochs=4, seed=1000 + seed)
    callbacks: list[Any] = []
    if method == "lora":
        callbacks.append(AdapterCallback(adapter=lora_for(model, rank)))
    curve = _Curve(dm)
    callbacks.append(curve)
    trainer = _trainer(rollouts * dm.steps_per_rollout, callbacks)
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.fit(model, dm)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = evaluate_policy(model, target, episodes=20, seed=90_000 + 100 * seed)
    sampled = evaluate_policy(model, target, episodes=20, seed=95_000 + 100 * seed, deterministic=False)
    return model, {
        "method": method,
        "seed": seed,
        "env_steps": dm.dataset.env_steps,
        "trainable_parameters": trainable,
        "eval_mean_return": result["mean_return"],
        "eval_std_return": result["std_return"],
        "eval_sampled_mean_return": sampled["mean_return"],
        "learning_rate": settings["learning_rate"],
        "train_mean_return_last_100": dm.dataset.stats().get("episode_return"),
        "wall_s": wall,
        "cpu_s": cpu,
        "curve": curve.points,
    }


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def _welch(a: list[float], b: list[float]) -> dict[str, float | None]:
    diff = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return {"difference": diff, "standard_error": None, "p_value": None}
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return {"difference": diff, "standard_error": 0.0, "p_value": 1.0 if diff == 0 else 0.0}
    t = diff / se
    dof = (va + vb) ** 2 / ((va**2 / (len(a) - 1)) + (vb**2 / (len(b) - 1)))
    try:
        from scipy import stats

        p = float(2 * stats.t.sf(abs(t), dof))
    except ImportError:  # normal approximation
        p = math.erfc(abs(t) / math.sqrt(2))
    return {"difference": diff, "standard_error": se, "t": t, "dof": dof, "p_value": p}


def study_returns(work: Path, args: argparse.Namespace, results: dict[str, Any], out: Path) -> None:
    bases: dict[str, Path] = {}
    results["base_training"] = []
    for source in dict.fromkeys(s for s, _ in PAIRS):
        path = work / f"trained_base_{source}.safetensors"
        info = train_base(source, path, args.base_rollouts, seed=0)
        mean100 = info["final_mean_return_100_episodes"]
        print(
            f"[base] {source}: solved={info['solved']} mean100={'n/a' if mean100 is None else f'{mean100:.1f}'} "
            f"env_steps={info['env_steps']} wall={info['wall_s']:.0f}s cpu={info['cpu_s']:.0f}s",
            flush=True,
        )
        results["base_training"].append(info)
        bases[source] = path
        _write(out, results)
    results["returns"] = []
    for source, target in PAIRS:
        base = PPO.from_policy_file(bases[source], task=target)
        zero = [evaluate_policy(base, target, episodes=20, seed=90_000 + 100 * s)["mean_return"] for s in range(args.seeds)]
        zero_sampled = [
            evaluate_policy(base, target, episodes=20, seed=95_000 + 100 * s, deterministic=False)["mean_return"] for s in range(args.seeds)
        ]
        methods = ("lora", "full", "full_low_lr")
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
        for seed in range(args.seeds):
            for method in methods:
                model, r = finetune(bases[source], source, target, method, seed, args.finetune_rollouts, args.rank)
                if method == "lora" and seed == 0:
                    # end to end: the trained adapter through a PolicyLibrary gives the same return
                    from lightning_peft import PolicyLibrary

                    lib = PolicyLibrary(work / f"study_library_{source}", base=bases[source])
                    lib.add(target, model, overwrite=True)
                    live = lib.activate(target, merge=True)
                    r["library_eval_mean_return"] = evaluate_policy(live, target, episodes=20, seed=90_000)["mean_return"]
                    r["library_adapter_bytes"] = lib.report()["policies"][target]["tensor_bytes"]
                runs[method].append(r)
                print(
                    f"[{source} -> {target}] seed {seed} {method}: greedy {r['eval_mean_return']:.1f}, sampled "
                    f"{r['eval_sampled_mean_return']:.1f} ({r['env_steps']} env steps, {r['trainable_parameters']} "
                    f"trainable, cpu {r['cpu_s']:.0f}s)",
                    flush=True,
                )
        entry: dict[str, Any] = {
            "source": source,
            "target": target,
            "env_steps_per_run": runs["lora"][0]["env_steps"],
            "lora_rank": args.rank,
            "zero_shot_base": _summary(zero),
            "zero_shot_base_sampled": _summary(zero_sampled),
        }
        for method in methods:
            entry[method] = _summary([r["eval_mean_return"] for r in runs[method]])
            entry[f"{method}_sampled"] = _summary([r["eval_sampled_mean_return"] for r in runs[method]])
        for other in ("full", "full_low_lr"):
            for suffix, key in (("", "eval_mean_return"), ("_sampled", "eval_sampled_mean_return")):
                entry[f"lora_minus_{other}{suffix}"] = _welch([r[key] for r in runs["lora"]], [r[key] for r in runs[other]])
        entry["runs"] = runs
        results["returns"].append(entry)
        _write(out, results)


def _write(out: Path, results: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "runs" / "benchmarks" / "rl_library.json"))
    p.add_argument("--ranks", default="1,2,4,8,16")
    p.add_argument("--library-ranks", default="1,8")
    p.add_argument("--library-sizes", default="10,50")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of the return study")
    p.add_argument("--base-rollouts", type=int, default=200, help="cap on base training (1,024 env steps each)")
    p.add_argument("--finetune-rollouts", type=int, default=60, help="rollouts of 1,024 env steps per fine-tuning")
    p.add_argument("--skip-returns", action="store_true")
    args = p.parse_args()

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    out = Path(args.out)
    ranks = [int(r) for r in args.ranks.split(",")]
    results: dict[str, Any] = {
        "benchmark": "rl_library",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "settings": vars(args),
        "ppo_settings": PPO_SETTINGS,
    }
    t0 = time.process_time()
    with tempfile.TemporaryDirectory(prefix="rl_library_") as tmp:
        work = Path(tmp)
        architectures = [
            ("CartPole-v1", [64, 64]),
            ("Acrobot-v1", [64, 64]),
            ("Pendulum-v1", [64, 64]),
            ("CartPole-v1", [256, 256]),
            ("Acrobot-v1", [256, 256]),
            ("Pendulum-v1", [256, 256]),
            ("Acrobot-v1", [256, 256, 256]),
        ]
        results["bytes"] = measure_bytes(work, ranks, architectures)
        for row in results["bytes"]:
            print(
                f"[bytes] {row['task']:<12} hidden {row['hidden_sizes']!s:<16} rank {row['rank']:>2}: "
                f"adapter {row['adapter_tensor_bytes']:>8,} B vs full {row['full_copy_tensor_bytes']:>9,} B "
                f"-> {row['ratio']:6.1f}x",
                flush=True,
            )
        _write(out, results)
        results["library"] = measure_library(
            work,
            [int(n) for n in args.library_sizes.split(",")],
            [int(r) for r in args.library_ranks.split(",")],
            [[64, 64], [256, 256]],
        )
        for row in results["library"]:
            print(
                f"[library] hidden {row['hidden_sizes']!s:<10} rank {row['rank']:>2} N={row['policies']:>3}: "
                f"saves {100 * row['savings']:.1f}% (disk {100 * row['savings_disk']:.1f}%), "
                f"activate {row['activate_cached_median_us']:.0f} us cached / {row['activate_from_disk_median_us']:.0f} us "
                f"from disk vs a full copy {row['load_full_copy_from_memory_median_us']:.0f} / "
                f"{row['load_full_copy_from_disk_median_us']:.0f} us",
                flush=True,
            )
        _write(out, results)
        results["activation_scaling"] = measure_activation_scaling(work, [[256, 256], [1024, 1024], [2048, 2048]], 8)
        for row in results["activation_scaling"]:
            print(
                f"[activate] hidden {row['hidden_sizes']!s:<12} adapter {row['adapter_tensor_bytes']:>9,.0f} B: "
                f"{row['activate_cached_median_us']:8.0f} us (merged {row['activate_merged_median_us']:8.0f} us) vs copying "
                f"a full policy of {row['full_copy_tensor_bytes']:>11,} B: {row['copy_full_policy_median_us']:8.0f} us",
                flush=True,
            )
        _write(out, results)
        if not args.skip_returns:
            study_returns(work, args, results, out)
    results["cpu_s_total"] = time.process_time() - t0
    _write(out, results)
    for pair in results.get("returns", []):
        line = ", ".join(f"{m} {pair[m]['mean']:.1f} +- {pair[m]['std']:.1f}" for m in ("zero_shot_base", "lora", "full", "full_low_lr"))
        print(f"[summary] {pair['source']} -> {pair['target']} (greedy return, mean +- std over seeds): {line}")
    print(f"wrote {out} (cpu {results['cpu_s_total']:.0f} s)")


if __name__ == "__main__":
    main()
