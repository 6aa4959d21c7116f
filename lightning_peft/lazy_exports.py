"""Public names of a package imported on first use (PEP 562 ``__getattr__``), so that
``from lightning_peft import LoRA`` does not pay for importing Lightning, transformers or
bitsandbytes."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from importlib import import_module
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str], names: Sequence[str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: a name in ``exports`` (name -> the module of
    ours that defines it) is imported when first asked for; ``__dir__`` lists ``names``."""
    listed = list(names)

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return listed

    return __getattr__, __dir__
