"""One task of LiteLoRA continual fine-tuning on an adapter library: begin, penalise, end.

``begin_task`` injects ``LiteLoRA`` layers whose frozen bank holds the library's LoRA adapter
entries; the training loop adds ``l0_penalty(model)`` to its loss (or its gradient, once per
optimizer step); ``end_task`` decides recruit/reuse from the gate, writes the library and leaves
the plain base. What ``end_task`` writes for task ``t``:

* recruited (``E[gamma] >= gate_threshold``): an adapter entry ``adapter_name`` (default
  ``"<t>_adapter"``) holding the new factors as a plain LoRA (``A``, ``gamma_eval B``, scale
  ``alpha / r``), and a combination entry ``t`` = ``{bank entry i: c_i, adapter_name: 1}``;
* reused: only the combination entry ``t`` = ``{bank entry i: c_i}``.

With per-module coefficients the combination's weights are per module
(``{entry: {module: c}}``); with global ones, one weight per entry. Either way activating ``t``
computes exactly what the trained layers compute in eval mode (minus the dropped adapter when it
reuses). With per-module gates each module decides on its own gate: the adapter entry covers every
adapted module (the library combines adapters of one target set), a closed module's ``B`` stored
as zeros; the task counts as recruited when any gate stayed open. With an empty bank (the first
task) the task is always recruited: there is nothing to reuse.
"""

from __future__ import annotations

import copy
import re
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_peft.adapters.base import AdapterLayer
from lightning_peft.adapters.litelora import LiteLoRA, LiteLoRALinear, litelora_gates, litelora_layers
from lightning_peft.adapters.lora import LoRA
from lightning_peft.continual.library_view import adapter_entries
from lightning_peft.io import remove_adapter, save_adapter
from lightning_peft.targeting import apply_adapter, resolve_targets

__all__ = ["TaskDecision", "begin_task", "end_task", "l0_penalty"]

#: bytes of one stored mixing coefficient (what ``TaskDecision.bytes`` counts for it)
COEFFICIENT_BYTES = 4


@dataclass
class TaskDecision:
    """What ``end_task`` decided and wrote for one task.

    ``gate``: ``E[gamma]`` (mean over gates with per-module gates; 1.0 for the ungated first task);
    ``coefficients``: the bank weights written into the combination (``{entry: c}`` or
    ``{entry: {module: c}}``); ``bytes``: tensor bytes the task added (new factors when recruited,
    plus ``4`` per stored coefficient); ``adapter``: the adapter entry written, or ``None``."""

    task: str
    recruited: bool
    gate: float
    coefficients: dict[str, Any]
    bytes: int
    adapter: str | None = None
    gate_eval: float = 1.0
    open_probability: float = 1.0
    bank: list[str] = field(default_factory=list)
    modules_recruited: list[str] = field(default_factory=list)
    gates: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_name(what: str, name: Any) -> None:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{what} must be a non-empty string, got {name!r}")


def begin_task(model: nn.Module, library: Any, spec: LiteLoRA, task: str, bank: list[str] | None = None) -> None:
    """Inject ``spec``'s LiteLoRA layers into ``model`` (the library's plain base, or a module with
    the same module names) with a frozen bank of the library's LoRA adapter entries ``bank``
    (default: all of them, in library order). Every module an entry adapts is adapted too, so the
    bank can act everywhere it learnt. Refused (nothing changed) when ``task`` already names an
    entry, ``bank`` names unknown entries, ``model`` already has adapters, or a factor does not fit."""
    if not isinstance(spec, LiteLoRA):
        raise TypeError(f"begin_task needs a LiteLoRA spec, got {type(spec).__name__}")
    _check_name("task", task)
    if task in library:
        raise ValueError(f"the library already has an entry {task!r}; name the task differently or remove the entry first")
    known = adapter_entries(library)
    names = known if bank is None else list(bank)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"bank entries {unknown} are not LoRA adapter entries of the library; its adapter entries are {known}")
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        if getattr(library, "model", None) is model and getattr(library, "active", None) is not None:
            raise ValueError(f"the library's entry {library.active!r} is active on this model: call library.deactivate() first")
        raise ValueError(f"{type(model).__name__} already has adapters; begin_task needs the plain base (remove_adapter first)")
    factors = {n: library.lora_factors(n) for n in names}
    modules = dict(model.named_modules())
    bank_modules = sorted({m for f in factors.values() for m in f})
    missing = [m for m in bank_modules if not isinstance(modules.get(m), nn.Linear)]
    if missing:
        raise ValueError(f"the bank adapts {missing}, which are not nn.Linear modules of {type(model).__name__}: another base?")
    targets = list(dict.fromkeys(resolve_targets(model, spec) + bank_modules))
    pinned = spec.retargeted(targets)
    assert isinstance(pinned, LiteLoRA)
    per_module = {m: [factors[n].get(m) for n in names] for m in targets}
    apply_adapter(model, pinned.with_bank(names, per_module))  # validates (shapes included) before changing model


def l0_penalty(model: nn.Module) -> torch.Tensor:
    """``sum over gates l0_weight * P(gamma != 0)`` (0-dim fp32, differentiable in ``log_alpha``;
    a constant 0 when the layers have no gate, e.g. the ungated first task)."""
    layers = litelora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LiteLoRA layers: call begin_task first")
    spec = next(iter(layers.values())).spec
    gates = list(litelora_gates(model).values())
    if not gates:
        return torch.zeros((), device=next(iter(layers.values())).lora_A.device)
    return spec.l0_weight * torch.stack([g.open_probability() for g in gates]).sum()


def _coefficients(layers: dict[str, LiteLoRALinear], spec: LiteLoRA) -> dict[str, Any]:
    """The bank weights for the combination entry (see the module docstring)."""
    names = spec.bank_names
    if not names:
        return {}
    first = next(iter(layers.values()))
    if spec.coefficients == "global":
        values = first.coefficients.detach().float().tolist()
        return {n: values[i] for i, n in enumerate(names)}
    weights: dict[str, Any] = {n: {} for n in names}
    for module, layer in layers.items():
        values = layer.coefficients.detach().float().tolist()
        owners = set(layer.bank_owner.tolist())
        for i, n in enumerate(names):
            if i in owners:
                weights[n][module] = values[i]
    return {n: w for n, w in weights.items() if w}


def _export_new_factors(model: nn.Module, layers: dict[str, LiteLoRALinear], keep: list[str], directory: str) -> int:
    """Save the new factors of every layer (its eval gate folded into ``B``; zeros where the module
    is not in ``keep``) as a plain LoRA export in ``directory``, from a plain copy of ``model``
    (``model`` is untouched). Returns their bytes."""
    plain = copy.deepcopy(model)
    remove_adapter(plain)
    spec = next(iter(layers.values())).spec
    pinned = {"re:" + re.escape(m): layer.rank for m, layer in layers.items()}
    lora = LoRA(rank=spec.rank, alpha=spec.alpha, target_modules=list(pinned), rank_pattern=pinned)
    apply_adapter(plain, lora, check_gradients=False)
    size = 0
    with torch.no_grad():
        for module, layer in layers.items():
            lora = plain.get_submodule(module)
            lora.lora_A.weight.copy_(layer.lora_A)
            lora.lora_B.weight.copy_((layer.eval_gate() if module in keep else 0.0) * layer.lora_B.float())
            size += layer.lora_A.numel() * layer.lora_A.element_size() + layer.lora_B.numel() * layer.lora_B.element_size()
    save_adapter(plain, directory)
    return size


def end_task(model: nn.Module, library: Any, task: str, adapter_name: str | None = None) -> TaskDecision:
    """Decide recruit/reuse for ``task`` from its gate(s), write the library (see the module
    docstring) and remove the LiteLoRA layers, leaving the plain base. Every check runs before
    anything is written; a failed write removes what this call wrote and leaves ``model`` as it was."""
    _check_name("task", task)
    layers = litelora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LiteLoRA layers: end_task ends what begin_task began")
    spec = next(iter(layers.values())).spec
    adapter_name = adapter_name if adapter_name is not None else f"{task}_adapter"
    _check_name("adapter_name", adapter_name)
    taken = [n for n in (task, adapter_name) if n in library]
    if taken:
        raise ValueError(f"the library already has entries {taken}; choose other names (nothing was written)")
    unknown = [n for n in spec.bank_names if n not in library]
    if unknown:
        raise ValueError(f"the bank's entries {unknown} are no longer in the library (known: {list(library.names)}); nothing was written")
    gates = {name: layer.gate for name, layer in layers.items()}
    with torch.no_grad():
        expected = {name: (1.0 if g is None else float(g.expected())) for name, g in gates.items()}
        opened = {name: (1.0 if g is None else float(g.open_probability())) for name, g in gates.items()}
        distinct = {id(g): name for name, g in gates.items()}  # one value per distinct gate
    keep = [name for name in layers if expected[name] >= spec.gate_threshold]
    if not spec.bank_names:  # nothing to reuse: the first adapter is always kept
        keep = list(layers)
    coefficients = _coefficients(layers, spec)
    n_coefficients = sum(len(w) if isinstance(w, dict) else 1 for w in coefficients.values())
    weights: dict[str, Any] = dict(coefficients)
    size = COEFFICIENT_BYTES * n_coefficients
    written: list[str] = []
    try:
        if keep:
            with tempfile.TemporaryDirectory() as directory:
                size += _export_new_factors(model, layers, keep, directory)
                library.add(adapter_name, directory)
            written.append(adapter_name)
            weights[adapter_name] = 1.0
        library.add_combination(task, weights)
        written.append(task)
    except BaseException:
        for name in reversed(written):
            library.remove(name)
        raise
    unique = list(distinct.values())
    decision = TaskDecision(
        task=task,
        recruited=bool(keep),
        gate=sum(expected[n] for n in unique) / len(unique),
        coefficients=coefficients,
        bytes=size,
        adapter=adapter_name if keep else None,
        gate_eval=sum(layers[n].eval_gate() for n in unique) / len(unique),
        open_probability=sum(opened[n] for n in unique) / len(unique),
        bank=list(spec.bank_names),
        modules_recruited=keep,
        gates={n: expected[n] for n in unique},
    )
    remove_adapter(model)
    return decision
