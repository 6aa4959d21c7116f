"""Memory meters.

``SavedTensorMeter`` counts the bytes autograd keeps for backward while it is active, using
``torch.autograd.graph.saved_tensors_hooks``. Tensors are deduplicated by storage (a view of an
already-saved tensor costs nothing) and parameters/buffers are excluded, so the figure is exact
and deterministic on any device, CPU included.
"""

from __future__ import annotations

import torch
from torch import nn


class SavedTensorMeter:
    """Context manager: ``bytes`` = activation bytes saved for backward inside the context.

    Example::

        with SavedTensorMeter(model) as meter:
            loss = model(x).sum()
        print(meter.bytes)
    """

    def __init__(self, model: nn.Module | None = None) -> None:
        self._excluded: set[int] = set()
        if model is not None:
            for tensor in (*model.parameters(), *model.buffers()):
                self._excluded.add(_storage_key(tensor))
        self._seen: set[int] = set()
        self.bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in self._excluded and key not in self._seen:
            self._seen.add(key)
            self.bytes += tensor.untyped_storage().nbytes()
        return tensor

    # The meter only observes: LoRA may still recompute inputs from producers' saved tensors.
    _pack._lightning_peft_transparent = True  # type: ignore[attr-defined]

    def __enter__(self) -> "SavedTensorMeter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def _storage_key(tensor: torch.Tensor) -> int:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
        return id(tensor)
