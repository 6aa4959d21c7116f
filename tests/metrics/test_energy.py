"""Energy sources: readings, labels, the trapezoid integral and ``select_energy_source``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lightning_peft.metrics import (
    ConstantPowerSource,
    EnergyReading,
    TdpEstimateSource,
    UnavailableSource,
    integrate_power,
    select_energy_source,
)
from lightning_peft.metrics import nvml as nvml_module
from lightning_peft.metrics import rapl as rapl_module

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from fake_devices import StepClock  # noqa: E402


def test_constant_power_reading():
    source = ConstantPowerSource(40.0, clock=StepClock(2.5))
    source.start()
    reading = source.stop()
    assert reading == EnergyReading(2.5, 100.0, 40.0, "constant", False, "constant power 40 W")
    assert not source.running


def test_estimates_are_labelled():
    source = TdpEstimateSource(65, clock=StepClock(2.0))
    source.start()
    reading = source.stop()
    assert reading.source == "tdp-estimate" and reading.estimated
    assert reading.joules == pytest.approx(130.0) and reading.watts == pytest.approx(65.0)
    assert "estimate" in reading.note
    stated = ConstantPowerSource(10, estimated=True, clock=StepClock())
    stated.start()
    assert stated.stop().estimated


def test_unavailable_reading_has_no_numbers():
    source = UnavailableSource("no reader here", clock=StepClock())
    source.start()
    reading = source.stop()
    assert reading.joules is None and reading.watts is None and not reading.estimated
    assert reading.seconds == 1.0 and reading.note == "no reader here" and reading.source == "unavailable"
    assert reading.to_dict()["joules"] is None


def test_zero_length_interval_has_no_power():
    source = ConstantPowerSource(40.0, clock=lambda: 5.0)
    source.start()
    reading = source.stop()
    assert reading.joules == 0.0 and reading.watts is None and "zero-length" in reading.note


def test_start_stop_order_enforced():
    source = ConstantPowerSource(1.0)
    with pytest.raises(RuntimeError, match="without start"):
        source.stop()
    source.start()
    with pytest.raises(RuntimeError, match="called twice"):
        source.start()


@pytest.mark.parametrize("watts", [0, -1, float("nan"), float("inf")])
def test_bad_power_refused(watts):
    with pytest.raises(ValueError, match="watts must be"):
        ConstantPowerSource(watts)
    with pytest.raises(ValueError, match="tdp_watts must be"):
        TdpEstimateSource(watts)


def test_integrate_power_trapezoid():
    assert integrate_power([(0.0, 10.0), (2.0, 10.0)]) == pytest.approx(20.0)
    # a linear ramp 0 -> 100 W over 4 s is exactly 200 J, however it is split
    ramp = [(t, 25.0 * t) for t in (0.0, 1.0, 1.5, 4.0)]
    assert integrate_power(ramp) == pytest.approx(200.0)
    assert integrate_power([(0.0, 100.0), (1.0, 200.0), (2.0, 300.0)]) == pytest.approx(400.0)
    assert integrate_power([(1.0, 50.0), (1.0, 70.0)]) == 0.0


@pytest.mark.parametrize(
    "samples, match",
    [
        ([(0.0, 1.0)], "at least two"),
        ([(1.0, 1.0), (0.5, 1.0)], "non-decreasing"),
        ([(0.0, 1.0), (1.0, float("nan"))], "non-negative powers"),
        ([(0.0, -1.0), (1.0, 1.0)], "non-negative powers"),
    ],
)
def test_integrate_power_refuses_bad_samples(samples, match):
    with pytest.raises(ValueError, match=match):
        integrate_power(samples)


def test_select_on_a_machine_without_readers(monkeypatch):
    monkeypatch.setattr(rapl_module, "rapl_unavailable_reason", lambda root=None: "no RAPL here")
    source = select_energy_source("auto", "cpu")
    assert isinstance(source, UnavailableSource) and "no RAPL here" in source.reason and "tdp_watts" in source.reason
    source = select_energy_source("auto", "cpu", tdp_watts=35)
    assert isinstance(source, TdpEstimateSource) and source.watts == 35
    monkeypatch.setattr(nvml_module, "nvml_unavailable_reason", lambda device, nvml=None: "no NVML here")
    source = select_energy_source("auto", "cuda:0")
    assert isinstance(source, UnavailableSource) and "NVML: no NVML here" in source.reason
    with pytest.raises(RuntimeError, match="energy='nvml' cannot read on cuda:0: no NVML here"):
        select_energy_source("nvml", "cuda:0")
    with pytest.raises(RuntimeError, match="energy='rapl' cannot read here: no RAPL here"):
        select_energy_source("rapl", "cpu")


def test_select_none_tdp_and_bad_arguments():
    assert isinstance(select_energy_source("none", "cpu"), UnavailableSource)
    assert isinstance(select_energy_source("tdp", "cpu", tdp_watts=100), TdpEstimateSource)
    with pytest.raises(ValueError, match="energy='tdp' needs tdp_watts"):
        select_energy_source("tdp", "cpu")
    with pytest.raises(ValueError, match="kind must be one of"):
        select_energy_source("gpu", "cpu")
    with pytest.raises(ValueError, match="tdp_watts must be"):
        select_energy_source("auto", "cpu", tdp_watts=-5)
    with pytest.raises(ValueError, match="device must name a torch device"):
        select_energy_source("auto", "quantum:0")
    # the real NVML reader on a CPU device: refused with the reason
    with pytest.raises(RuntimeError, match="not a CUDA device"):
        select_energy_source("nvml", "cpu")
