"""Fair comparisons: HRM dimensions whose trainable-parameter count matches a LoRA's.

``hrm_dims_for_lora_budget(model, lora)`` counts the trainable parameters ``lora`` would add to
``model`` (exactly: each target's layer is built, never inserted) and returns the largest
``(input_dim, state_dim)`` whose HRM at ``site`` adds no more (``state_dim = input_dim`` unless
fixed). The model is not changed. One HRM layer has
``m d_in + 2n + 4nm + m^2 + d_out m + d_out`` parameters (``hrm_parameter_count``).
"""

from __future__ import annotations

from torch import nn

from lightning_peft.adapters.base import AdapterLayer, AdapterSpec
from lightning_peft.adapters.hrm import HRM, hrm_parameter_count, site_dims
from lightning_peft.targeting import resolve_targets
from lightning_peft.validation import check_int

__all__ = ["hrm_dims_for_lora_budget", "hrm_sites", "lora_parameter_count"]


def lora_parameter_count(model: nn.Module, lora: AdapterSpec) -> int:
    """Trainable parameters ``lora`` (any layer-building spec) would add to ``model``."""
    modules = dict(model.named_modules())
    total = 0
    for name in resolve_targets(model, lora):
        layer = lora.wrap(name, modules[name])
        total += layer.num_trainable() if isinstance(layer, AdapterLayer) else 0
    return total


def hrm_sites(model: nn.Module, site: str | list[str] = "mlp") -> dict[str, tuple[int, int]]:
    """``name -> (d_in, d_out)`` of the sites ``HRM(site=site)`` adapts in ``model``."""
    probe = HRM(state_dim=1, input_dim=1, site=site, init="random")
    modules = dict(model.named_modules())
    return {n: site_dims(modules[n])[:2] for n in resolve_targets(model, probe)}  # type: ignore[index]


def hrm_dims_for_lora_budget(
    model: nn.Module, lora: AdapterSpec | int, site: str | list[str] = "mlp", state_dim: int | None = None
) -> tuple[int, int]:
    """``(input_dim, state_dim)`` of the largest HRM at ``site`` with at most as many trainable
    parameters as ``lora`` (a spec, or a parameter count). Raises ``ValueError`` when even
    ``input_dim = 1`` exceeds the budget."""
    budget = lora if isinstance(lora, int) else lora_parameter_count(model, lora)
    check_int("lora", budget, low=1)
    check_int("state_dim", state_dim, low=1, allow_none=True)
    sites = hrm_sites(model, site)
    widest = min(min(d_in, d_out) for d_in, d_out in sites.values())
    best = None
    for m in range(1, widest + 1):
        n = state_dim if state_dim is not None else m
        if sum(hrm_parameter_count(d_in, d_out, m, n) for d_in, d_out in sites.values()) <= budget:
            best = (m, n)
    if best is None:
        raise ValueError(
            f"even input_dim=1 (state_dim={state_dim or 1}) at {len(sites)} sites exceeds the budget of {budget} parameters; "
            "use fewer sites or a larger LoRA"
        )
    return best
