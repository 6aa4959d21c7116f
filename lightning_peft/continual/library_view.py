"""What the continual core reads from an ``AdapterLibrary``: its plain-LoRA adapter entries (the
bank members; combination entries and adapters that are not pure LoRA are not)."""

from __future__ import annotations

from typing import Any

__all__ = ["adapter_entries"]


def adapter_entries(library: Any) -> list[str]:
    """The library's pure-LoRA adapter entries, in ``library.names`` order."""
    entries = library.index["entries"]
    return [n for n in library.names if entries[n].get("type", "adapter") == "adapter" and entries[n].get("lora", True)]
