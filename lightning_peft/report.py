"""The trainable-parameter report ``apply_adapter`` returns, and the counts it is built from."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class AdapterReport:
    """The trainable-parameter table ``apply_adapter`` returns (``print(report)``)."""

    rows: list[tuple[str, str, str, int]] = field(default_factory=list)  # (module, kind, detail, trainable)
    trainable: int = 0
    total: int = 0
    notes: list[str] = field(default_factory=list)  # printed under the table
    tied: dict[str, list[str]] = field(default_factory=dict)  # trained parameter -> names it is tied to
    trainable_matches: dict[str, list[str]] = field(default_factory=dict)  # trainable_modules entry -> full names

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        width = max([len(r[0]) for r in self.rows] + [6])
        detail = max([len(r[2]) for r in self.rows] + [22])  # FRAME's detail is longer than LoRA's
        lines = [f"{'module':<{width}}  {'adapter':<8}  {'detail':<{detail}}  {'trainable':>11}"]
        lines += [f"{m:<{width}}  {k:<8}  {d:<{detail}}  {n:>11,}" for m, k, d, n in self.rows]
        lines.append(f"trainable {self.trainable:,} / total {self.total:,} parameters ({100 * self.trainable_fraction:.3f}%)")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def parameter_count(param: torch.Tensor) -> int:
    """Logical element count (a 4-bit packed weight counts its unpacked shape)."""
    quant_state = getattr(param, "quant_state", None)
    return int(torch.Size(quant_state.shape).numel()) if quant_state is not None else param.numel()


def tied_parameters(model: nn.Module, module_name: str) -> dict[str, list[str]]:
    """Parameters of submodule ``module_name`` that are the same ``Parameter`` as one registered
    outside it (e.g. an LM head tied to the input embedding): ``own name -> outside names``,
    full names. Training the module trains those too."""
    prefix = module_name + "."
    names_of: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    tied: dict[str, list[str]] = {}
    for names in names_of.values():
        inside = [n for n in names if n.startswith(prefix)]
        outside = [n for n in names if not n.startswith(prefix)]
        for own in inside:
            if outside:
                tied[own] = outside
    return tied
