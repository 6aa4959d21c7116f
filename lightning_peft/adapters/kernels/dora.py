"""DoRA's magnitude node and its row-norm maths (see ``lightning_peft.adapters.dora``).

The layer computes ``y_pre = x W0^T + s x A^T B^T`` with LoRA's fused node (no bias), then this
node scales each output channel: ``y = g * y_pre + b`` with ``g = m / n [d_out]``. ``n`` is
passed in detached (DoRA sec. 4.3, as peft), so only ``y_pre``, ``m`` and ``b`` get gradients.
"""

from __future__ import annotations

from typing import Any

import torch


class DoRAMagnitudeFunction(torch.autograd.Function):
    """``y = (m * inv_n) * y_pre + b`` on ``y_pre [..., d_out]``; ``m``, ``inv_n``, ``b`` are ``[d_out]``.

    Backward needs ``y_pre`` for ``dm_j = sum_i dy_ij y_pre_ij / n_j``. Instead of keeping
    ``y_pre`` (a second ``[N, d_out]`` activation) the node keeps its own *output*, which the
    next op usually saves anyway (an activation, attention, a product), and recovers
    ``sum_i dy_ij y_pre_ij / n_j = sum_i dy_ij (y_ij - b_j) / m_j``. An output modified in
    place afterwards is caught by autograd's version check (a loud error, never a wrong
    gradient). An exactly zero ``m_j`` has no defined recovery: its gradient is then inf/nan.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, y_pre: torch.Tensor, magnitude: torch.Tensor, inv_norm: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        dtype = y_pre.dtype
        factor = (magnitude.to(inv_norm.dtype) * inv_norm).to(dtype)
        out = torch.addcmul(bias.to(dtype), y_pre, factor) if bias is not None else y_pre * factor
        ctx.save_for_backward(out, magnitude, inv_norm, bias)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        out, magnitude, inv_norm, bias = ctx.saved_tensors
        need_y, need_m, _, need_b = ctx.needs_input_grad
        d_out = out.shape[-1]
        acc = inv_norm.dtype  # sums over tokens in fp32 (fp64 for fp64); products in the activation dtype
        grad_y = grad_m = grad_b = None
        dy_sum = grad_out.reshape(-1, d_out).sum(0, dtype=acc) if need_b or (need_m and bias is not None) else None
        buffer = None
        if need_m:
            # sum_i dy_ij (y_ij - b_j) = sum_i dy_ij y_ij - b_j sum_i dy_ij
            buffer = grad_out * out
            total = buffer.reshape(-1, d_out).sum(0, dtype=acc)
            if bias is not None:
                total -= bias.to(acc) * dy_sum
            grad_m = (total / magnitude.to(acc)).to(magnitude.dtype)
        if need_y:
            factor = (magnitude.to(acc) * inv_norm).to(grad_out.dtype)
            # into the product's buffer: a fresh [N, d_out] allocation costs about one more pass on the CPU
            grad_y = grad_out * factor if buffer is None else torch.mul(grad_out, factor, out=buffer)
        if need_b:
            grad_b = dy_sum.to(bias.dtype)
        return grad_y, grad_m, None, grad_b


def dora_magnitude(y_pre: torch.Tensor, magnitude: torch.Tensor, inv_norm: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Functional ``DoRAMagnitudeFunction``: ``(m * inv_n) * y_pre + b``."""
    return DoRAMagnitudeFunction.apply(y_pre, magnitude, inv_norm, bias)


@torch.no_grad()
def adapted_row_norms(
    weight: torch.Tensor, weight_sq: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float
) -> torch.Tensor:
    """``||W0 + s B A||`` per output row (over ``d_in``), ``[d_out]``, without forming ``W0 + s B A``::

        ||W0 + s B A||^2_row = ||W0||^2_row + s * rowsum(B * (2 W0 A^T + s B (A A^T)))

    ``weight [d_out, d_in]`` (dense), ``weight_sq = ||W0||^2_row`` (cached by the caller),
    ``lora_a [r, d_in]``, ``lora_b [d_out, r]``. Costs ``d_out d_in r`` multiply-adds (one
    ``W0 A^T``), i.e. ``r / N`` of the base matmul over ``N`` tokens. Result in ``weight_sq``'s
    dtype (fp32, fp64 for fp64 weights)."""
    dtype = weight_sq.dtype
    a = lora_a.detach()
    b = lora_b.detach().to(dtype)
    w0_a = (weight @ a.to(weight.dtype).t()).to(dtype)  # [d_out, r], in the weight's dtype (bf16 weights: no fp32 copy)
    a = a.to(dtype)
    t = torch.addmm(w0_a, b, a @ a.t(), beta=2.0, alpha=scale)  # 2 W0 A^T + s B (A A^T)
    return weight_sq.add(torch.linalg.vecdot(b, t), alpha=scale).clamp_min_(0.0).sqrt_()


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype DoRA's norms are computed in: fp32, or fp64 for fp64 weights."""
    return torch.float64 if dtype == torch.float64 else torch.float32
