"""The efficiency report: scores from measured phases, missing inputs, labels, the table."""

from __future__ import annotations

import pytest

from lightning_peft.metrics import netscore, ns_e, ns_m, ns_sharp
from lightning_peft.metrics.energy import EnergyReading
from lightning_peft.metrics.memory import MIB, MemoryPeak
from lightning_peft.metrics.summary import RESULT_KEYS, PhaseMeasure, format_table, summarize


def phase(stage, seconds, joules, source="constant", estimated=False, mib=100.0, memory_source="cuda-allocator", memory_estimated=False):
    reading = EnergyReading(seconds, joules, None if joules is None else joules / seconds, source, estimated, "note")
    memory = MemoryPeak(int(mib * MIB), memory_source, memory_estimated, {"activations": int(mib * MIB)})
    return PhaseMeasure(reading, memory, stage, samples=64)


def test_scores_use_the_inference_phase():
    fit, infer = phase("fit", 100.0, 20_000.0, mib=900.0), phase("test", 21.3, 21.3 * 144.2, mib=1084.0)
    out = summarize(fit, infer, accuracy=89.7, params=22_000_000, trainable_params=300_000, macs_per_sample=4.6e9)
    assert set(RESULT_KEYS) <= set(out)
    assert out["ns_e"] == pytest.approx(69.39, abs=0.01) and out["ns_m"] == pytest.approx(70.52, abs=0.01)
    assert out["ns_sharp"] == pytest.approx(61.81, abs=0.01)
    assert out["netscore"] == pytest.approx(netscore(89.7, 22.0, 4600.0))
    assert out["fit_seconds"] == 100.0 and out["fit_avg_watts"] == pytest.approx(200.0) and out["fit_peak_memory_mib"] == 900.0
    assert out["infer_avg_watts"] == pytest.approx(144.2) and out["infer_samples"] == 64 and out["infer_stage"] == "test"
    assert out["energy_source"] == "constant" and not out["energy_estimated"] and not out["memory_estimated"]
    assert out["peak_memory_source"] == "cuda-allocator" and out["notes"] == []


def test_missing_inputs_give_none_and_reasons():
    out = summarize(phase("fit", 10.0, None, source="unavailable"), None, None, 1000, 10, None)
    assert out["netscore"] is None and out["ns_e"] is None and out["ns_m"] is None and out["ns_sharp"] is None
    assert out["fit_energy_joules"] is None and out["infer_seconds"] is None
    notes = " | ".join(out["notes"])
    assert "no inference phase measured" in notes and "fit energy unavailable: note" in notes
    assert "netscore not computed: no accuracy, no parameters/MACs" in notes
    infer = phase("test", 2.0, None, source="unavailable")
    out = summarize(None, infer, 50.0, 1000, 10, 2000.0)
    assert out["ns_m"] == pytest.approx(ns_m(50.0, 100.0)) and out["netscore"] == pytest.approx(netscore(50.0, 0.001, 0.002))
    assert out["ns_e"] is None and out["ns_sharp"] is None
    assert "ns_e not computed: no inference power" in out["notes"]


def test_estimates_are_labelled_everywhere():
    infer = phase("test", 4.0, 400.0, source="tdp-estimate", estimated=True, memory_source="cpu-estimate", memory_estimated=True)
    out = summarize(None, infer, 90.0, 10**6, 10**5, 10**6)
    assert out["energy_estimated"] and out["memory_estimated"] and out["energy_source"] == "tdp-estimate"
    assert out["ns_e"] == pytest.approx(ns_e(90.0, 4.0, 100.0)) and out["ns_sharp"] == pytest.approx(ns_sharp(90.0, 100.0, 4.0, 100.0))
    assert any("energy is an estimate" in n for n in out["notes"]) and any("CPU estimate" in n for n in out["notes"])
    table = format_table(out)
    assert "inference energy [J] (estimate)" in table and "NS-E (estimate)" in table and "NS-M (estimate)" in table
    assert "NS# (estimate)" in table


def test_table_says_unavailable():
    table = format_table(summarize(None, phase("predict", 1.0, None, source="unavailable"), None, 10, 1, None))
    assert "NetScore" in table and "unavailable" in table and "(estimate)" not in table
    assert "note: netscore not computed" in table


def test_zero_inference_time_gives_no_time_scores():
    out = summarize(None, phase("test", 0.0, None), 80.0, 10, 1, 10.0)
    assert out["ns_e"] is None and "inference time is zero" in " ".join(out["notes"])


def test_missing_phase_has_the_same_keys():
    full = summarize(phase("fit", 1.0, 1.0), phase("test", 1.0, 1.0), 50.0, 10, 1, 10.0)
    empty = summarize(None, None, None, None, None, None)
    assert set(full) == set(empty) and empty["infer_stage"] is None and empty["fit_samples"] is None
