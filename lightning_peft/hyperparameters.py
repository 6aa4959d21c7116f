"""Which saved hyperparameters put whole objects into a checkpoint (pure torch).

``LightningModule.save_hyperparameters()`` stores every ``__init__`` argument in each
checkpoint. An ``nn.Module`` passed as an argument (``net``: the usual shape of Hydra-style
projects) is then pickled whole -- the frozen base included -- into an "adapter-only"
checkpoint, and the file can only be read with ``torch.load(weights_only=False)``. This walks
the values (no pickling) and measures the tensor bytes they hold.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: values holding at least this many bytes are reported even without a module inside
LARGE_BYTES = 1 << 20
_MAX_NODES = 100_000  # bound the walk of huge object graphs


@dataclass
class HeavyHyperparameter:
    """One hyperparameter that pickles a module, or at least ``LARGE_BYTES`` of data."""

    name: str
    nbytes: int  # tensor bytes (modules: their state dict) plus str/bytes lengths
    modules: list[str]  # class names of the nn.Modules inside

    def describe(self) -> str:
        kinds = f"{', '.join(sorted(set(self.modules)))} module{'s' if len(self.modules) > 1 else ''}, " if self.modules else ""
        return f"{self.name!r} ({kinds}{format_bytes(self.nbytes)})"


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Walk:
    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.nbytes = 0
        self.modules: list[str] = []

    def visit(self, obj: Any) -> None:
        if len(self.seen) >= _MAX_NODES or id(obj) in self.seen:
            return
        if obj is None or isinstance(
            obj, (bool, int, float, complex, type, types.FunctionType, types.BuiltinFunctionType, types.ModuleType)
        ):
            return
        self.seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            self.nbytes += _tensor_bytes(obj)
        elif isinstance(obj, nn.Module):
            self.modules.append(type(obj).__name__)
            for t in obj.state_dict(keep_vars=True).values():  # tied tensors once
                if isinstance(t, torch.Tensor) and id(t) not in self.seen:
                    self.seen.add(id(t))
                    self.nbytes += _tensor_bytes(t)
        elif isinstance(obj, (str, bytes, bytearray)):
            self.nbytes += len(obj)
        elif isinstance(obj, Mapping):
            for value in obj.values():
                self.visit(value)
        elif isinstance(obj, (list, tuple, set, frozenset)):
            for item in obj:
                self.visit(item)
        elif isinstance(obj, functools.partial):
            self.visit(obj.func)
            self.visit(obj.args)
            self.visit(obj.keywords)
        elif dataclasses.is_dataclass(obj):
            for f in dataclasses.fields(obj):
                self.visit(getattr(obj, f.name, None))
        elif isinstance(getattr(obj, "__dict__", None), dict):
            self.visit(vars(obj))


def heavy_hyperparameters(hparams: Mapping[str, Any] | None, large_bytes: int = LARGE_BYTES) -> list[HeavyHyperparameter]:
    """The entries of ``hparams`` that hold an ``nn.Module`` (any size) or at least
    ``large_bytes`` of tensors/strings, in order. Nothing is pickled."""
    found: list[HeavyHyperparameter] = []
    for name, value in (hparams or {}).items():
        walk = _Walk()
        walk.visit(value)
        if walk.modules or walk.nbytes >= large_bytes:
            found.append(HeavyHyperparameter(str(name), walk.nbytes, walk.modules))
    return found
