"""What the continual core reads from an ``AdapterLibrary``: its LoRA adapter entries (the ones
``lora_factors`` answers for; combination entries are not adapters) and their factors."""

from __future__ import annotations

from typing import Any

__all__ = ["adapter_entries"]


def adapter_entries(library: Any) -> list[str]:
    """The library's LoRA adapter entries, in library order."""
    kinds = getattr(library, "kind", None)
    names = list(library.names)
    if callable(kinds):
        return [n for n in names if kinds(n) == "adapter"]
    found = []
    for name in names:
        try:
            library.lora_factors(name)
        except (ValueError, KeyError, TypeError):
            continue  # a combination entry (or an adapter that is not LoRA): not a bank member
        found.append(name)
    return found
