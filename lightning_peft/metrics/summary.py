"""The efficiency report: measured phases in, the NetScore family and a table out (pure).

``summarize`` turns a training phase and an inference phase (each an ``EnergyReading`` plus a
``MemoryPeak``), the accuracy and the model's counts into the flat ``results`` dict that
``EfficiencyCallback`` writes to ``efficiency.json`` and that the study reads. Which inputs each
score takes (as in Toktassyn & Park, section "Metrics"; ``docs/efficiency.md``):

* ``netscore(accuracy, params / 1e6, macs_per_sample / 1e6)``: total parameters of the model as
  run (adapters included while unmerged), MACs of one sample's forward;
* ``ns_e(accuracy, infer_seconds, infer_avg_watts)``: the *inference* phase: total time over the
  timed set and the average power over it;
* ``ns_m(accuracy, infer_peak_memory_mib)``; ``ns_sharp`` all three.

A score whose input is missing (no energy reader, no inference phase, no accuracy) is ``None``
and ``notes`` says why; nothing is filled in. A score computed from an estimated power or memory
is marked by ``energy_estimated``/``memory_estimated`` (and by ``*_estimated`` names where the
callback logs it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lightning_peft.metrics.energy import EnergyReading
from lightning_peft.metrics.memory import MemoryPeak
from lightning_peft.metrics.netscore import netscore, ns_e, ns_m, ns_sharp

__all__ = ["PhaseMeasure", "summarize", "format_table", "RESULT_KEYS"]

RESULT_KEYS = (
    "fit_seconds",
    "fit_energy_joules",
    "fit_avg_watts",
    "infer_seconds",
    "infer_energy_joules",
    "infer_avg_watts",
    "energy_source",
    "energy_estimated",
    "fit_peak_memory_mib",
    "infer_peak_memory_mib",
    "peak_memory_source",
    "memory_estimated",
    "accuracy",
    "params",
    "trainable_params",
    "macs_per_sample",
    "netscore",
    "ns_e",
    "ns_m",
    "ns_sharp",
)


@dataclass(frozen=True)
class PhaseMeasure:
    """One measured phase: its energy reading (time included), its peak memory (``None``: not
    measured), the stage name (``fit``, ``test``, ``predict``, ``validate``) and samples seen."""

    reading: EnergyReading
    memory: MemoryPeak | None
    stage: str
    samples: int = 0


def _phase_fields(prefix: str, phase: PhaseMeasure | None) -> dict[str, Any]:
    if phase is None:  # the same keys, all None
        keys = ("seconds", "energy_joules", "avg_watts", "peak_memory_mib", "memory_breakdown_bytes", "energy_note", "stage", "samples")
        return dict.fromkeys((f"{prefix}_{key}" for key in keys), None)
    memory = phase.memory
    return {
        f"{prefix}_seconds": phase.reading.seconds,
        f"{prefix}_energy_joules": phase.reading.joules,
        f"{prefix}_avg_watts": phase.reading.watts,
        f"{prefix}_peak_memory_mib": None if memory is None else memory.mib,
        f"{prefix}_memory_breakdown_bytes": None if memory is None else dict(memory.breakdown),
        f"{prefix}_energy_note": phase.reading.note,
        f"{prefix}_stage": phase.stage,
        f"{prefix}_samples": phase.samples,
    }


def _labels(phases: list[PhaseMeasure]) -> dict[str, Any]:
    readings = [p.reading for p in phases]
    sources = list(dict.fromkeys(r.source for r in readings))
    memories = [p.memory for p in phases if p.memory is not None]
    memory_sources = list(dict.fromkeys(m.source for m in memories))
    return {
        "energy_source": "+".join(sources) if sources else None,
        "energy_estimated": any(r.estimated for r in readings),
        "peak_memory_source": "+".join(memory_sources) if memory_sources else None,
        "memory_estimated": any(m.estimated for m in memories),
    }


def _scores(out: dict[str, Any], notes: list[str]) -> None:
    a, t, watts, mib = out["accuracy"], out["infer_seconds"], out["infer_avg_watts"], out["infer_peak_memory_mib"]
    params, macs = out["params"], out["macs_per_sample"]
    if t is not None and t <= 0:
        notes.append("inference time is zero (too short to time)")
        t = None
    have = {
        "accuracy": a is not None,
        "parameters/MACs": bool(params) and bool(macs),
        "inference time": t is not None,
        "inference power": watts is not None,
        "inference memory": mib is not None,
    }
    formulas = {
        "netscore": (("accuracy", "parameters/MACs"), lambda: netscore(a, params / 1e6, macs / 1e6)),
        "ns_e": (("accuracy", "inference time", "inference power"), lambda: ns_e(a, t, watts)),
        "ns_m": (("accuracy", "inference memory"), lambda: ns_m(a, mib)),
        "ns_sharp": (("accuracy", "inference memory", "inference time", "inference power"), lambda: ns_sharp(a, mib, t, watts)),
    }
    for name, (inputs, formula) in formulas.items():
        lacking = [i for i in inputs if not have[i]]
        out[name] = None if lacking else formula()
        if lacking:
            notes.append(f"{name} not computed: no {', no '.join(lacking)}")


def summarize(
    fit: PhaseMeasure | None,
    infer: PhaseMeasure | None,
    accuracy: float | None,
    params: int | None,
    trainable_params: int | None,
    macs_per_sample: float | None,
    notes: list[str] | None = None,
) -> dict[str, Any]:
    """The flat results dict (``RESULT_KEYS`` and a few more: per-phase notes, memory
    breakdowns, stages, sample counts, ``notes``). ``accuracy`` in percent or ``None``."""
    notes = list(notes or [])
    out: dict[str, Any] = {**_phase_fields("fit", fit), **_phase_fields("infer", infer)}
    out.update(_labels([p for p in (fit, infer) if p is not None]))
    out.update(accuracy=accuracy, params=params, trainable_params=trainable_params, macs_per_sample=macs_per_sample)
    for phase, label in ((fit, "fit"), (infer, "inference")):
        if phase is None:
            notes.append(f"no {label} phase measured")
        elif phase.reading.joules is None:
            notes.append(f"{label} energy unavailable: {phase.reading.note}")
        elif phase.reading.estimated:
            notes.append(f"{label} energy is an estimate: {phase.reading.note}")
    if out["memory_estimated"]:
        notes.append(
            "peak memory is a CPU estimate: parameters + buffers + gradients + optimizer state + saved activations"
            " (training), parameters + buffers + live tensors (inference)"
        )
    _scores(out, notes)
    out["notes"] = notes
    return out


def _show(value: Any, unit: str = "", digits: int = 2) -> str:
    if value is None:
        return "unavailable"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}{unit}"
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table of ``results``; estimates are marked ``(estimate)``."""
    energy_mark = " (estimate)" if results.get("energy_estimated") else ""
    memory_mark = " (estimate)" if results.get("memory_estimated") else ""
    rows = [
        ("accuracy [%]", _show(results.get("accuracy"))),
        ("parameters (trainable)", f"{_show(results.get('params'))} ({_show(results.get('trainable_params'))})"),
        ("MACs per sample", _show(results.get("macs_per_sample"))),
        ("fit time [s]", _show(results.get("fit_seconds"), digits=3)),
        ("fit energy [J]" + energy_mark, _show(results.get("fit_energy_joules"))),
        ("fit avg power [W]" + energy_mark, _show(results.get("fit_avg_watts"))),
        ("fit peak memory [MiB]" + memory_mark, _show(results.get("fit_peak_memory_mib"))),
        ("inference time [s]", _show(results.get("infer_seconds"), digits=3)),
        ("inference energy [J]" + energy_mark, _show(results.get("infer_energy_joules"))),
        ("inference avg power [W]" + energy_mark, _show(results.get("infer_avg_watts"))),
        ("inference peak memory [MiB]" + memory_mark, _show(results.get("infer_peak_memory_mib"))),
        ("energy source", _show(results.get("energy_source"))),
        ("memory source", _show(results.get("peak_memory_source"))),
        ("NetScore", _show(results.get("netscore"))),
        ("NS-E" + energy_mark, _show(results.get("ns_e"))),
        ("NS-M" + memory_mark, _show(results.get("ns_m"))),
        ("NS#" + (energy_mark or memory_mark), _show(results.get("ns_sharp"))),
    ]
    width = max(len(name) for name, _ in rows)
    lines = ["Efficiency", *(f"  {name.ljust(width)}  {value}" for name, value in rows)]
    lines += [f"  note: {note}" for note in results.get("notes", [])]
    return "\n".join(lines)
