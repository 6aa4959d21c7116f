"""Offloading a block's saved activations to pinned host memory (CUDA).

Device-to-host copies run on a side stream while the next blocks compute; in backward the first
unpack of a block loads all of its tensors and prefetches the previous offloaded block.
:func:`measure_bandwidth` gives the device-to-host rate the planner's offload cost uses.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

import torch
from torch import nn

__all__ = ["Offloader", "measure_bandwidth"]


class _OffloadHandle:
    __slots__ = ("host", "device", "dev", "event", "group", "__weakref__")

    def __init__(self, tensor: torch.Tensor, stream: torch.cuda.Stream, group: int) -> None:
        self.device = tensor.device
        self.group = group
        self.dev: torch.Tensor | None = None
        self.event = None
        self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(stream):
            self.host.copy_(tensor, non_blocking=True)
        tensor.record_stream(stream)  # the allocator keeps the memory until the copy is done

    def load(self, stream: torch.cuda.Stream) -> None:
        if self.dev is not None:
            return
        with torch.cuda.stream(stream):
            self.dev = self.host.to(self.device, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(stream)

    def get(self, stream: torch.cuda.Stream) -> torch.Tensor:
        self.load(stream)
        current = torch.cuda.current_stream(self.device)
        current.wait_event(self.event)
        tensor = self.dev
        tensor.record_stream(current)
        self.dev = None
        return tensor


class Offloader:
    """Saved-tensor hooks that move a block's saved activations to pinned host memory.

    Device-to-host copies run on a side stream while the next blocks compute; in backward the
    first unpack of block ``g`` loads all of ``g`` and prefetches the previous offloaded block,
    so its host-to-device copy overlaps ``g``'s backward.
    """

    min_bytes = 1 << 20

    def __init__(self) -> None:
        self.stream: torch.cuda.Stream | None = None
        self.groups: dict[int, list[weakref.ref]] = {}

    def reset(self) -> None:
        self.groups = {}

    def hooks(self, group: int) -> torch.autograd.graph.saved_tensors_hooks:
        if self.stream is None:
            self.stream = torch.cuda.Stream()

        def pack(t: torch.Tensor) -> Any:
            if not t.is_cuda or isinstance(t, nn.Parameter) or t.numel() * t.element_size() < self.min_bytes:
                return t
            handle = _OffloadHandle(t, self.stream, group)
            self.groups.setdefault(group, []).append(weakref.ref(handle))
            return handle

        def unpack(h: Any) -> torch.Tensor:
            if not isinstance(h, _OffloadHandle):
                return h
            self._load_group(h.group)
            earlier = [g for g in self.groups if g < h.group]
            if earlier:
                self._load_group(max(earlier))
            return h.get(self.stream)

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    def _load_group(self, group: int) -> None:
        refs = self.groups.pop(group, None)
        if not refs:
            return
        for ref in refs:
            handle = ref()
            if handle is not None:
                handle.load(self.stream)


def measure_bandwidth(device: torch.device) -> float:
    """Device-to-host copy rate (bytes/s) into pinned memory: three 64 MiB copies after a warm-up."""
    n = 64 << 20
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(3):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    return 3 * n / max(time.perf_counter() - t0, 1e-9)
