"""Floating dtypes by name, and the compute-dtype rule every fused kernel follows."""

from __future__ import annotations

import torch

#: dtype names a config may write (QLoRA's ``compute_dtype``, FSDP2's ``param_dtype`` ...)
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a kernel computes ``x``'s matmuls in: autocast's dtype when autocast is on for
    ``x``'s device, else ``x``'s own (so the kernels below are unaffected by autocast)."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
