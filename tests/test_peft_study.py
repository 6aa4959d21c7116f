"""The five-regime study's cell function and report (benchmarks/peft_study*.py), a few steps each.

Runs the study's own code path (ImageClassifier + DigitsDataModule + AdapterCallback +
AdaptiveCheckpointCallback + EfficiencyCallback) for two training steps per cell on a random
base, with an injected ``ConstantPowerSource`` standing in for NVML, so the energy columns
and NS-E / NS# are exercised on CPU exactly as they would be filled on a GPU.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(BENCH))
    try:
        import peft_study
        import peft_study_cells
        import peft_study_report

        yield peft_study, peft_study_cells, peft_study_report
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def two_cells(study, tmp_path_factory):
    """Full FT without checkpointing, then LoRA with adaptive checkpointing at a budget below
    LoRA's own no-checkpointing activation peak, both at 50 W constant power."""
    import torch

    from lightning_peft.metrics import ConstantPowerSource

    torch.set_num_threads(1)
    _, cells, _ = study
    work = tmp_path_factory.mktemp("study")
    full = cells.Cell("vit_s", "full", "none", 0, epochs=1, batch_size=16, max_steps=2)
    lora_none = cells.Cell("vit_s", "lora", "none", 0, epochs=1, batch_size=16, max_steps=2)
    r_full = cells.run_cell(full, None, ConstantPowerSource(50.0), work)
    r_none = cells.run_cell(lora_none, None, ConstantPowerSource(50.0), work)
    budget = int(0.7 * r_none["activation_peak_bytes"])
    lora = cells.Cell("vit_s", "lora", "adaptive", 0, epochs=1, batch_size=16, max_steps=2, activation_budget_bytes=budget)
    r_lora = cells.run_cell(lora, None, ConstantPowerSource(50.0), work)
    return r_full, r_none, r_lora, work


def test_cell_fills_every_column_with_an_injected_energy_source(two_cells):
    r_full, _, r_lora, work = two_cells
    for r in (r_full, r_lora):
        assert r["energy_source"] == "constant" and r["energy_estimated"] is False
        assert r["fit_energy_joules"] == pytest.approx(50.0 * r["fit_seconds"], rel=1e-6)
        assert r["infer_avg_watts"] == pytest.approx(50.0)
        assert r["train_steps"] == 2 and 0.0 <= r["test_acc"] <= 1.0
        for key in ("netscore", "ns_e", "ns_m", "ns_sharp", "fit_peak_memory_mib", "macs_per_sample"):
            assert r[key] is not None and math.isfinite(r[key]) and r[key] > 0, key
        assert (work / r["key"].replace("/", "_") / "seed0" / "efficiency.json").is_file()
    assert r_full["trainable_params"] == r_full["params"]
    assert 0 < r_lora["trainable_params"] < r_lora["params"] // 4
    assert r_lora["macs_per_sample"] > r_full["macs_per_sample"]  # the unmerged LoRA matmuls


def test_adaptive_cell_checkpoints_to_fit_its_budget(two_cells):
    _, r_none, r_lora, _ = two_cells
    assert r_lora["checkpointed_blocks_final"], "a budget below the no-checkpointing peak must checkpoint some block"
    assert r_lora["activation_peak_bytes"] <= r_lora["activation_budget_bytes"]
    assert r_lora["activation_peak_bytes"] < r_none["activation_peak_bytes"]
    # the training peak is the labelled CPU estimate: static bytes + the adaptive meter's activations
    parts = r_lora["fit_memory_breakdown_bytes"]
    assert parts["activations"] == r_lora["activation_peak_bytes"]
    assert r_lora["peak_memory_source"] == "cpu-estimate" and r_lora["memory_estimated"] is True


def test_report_ratios_budget_and_figure(study, two_cells, tmp_path):
    peft_study, _, report = study
    r_full, r_none, r_lora, _ = two_cells
    budget = int(0.65 * r_full["fit_peak_memory_mib"] * report.MIB)
    state = {"records": [dict(r_full), dict(r_none), dict(r_lora)], "memory_budget_bytes": {"vit_s": budget}}
    png = tmp_path / "study.png"
    report.finish(state, str(png))
    assert png.stat().st_size > 10_000
    cells = state["cells"]
    assert cells["vit_s/full/none"]["time_vs_full"]["mean"] == pytest.approx(1.0)
    assert cells["vit_s/lora/adaptive"]["energy_vs_full"]["mean"] > 0
    assert state["energy_measured"] is True
    fits = state["budget"]["vit_s"]["fits"]
    assert fits["vit_s/full/none"] is False  # 0.65 of its own peak
    adaptive = state["paper_comparison"]["backbones"]["vit_s"]["adaptive_vs_none"]["lora"]
    assert adaptive["peak_memory_change_pct"] < 0 and adaptive["energy_change_pct"] is not None
    assert "| LoRA | adaptive |" in state["markdown"]
    json.dumps(state, default=str)  # the study writes it as JSON


def test_pareto_front():
    sys.path.insert(0, str(BENCH))
    try:
        from peft_study_report import pareto
    finally:
        sys.path.remove(str(BENCH))
    pts = [("a", 1.0, 0.9), ("b", 2.0, 0.95), ("c", 2.0, 0.8), ("d", 0.5, 0.5), ("e", 3.0, 0.95)]
    assert pareto(pts, maximize_y=True) == ["a", "b", "d"]
    assert pareto([("a", 1.0, 5.0), ("b", 2.0, 4.0), ("c", 2.0, 6.0)], maximize_y=False) == ["a", "b"]


def test_cuda_path_budget_and_paths(study):
    peft_study, _, _ = study
    args = peft_study.parse_args(["--device", "cuda", "--quick"])
    assert args.out.endswith("peft_study_quick_cuda.json") and args.seeds == 1
    # on CUDA the allocator measures the whole step: the adaptive cell gets the whole budget
    assert peft_study.activation_budget(args, 1000, None) == 1000
    cpu = peft_study.parse_args([])
    none = {"fit_memory_breakdown_bytes": {"parameters": 100, "buffers": 0, "gradients": 100, "optimizer_state": 200, "activations": 5000}}
    assert peft_study.activation_budget(cpu, 1000, none) == 600
    plan = peft_study.cell_plan("vit_s", ["full", "lora", "probe"], 2)
    assert plan[0] == ("full", "none", 0) and ("probe", "static", 0) not in plan and len(plan) == 2 * 7
