"""Adapter layouts of an adapter library: what an entry's export
(:func:`lightning_peft.io.save_adapter`) says about its adapters, rebuilding them on the live
model from a validated :class:`~lightning_peft.io_checks.LoadPlan` (specs only through the
adapter registry), injecting plain LoRA layers of given ranks (combinations, whose rank is the
sum of their parts' ranks), and removing them (:func:`lightning_peft.io.remove_adapter`).

Two entries with the same :func:`layout_key` share one set of injected layers: switching
between them only copies tensors into those layers in place.
"""

from __future__ import annotations

import json
from typing import Any

from torch import Tensor, nn

from lightning_peft.adapters.lora import LoRA, LoRALinear
from lightning_peft.io import adapter_layers, remove_adapter
from lightning_peft.io_checks import LoadPlan
from lightning_peft.targeting import adapter_record, apply_adapter

__all__ = ["inject_lora_ranks", "inject_plan", "kind_of", "layout_key", "lookup", "ranks", "strip_adapters"]


def strip_adapters(model: nn.Module) -> None:
    """Put every adapter layer's base back (:func:`lightning_peft.io.remove_adapter`: unmerged
    first, record dropped) and freeze ``model``; a model without adapters is only frozen."""
    if adapter_record(model) is not None or adapter_layers(model):
        remove_adapter(model)
    model.requires_grad_(False)


def layout_key(meta: dict[str, Any]) -> str:
    """What two entries must share for one set of injected adapter layers to serve both: the
    specs, the adapted modules with their hyper-parameters, and the trained modules of the
    export's metadata (fingerprints left out: every entry of a library is on its base)."""
    targets = {n: {k: v for k, v in e.items() if k != "fingerprint"} for n, e in meta["targets"].items()}
    layout = {k: meta[k] for k in ("specs", "trainable_modules", "record_prefix", "norm_stats") if k in meta}
    return json.dumps({**layout, "targets": targets}, sort_keys=True)


def kind_of(meta: dict[str, Any]) -> str:
    """The adapter kinds of an export's adapter layers (``"lora"``, ...), or ``"full"``."""
    kinds = {e["kind"] for e in meta["targets"].values() if "fingerprint" in e}
    return "+".join(sorted(kinds)) if kinds else "full"


def ranks(meta: dict[str, Any]) -> dict[str, int]:
    return {n: int(t["rank"]) for n, t in meta.get("targets", {}).items() if "rank" in t}


def inject_plan(model: nn.Module, plan: LoadPlan, meta: dict[str, Any]) -> None:
    """Inject the adapters of a validated ``plan`` (its specs were resolved through the
    registry by :func:`lightning_peft.io_checks.plan_load`) into ``model``, for inference."""
    if plan.specs:
        root = model.get_submodule(plan.apply_prefix) if plan.apply_prefix else model
        norm_stats = meta.get("norm_stats", "train")
        apply_adapter(root, plan.specs, trainable_modules=plan.trainable, norm_stats=norm_stats, check_gradients=False)
    model.eval()
    model.requires_grad_(False)


def inject_lora_ranks(model: nn.Module, module_ranks: dict[str, int]) -> None:
    """Wrap each ``nn.Linear`` named in ``module_ranks`` in a :class:`LoRALinear` of that rank
    with scale 1 (``alpha = rank``), for factors whose scales are already folded into ``B``.
    The rank may exceed ``min(d_in, d_out)`` (a combination's rank is the sum of its parts'),
    which :class:`LoRA`'s own check refuses for training: built here directly, for inference.
    The caller checked that every module is an ``nn.Linear`` of the base."""
    layers = {}
    for name, rank in module_ranks.items():
        base = model.get_submodule(name)
        layers[name] = LoRALinear(base, rank=rank, alpha=float(rank), spec=LoRA(rank=rank, alpha=float(rank), target_modules=[name]))
    for name, layer in layers.items():
        model.set_submodule(name, layer)
    model.eval()
    model.requires_grad_(False)


def lookup(model: nn.Module, key: str) -> Tensor:
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    value = getattr(module, attr, None)
    if not isinstance(value, Tensor):
        raise ValueError(f"{key!r} is not a tensor of the live model")
    return value
