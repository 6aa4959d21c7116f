"""Running observation normalisation for RL policies (buffers saved with the policy)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["RunningObsNorm"]


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
        batch_mean = x.mean(0)
        batch_var = x.var(0, unbiased=False)
        delta = batch_mean - self.mean
        total = self.count + n
        new_mean = self.mean + delta * n / total
        m2 = self.var * self.count + batch_var * n + delta.pow(2) * self.count * n / total
        self.mean.copy_(new_mean)
        self.var.copy_(m2 / total)
        self.count.copy_(total)

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.mean)
        return ((x - self.mean) / torch.sqrt(self.var + self.eps)).clamp(-self.clip, self.clip)
