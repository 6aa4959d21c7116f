"""The files of a :class:`~lightning_peft.rl.library.PolicyLibrary`: the index, its format,
paths that must stay inside the library root, and atomic writes (through :mod:`lightning_peft.io`).

Format 2 fingerprints the base with the core's per-module scheme
(:func:`lightning_peft.rl.policy_file.policy_fingerprint`); format 1 libraries recorded a
whole-state hash instead and are refused with a message saying how to rebuild them.
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
    "read_index",
    "save_tensors",
    "slug",
    "tensor_bytes",
    "write_json",
]

FORMAT = "lightning_peft.policy_library/2"
OLD_FORMATS = ("lightning_peft.policy_library/1",)
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


def save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """``tensors`` as one safetensors file at ``path``, written atomically."""
    from safetensors.torch import save

    data = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_file(path, lambda f: f.write(data))


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
            f"whose base fingerprint this version no longer computes; this version reads {FORMAT!r}. Rebuild the "
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
