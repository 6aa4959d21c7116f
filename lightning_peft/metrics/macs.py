"""Multiply-accumulates of one forward pass, counted by ``torch.utils.flop_counter.FlopCounterMode``.

What is counted: the matmul-type operators torch's flop counter knows (``mm``, ``addmm``,
``bmm``, ``baddbmm``, ``_scaled_mm``, convolutions, and fused scaled-dot-product attention:
``QK^T`` and ``AV``), plus what the registry leaves out, added here with torch's own formulas:
the CPU flash-attention kernel and the in-place ``addmm_``/``baddbmm_`` (our fused LoRA
kernel adds its update with ``addmm_``). Each is counted as ``2 * M * N * K`` FLOPs, so
``MACs = FLOPs / 2``. Not counted: element-wise work (activations, norms, softmax, residual
adds, the bias of ``addmm``) and gathers/embeddings; that is the NetScore convention of MACs in
matmul-type layers (Wong 2018). A LoRA update ``x A^T B^T`` is two matmuls and counts as such;
a merged adapter costs nothing extra. The count is for the whole ``example_input`` (divide by
its batch size for per-sample MACs). Pure torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, baddbmm_flop, mm_flop, sdpa_flop_count

__all__ = ["count_macs", "count_flops_by_operator"]


def _cpu_flash_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``aten._scaled_dot_product_flash_attention_for_cpu`` (the same formula torch
    uses for the CUDA flash kernel; causal masking not discounted, as in torch)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _addmm_inplace(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """``out.addmm_(a, b)``: the ``a @ b`` of ``addmm`` (our LoRA kernel adds its update so)."""
    return mm_flop(a_shape, b_shape)


def _baddbmm_inplace(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return baddbmm_flop(self_shape, a_shape, b_shape)


def _custom_mapping() -> dict[Any, Any]:
    """Operators torch's registry leaves out: the CPU flash-attention kernel and the in-place
    ``addmm_``/``baddbmm_`` (their out-of-place forms are registered)."""
    aten = torch.ops.aten
    wanted = {
        "_scaled_dot_product_flash_attention_for_cpu": _cpu_flash_attention,
        "addmm_": _addmm_inplace,
        "baddbmm_": _baddbmm_inplace,
    }
    return {getattr(aten, name): formula for name, formula in wanted.items() if hasattr(aten, name)}


def _run(model: nn.Module, example_input: Any) -> None:
    if isinstance(example_input, Mapping):
        model(**example_input)
    elif isinstance(example_input, tuple | list):
        model(*example_input)
    else:
        model(example_input)


def count_flops_by_operator(model: nn.Module, example_input: Any) -> dict[str, int]:
    """FLOPs per operator name of one forward of ``example_input`` (a tensor, a tuple/list of
    positional arguments, or a mapping of keyword arguments), in eval mode and without grad;
    the model's training flag is restored afterwards (eval keeps batch-norm statistics unchanged)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as counter:
            _run(model, example_input)
    finally:
        model.train(was_training)
    return {str(op): int(flops) for op, flops in counter.get_flop_counts().get("Global", {}).items()}


def count_macs(model: nn.Module, example_input: Any) -> int:
    """Multiply-accumulates of one forward of ``example_input`` (see the module doc for what is
    counted): total FLOPs of the matmul-type operators divided by two."""
    return sum(count_flops_by_operator(model, example_input).values()) // 2
