"""The byte accounting of an adapter library (read from its index): bytes per entry against a
full copy of the base, and what the library saves against full copies."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["format_report", "library_report"]


def library_report(
    base: Mapping[str, Any], entries: Mapping[str, Mapping[str, Any]], library_sizes: Iterable[int] = (10, 50)
) -> dict[str, Any]:
    """Bytes per entry against a full copy, and library savings.

    ``full_copy_bytes`` = bytes of the base's tensors (what one fully fine-tuned copy stores).
    Per entry: ``tensor_bytes`` (what the entry stores: adapter tensors, or 4 bytes per
    coefficient of a combination), ``file_bytes`` (on disk, with headers and config) and
    ``ratio`` = full / entry. ``savings`` = ``1 - (base + sum(entries)) / (N full copies)`` for
    the ``N`` entries held, and ``projected_savings`` for libraries of ``library_sizes`` entries
    of this library's mean size: ``1 - 1/N - 1/ratio``.
    """
    full = int(base["tensor_bytes"])
    per = {
        name: {
            "kind": e.get("kind", "combination"),
            "type": e.get("type", "adapter"),
            "ranks": e.get("ranks", {}),
            "tensor_bytes": int(e["tensor_bytes"]),
            "file_bytes": int(e.get("file_bytes", 0)),
            "ratio": full / max(1, int(e["tensor_bytes"])),
        }
        for name, e in sorted(entries.items())
    }
    n = len(per)
    stored = sum(e["tensor_bytes"] for e in per.values())
    library = full + stored
    out: dict[str, Any] = {
        "base": {k: v for k, v in base.items() if k not in ("hparams", "modules")},
        "full_copy_bytes": full,
        "policies": per,
        "entries": per,
        "num_policies": n,
        "num_entries": n,
        "library_bytes": library,
        "full_copies_bytes": n * full,
        "savings": (1 - library / (n * full)) if n else None,
    }
    if n:
        mean = stored / n
        out["mean_adapter_bytes"] = mean
        out["mean_ratio"] = full / max(mean, 1)
        out["projected_savings"] = {int(k): 1 - (full + k * mean) / (k * full) for k in library_sizes}
    return out


def format_report(
    root: Path, r: Mapping[str, Any], what: str = "adapter library", item: str = "entry", base_name: str | None = None
) -> str:
    """``r`` (a :func:`library_report`) as a table, one line per entry, and the savings."""
    base = base_name if base_name is not None else r["base"].get("model", "model")
    lines = [
        f"{what} {str(root)!r}: base {base} ({r['full_copy_bytes']:,} bytes per full copy)",
        f"{item:<40} {'kind':<6} {'bytes':>10} {'x smaller':>10}",
    ]
    for name, e in r["entries"].items():
        lines.append(f"{name:<40} {e['kind']:<6} {e['tensor_bytes']:>10,} {e['ratio']:>10.1f}")
    if r["num_entries"]:
        label = "policies" if item == "task" else "entries"
        lines.append(
            f"{r['num_entries']} {label}: {r['library_bytes']:,} bytes vs {r['full_copies_bytes']:,} as full copies "
            f"(saves {100 * r['savings']:.1f}%); projected: "
            + ", ".join(f"{k} {label} {100 * v:.1f}%" for k, v in r["projected_savings"].items())
        )
    return "\n".join(lines)
