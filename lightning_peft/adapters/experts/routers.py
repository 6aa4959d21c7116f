"""Finding the router of an MoE block and reading its logits (what EPnG's expert importance
is computed from; ``ExpertImportanceCallback`` wires it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_peft.adapters.experts.layer import ExpertsLoRALayer


def find_router(model: nn.Module, layer_name: str, router_names: Sequence[str] = ("gate", "router")) -> tuple[str, nn.Module]:
    """The router of the MoE block that holds the experts at ``layer_name``: a sibling module
    named one of ``router_names`` (transformers: ``mlp.gate``)."""
    parent_name = layer_name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    for candidate in router_names:
        router = getattr(parent, candidate, None)
        if isinstance(router, nn.Module) and not isinstance(router, ExpertsLoRALayer):
            return (f"{parent_name}.{candidate}" if parent_name else candidate), router
    siblings = [n for n, _ in parent.named_children()]
    raise ValueError(
        f"no router found next to {layer_name!r}: looked for {list(router_names)} in {parent_name or type(model).__name__!r}, "
        f"which has {siblings}. Pass router_names=[...] naming the module that computes the routing logits."
    )


def router_logits(output: Any, num_experts: int, name: str) -> torch.Tensor:
    """The ``[tokens, E]`` logits from a router's output: a tensor, or a tuple whose first
    element is the logits (transformers 5.x: ``(logits, scores, indices)``)."""
    logits = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(logits, torch.Tensor) or logits.shape[-1] != num_experts:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise RuntimeError(
            f"router {name!r} returned {shape}, not logits over {num_experts} experts: pass router_names=[...] naming "
            "the module whose output (or first output) is [tokens, num_experts]"
        )
    return logits.reshape(-1, num_experts)
