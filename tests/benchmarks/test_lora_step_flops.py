"""The LoRA step benchmark's FLOP figures (``benchmarks/lora_step.py``): a variant's counted FLOPs
are its model's, and the ceiling and extra-work rate follow from counts and times as documented
(timings are made up here, never measured)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import lora_step as ls  # noqa: E402


def timed(step_s: float, flops: int | None) -> dict:
    times = {"step_s_median": step_s, "step_s_all": [step_s], "cpu_s_median": step_s}
    return {**times, "peak_bytes": 1, "saved_activation_bytes": 1, "flops_per_step": flops}


def test_ceiling_and_extra_work_rate():
    result = {"variants": {"frozen": timed(1.0, 1000), "ours": timed(1.25, 1100), "ours_compiled": timed(1.0, None)}}
    ls.add_ratios(result)
    ours = result["variants"]["ours"]
    assert ours["flop_ceiling_vs_frozen"] == pytest.approx(1000 / 1100)
    # 100 extra FLOPs in 0.25 s against the base's 1000 in 1 s: 0.4 of the base's rate
    assert ours["extra_work_rate_vs_frozen"] == pytest.approx(0.4)
    assert "flop_ceiling_vs_frozen" not in result["variants"]["ours_compiled"]  # not counted: no figure


def test_counted_flops_are_the_step_of_each_variant():
    torch.manual_seed(0)
    args = argparse.Namespace(quick=True, img=32, batch=2, seq=None)
    spec = ls.model_spec("vit_s", args)
    spec["depth"] = 1
    ref = ls.build_reference(spec, torch.device("cpu"), torch.float32)
    batch = {"x": torch.randn(2, 3, 32, 32), "y": torch.tensor([0, 1])}
    frozen, ours = (ls.make_variant(n, ref, spec, batch, contextlib.nullcontext) for n in ("frozen", "ours"))
    base, adapted = ls.step_flops(frozen), ls.step_flops(ours)
    # 5 tokens (4 patches + cls) x 2 images; LoRA on qkv, proj, fc1, fc2 (d = 384, r = 16): six
    # thin GEMMs each (10 rows: never merged), plus the trainable head's weight gradient; the
    # frozen limit runs backward into the embeddings, ours stops at the first qkv (nothing below
    # it trains): no dx there, neither the base's nor the thin g A
    n, d, r = 10, 384, 16
    lora = sum(6 * n * r * (i + o) for i, o in ((d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)))
    head = 2 * 2 * d * ref.num_classes
    first_dx = 2 * n * 3 * d * d + 2 * n * r * d
    assert adapted - base == lora + head - first_dx
    assert all(p.grad is None for p in ours.model.parameters())  # counting leaves no gradients behind
