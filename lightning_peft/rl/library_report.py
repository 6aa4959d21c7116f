"""The byte accounting of a :class:`~lightning_peft.rl.library.PolicyLibrary` (read from its index)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["format_report", "library_report"]


def library_report(index: dict[str, Any], library_sizes: Iterable[int] = (10, 50)) -> dict[str, Any]:
    """Bytes per policy against a full copy, and library savings.

    ``full_copy_bytes`` = bytes of one standalone policy (the base's tensors: what a fully
    fine-tuned copy stores). Per task: ``tensor_bytes`` (adapter tensors), ``file_bytes``
    (with the safetensors header) and ``ratio`` = full / adapter. ``savings`` = ``1 -
    (base + sum(adapters)) / (N full copies)`` for the tasks held, and ``projected_savings``
    for libraries of ``library_sizes`` policies with this library's mean adapter size.
    """
    full = int(index["base"]["tensor_bytes"])
    tasks = index["tasks"]
    per = {
        t: {
            "kind": e["kind"],
            "ranks": e.get("ranks", {}),
            "tensor_bytes": e["tensor_bytes"],
            "file_bytes": e["file_bytes"],
            "ratio": full / max(1, e["tensor_bytes"]),
        }
        for t, e in sorted(tasks.items())
    }
    n = len(tasks)
    adapters = sum(e["tensor_bytes"] for e in tasks.values())
    library = full + adapters
    out: dict[str, Any] = {
        "base": dict(index["base"], hparams=None),
        "full_copy_bytes": full,
        "policies": per,
        "num_policies": n,
        "library_bytes": library,
        "full_copies_bytes": n * full,
        "savings": (1 - library / (n * full)) if n else None,
    }
    if n:
        mean = adapters / n
        out["mean_adapter_bytes"] = mean
        out["mean_ratio"] = full / max(mean, 1)
        out["projected_savings"] = {int(k): 1 - (full + k * mean) / (k * full) for k in library_sizes}
    return out


def format_report(root: Path, r: dict[str, Any]) -> str:
    """``r`` (a :func:`library_report`) as a table, one line per task, and the savings."""
    lines = [
        f"policy library {str(root)!r}: base {r['base']['task']} ({r['full_copy_bytes']:,} bytes per full copy)",
        f"{'task':<40} {'kind':<6} {'bytes':>10} {'x smaller':>10}",
    ]
    for t, e in r["policies"].items():
        lines.append(f"{t:<40} {e['kind']:<6} {e['tensor_bytes']:>10,} {e['ratio']:>10.1f}")
    if r["num_policies"]:
        lines.append(
            f"{r['num_policies']} policies: {r['library_bytes']:,} bytes vs {r['full_copies_bytes']:,} as full copies "
            f"(saves {100 * r['savings']:.1f}%); projected: "
            + ", ".join(f"{k} policies {100 * v:.1f}%" for k, v in r["projected_savings"].items())
        )
    return "\n".join(lines)
