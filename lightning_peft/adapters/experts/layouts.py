"""Recognising the two experts layouts ExpertLoRA adapts (fused 3-D parameters, or a list of
identical experts built from ``nn.Linear``), and their projection shapes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from lightning_peft.adapters.base import AdapterLayer


def fused_layout(module: nn.Module) -> dict[str, Any] | None:
    """Describe a fused experts module, or ``None`` if ``module`` is not one.

    Recognised: a module with ``num_experts`` and 3-D parameters ``gate_up_proj`` (or
    ``up_proj`` when ``has_gate`` is false) and ``down_proj``, stored ``[E, d_out, d_in]`` or,
    with ``is_transposed``, ``[E, d_in, d_out]`` (transformers' ``use_experts_implementation``
    attributes: ``has_gate``, ``has_bias``, ``is_transposed``, ``has_post_expert_norm``)."""
    if isinstance(module, AdapterLayer):
        return None
    params = {n: p for n, p in module.named_parameters(recurse=False) if p.ndim == 3}
    num_experts = getattr(module, "num_experts", None)
    if not isinstance(num_experts, int) or not params:
        return None
    gate = bool(getattr(module, "has_gate", "gate_up_proj" in params))
    up = "gate_up_proj" if gate else "up_proj"
    if up not in params or "down_proj" not in params:
        return None
    transposed = bool(getattr(module, "is_transposed", False))
    shapes = {}
    for name in (up, "down_proj"):
        p = params[name]
        if p.shape[0] != num_experts:
            return None
        shapes[name] = (p.shape[2], p.shape[1]) if transposed else (p.shape[1], p.shape[2])  # (d_out, d_in)
    if gate and getattr(module, "is_concatenated", True) is False and not hasattr(module, "_apply_gate"):
        return None  # interleaved gate/up without a gate function: we cannot split it
    return {
        "num_experts": num_experts,
        "up": up,
        "gate": gate,
        "transposed": transposed,
        "bias": bool(getattr(module, "has_bias", False)),
        "post_norm": bool(getattr(module, "has_post_expert_norm", False)),
        "shapes": shapes,
        "expert_parallel": bool(getattr(module, "_is_expert_parallel", False)),
    }


def expert_linears(module: nn.Module) -> dict[str, str] | None:
    """For an ``nn.ModuleList`` of >= 2 identically structured experts containing ``nn.Linear``
    layers: ``{parameter key: path of the linear inside an expert}`` (``""`` when each expert
    is itself a linear), else ``None``."""
    if not isinstance(module, nn.ModuleList) or len(module) < 2:
        return None

    def signature(expert: nn.Module) -> list[tuple[str, int, int]]:
        return [(n, m.in_features, m.out_features) for n, m in expert.named_modules() if type(m) is nn.Linear]

    first = signature(module[0])
    if not first or any(signature(m) != first for m in module):
        return None
    return {(n.replace(".", "_") or "linear"): n for n, _, _ in first}


def chosen_paths(linears: dict[str, str], projections: Sequence[str] | None) -> dict[str, str]:
    """The ``expert_linears`` entries that ``projections`` names by key or by path (all for ``None``)."""
    return {k: path for k, path in linears.items() if projections is None or k in projections or path in projections}


def linear_shapes(expert: nn.Module, paths: dict[str, str]) -> dict[str, tuple[int, int]]:
    """``{key: (d_out, d_in)}`` of the linears at ``paths`` inside ``expert``."""
    linears = {k: expert.get_submodule(path) for k, path in paths.items()}
    return {k: (lin.out_features, lin.in_features) for k, lin in linears.items()}
