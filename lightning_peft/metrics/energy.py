"""Energy readings behind one small interface: ``source.start()``, work, ``source.stop()``.

A reading is ``EnergyReading(seconds, joules, watts, source, estimated)``: ``seconds`` the
wall time between ``start`` and ``stop``, ``joules`` the energy over it, ``watts = joules /
seconds`` the average power. ``joules``/``watts`` are ``None`` where nothing measures them (never
a made-up number), and ``estimated`` is ``True`` for any estimate (a stated TDP, a constant
power): every output that shows the figure must label it.

Sources (``select_energy_source`` picks one):

* ``"nvml-counter"`` / ``"nvml-sampled"`` (``metrics/nvml.py``): the GPU's total-energy counter
  (``nvmlDeviceGetTotalEnergyConsumption``, mJ) where the GPU has one, else the board power
  sampled on a background thread and integrated by the trapezoid rule (``integrate_power``).
* ``"rapl"`` (``metrics/rapl.py``): the CPU packages' RAPL counters under ``/sys/class/powercap``
  (``energy_uj``, wrapping at ``max_energy_range_uj``), where readable.
* ``"tdp-estimate"``: a stated power times the wall time, labelled an estimate.
* ``"constant"``: ``ConstantPowerSource(watts)``, injectable for tests and plain Python.
* ``"unavailable"``: readings with ``joules = watts = None`` and the reason in ``note``.

Both hardware counters measure the whole device (a GPU board, a CPU package), including other
processes sharing it. Pure Python and torch (no Lightning).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from lightning_peft.validation import check_bool, check_choice, check_float, check_str

__all__ = [
    "EnergyReading",
    "EnergySource",
    "ConstantPowerSource",
    "TdpEstimateSource",
    "UnavailableSource",
    "integrate_power",
    "select_energy_source",
]

EnergyKind = Literal["auto", "nvml", "rapl", "tdp", "none"]
ENERGY_KINDS = ("auto", "nvml", "rapl", "tdp", "none")


@dataclass(frozen=True)
class EnergyReading:
    """One measured interval: ``seconds`` (> 0 wall time), ``joules`` and ``watts`` (``None``:
    unavailable), the ``source`` name, whether the figure is an ``estimated`` one, and a
    ``note`` saying why a figure is missing or how it was estimated."""

    seconds: float
    joules: float | None
    watts: float | None
    source: str
    estimated: bool
    note: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "seconds": self.seconds,
            "joules": self.joules,
            "watts": self.watts,
            "source": self.source,
            "estimated": self.estimated,
            "note": self.note,
        }


class EnergySource:
    """Measures one interval at a time: ``start()``, then ``stop()`` returns its reading.

    Subclasses implement ``_begin()`` (read the counter at start) and ``_end(seconds)`` (return
    ``(joules, note)`` for the interval); ``poll()`` may be called often in between (the
    callback calls it after every batch) so that counters that wrap are read before they wrap
    twice. ``clock`` (default ``time.perf_counter``) is injectable so tests need no real time.
    """

    name: str = "source"
    estimated: bool = False
    #: ``"device"``: the reading covers the device this process runs on (a GPU, a stated power
    #: per device), so data-parallel ranks add up; ``"host"``: the whole machine (RAPL), so
    #: ranks on one machine share one reading.
    scope: str = "device"

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._clock = clock or time.perf_counter
        self._started: float | None = None

    @property
    def running(self) -> bool:
        return self._started is not None

    def start(self) -> None:
        if self._started is not None:
            raise RuntimeError(f"{type(self).__name__}.start() called twice; call stop() before starting again")
        self._begin()
        self._started = self._clock()

    def poll(self) -> None:
        """Read the counter now (a no-op for sources that need no intermediate reads)."""

    def stop(self) -> EnergyReading:
        if self._started is None:
            raise RuntimeError(f"{type(self).__name__}.stop() called without start()")
        seconds = max(self._clock() - self._started, 0.0)
        self._started = None
        joules, note = self._end(seconds)
        watts = joules / seconds if joules is not None and seconds > 0 else None
        if joules is not None and seconds <= 0:
            note = (note + "; " if note else "") + "zero-length interval: no average power"
        return EnergyReading(seconds, joules, watts, self.name, self.estimated and joules is not None, note)

    def close(self) -> None:
        """Release what the source holds (a library handle, a thread); safe to call twice."""

    def _begin(self) -> None:
        pass

    def _end(self, seconds: float) -> tuple[float | None, str | None]:
        raise NotImplementedError


class ConstantPowerSource(EnergySource):
    """``joules = watts * seconds`` at a fixed power: for tests, or a power known otherwise.
    ``estimated=True`` labels the figures as estimates (a stated rather than measured power)."""

    name = "constant"

    def __init__(self, watts: float, estimated: bool = False, clock: Callable[[], float] | None = None) -> None:
        self.watts = check_float("watts", watts, low=0.0, low_open=True)
        self.estimated = check_bool("estimated", estimated)
        super().__init__(clock)

    def _end(self, seconds: float) -> tuple[float | None, str | None]:
        note = f"constant power {self.watts:g} W" + (" (an estimate)" if self.estimated else "")
        return self.watts * seconds, note


class TdpEstimateSource(ConstantPowerSource):
    """An estimate: the device's stated thermal design power ``tdp_watts`` times the wall time.
    It overstates idle phases and understates nothing it cannot see; always labelled."""

    name = "tdp-estimate"

    def __init__(self, tdp_watts: float, clock: Callable[[], float] | None = None) -> None:
        super().__init__(check_float("tdp_watts", tdp_watts, low=0.0, low_open=True), estimated=True, clock=clock)

    def _end(self, seconds: float) -> tuple[float | None, str | None]:
        return self.watts * seconds, f"estimate: stated TDP {self.watts:g} W x wall time, not a measurement"


class UnavailableSource(EnergySource):
    """No reading exists here: every reading has ``joules = watts = None`` and ``reason``."""

    name = "unavailable"

    def __init__(self, reason: str, clock: Callable[[], float] | None = None) -> None:
        self.reason = check_str("reason", reason)
        super().__init__(clock)

    def _end(self, seconds: float) -> tuple[float | None, str | None]:
        return None, self.reason


def integrate_power(samples: Sequence[tuple[float, float]]) -> float:
    """Energy in joules from ``(time_s, watts)`` samples by the trapezoid rule:
    ``sum_i (t_{i+1} - t_i) * (P_i + P_{i+1}) / 2``. Needs two samples at least, times not
    decreasing, finite non-negative powers (a sampler's bug shows here, not as a wrong number)."""
    if len(samples) < 2:
        raise ValueError(f"samples must hold at least two (time_s, watts) pairs to integrate, got {len(samples)}")
    total = 0.0
    for (t0, p0), (t1, p1) in zip(samples[:-1], samples[1:]):
        if not (math.isfinite(t0) and math.isfinite(t1) and t1 >= t0):
            raise ValueError(f"samples must have finite, non-decreasing times, got {t0!r} then {t1!r}")
        if not (math.isfinite(p0) and math.isfinite(p1) and p0 >= 0 and p1 >= 0):
            raise ValueError(f"samples must have finite non-negative powers, got {p0!r} and {p1!r}")
        total += (t1 - t0) * (p0 + p1) / 2.0
    return total


def _device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, str | torch.device):
        try:
            return torch.device(device)
        except RuntimeError as error:
            raise ValueError(f"device must name a torch device such as 'cpu' or 'cuda:0', got {device!r}") from error
    raise TypeError(f"device must be a torch.device, a string or None, got {type(device).__name__}")


def select_energy_source(
    kind: EnergyKind = "auto", device: torch.device | str | None = None, tdp_watts: float | None = None
) -> EnergySource:
    """The energy source for ``device`` (``None``: CUDA if available, else CPU).

    ``"nvml"``/``"rapl"``: that source, or a ``RuntimeError`` saying why it cannot read here.
    ``"tdp"``: ``TdpEstimateSource(tdp_watts)`` (``tdp_watts`` required). ``"none"``: unavailable.
    ``"auto"``: NVML on a CUDA device, RAPL on a CPU, else the TDP estimate if ``tdp_watts`` is
    given, else an ``UnavailableSource`` whose note lists why each reader was not usable.
    """
    check_choice("kind", kind, ENERGY_KINDS)
    tdp = check_float("tdp_watts", tdp_watts, low=0.0, low_open=True, allow_none=True)
    dev = _device(device)
    if kind == "none":
        return UnavailableSource("energy measurement switched off (energy='none')")
    if kind == "tdp":
        if tdp is None:
            raise ValueError("energy='tdp' needs tdp_watts (the device's stated power in W), e.g. tdp_watts=65")
        return TdpEstimateSource(tdp)
    from lightning_peft.metrics.nvml import NvmlEnergySource, nvml_unavailable_reason
    from lightning_peft.metrics.rapl import RaplEnergySource, rapl_unavailable_reason

    if kind == "nvml":
        reason = nvml_unavailable_reason(dev)
        if reason:
            raise RuntimeError(f"energy='nvml' cannot read on {dev}: {reason}; use energy='auto' or 'none'")
        return NvmlEnergySource(dev)
    if kind == "rapl":
        reason = rapl_unavailable_reason()
        if reason:
            raise RuntimeError(f"energy='rapl' cannot read here: {reason}; use energy='auto' or 'none'")
        return RaplEnergySource()
    reasons = []
    if dev.type == "cuda":
        reason = nvml_unavailable_reason(dev)
        if not reason:
            return NvmlEnergySource(dev)
        reasons.append(f"NVML: {reason}")
    else:
        reason = rapl_unavailable_reason()
        if not reason:
            return RaplEnergySource()
        reasons.append(f"RAPL: {reason}")
    if tdp is not None:
        return TdpEstimateSource(tdp)
    return UnavailableSource("no energy reader on this machine (" + "; ".join(reasons) + "); pass tdp_watts for a labelled estimate")
