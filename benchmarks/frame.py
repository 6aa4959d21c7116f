"""FRAME vs LoRA, MoE-LoRA and Fourier MoE-LoRA on a multi-task mixture, at equal trainable
parameters, with the pretrained MiniLM encoder (d = 384), on CPU.

Quality: one model per method and seed, fine-tuned on three tasks at once (BBC topic, BBC word
order, pydoc topic family; ``frame_data.py``), with a task prefix and one linear head per task;
adapters on every linear of the top ``6 - split_layer`` layers. Methods:

* ``lora``: ``LoRA`` with per-module-kind ranks matched to FRAME's trainable parameters;
* ``moe_lora``: ``FRAME(order_init=0.0, train_orders=False)`` (orders fixed at 0 = spatial);
* ``fourier_moe``: ``FRAME(order_init=1.0, train_orders=False)`` (every expert in the DFT basis);
* ``frame``: ``FRAME(order_init="spread", train_orders=True)`` (orders learned).

Reported: test accuracy per task and averaged over tasks, mean and sample std over seeds; the
learned orders per layer and expert and their spread; the mean |cos| between experts' dense
updates (decorrelation) for learned vs fixed orders; the cost (``frame_cost.py``). JSON and
PNGs go to ``benchmarks/results/``. Docs: ``docs/frame_benchmark.md``.

    python benchmarks/frame.py            # full: 4 methods x 3 seeds + cost (about 50 min on 2 shared, busy cores)
    python benchmarks/frame.py --quick    # small data, 1 seed, 30 steps (2 min on a lightly loaded machine)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import frame_data as fd  # noqa: E402
import frame_train as ft  # noqa: E402
import torch  # noqa: E402

METHODS = ["lora", "moe_lora", "fourier_moe", "frame"]
ABLATIONS = ["frame_g1"]  # opt-in: FRAME with balance_groups=1
LABELS = {
    "lora": "LoRA",
    "moe_lora": "MoE-LoRA (a=0)",
    "fourier_moe": "Fourier MoE-LoRA (a=1)",
    "frame": "FRAME (learned a)",
    "frame_g1": "FRAME, 1 balance group",
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="40 examples per class/family, 1 seed, 30 steps, short cost")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS + ABLATIONS)
    p.add_argument("--steps", type=int, default=None, help="training steps (default 280 = one pass over the training mixture; --quick: 30)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--order-lr", type=float, default=1e-2, help="FRAME orders' learning rate (5x lr, methods.md's ratio)")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--alpha", type=float, default=8.0)
    p.add_argument("--balance-coef", type=float, default=0.01)
    p.add_argument("--split-layer", type=int, default=5, help="adapters in layers split_layer..5; lower layers cached")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--max-per-class", type=int, default=None)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the quality runs")
    p.add_argument("--cost-threads", type=int, default=1, help="torch threads of the cost measurement")
    p.add_argument("--device", default="cpu", help="device of the cost measurement (quality runs on CPU)")
    p.add_argument("--cost-batch", type=int, default=16)
    p.add_argument("--cost-rounds", type=int, default=3)
    p.add_argument("--cost-steps", type=int, default=2)
    p.add_argument("--cost-warmup", type=int, default=2)
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--cache-dir", default=ft.default_cache_dir(), help="where the cached lower-layer states go ('' for none)")
    p.add_argument(
        "--from-json", nargs="+", default=None, help="recompute summary, goals and figures from earlier JSON (runs of all files pooled)"
    )
    p.add_argument("--cost-json", default=None, help="with --from-json: take the cost part from this JSON (a --skip-quality run)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/frame[_quick].json)")
    args = p.parse_args(argv)
    args.out_given = args.out is not None
    args.steps = args.steps or (None if args.quick else 280)
    if args.quick:
        args.seeds, args.steps, args.max_per_class = args.seeds[:1], args.steps or 30, args.max_per_class or 40
        args.cost_rounds, args.cost_steps, args.cost_warmup = 2, 2, 1
    suffix = "_quick" if args.quick else ""
    args.out = Path(args.out or HERE / "results" / f"frame{suffix}.json")
    args.png = args.out.with_suffix(".png")
    args.orders_png = args.out.with_name(args.out.stem + "_orders.png")
    return args


def param_counts(encoder: torch.nn.Module, args: argparse.Namespace, lora_spec: Any) -> dict[str, Any]:
    """Exact trainable adapter parameters (heads excluded) of every method on the same modules."""
    out: dict[str, Any] = {}
    for method in METHODS:
        model = ft.build(method, encoder, args, lora_spec, 0)
        per_module = ft.adapter_params(model)
        heads = sum(p.numel() for p in model.heads.parameters())
        out[method] = {"adapter_params": sum(per_module.values()), "head_params": heads, "adapted_modules": len(per_module)}
    return out


def analyse(model: torch.nn.Module, method: str, args: argparse.Namespace) -> dict[str, Any]:
    if method == "lora":
        return {}
    import frame_hooks as fh

    initial = ft.moe_spec(method, args).initial_orders()
    cosines, load, norms = fh.expert_cosines(model), fh.routing_load(model), fh.update_norms(model)
    return {"initial_orders": initial, "orders": fh.orders(model), "expert_abs_cos": cosines, "routing_load": load, "update_norms": norms}


def quality(args: argparse.Namespace, encoder: torch.nn.Module, lora_spec: Any, result: dict[str, Any]) -> None:
    t0 = time.perf_counter()
    train_ex, test_ex = fd.build_tasks(args.max_per_class)
    result["data"] = {"train": fd.summary(train_ex), "test": fd.summary(test_ex), "prefix": fd.PREFIX, "max_length": args.max_length}
    cache = args.cache_dir or None
    train_data = ft.encode_cache(train_ex, encoder, args.split_layer, args.max_length, cache)
    test_data = ft.encode_cache(test_ex, encoder, args.split_layer, args.max_length, cache)
    result["data"]["truncated_share"] = float((train_data["mask"][:, -1] == 1).float().mean())
    result["timing"]["data_and_cache_s"] = time.perf_counter() - t0
    print(f"data: {len(train_ex)} train / {len(test_ex)} test examples ({result['timing']['data_and_cache_s']:.0f} s)", flush=True)
    runs = result.setdefault("runs", [])
    for seed in args.seeds:
        # rotate the method order per seed so that machine drift does not favour one method
        order = args.methods[seed % len(args.methods) :] + args.methods[: seed % len(args.methods)]
        for method in order:
            start = time.perf_counter()
            print(f"  {method} seed {seed}", flush=True)
            model = ft.build(method, encoder, args, lora_spec, seed)
            log = ft.train(model, train_data, args, seed)
            acc = ft.evaluate(model, test_data)
            acc["average"] = sum(acc[t] for t in ft.TASK_NAMES) / len(ft.TASK_NAMES)
            run = {
                "method": method,
                "seed": seed,
                "test_accuracy": acc,
                **log,
                **analyse(model, method, args),
                "wall_s": time.perf_counter() - start,
            }
            runs.append(run)
            print(f"    acc {json.dumps({k: round(v, 4) for k, v in acc.items()})}  ({run['wall_s']:.0f} s)", flush=True)
            write(args, result)
    result["summary"] = summarise(runs, args)


def summarise(runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    import frame_summary as fs

    return fs.summarise(runs, args.methods, ft.TASK_NAMES, fd.TASKS)


def write(args: argparse.Namespace, result: dict[str, Any]) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


def resummarise(args: argparse.Namespace) -> None:
    """Summary, goals and PNGs again from ``args.from_json``: the first file's settings, the runs
    of every file (e.g. methods or seeds run in separate processes); written to ``--out`` (default:
    the first file)."""
    import frame_summary as fs

    path = Path(args.out) if args.out_given else Path(args.from_json[0])
    result = json.loads(Path(args.from_json[0]).read_text())
    for other in args.from_json[1:]:
        more = json.loads(Path(other).read_text())
        result["runs"] = result.get("runs", []) + more.get("runs", [])
        result["methods"] = {**result["methods"], **more["methods"]}
        result.setdefault("parts", []).append({"file": str(other), "config": more["config"], "timing": more.get("timing")})
    if args.cost_json:
        result["cost"] = json.loads(Path(args.cost_json).read_text())["cost"]
        result["cost"]["from"] = str(args.cost_json)
    if result.get("runs"):
        result["summary"] = fs.summarise(
            result["runs"], [m for m in METHODS + ABLATIONS if m in result["methods"]], ft.TASK_NAMES, fd.TASKS
        )
    result["goals"] = fs.goals(result)
    fs.plot(result, path.with_suffix(".png"), path.with_name(path.stem + "_orders.png"))
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(fs.markdown(result))
    print(f"rewrote {path}")


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.from_json:
        resummarise(args)
        return
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    encoder = ft.load_encoder()
    lora_spec, matching = ft.matched_lora(encoder, args)
    result: dict[str, Any] = {
        "benchmark": "frame",
        "quick": args.quick,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": {
            "torch": torch.__version__,
            "platform": platform.platform(),
            "torch_threads_quality": args.threads,
            "torch_threads_cost": args.cost_threads,
            "shared_machine": "yes: 2 cores shared with other jobs; times are single-thread process CPU time where noted",
            "load_average_start": os.getloadavg(),
        },
        "methods": {m: LABELS[m] for m in args.methods},
        "matching": {**matching, "lora_rank_pattern": lora_spec.rank_pattern, "params": param_counts(encoder, args, lora_spec)},
        "timing": {},
    }
    print(json.dumps(result["matching"]["params"]), flush=True)
    if not args.skip_quality:
        quality(args, encoder, lora_spec, result)
    if not args.skip_cost:
        import frame_cost

        torch.set_num_threads(args.cost_threads)
        t1 = time.perf_counter()
        train_ex, _ = fd.build_tasks(args.max_per_class)
        sample = ft.tokenise(train_ex[:: max(1, len(train_ex) // args.cost_batch)][: args.cost_batch], args.max_length)
        result["cost"] = {
            "device": args.device,
            "batch": args.cost_batch,
            "tokens": args.max_length,
            **frame_cost.measure(encoder, sample, args, lora_spec),
        }
        result["timing"]["cost_s"] = time.perf_counter() - t1
    result["environment"]["load_average_end"] = os.getloadavg()
    result["timing"]["total_s"] = time.perf_counter() - t0
    if "summary" in result or "cost" in result:
        import frame_summary as fs

        result["goals"] = fs.goals(result)
        fs.plot(result, args.png, args.orders_png)
    write(args, result)
    print(f"wrote {args.out} ({result['timing']['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
