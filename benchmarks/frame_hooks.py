"""Glue between the benchmark and FRAME layers (``lightning_peft.adapters.frame``).

FRAME's load-balancing loss reaches the router's gradient inside the layer's backward, so the
loop adds nothing to the loss; ``balance_value`` only reads the last value for the log.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn


def frame_layers(model: nn.Module) -> dict[str, nn.Module]:
    from lightning_peft.adapters.frame import frame_layers as layers

    return layers(model)


def balance_value(model: nn.Module) -> float | None:
    """Mean over FRAME layers of the last training forward's balance loss (``None``: none)."""
    values = [float(m.last_balance_loss) for m in frame_layers(model).values() if getattr(m, "last_balance_loss", None) is not None]
    return sum(values) / len(values) if values else None


def param_groups(model: nn.Module, lr: float) -> list[dict[str, Any]]:
    """AdamW groups: orders (FRAME, when trained) get their own learning rate, no decay."""
    from lightning_peft.adapters.frame import frame_parameter_groups

    return frame_parameter_groups(model, lr, weight_decay=0.0)


@torch.no_grad()
def orders(model: nn.Module) -> dict[str, list[float]]:
    """Every FRAME layer's expert orders ``a_e``."""
    return {name: [float(a) for a in m.orders.detach().flatten()] for name, m in frame_layers(model).items()}


@torch.no_grad()
def expert_cosines(model: nn.Module) -> dict[str, float]:
    """Per FRAME layer: mean |cos| between the flattened dense updates ``s Re(F_-a B_e A_e F_a)``
    of every pair of experts (0: orthogonal updates, 1: collinear). Layers whose updates are
    all zero (untrained) are skipped."""
    out = {}
    for name, m in frame_layers(model).items():
        delta = m.delta_weights().flatten(1).double()  # [E, d_out * d_in]
        norms = delta.norm(dim=1)
        if bool((norms == 0).any()):
            continue
        unit = delta / norms[:, None]
        pairs = [abs(float(unit[i] @ unit[j])) for i, j in itertools.combinations(range(len(unit)), 2)]
        out[name] = sum(pairs) / len(pairs)
    return out


@torch.no_grad()
def routing_load(model: nn.Module) -> dict[str, list[float]]:
    """Share of token-to-expert assignments per expert in the last training forward."""
    out = {}
    for name, m in frame_layers(model).items():
        load = getattr(m, "last_load", None)
        if load is not None:
            load = load.detach().float()
            out[name] = [float(v) for v in (load / load.sum().clamp_min(1e-12))]
    return out


@torch.no_grad()
def update_norms(model: nn.Module) -> dict[str, list[float]]:
    """Frobenius norm of every expert's dense update (an expert the router starves stays near 0,
    and its direction then says little about decorrelation)."""
    return {name: [float(v) for v in m.delta_weights().flatten(1).norm(dim=1)] for name, m in frame_layers(model).items()}
