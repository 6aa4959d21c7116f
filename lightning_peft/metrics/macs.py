"""Multiply-accumulates of one forward pass, counted by ``torch.utils.flop_counter.FlopCounterMode``.

What is counted: the matmul-type operators torch's flop counter knows (``mm``, ``addmm``,
``bmm``, ``baddbmm``, ``_scaled_mm``, convolutions, and fused scaled-dot-product attention:
``QK^T`` and ``AV``), plus what the registry leaves out, added here with torch's own formulas:
the CPU flash-attention kernel (forward and backward) and the in-place ``addmm_``/``baddbmm_``
(our fused LoRA kernel adds its update with ``addmm_``). Each is counted as ``2 * M * N * K``
FLOPs, so ``MACs = FLOPs / 2``. Not counted: element-wise work (activations, norms, softmax, residual
adds, the bias of ``addmm``) and gathers/embeddings; that is the NetScore convention of MACs in
matmul-type layers (Wong 2018). A LoRA update ``x A^T B^T`` is two matmuls and counts as such;
a merged adapter costs nothing extra. Quantized linear layers (bitsandbytes ``Linear4bit`` /
``Linear8bitLt``) run as custom operators the counter cannot see: where such a layer's forward
added no counted FLOPs, it is counted as the dense matmul it stands for (``2 * tokens * in *
out``, under ``"quantized_linear"``). The count is for the whole ``example_input`` (divide by
its batch size for per-sample MACs). Pure torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, baddbmm_flop, mm_flop, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["count_macs", "count_flops_by_operator", "count_step_flops"]


def _cpu_flash_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``aten._scaled_dot_product_flash_attention_for_cpu`` (the same formula torch
    uses for the CUDA flash kernel; causal masking not discounted, as in torch)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_attention_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``aten._scaled_dot_product_flash_attention_for_cpu_backward`` (torch's formula
    for the CUDA kernel's backward: the ``QK^T`` recompute and four gradient matmuls)."""
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _addmm_inplace(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """``out.addmm_(a, b)``: the ``a @ b`` of ``addmm`` (our LoRA kernel adds its update so)."""
    return mm_flop(a_shape, b_shape)


def _baddbmm_inplace(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return baddbmm_flop(self_shape, a_shape, b_shape)


def _custom_mapping() -> dict[Any, Any]:
    """Operators torch's registry leaves out: the CPU flash-attention kernel and its backward,
    and the in-place ``addmm_``/``baddbmm_`` (their out-of-place forms are registered)."""
    aten = torch.ops.aten
    wanted = {
        "_scaled_dot_product_flash_attention_for_cpu": _cpu_flash_attention,
        "_scaled_dot_product_flash_attention_for_cpu_backward": _cpu_flash_attention_backward,
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


def _is_quantized_linear(module: nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes") and hasattr(module, "in_features") and hasattr(module, "out_features")


def _count_quantized_linears(model: nn.Module, counter: FlopCounterMode, found: list[int]) -> list[Any]:
    """Hooks adding the dense-matmul FLOPs of each quantized linear whose forward the counter
    saw no FLOPs in (a dequantize-then-matmul path is counted by torch already)."""
    handles = []
    for module in model.modules():
        if not _is_quantized_linear(module):
            continue
        before: list[int] = []

        def pre(mod: nn.Module, args: Any, before: list[int] = before) -> None:
            before.append(counter.get_total_flops())

        def post(mod: nn.Module, args: Any, output: torch.Tensor, before: list[int] = before) -> None:
            if counter.get_total_flops() == before.pop():
                found.append(2 * (output.numel() // mod.out_features) * mod.in_features * mod.out_features)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


def count_flops_by_operator(model: nn.Module, example_input: Any) -> dict[str, int]:
    """FLOPs per operator name of one forward of ``example_input`` (a tensor, a tuple/list of
    positional arguments, or a mapping of keyword arguments), in eval mode and without grad;
    the model's training flag is restored afterwards (eval keeps batch-norm statistics unchanged)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False, custom_mapping=_custom_mapping())
    quantized: list[int] = []
    handles = _count_quantized_linears(model, counter, quantized)
    try:
        with torch.no_grad(), counter:
            _run(model, example_input)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    flops = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    if quantized:
        flops["quantized_linear"] = sum(quantized)
    return flops


def count_step_flops(step: Callable[[], object]) -> dict[str, int]:
    """FLOPs per operator of one call of ``step``, e.g. a training step's forward and backward
    (``lambda: model(x).sum().backward()``), counted as the module doc says; unlike
    ``count_flops_by_operator`` it runs ``step`` as given: grad mode, training flag and any
    state the step changes are the caller's. A LoRA layer over ``N`` rows with a frozen base
    counts ``4 N d_in d_out`` for the base (forward and ``dx``) plus ``6 N r (d_in + d_out)``,
    or ``4 N r (d_in + d_out) + 4 r d_in d_out`` where it runs on the merged weight
    (``lightning_peft.adapters.kernels.lora.LoRAFunction``)."""
    counter = FlopCounterMode(display=False, custom_mapping=_custom_mapping())
    with counter:
        step()
    return {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}


def count_macs(model: nn.Module, example_input: Any) -> int:
    """Multiply-accumulates of one forward of ``example_input`` (see the module doc for what is
    counted): total FLOPs of the matmul-type operators divided by two."""
    return sum(count_flops_by_operator(model, example_input).values()) // 2
