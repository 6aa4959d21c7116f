"""The files of a :class:`~lightning_peft.rl.library.PolicyLibrary`: its index format and base
file (paths inside the root, atomic writes, byte counts: :mod:`lightning_peft.library.store`).

Format 3 stores each task as an adapter export of :func:`lightning_peft.io.save_adapter` (a
directory ``adapters/<task>/`` with ``adapter_model.safetensors`` and ``adapter_config.json``)
and fingerprints the base with the core's per-module scheme
(:func:`lightning_peft.rl.policy_file.policy_fingerprint`). Older libraries are refused with a
message saying how to rebuild them: format 2 stored each task as one safetensors file of its own
layout, format 1 also recorded a whole-state hash of the base.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# the generic pieces live in the adapter library's store (re-exported: older imports keep working)
from lightning_peft.library.store import export_bytes, library_path, slug, tensor_bytes, write_json

__all__ = [
    "ADAPTER_DIR",
    "BASE_NAME",
    "FORMAT",
    "INDEX_NAME",
    "library_path",
    "export_bytes",
    "read_index",
    "slug",
    "tensor_bytes",
    "write_json",
]

FORMAT = "lightning_peft.policy_library/3"
OLD_FORMATS = {
    "lightning_peft.policy_library/1": "whose base fingerprint this version no longer computes",
    "lightning_peft.policy_library/2": "whose task files (one safetensors file per task) this version no longer reads",
}
INDEX_NAME = "index.json"
BASE_NAME = "base.safetensors"
ADAPTER_DIR = "adapters"


def read_index(path: Path) -> dict[str, Any]:
    """The parsed ``index.json``, its structure checked (a damaged index is named, not a
    ``KeyError`` later)."""
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"policy library index {str(path)!r} is damaged (not valid JSON: {error})") from error
    if isinstance(index, dict) and index.get("format") in OLD_FORMATS:
        raise ValueError(
            f"policy library {str(path.parent)!r} has format {index['format']!r}, written by an older lightning-peft "
            f"{OLD_FORMATS[index['format']]}; this version reads {FORMAT!r}. Rebuild the "
            f"library: PolicyLibrary(new_root, base={str(path.parent / BASE_NAME)!r}), then add each task's adapter again"
        )
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a policy library index (format {FORMAT})")
    base, tasks = index.get("base"), index.get("tasks")
    if not isinstance(base, dict) or not all(isinstance(base.get(k), str) for k in ("file", "fingerprint", "task")):
        raise ValueError(f"policy library index {str(path)!r} is damaged: its 'base' entry lacks file/fingerprint/task")
    stored = all(isinstance(e, dict) and ("file" in e or e.get("type") == "combination") for e in (tasks or {}).values())
    if not isinstance(tasks, dict) or not stored:
        raise ValueError(f"policy library index {str(path)!r} is damaged: every 'tasks' entry needs a 'file'")
    return index
