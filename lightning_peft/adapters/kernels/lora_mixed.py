"""Mixed LoRA batches: each sample of a batch uses its own adapter.

For ``K`` adapters stacked (zero-padded to a common rank ``r``; slot of zeros = the plain base)
``A [K, r, d_in]`` and ``B [K, d_out, r]`` with each adapter's scale ``s_k`` already folded into
its ``B``, and ``index [N]`` (the adapter slot of each sample), the update for an input
``x [N, ..., d_in]`` (the batch is dim 0) is::

    delta[n] = x[n] A[index[n]]^T B[index[n]]^T           [N, ..., d_out]

i.e. exactly ``s_k B_k A_k x[n]`` of the adapter ``k = index[n]``: two batched matmuls over the
gathered factors, so one forward serves a batch whose samples need different adapters.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["MixedLoRA", "mixed_lora_delta"]


class MixedLoRA(NamedTuple):
    """The stacked factors of one layer and each sample's adapter slot."""

    a_stack: torch.Tensor  # [K, r, d_in]
    b_stack: torch.Tensor  # [K, d_out, r], scales folded in
    index: torch.Tensor  # [N] int64, slot per sample


def mixed_lora_delta(x: torch.Tensor, mixed: MixedLoRA) -> torch.Tensor:
    """The per-sample LoRA update of ``x [N, ..., d_in]`` (see the module docstring)."""
    n = x.shape[0]
    if n != mixed.index.shape[0]:
        raise ValueError(
            f"a mixed batch was set up for {mixed.index.shape[0]} samples (one adapter name each), but this layer's input "
            f"has batch size {n} (dim 0 of shape {tuple(x.shape)}): pass one name per sample to per_sample()"
        )
    a = mixed.a_stack.index_select(0, mixed.index).to(x.dtype)  # [N, r, d_in]
    b = mixed.b_stack.index_select(0, mixed.index).to(x.dtype)  # [N, d_out, r]
    rows = x.reshape(n, -1, x.shape[-1])  # [N, T, d_in]
    delta = torch.bmm(torch.bmm(rows, a.transpose(1, 2)), b.transpose(1, 2))  # [N, T, d_out]
    return delta.reshape(*x.shape[:-1], b.shape[1])
