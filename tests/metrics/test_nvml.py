"""NVML energy with a fake pynvml: the counter, sampled power, device mapping, failures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lightning_peft.metrics.nvml import NvmlEnergySource, nvml_unavailable_reason

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from fake_devices import FakeNvml, StepClock  # noqa: E402


@pytest.fixture(autouse=True)
def _no_visible_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_total_energy_counter():
    nvml = FakeNvml(energy_mj=[1000, 1000, 6000])  # probe read, start, stop
    source = NvmlEnergySource("cuda:0", nvml=nvml, clock=StepClock(2.0))
    assert source.mode == "counter" and source.name == "nvml-counter" and source.scope == "device"
    source.start()
    reading = source.stop()
    assert reading.joules == pytest.approx(5.0) and reading.seconds == 2.0 and reading.watts == pytest.approx(2.5)
    assert reading.source == "nvml-counter" and not reading.estimated and "whole board" in reading.note
    source.close()
    source.close()
    assert nvml.inits == 1 and nvml.shutdowns == 1


def test_sampled_power_is_integrated():
    nvml = FakeNvml(energy_mj=None, power_mw=[100_000, 200_000, 300_000])
    source = NvmlEnergySource("cuda:0", nvml=nvml, sample_interval=None, clock=StepClock(1.0))
    assert source.mode == "sampled" and source.name == "nvml-sampled"
    # clock reads: sample at start (t=0), the interval start (t=1), poll (t=2), interval end (t=3), sample at stop (t=4)
    source.start()
    source.poll()
    reading = source.stop()
    # samples (0, 100 W), (2, 200 W), (4, 300 W): trapezoid 2*150 + 2*250 = 800 J over 4 s, a
    # mean of 200 W; over the 2 s interval that is 400 J
    assert reading.watts == pytest.approx(200.0) and reading.seconds == 2.0
    assert reading.joules == pytest.approx(400.0)
    assert reading.source == "nvml-sampled" and "sampled 3 times" in reading.note


def test_sampler_thread_starts_and_stops():
    nvml = FakeNvml(energy_mj=None, power_mw=[50_000])
    source = NvmlEnergySource("cuda:0", nvml=nvml, sample_interval=0.001)
    source.start()
    assert source._thread is not None and source._thread.is_alive()
    thread = source._thread
    reading = source.stop()
    assert not thread.is_alive() and source._thread is None
    # constant 50 W however many samples the thread took (only the reads' times vary)
    assert reading.watts == pytest.approx(50.0, rel=1e-9)


def test_power_failure_mid_interval_gives_no_number():
    nvml = FakeNvml(energy_mj=None, power_mw=[100_000])
    source = NvmlEnergySource("cuda:0", nvml=nvml, sample_interval=None, clock=StepClock())
    source.start()
    nvml.power_mw = []  # the next read raises
    source.poll()
    reading = source.stop()
    assert reading.joules is None and reading.watts is None and "power reading failed" in reading.note


def test_counter_failure_at_stop_gives_no_number():
    nvml = FakeNvml(energy_mj=[1000])
    source = NvmlEnergySource("cuda:0", nvml=nvml, clock=StepClock())
    source.start()
    nvml.energy_mj = None
    reading = source.stop()
    assert reading.joules is None and "counter read failed" in reading.note


def test_visible_devices_map_to_nvml_handles(monkeypatch):
    nvml = FakeNvml(energy_mj=[0])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    NvmlEnergySource("cuda:1", nvml=nvml)
    assert nvml.handles == [("index", 5)]
    nvml = FakeNvml(energy_mj=[0])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-abc")
    NvmlEnergySource("cuda:0", nvml=nvml)
    assert nvml.handles == [("uuid", "GPU-abc")]
    nvml = FakeNvml(energy_mj=[0, 0, 4000])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-xyz")
    source = NvmlEnergySource("cuda:0", nvml=nvml, clock=StepClock())
    assert nvml.handles == [("uuid", "MIG-xyz"), ("mig-parent", ("uuid", "MIG-xyz"))]
    source.start()
    assert "MIG instance MIG-xyz" in source.stop().note


def test_unavailable_reasons():
    assert "not a CUDA device" in nvml_unavailable_reason("cpu", nvml=FakeNvml(energy_mj=[0]))
    assert "nvmlInit failed" in nvml_unavailable_reason("cuda:0", nvml=FakeNvml(init_error=True))
    assert "neither the energy counter nor power" in nvml_unavailable_reason("cuda:0", nvml=FakeNvml(energy_mj=None))
    nvml = FakeNvml(energy_mj=None, power_mw=[1000])
    assert nvml_unavailable_reason("cuda:0", nvml=nvml) is None
    assert nvml.inits == nvml.shutdowns == 1


def test_bad_sample_interval_refused():
    with pytest.raises(ValueError, match="sample_interval must be > 0"):
        NvmlEnergySource("cuda:0", nvml=FakeNvml(energy_mj=[0]), sample_interval=0)
