"""The machine a benchmark ran on, for its JSON: CPU model and BLAS, so results from
different hosts are not compared as if they were one (the shared VMs change CPU between
sessions, and GEMM layouts that win on one lose on another)."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    """``/proc/cpuinfo``'s model name (Linux), else ``platform.processor()``, else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> dict[str, str]:
    return {
        "cpu": cpu_name(),
        "blas": "mkl" if torch.backends.mkl.is_available() else "other",
        "capability": torch.backends.cpu.get_cpu_capability(),
    }
