"""CPU package energy from Linux RAPL counters (``/sys/class/powercap/intel-rapl:*``).

Each top-level zone ``intel-rapl:N`` whose ``name`` starts with ``package`` has a cumulative
counter ``energy_uj`` (microjoules) that wraps to 0 after ``max_energy_range_uj``. Between two
reads ``e0`` then ``e1`` the energy is ``e1 - e0``, or ``(max - e0) + e1`` when ``e1 < e0``
(one wrap). The counter wraps after ``max / P`` seconds (about 40 min at 100 W for a typical
2^38 uJ range), so ``poll()`` should run more often than that; the callback polls after every
batch. Sub-zones (``intel-rapl:N:M``: cores, uncore, DRAM) are inside the package and are not
added again; ``psys`` (the whole platform) would double count and is skipped.

Since 2020 most kernels make ``energy_uj`` readable by root only (the PLATYPUS side channel);
``rapl_unavailable_reason`` says so instead of failing later. The counters cover the whole
socket, other processes included. Pure Python.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lightning_peft.metrics.energy import EnergySource

__all__ = ["RaplEnergySource", "rapl_zones", "rapl_unavailable_reason", "counter_delta"]

DEFAULT_ROOT = "/sys/class/powercap"


def counter_delta(before: int, after: int, max_range: int) -> int:
    """Counter increase from ``before`` to ``after`` for a counter wrapping at ``max_range``
    (at most one wrap between the reads)."""
    if after >= before:
        return after - before
    return (max_range - before) + after


def rapl_zones(root: str | Path = DEFAULT_ROOT) -> list[Path]:
    """The package zones under ``root`` (``intel-rapl:N`` directories named ``package-*``), or
    every top-level zone but ``psys`` where none is named (older kernels)."""
    base = Path(root)
    if not base.is_dir():
        return []
    top = sorted(p for p in base.glob("intel-rapl:*") if p.name.count(":") == 1 and (p / "energy_uj").exists())

    def zone_name(p: Path) -> str:
        try:
            return (p / "name").read_text().strip()
        except OSError:
            return ""

    packages = [p for p in top if zone_name(p).startswith("package")]
    return packages or [p for p in top if zone_name(p) != "psys"]


def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


def rapl_unavailable_reason(root: str | Path = DEFAULT_ROOT) -> str | None:
    """``None`` if the package counters under ``root`` can be read, else why not."""
    zones = rapl_zones(root)
    if not zones:
        return f"no RAPL package zones under {root}"
    for zone in zones:
        try:
            _read_int(zone / "energy_uj")
            _read_int(zone / "max_energy_range_uj")
        except PermissionError:
            return f"{zone / 'energy_uj'} is not readable by this user (RAPL is root-only on most kernels)"
        except (OSError, ValueError) as error:
            return f"cannot read {zone}: {error}"
    return None


class RaplEnergySource(EnergySource):
    """Sum of the package zones' energy between ``start`` and ``stop``, wrap-around handled;
    ``poll()`` folds the counters in between so a long interval sees each wrap."""

    name = "rapl"
    scope = "host"

    def __init__(self, root: str | Path = DEFAULT_ROOT, clock: Callable[[], float] | None = None) -> None:
        reason = rapl_unavailable_reason(root)
        if reason:
            raise RuntimeError(f"RAPL energy cannot be read: {reason}")
        super().__init__(clock)
        self.zones = rapl_zones(root)
        self._max = {zone: _read_int(zone / "max_energy_range_uj") for zone in self.zones}
        self._last: dict[Path, int] = {}
        self._microjoules = 0

    def _begin(self) -> None:
        self._last = {zone: _read_int(zone / "energy_uj") for zone in self.zones}
        self._microjoules = 0

    def poll(self) -> None:
        if not self.running:
            return
        for zone in self.zones:
            now = _read_int(zone / "energy_uj")
            self._microjoules += counter_delta(self._last[zone], now, self._max[zone])
            self._last[zone] = now

    def _end(self, seconds: float) -> tuple[float | None, str | None]:
        # stop() has cleared the running flag, so fold the last reads here
        for zone in self.zones:
            now = _read_int(zone / "energy_uj")
            self._microjoules += counter_delta(self._last[zone], now, self._max[zone])
            self._last[zone] = now
        names = ", ".join(zone.name for zone in self.zones)
        return self._microjoules / 1e6, f"RAPL package counters ({names}); whole socket, other processes included"
