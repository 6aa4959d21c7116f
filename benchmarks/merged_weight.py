#!/usr/bin/env python
"""LoRA's base GEMMs on the merged weight ``W + s B A`` or on ``W`` plus the thin update, one
layer at a time (forward + backward of a ``LoRALinear`` after its real producer: LayerNorm
before qkv / fc1, GELU before fc2, none before proj), at the shapes of the LoRA step benchmark:

* ``frozen``     the base ``nn.Linear`` alone (no weight gradient): the limit;
* ``unmerged``   ``y = x W^T + b + s u B^T``, ``dx = dy W + s (dy B) A`` at every size;
* ``default``    the library's rule (``kernels.lora.MERGE_MIN_ROWS_PER_COLUMN``);
* ``merged``     ``y = x (W + s B A)^T + b``, ``dx = dy (W + s B A)`` at every size.

Whole training steps (``benchmarks/lora_step.py``) differ by up to +-4% between two copies of the
same variant on these VMs, more than this choice is worth there; one layer in a loop, variants
interleaved round by round, resolves it. Reported: each variant's median time per call and its
extra over ``frozen``, per layer and summed per block. Written to ``--out`` as JSON.

    python benchmarks/merged_weight.py --threads 2        # ~3 min
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

import machine  # noqa: E402  (benchmarks/machine.py: the CPU this ran on)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from lightning_peft.adapters.kernels import lora as lora_kernels  # noqa: E402
from lightning_peft.adapters.lora import LoRALinear  # noqa: E402

RANK, ALPHA = 16, 32.0
# (block, layer, N rows, d_in, d_out, producer): ViT-S/16 img 224 (197 tokens) at batch 8 and 32;
# the lora_step Llama (--quick: hidden 512, MLP 1408, 2 KV heads of 64) at 2 x 2048 tokens
SHAPES = [
    *[(f"vit_s_b{b}", name, b * 197, d_in, d_out, prod) for b in (8, 32) for name, d_in, d_out, prod in (
        ("qkv", 384, 1152, "layer_norm"), ("proj", 384, 384, None), ("fc1", 384, 1536, "layer_norm"), ("fc2", 1536, 384, "gelu"))],
    *[("llama_2x2048", name, 4096, d_in, d_out, prod) for name, d_in, d_out, prod in (
        ("q", 512, 512, "rms_norm"), ("k", 512, 128, "rms_norm"), ("v", 512, 128, "rms_norm"), ("o", 512, 512, None),
        ("gate", 512, 1408, "rms_norm"), ("up", 512, 1408, "rms_norm"), ("down", 1408, 512, "silu"))],
]  # fmt: skip
PRODUCERS: dict[str | None, Callable[[torch.Tensor], torch.Tensor]] = {
    None: lambda h: h * 1.0,  # a producer without a recipe (attention's output): the input is saved
    "layer_norm": lambda h: F.layer_norm(h, h.shape[-1:]),
    "rms_norm": lambda h: torch.ones(h.shape[-1]) * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)),  # transformers' form
    "gelu": F.gelu,
    "silu": F.silu,
}
VARIANTS = {"frozen": None, "unmerged": math.inf, "default": lora_kernels.MERGE_MIN_ROWS_PER_COLUMN, "merged": 0.0}


def time_layer(rows: int, d_in: int, d_out: int, producer: str | None, rounds: int, calls: int) -> dict[str, float]:
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out).requires_grad_(False)
    layer = LoRALinear(base, RANK, alpha=ALPHA)
    nn.init.normal_(layer.lora_B.weight, std=0.02)  # B = 0 would not change the work, but be honest
    h = torch.randn(rows, d_in, requires_grad=True)
    dy = torch.randn(rows, d_out)
    make_input = PRODUCERS[producer]
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(rounds):
        for name, merge_rows in VARIANTS.items():
            module = base if merge_rows is None else layer
            if merge_rows is not None:
                lora_kernels.MERGE_MIN_ROWS_PER_COLUMN = merge_rows
            start = time.perf_counter()
            for _ in range(calls):
                module(make_input(h)).backward(dy)
            times[name].append((time.perf_counter() - start) / calls)
            h.grad = layer.lora_A.weight.grad = layer.lora_B.weight.grad = None
    lora_kernels.MERGE_MIN_ROWS_PER_COLUMN = VARIANTS["default"]
    return {name: statistics.median(ts[2:]) * 1e3 for name, ts in times.items()}  # the first two rounds warm up


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=16)
    p.add_argument("--calls", type=int, default=4, help="forward + backward calls per variant per round")
    p.add_argument("--out", default="benchmarks/results/merged_weight_cpu.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows_out, blocks = [], {}
    for block, name, rows, d_in, d_out, producer in SHAPES:
        ms = time_layer(rows, d_in, d_out, producer, args.rounds, args.calls)
        extra = {k: round(v - ms["frozen"], 3) for k, v in ms.items() if k != "frozen"}
        rows_out.append({"block": block, "layer": name, "N": rows, "d_in": d_in, "d_out": d_out, "producer": producer,
                         "ms": {k: round(v, 3) for k, v in ms.items()}, "extra_ms": extra})  # fmt: skip
        total = blocks.setdefault(block, {k: 0.0 for k in ms})
        for k, v in ms.items():
            total[k] += v
        print(f"{block:13s} {name:5s} frozen {ms['frozen']:8.2f} ms  extra: " + "  ".join(f"{k} {v:+7.2f}" for k, v in extra.items()))
    summary = {}
    for block, total in blocks.items():
        summary[block] = {k: round(total["frozen"] / v, 4) for k, v in total.items() if k != "frozen"}
        ratios = "  ".join(f"{k} {v:.3f}x" for k, v in summary[block].items())
        print(f"{block:13s} frozen / variant, the block's adapted layers: {ratios}")
    result = {
        "benchmark": "merged_weight",
        "command": " ".join(["python", "benchmarks/merged_weight.py", *sys.argv[1:]]),
        "torch": torch.__version__,
        "threads": args.threads,
        "rounds": args.rounds,
        "calls": args.calls,
        "default_merge_min_rows_per_column": VARIANTS["default"],
        **machine.describe(),
        "rows": rows_out,
        "frozen_over_variant_per_block": summary,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
