"""RAPL against a fake ``/sys/class/powercap`` tree: zone choice, wrap-around, unreadable files."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lightning_peft.metrics import rapl
from lightning_peft.metrics.rapl import RaplEnergySource, counter_delta, rapl_unavailable_reason, rapl_zones

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from fake_devices import StepClock  # noqa: E402


def zone(root: Path, name: str, label: str, energy: int, max_range: int = 1000) -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / "name").write_text(label + "\n")
    (path / "energy_uj").write_text(f"{energy}\n")
    (path / "max_energy_range_uj").write_text(f"{max_range}\n")
    return path


def set_energy(path: Path, value: int) -> None:
    (path / "energy_uj").write_text(f"{value}\n")


@pytest.fixture
def sysfs(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "powercap"
    return {
        "root": root,
        "pkg0": zone(root, "intel-rapl:0", "package-0", 900),
        "core": zone(root, "intel-rapl:0:0", "core", 10),  # inside package 0: never added
        "psys": zone(root, "intel-rapl:1", "psys", 5000, 10**6),  # the whole platform: double counts
        "pkg1": zone(root, "intel-rapl:2", "package-1", 100),
    }


def test_counter_delta_wraps():
    assert counter_delta(100, 250, 1000) == 150
    assert counter_delta(900, 50, 1000) == 150
    assert counter_delta(5, 5, 1000) == 0


def test_zones_are_the_packages(sysfs):
    assert [p.name for p in rapl_zones(sysfs["root"])] == ["intel-rapl:0", "intel-rapl:2"]
    assert rapl_zones(sysfs["root"] / "missing") == []


def test_zones_without_names_skip_psys(tmp_path):
    root = tmp_path / "powercap"
    zone(root, "intel-rapl:0", "", 0)
    zone(root, "intel-rapl:1", "psys", 0)
    assert [p.name for p in rapl_zones(root)] == ["intel-rapl:0"]


def test_energy_with_wrap_around(sysfs):
    source = RaplEnergySource(sysfs["root"], clock=StepClock(2.0))
    source.start()
    set_energy(sysfs["pkg0"], 50)  # wrapped: 900 -> 1000 -> 50 is 150 uJ
    set_energy(sysfs["pkg1"], 400)  # +300
    source.poll()
    set_energy(sysfs["pkg0"], 850)  # a second wrap would be lost without the poll: +800
    set_energy(sysfs["pkg1"], 500)  # +100
    set_energy(sysfs["core"], 999)  # sub-zone: ignored
    reading = source.stop()
    assert reading.source == "rapl" and not reading.estimated and source.scope == "host"
    assert reading.joules == pytest.approx((150 + 300 + 800 + 100) / 1e6)
    assert reading.seconds == 2.0 and reading.watts == pytest.approx(reading.joules / 2.0)
    assert "intel-rapl:0, intel-rapl:2" in reading.note
    # a second interval starts from the counters' new values
    source.start()
    set_energy(sysfs["pkg0"], 860)
    assert source.stop().joules == pytest.approx(10 / 1e6)


def test_unreadable_counters_reported(sysfs, monkeypatch):
    assert rapl_unavailable_reason(sysfs["root"]) is None
    assert "no RAPL package zones" in rapl_unavailable_reason(sysfs["root"] / "none")

    def denied(path: Path) -> int:  # root reads anything, so the denial is simulated
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(rapl, "_read_int", denied)
    reason = rapl_unavailable_reason(sysfs["root"])
    assert "not readable by this user" in reason and "root-only" in reason
    with pytest.raises(RuntimeError, match="RAPL energy cannot be read: .*not readable"):
        RaplEnergySource(sysfs["root"])


def test_garbage_counter_reported(sysfs):
    set_energy(sysfs["pkg1"], 0)
    (sysfs["pkg1"] / "energy_uj").write_text("n/a\n")
    assert "cannot read" in rapl_unavailable_reason(sysfs["root"])
