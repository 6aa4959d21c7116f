"""The continual-learning matrix and its summaries (pure Python / numpy).

``acc[i][j]`` is the accuracy on task ``j`` measured right after training task ``i`` (``j <= i``;
entries above the diagonal are ignored). With ``T`` rows (tasks trained so far):

* ``average_accuracy = mean_j acc[T-1][j]`` (the final row);
* ``average_incremental_accuracy = mean_i mean_{j<=i} acc[i][j]`` (the mean of every row's mean);
* ``forgetting = mean_{j<T-1} (max_{j<=i<T-1} acc[i][j] - acc[T-1][j])`` (Chaudhry et al. 2018:
  the mean drop from each earlier task's best accuracy to its final one);
* ``backward_transfer = mean_{j<T-1} (acc[T-1][j] - acc[j][j])`` (Lopez-Paz & Ranzato 2017:
  negative = forgetting, positive = later tasks helped earlier ones).

With one task, ``forgetting`` and ``backward_transfer`` are ``None`` (no earlier task to forget).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["continual_metrics"]


def _rows(acc: np.ndarray | Sequence[Sequence[float]]) -> list[list[float]]:
    """The lower triangle as ragged rows (row ``i`` has ``i + 1`` finite numbers), validated."""
    if isinstance(acc, np.ndarray):
        if acc.ndim != 2:
            raise ValueError(f"acc must be a 2-d matrix acc[i][j] (task j after training task i), got shape {list(acc.shape)}")
        acc = acc.tolist()
    if isinstance(acc, (str, bytes)) or not isinstance(acc, Sequence) or len(acc) == 0:
        raise ValueError(f"acc must be a non-empty list of rows acc[i][j] (accuracy on task j after training task i), got {acc!r:.100}")
    rows = []
    for i, row in enumerate(acc):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence) or len(row) < i + 1:
            raise ValueError(f"acc row {i} must list the accuracies on tasks 0..{i} (at least {i + 1} numbers), got {row!r:.100}")
        values = []
        for j, value in enumerate(row[: i + 1]):
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(float(value)):
                raise ValueError(f"acc[{i}][{j}] must be a finite number, got {value!r}")
            values.append(float(value))
        rows.append(values)
    return rows


def continual_metrics(acc: np.ndarray | Sequence[Sequence[float]]) -> dict[str, Any]:
    """Average accuracy, forgetting, backward transfer and per-task rows of the matrix ``acc``
    (see the module docstring). Returns plain floats/lists (JSON-ready)."""
    rows = _rows(acc)
    last = len(rows) - 1
    final = rows[last]
    per_task = []
    for j in range(len(final)):
        history = [rows[i][j] for i in range(j, last + 1)]
        earlier = history[:-1]
        per_task.append(
            {
                "task": j,
                "just_trained": rows[j][j],
                "final": final[j],
                "best_before_final": max(earlier) if earlier else None,
                "forgetting": (max(earlier) - final[j]) if earlier else None,
                "history": history,
            }
        )
    earlier_tasks = per_task[:-1]
    return {
        "tasks": len(rows),
        "average_accuracy": float(np.mean(final)),
        "average_incremental_accuracy": float(np.mean([np.mean(r) for r in rows])),
        "forgetting": float(np.mean([t["forgetting"] for t in earlier_tasks])) if earlier_tasks else None,
        "backward_transfer": float(np.mean([t["final"] - t["just_trained"] for t in earlier_tasks])) if earlier_tasks else None,
        "matrix": rows,
        "per_task": per_task,
    }
