"""Efficiency metrics, pure torch (no Lightning): the NetScore family, energy readings, MACs and
peak memory. ``lightning_peft.callbacks.efficiency.EfficiencyCallback`` measures them in a run."""

from lightning_peft.metrics.energy import (
    ConstantPowerSource,
    EnergyReading,
    EnergySource,
    TdpEstimateSource,
    UnavailableSource,
    integrate_power,
    select_energy_source,
)
from lightning_peft.metrics.macs import count_flops_by_operator, count_macs, count_step_flops
from lightning_peft.metrics.memory import CpuMemoryProbe, CudaMemoryProbe, MemoryPeak, MemoryProbe, memory_probe_for
from lightning_peft.metrics.netscore import netscore, ns_e, ns_m, ns_sharp
from lightning_peft.metrics.summary import RESULT_KEYS, PhaseMeasure, format_table, summarize

__all__ = [
    "RESULT_KEYS",
    "ConstantPowerSource",
    "CpuMemoryProbe",
    "CudaMemoryProbe",
    "EnergyReading",
    "EnergySource",
    "MemoryPeak",
    "MemoryProbe",
    "PhaseMeasure",
    "TdpEstimateSource",
    "UnavailableSource",
    "count_flops_by_operator",
    "count_macs",
    "count_step_flops",
    "format_table",
    "integrate_power",
    "memory_probe_for",
    "netscore",
    "ns_e",
    "ns_m",
    "ns_sharp",
    "select_energy_source",
    "summarize",
]
