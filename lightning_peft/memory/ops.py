"""The op profiler behind a block profile, and the op policy of selective checkpointing.

:class:`OpProfiler` (a ``TorchDispatchMode``) counts a block's forward FLOPs (torch's own
``flop_registry``), per-op time split into cheap and expensive ops, and the bytes of the
expensive ops' outputs, which selective checkpointing keeps (:func:`selective_policy`).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy

from lightning_peft.memory.meters import tensor_leaves

__all__ = ["OpProfiler", "expensive_ops", "selective_policy"]


def _expensive_ops() -> set:
    names = [
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "_scaled_mm",
        "convolution",
        "_convolution",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_flash_attention_forward",
        "_efficient_attention_forward",
        "_scaled_dot_product_fused_attention_overrideable",
    ]
    ops = set()
    for name in names:
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None:
            ops.add(packet)
    return ops


_EXPENSIVE: set | None = None


def expensive_ops() -> set:
    """Op packets whose outputs selective checkpointing keeps (matmul, attention, conv)."""
    global _EXPENSIVE
    if _EXPENSIVE is None:
        _EXPENSIVE = _expensive_ops()
    return _EXPENSIVE


def _kept_by_selective(op: Any) -> bool:
    """Whether selective checkpointing keeps ``op``'s output (see :func:`selective_policy`)."""
    if op.overloadpacket in expensive_ops():
        return True
    schema = getattr(op, "_schema", None)
    return schema is not None and schema.is_mutable


def _op_flops(registry: dict, func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    packet = func.overloadpacket
    try:
        if packet in registry:
            return float(registry[packet](*args, **kwargs, out_val=out))
        name = str(packet)
        if name in ("aten.addmm_", "aten.baddbmm_") and len(args) >= 3:
            a, b = args[1], args[2]
            return 2.0 * a.numel() * b.shape[-1]
        if name == "aten._scaled_dot_product_flash_attention_for_cpu":
            q, k = args[0], args[1]  # [B, H, L, E], [B, H, S, E]
            return 4.0 * q.numel() * k.shape[-2]
    except Exception:  # a formula that does not accept these arguments: count nothing
        return 0.0
    return 0.0


class OpProfiler(TorchDispatchMode):
    """Counts forward FLOPs, per-op time (cheap vs expensive) and expensive-op output bytes."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.registry = flop_registry
        self.cuda = device.type == "cuda"
        self.flops = 0.0
        self.sel_bytes = 0
        self._sel_keys: set[int] = set()
        self.cheap_time = 0.0
        self.total_time = 0.0
        self._events: list[tuple[Any, Any, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        expensive = _kept_by_selective(func)  # not recomputed by selective checkpointing
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            out = func(*args, **kwargs)
            end.record()
            self._events.append((start, end, expensive))
        else:
            t0 = time.perf_counter()
            out = func(*args, **kwargs)
            dt = time.perf_counter() - t0
            self.total_time += dt
            if not expensive:
                self.cheap_time += dt
        self.flops += _op_flops(self.registry, func, args, kwargs, out)
        if func.overloadpacket in expensive_ops():
            for t in tensor_leaves(out):
                try:
                    st = t.untyped_storage()
                except (RuntimeError, NotImplementedError):
                    continue
                if st.data_ptr() not in self._sel_keys:
                    self._sel_keys.add(st.data_ptr())
                    self.sel_bytes += st.nbytes()
        return out

    def finalize(self) -> None:
        """Resolve CUDA event timings (synchronizes; profile steps only)."""
        if not self._events:
            return
        self._events[-1][1].synchronize()
        for start, end, expensive in self._events:
            dt = start.elapsed_time(end) / 1000.0
            self.total_time += dt
            if not expensive:
                self.cheap_time += dt
        self._events.clear()


def selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    """Keep matmul/attention/conv outputs; recompute the rest, except in-place ops.

    In-place ops are "kept" too (their output is the mutated tensor itself, no extra memory
    when it is already cached): replaying them in backward would mutate a cached tensor a
    second time (LoRA's fused ``out.addmm_(u, B^T)`` right after the base matmul is the common
    case). This assumes no op reads a tensor between its creation and a later in-place update
    of it, which holds for the library's adapters and the usual transformer blocks.
    """
    return CheckpointPolicy.MUST_SAVE if _kept_by_selective(op) else CheckpointPolicy.PREFER_RECOMPUTE
