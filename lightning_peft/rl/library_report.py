"""The byte accounting of a :class:`~lightning_peft.rl.library.PolicyLibrary` (read from its
index): :mod:`lightning_peft.library.report` over the library's tasks."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lightning_peft.library import report as _report

__all__ = ["format_report", "library_report"]


def library_report(index: dict[str, Any], library_sizes: Iterable[int] = (10, 50)) -> dict[str, Any]:
    """Bytes per policy against a full copy, and library savings (see
    :func:`lightning_peft.library.report.library_report`; ``policies`` lists the tasks)."""
    return _report.library_report(index["base"], index["tasks"], library_sizes)


def format_report(root: Path, r: dict[str, Any]) -> str:
    """``r`` (a :func:`library_report`) as a table, one line per task, and the savings."""
    return _report.format_report(root, r, what="policy library", item="task", base_name=r["base"]["task"])
