"""LoRA factors of library entries, and combinations of them.

An adapter entry's LoRA layer on module ``m`` holds ``A [r, d_in]``, ``B [d_out, r]`` and a
scale ``s`` (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA): its update is ``s B A``.

A combination ``{i: w_i}`` (or per module ``{i: {m: w_im}}``, absent modules weighing 0) has,
per module, the update ``sum_i w_i s_i B_i A_i``. It is stored exactly as one LoRA layer of rank
``R = sum_i r_i``::

    A = [A_1; A_2; ...]                    [R, d_in]   (rows concatenated)
    B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]    [d_out, R]  (columns concatenated), scale 1

since ``B A = sum_i w_i s_i B_i A_i`` block by block: no SVD, no approximation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_peft.io_checks import LoadPlan

__all__ = ["Factors", "combine_factors", "entry_factors", "normalise_weights"]

#: ``{module name: (A [r, d_in], B [d_out, r], scale)}``
Factors = dict[str, tuple[Tensor, Tensor, float]]


def entry_factors(name: str, plan: LoadPlan, meta: dict[str, Any]) -> tuple[Factors, list[str]]:
    """``(factors, problems)`` of an adapter entry: its LoRA factors per adapted module, and
    what keeps it from being pure LoRA (other adapter kinds, tensors outside LoRA layers, such
    as a trained head or statistics), empty when it is pure LoRA."""
    factors: Factors = {}
    problems: list[str] = []
    specs = plan.specs or []
    root = meta.get("export_root") or ""
    for saved, entry in meta["targets"].items():
        # a module name of the plain base (an export of a wrapper, loaded into the bare model, drops its root)
        module = saved[len(root) + 1 :] if root and saved.startswith(root + ".") and f"{saved}.lora_A.weight" not in plan.state else saved
        a_key, b_key = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        if entry.get("kind") != "lora" or a_key not in plan.state or b_key not in plan.state:
            problems.append(f"{module!r} holds a {entry.get('kind')!r} adapter, not a plain LoRA layer")
            continue
        spec = specs[entry["spec"]] if entry.get("spec", -1) < len(specs) else None
        rank, alpha = int(entry["rank"]), float(entry["alpha"])
        scale = alpha / math.sqrt(rank) if getattr(spec, "use_rslora", False) else alpha / rank
        factors[module] = (plan.state[a_key], plan.state[b_key], scale)
    owned = {f"{m}.lora_A.weight" for m in factors} | {f"{m}.lora_B.weight" for m in factors}
    others = sorted(k for k in plan.state if k not in owned)
    if others:
        problems.append(f"it also stores tensors outside its LoRA layers ({others[:4]}{'...' if len(others) > 4 else ''})")
    return factors, problems


def normalise_weights(weights: Any, known: Mapping[str, Factors]) -> dict[str, dict[str, float]]:
    """``{entry: {module: weight}}`` from ``{entry: w}`` / ``{entry: {module: w}}``; refused by name
    when an entry or a module is unknown or a weight is not a finite number."""
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError(f"weights must be a non-empty mapping {{adapter entry: weight or {{module: weight}}}}, got {weights!r}")
    out: dict[str, dict[str, float]] = {}
    for entry, w in weights.items():
        modules = known[entry]
        if isinstance(w, Mapping):
            unknown = [m for m in w if m not in modules]
            if unknown:
                raise ValueError(f"weights for {entry!r} name modules it does not adapt: {unknown[:4]}; it adapts {sorted(modules)}")
            per = {m: _weight(entry, w.get(m, 0.0)) for m in modules}
        else:
            per = dict.fromkeys(modules, _weight(entry, w))
        out[entry] = per
    return out


def _weight(entry: str, w: Any) -> float:
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(float(w)):
        raise ValueError(f"the weight of {entry!r} must be a finite number, got {w!r}")
    return float(w)


def combine_factors(parts: Mapping[str, Factors], weights: Mapping[str, Mapping[str, float]]) -> Factors:
    """The exact combination (see the module docstring): per module, the parts' ``A`` stacked
    along the rank and their ``w s B`` side by side, in fp32, scale 1. Every part adapts the same
    modules (the caller checked)."""
    names = list(weights)
    out: Factors = {}
    for module in parts[names[0]]:
        a = torch.cat([parts[n][module][0].float() for n in names], dim=0)
        b = torch.cat([parts[n][module][1].float() * (weights[n][module] * parts[n][module][2]) for n in names], dim=1)
        out[module] = (a, b, 1.0)
    return out
