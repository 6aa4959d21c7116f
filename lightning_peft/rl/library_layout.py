"""Adapter layouts of a :class:`~lightning_peft.rl.library.PolicyLibrary`: what a task file
records about its adapters (specs, targets, trained modules), rebuilding them on a policy
(specs only through the adapter registry), and checking a task's tensors against them."""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.io import adapter_layers, remove_adapter
from lightning_peft.targeting import adapter_record

__all__ = ["layout_of", "inject_layout", "lookup", "parse_layout", "ranks", "strip_adapters", "task_problems"]


def strip_adapters(model: nn.Module) -> None:
    """Put every adapter layer's base back (:func:`lightning_peft.io.remove_adapter`: unmerged
    first, record dropped) and freeze ``model``; a model without adapters is only frozen."""
    if adapter_record(model) is not None or adapter_layers(model):
        remove_adapter(model)
    model.requires_grad_(False)


def layout_of(policy: nn.Module, layers: dict[str, Any]) -> tuple[str, str]:
    """``(layout JSON, kind)`` of an adapted ``policy`` whose adapter layers are ``layers``."""
    found = adapter_record(policy)
    if found is not None and found[0]:
        raise ValueError("adapters must be applied to the PPO module itself, not a submodule of it")
    layout = {
        "specs": [s.to_config() for s in found[1].specs] if found else [],
        "targets": {n: {"kind": m.spec.kind, **m.peft_metadata()} for n, m in sorted(layers.items())},
        "trainable_modules": list(found[1].trainable_modules) if found else [],
    }
    kind = "full" if not layers else "+".join(sorted({t["kind"] for t in layout["targets"].values()}))
    return json.dumps(layout, sort_keys=True), kind


def task_problems(scratch: nn.Module, tensors: dict[str, Tensor]) -> list[str]:
    """What keeps ``tensors`` from loading into ``scratch`` (a policy with the task's layout
    injected): unknown names, other shapes or dtype kinds, non-finite values, missing adapter
    tensors."""
    problems = []
    for key, value in tensors.items():
        try:
            like = lookup(scratch, key)
        except (AttributeError, ValueError):
            problems.append(f"{key!r}: the policy has no such tensor")
            continue
        if tuple(like.shape) != tuple(value.shape):
            problems.append(f"{key!r}: shape {tuple(value.shape)} != policy {tuple(like.shape)}")
        elif like.is_floating_point() != value.is_floating_point() or (value.dtype == torch.bool) != (like.dtype == torch.bool):
            problems.append(f"{key!r}: dtype {value.dtype} does not fit the policy's {like.dtype}")
        elif value.is_floating_point() and not bool(torch.isfinite(value.to(like.dtype)).all()):
            problems.append(f"{key!r}: non-finite values (NaN/inf)")
    adapter_keys = {f"{n}.{k}" for n, m in adapter_layers(scratch).items() for k in m.adapter_state_dict()}
    missing = sorted(adapter_keys - set(tensors))
    if missing:
        problems.append(f"missing adapter tensors {missing[:6]}")
    return problems


def parse_layout(layout_json: str, source: Any) -> dict[str, Any]:
    try:
        layout = json.loads(layout_json)
    except json.JSONDecodeError as error:
        raise ValueError(f"{str(source)!r}: the adapter layout is damaged (not valid JSON: {error})") from error
    if (
        not isinstance(layout, dict)
        or not isinstance(layout.get("specs"), list)
        or not isinstance(layout.get("targets"), dict)
        or not all(isinstance(t, dict) and isinstance(t.get("kind"), str) for t in layout["targets"].values())
        or not isinstance(layout.get("trainable_modules"), list)
    ):
        raise ValueError(f"{str(source)!r}: the adapter layout is damaged (needs specs, targets with kinds, trainable_modules)")
    return layout


def inject_layout(model: nn.Module, layout: dict[str, Any], source: str) -> None:
    """Inject the adapters ``layout`` describes; specs resolve only through the registry."""
    from lightning_peft.io import spec_from_config
    from lightning_peft.targeting import apply_adapter

    if layout["specs"]:
        specs = [spec_from_config(c, f"{source} (spec {i})") for i, c in enumerate(layout["specs"])]
        names = sorted(layout["targets"])
        # each spec pinned to the modules the file names for its kind (a validated copy)
        specs = [spec.retargeted(own) for spec in specs if (own := [n for n in names if layout["targets"][n]["kind"] == spec.kind])]
        if specs:
            apply_adapter(model, specs, trainable_modules=layout["trainable_modules"], check_gradients=False)  # inference only
    model.eval()
    model.requires_grad_(False)


def lookup(model: nn.Module, key: str) -> Tensor:
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    value = getattr(module, attr, None)
    if not isinstance(value, Tensor):
        raise ValueError(f"{key!r} is not a tensor of the live policy")
    return value


def ranks(layout: dict[str, Any]) -> dict[str, int]:
    return {n: int(t["rank"]) for n, t in layout.get("targets", {}).items() if "rank" in t}
