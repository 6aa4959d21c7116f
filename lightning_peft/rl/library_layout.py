"""Adapter layouts of a :class:`~lightning_peft.rl.library.PolicyLibrary`: the generic ones of
:mod:`lightning_peft.library.layout` (re-exported)."""

from lightning_peft.library.layout import inject_plan, kind_of, layout_key, lookup, ranks, strip_adapters

__all__ = ["inject_plan", "kind_of", "layout_key", "lookup", "ranks", "strip_adapters"]
