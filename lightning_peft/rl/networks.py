"""The actor-critic networks of :class:`~lightning_peft.rl.ppo.PPO` and the description of a
task's spaces they are built for."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["IndependentNormal", "LogStd", "describe_spaces", "mlp"]


def mlp(sizes: Sequence[int], activation: type[nn.Module], out_gain: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        linear = nn.Linear(d_in, d_out)
        last = i == len(sizes) - 2
        # Orthogonal init (gain sqrt(2) hidden, small for the output) is what makes PPO on
        # classic control converge reliably (Engstrom et al., "Implementation Matters").
        nn.init.orthogonal_(linear.weight, out_gain if last else math.sqrt(2))
        nn.init.zeros_(linear.bias)
        layers.append(linear)
        if not last:
            layers.append(activation())
    return nn.Sequential(*layers)


class LogStd(nn.Module):
    """A state-independent log standard deviation ``weight [action_dim]``."""

    def __init__(self, dim: int, init: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self) -> Tensor:
        return self.weight


class IndependentNormal(torch.distributions.Independent):
    """Diagonal Gaussian over the last dimension, built from keyword ``loc`` and ``scale``."""

    def __init__(self, loc: Tensor, scale: Tensor) -> None:
        super().__init__(torch.distributions.Normal(loc, scale), 1)

    @property
    def deterministic_sample(self) -> Tensor:
        return self.mean


def describe_spaces(task: str, obs_space: Any, act_space: Any) -> tuple[tuple[int, ...], str, int, Any, Any]:
    """Observation shape, action kind, action dim (or number of actions) and bounds."""
    from gymnasium import spaces

    if not isinstance(obs_space, spaces.Box):
        raise ValueError(f"task {task!r}: PPO's MLP policy needs a Box observation space, got {obs_space}")
    if isinstance(act_space, spaces.Discrete):
        return tuple(obs_space.shape), "discrete", int(act_space.n), None, None
    if isinstance(act_space, spaces.Box) and len(act_space.shape) == 1:
        return (
            tuple(obs_space.shape),
            "continuous",
            int(act_space.shape[0]),
            np.asarray(act_space.low, dtype=np.float32),
            np.asarray(act_space.high, dtype=np.float32),
        )
    raise ValueError(f"task {task!r}: PPO supports Discrete or 1-D Box action spaces, got {act_space}")
