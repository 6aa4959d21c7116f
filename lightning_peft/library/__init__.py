"""Adapter libraries: many adapters (and exact combinations of them) on one base model, with
one live model that switches between them in place (:class:`AdapterLibrary`).

One job per file: ``store`` (index, paths, atomic writes), ``fingerprint`` (the base's),
``layout`` (inject/strip adapter layouts), ``factors`` (LoRA factors, exact combinations),
``per_sample`` (mixed batches), ``report`` (bytes), ``library`` (the class)."""

from lightning_peft.library.library import AdapterLibrary

__all__ = ["AdapterLibrary"]
