"""The files of an adapter library (:class:`~lightning_peft.library.AdapterLibrary`, and the RL
:class:`~lightning_peft.rl.library.PolicyLibrary` on top of it): the index, paths that must stay
inside the library root, entry directories and atomic writes (through :mod:`lightning_peft.io`).

Layout on disk (format ``lightning_peft.adapter_library/1``)::

    <root>/index.json            base fingerprint (whole and per module), its byte count, the entries
    <root>/adapters/<slug>/      one lightning_peft.io.save_adapter export per adapter entry

A combination entry lives in the index only (its coefficients over adapter entries).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from torch import Tensor

from lightning_peft.io import atomic_write_dir, atomic_write_file

__all__ = [
    "ADAPTER_DIR",
    "FORMAT",
    "INDEX_NAME",
    "export_bytes",
    "install_dir",
    "library_path",
    "read_index",
    "slug",
    "tensor_bytes",
    "write_json",
]

FORMAT = "lightning_peft.adapter_library/1"
INDEX_NAME = "index.json"
ADAPTER_DIR = "adapters"


def tensor_bytes(tensors: Iterable[Tensor]) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


def slug(name: str) -> str:
    """A file name for entry ``name``: its safe characters plus a hash (distinct names never collide)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "entry"
    return f"{safe[:80]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON atomically (a crash leaves the previous index, never half of one)."""
    encoded = json.dumps(data, indent=2, sort_keys=True).encode()
    atomic_write_file(path, lambda f: f.write(encoded))


def export_bytes(path: Path) -> int:
    """Bytes on disk of an entry's export directory (its tensor files and its config)."""
    return int(sum(f.stat().st_size for f in path.iterdir() if f.is_file()))


def install_dir(staged: Path, dest: Path) -> None:
    """Copy the files of the checked export ``staged`` to ``dest`` atomically (a previous
    ``dest`` stays whole until the new one is complete)."""

    def copy(tmp: Path) -> None:
        for file in staged.iterdir():
            if file.is_file() and not file.is_symlink():
                shutil.copyfile(file, tmp / file.name)

    atomic_write_dir(dest, copy)


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
    """The parsed ``index.json`` of an adapter library, its structure checked (a damaged index
    is named, not a ``KeyError`` later)."""
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"adapter library index {str(path)!r} is damaged (not valid JSON: {error})") from error
    if isinstance(index, dict) and str(index.get("format", "")).startswith("lightning_peft.policy_library/"):
        raise ValueError(f"{str(path.parent)!r} is a policy library ({index['format']!r}): open it with lightning_peft.PolicyLibrary")
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not an adapter library index (format {FORMAT})")
    base, entries = index.get("base"), index.get("entries")
    if not isinstance(base, dict) or not isinstance(base.get("fingerprint"), str) or not isinstance(base.get("modules"), dict):
        raise ValueError(f"adapter library index {str(path)!r} is damaged: its 'base' entry lacks fingerprint/modules")
    if not isinstance(entries, dict) or not all(
        isinstance(e, dict) and e.get("type") in ("adapter", "combination") for e in entries.values()
    ):
        raise ValueError(f"adapter library index {str(path)!r} is damaged: every entry needs a type 'adapter' or 'combination'")
    if not all("file" in e for e in entries.values() if e["type"] == "adapter"):
        raise ValueError(f"adapter library index {str(path)!r} is damaged: every adapter entry needs a 'file'")
    return index
