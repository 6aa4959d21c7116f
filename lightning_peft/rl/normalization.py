"""Running normalisation for RL: observations (buffers saved with the policy) and rewards (by
the running scale of the discounted return, kept by the rollout), one moment update for both."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["RunningObsNorm", "RunningReturnScale", "merge_moments"]


def merge_moments(mean: Any, var: Any, count: Any, batch_mean: Any, batch_var: Any, n: int) -> tuple[Any, Any, Any]:
    """Merge running ``(mean, var, count)`` with a batch's ``(batch_mean, batch_var, n)`` by the
    parallel-variance formula (Chan et al.): with ``delta = batch_mean - mean`` and
    ``N = count + n``, ``mean' = mean + delta n / N`` and
    ``var' = (var count + batch_var n + delta^2 count n / N) / N``. Floats or tensors alike."""
    delta = batch_mean - mean
    total = count + n
    new_mean = mean + delta * n / total
    new_var = (var * count + batch_var * n + delta**2 * count * n / total) / total
    return new_mean, new_var, total


class RunningObsNorm(nn.Module):
    """Running observation normaliser: ``clamp((x - mean) / sqrt(var + eps), -clip, clip)``.

    ``mean``/``var``/``count`` are buffers (saved with the policy, never trained) merged with each
    new batch ``x [N, D]`` by the parallel-variance formula (Chan et al.). ``count`` starts at
    ``eps`` so the first update dominates the initial ``mean=0, var=1``.
    """

    def __init__(self, dim: int, clip: float = 10.0, eps: float = 1e-8) -> None:
        super().__init__()
        self.clip = float(clip)
        self.eps = float(eps)
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("count", torch.tensor(1e-4))

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        x = x.reshape(-1, self.mean.numel()).to(self.mean)
        n = x.shape[0]
        if n == 0:
            return
        mean, var, count = merge_moments(self.mean, self.var, self.count, x.mean(0), x.var(0, unbiased=False), n)
        self.mean.copy_(mean)
        self.var.copy_(var)
        self.count.copy_(count)

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.mean)
        return ((x - self.mean) / torch.sqrt(self.var + self.eps)).clamp(-self.clip, self.clip)


class RunningReturnScale:
    """Scale rewards by the running std of the discounted return (as gymnasium's
    ``NormalizeReward``), which keeps value targets O(1) for tasks like Pendulum."""

    def __init__(self, num_envs: int, gamma: float) -> None:
        self.ret = np.zeros(num_envs)
        self.gamma = gamma
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def __call__(self, reward: np.ndarray, done: np.ndarray) -> np.ndarray:
        self.ret = self.ret * self.gamma + reward
        self.mean, self.var, self.count = merge_moments(
            self.mean, self.var, self.count, float(self.ret.mean()), float(self.ret.var()), len(self.ret)
        )
        self.ret[done] = 0.0
        return reward / math.sqrt(self.var + 1e-8)
