"""The files of a :class:`~lightning_peft.rl.library.PolicyLibrary`: the index, its format,
paths that must stay inside the library root, and atomic writes (through :mod:`lightning_peft.io`).

Format 3 stores each task as an adapter export of :func:`lightning_peft.io.save_adapter` (a
directory ``adapters/<task>/`` with ``adapter_model.safetensors`` and ``adapter_config.json``)
and fingerprints the base with the core's per-module scheme
(:func:`lightning_peft.rl.policy_file.policy_fingerprint`). Older libraries are refused with a
message saying how to rebuild them: format 2 stored each task as one safetensors file of its own
layout, format 1 also recorded a whole-state hash of the base.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from torch import Tensor

from lightning_peft.io import atomic_write_file

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


def tensor_bytes(tensors: Iterable[Tensor]) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


def slug(task: str) -> str:
    """A file name for ``task``: its safe characters plus a hash (distinct tasks never collide)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", task).strip("_") or "task"
    return f"{safe[:80]}-{hashlib.sha256(task.encode()).hexdigest()[:8]}"


def write_json(path: Path, data: Any) -> None:
    encoded = json.dumps(data, indent=2, sort_keys=True).encode()
    atomic_write_file(path, lambda f: f.write(encoded))


def export_bytes(path: Path) -> int:
    """Bytes on disk of a task's export directory (its tensors file and its config)."""
    return int(sum(f.stat().st_size for f in path.iterdir() if f.is_file()))


def library_path(root: Path, rel: Any, what: str) -> Path:
    """``root / rel`` for a ``file`` entry of the index, refused unless it stays inside the
    library root: a relative path without ``..`` that, symlinks resolved, is under root."""
    index = str(root / INDEX_NAME)
    if not isinstance(rel, str) or not rel:
        raise ValueError(f"{index!r}: the {what} entry's file {rel!r} is not a path; the index is damaged")
    pure = PurePosixPath(rel.replace("\\", "/"))
    if pure.is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive or ".." in pure.parts:
        raise ValueError(
            f"{index!r}: the {what} entry's file {rel!r} points outside the library {str(root)!r}; "
            "library files must be relative paths inside it (the index is damaged or crafted)"
        )
    path = root / pure
    resolved, real_root = path.resolve(), root.resolve()
    if resolved != real_root and real_root not in resolved.parents:
        raise ValueError(
            f"{index!r}: the {what} entry's file {rel!r} resolves to {str(resolved)!r}, outside the library "
            f"{str(real_root)!r} (a symlink?); library files must stay inside it"
        )
    return path


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
    if not isinstance(tasks, dict) or not all(isinstance(e, dict) and "file" in e for e in tasks.values()):
        raise ValueError(f"policy library index {str(path)!r} is damaged: every 'tasks' entry needs a 'file'")
    return index
