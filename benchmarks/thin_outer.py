#!/usr/bin/env python
"""LoRA's ``dB = s dy^T u`` (``dy [N, d_out]``, ``u [N, r]``, scale ``s``) in the forms a GEMM
library can be given, at the shapes of the LoRA step benchmark (``benchmarks/lora_step.py``):

* ``direct``      ``torch.mm(dy.t(), u).mul_(s)``: the product as it reads (the kernel before);
* ``transposed``  ``torch.mm(u.t(), dy).t().mul_(s).contiguous()``: the same values, computed as
                  ``(u^T dy)^T`` and copied into ``B``'s layout (the copy autograd makes);
* ``thin_outer``  ``lightning_peft.adapters.kernels.lora.thin_outer`` (the form it picks, the
                  scale in the GEMM's ``alpha``; plus the copy where its result is transposed).

Medians over interleaved rounds; the ratio ``direct / transposed`` > 1 means the transposed form
is faster. Written to ``--out`` as JSON.

    python benchmarks/thin_outer.py --threads 2        # ~1 min
"""

from __future__ import annotations

import argparse
import json
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

from lightning_peft.adapters.kernels.lora import thin_outer  # noqa: E402

# (name, N rows, d_out, r): ViT-S/16 img 224 (197 tokens) at batch 8 and 32 (qkv, proj/fc2, fc1),
# 2 x 2048 tokens at the Llama-1.1B width (hidden 2048, MLP 5632; the GPU benchmark's model), and the host-cost stack
SHAPES = [
    ("vit_s_b8_qkv", 8 * 197, 1152, 16),
    ("vit_s_b8_proj", 8 * 197, 384, 16),
    ("vit_s_b8_fc1", 8 * 197, 1536, 16),
    ("vit_s_b32_qkv", 32 * 197, 1152, 16),
    ("vit_s_b32_fc1", 32 * 197, 1536, 16),
    ("llama_2x2048_q", 4096, 2048, 16),
    ("llama_2x2048_up", 4096, 5632, 16),
    ("host_stack", 8, 64, 8),
]


SCALE = 2.0  # alpha / rank of the benchmarks' LoRA (32 / 16)


def in_b_layout(grad: torch.Tensor) -> torch.Tensor:
    """What autograd does with a gradient of a contiguous parameter: copy it only if strided."""
    return grad if grad.is_contiguous() else grad.contiguous()


def db_forms(dy: torch.Tensor, u: torch.Tensor, like: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    return {
        "direct": lambda: torch.mm(dy.t(), u).mul_(SCALE),
        "transposed": lambda: torch.mm(u.t(), dy).t().mul_(SCALE).contiguous(),
        "thin_outer": lambda: in_b_layout(thin_outer(dy, u, SCALE, like)),
    }


def time_us(fn: Callable[[], torch.Tensor], calls: int) -> float:
    """Mean time of one call over ``calls`` back-to-back calls, in microseconds."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--out", default="benchmarks/results/thin_outer_cpu.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    rows = []
    for name, n, d_out, r in SHAPES:
        dy, u, like = torch.randn(n, d_out, dtype=dtype), torch.randn(n, r, dtype=dtype), torch.empty(d_out, r, dtype=dtype)
        forms = db_forms(dy, u, like)
        ref = torch.mm(dy.t().double(), u.double()) * SCALE
        for fn in forms.values():  # the forms agree before any is timed
            torch.testing.assert_close(fn().double(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
        calls = max(3, min(200, int(2e8 // (n * d_out * r))))
        samples: dict[str, list[float]] = {f: [] for f in forms}
        for _ in range(args.rounds):  # interleaved: drift hits every form alike
            for form, fn in forms.items():
                samples[form].append(time_us(fn, calls))
        med = {f: statistics.median(v) for f, v in samples.items()}
        row = {"shape": name, "N": n, "d_out": d_out, "r": r, **{f"{f}_us": round(m, 2) for f, m in med.items()}}
        row["direct_over_transposed"] = round(med["direct"] / med["transposed"], 3)
        row["direct_over_thin_outer"] = round(med["direct"] / med["thin_outer"], 3)
        rows.append(row)
        print(
            f"{name:18s} direct {med['direct']:9.1f} us  transposed {med['transposed']:9.1f} us  "
            f"thin_outer {med['thin_outer']:9.1f} us  direct/thin_outer {row['direct_over_thin_outer']:.2f}x"
        )
    result = {
        "benchmark": "thin_outer",
        "torch": torch.__version__,
        "threads": args.threads,
        "dtype": args.dtype,
        **machine.describe(),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
