"""Which modules get which adapter: matching, injection, freezing, and the report.

The report's table is ``lightning_peft.report``; the refusal of parents that read a child's
weights is ``lightning_peft.weight_readers`` (both re-exported here).

``apply_adapter`` validates everything first (targets exist, types fit, ranks fit, no module
claimed twice) and builds every replacement before it touches the model, so a bad spec leaves
the model exactly as it was.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_peft.adapters.base import AdapterLayer, AdapterSpec, name_matches
from lightning_peft.gradient_check import GradientCheck
from lightning_peft.report import AdapterReport, parameter_count, tied_parameters
from lightning_peft.trained_buffers import BufferWatch, NormStats, freeze_running_stats, running_stat_buffers
from lightning_peft.validation import check_bool, check_choice, check_name_pattern, check_str_list
from lightning_peft.weight_readers import check_weight_readers, redirect_to_weight_readers

#: leaf names of output heads that "all-linear" leaves alone (train them via trainable_modules)
OUTPUT_HEAD_NAMES = ("lm_head", "head", "classifier", "score")
RECORD_ATTRIBUTE = "_lightning_peft_record"


@dataclass
class AdapterRecord:
    """What ``apply_adapter`` did, kept on the model (not a submodule, not in its state dict)."""

    specs: list[AdapterSpec]
    targets: dict[str, str]  # module name -> spec kind
    trainable_modules: list[str]
    #: buffers that change in training (running statistics, then any persistent buffer seen to
    #: change), relative to the adapted module: checkpoints and exports keep them
    trained_buffers: list[str] = field(default_factory=list)
    norm_stats: NormStats = "train"
    buffer_watch: BufferWatch | None = field(default=None, repr=False)
    #: hook handles specs registered on the model (``AdapterSpec.attach``); removed with the adapter
    hooks: list[Any] = field(default_factory=list, repr=False)
    #: modules changed in place (BitFit) -> ``module_fingerprint`` of the parameters they leave
    #: frozen, taken at injection: exports record it so a load into another base is refused
    fingerprints: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------------
def _nearest_names(entry: str, names: Sequence[str], n: int = 5) -> list[str]:
    key = entry.removeprefix("re:")
    leaves = sorted({name.rsplit(".", 1)[-1] for name in names if name})
    close = difflib.get_close_matches(key, leaves, n=n, cutoff=0.5)
    close += difflib.get_close_matches(key, [x for x in names if x], n=n, cutoff=0.5)
    return list(dict.fromkeys(close))[:n] or leaves[:n]


def output_head_names(model: nn.Module) -> set[str]:
    """Names of output layers that ``"all-linear"`` must not adapt."""
    heads = {name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in OUTPUT_HEAD_NAMES}
    by_id = {id(m): name for name, m in model.named_modules()}
    for module in model.modules():
        getter = getattr(module, "get_output_embeddings", None)
        if callable(getter):
            try:
                head = getter()
            except (NotImplementedError, AttributeError):
                head = None
            if head is not None and id(head) in by_id:
                heads.add(by_id[id(head)])
    return heads


def _scope(model: nn.Module, spec: AdapterSpec) -> dict[str, nn.Module]:
    """The modules ``spec`` may select: all of ``model``'s, or those below ``module_path``."""
    modules = dict(model.named_modules())
    if not spec.module_path:
        return modules
    if spec.module_path not in modules:
        near = _nearest_names(spec.module_path, list(modules))
        raise ValueError(f"module_path {spec.module_path!r} is not a submodule of {type(model).__name__}; nearest names: {near}")
    prefix = spec.module_path + "."
    return {n: m for n, m in modules.items() if n == spec.module_path or n.startswith(prefix)}


def _matched(model: nn.Module, modules: dict[str, nn.Module], targets: str | list[str]) -> list[str]:
    """The names ``targets`` selects among ``modules`` (before exclusions and type checks)."""
    if targets == "all-linear":
        heads = output_head_names(model)
        return [n for n, m in modules.items() if isinstance(m, nn.Linear) and n not in heads]
    if isinstance(targets, str):
        pattern = re.compile(targets.removeprefix("re:"))
        return [n for n in modules if pattern.fullmatch(n)]
    return [n for n in modules if any(name_matches(n, e) for e in targets)]


def _unmatched_entry_error(model: nn.Module, spec: AdapterSpec, modules: dict[str, nn.Module], entry: str, hits: list[str]) -> ValueError:
    """Why the explicit target ``entry`` selects nothing adaptable (``hits``: what it selected
    after exclusions), with the fix."""
    matched = [n for n in modules if name_matches(n, entry)]
    removed = [n for n in matched if any(name_matches(n, e) for e in spec.exclude_modules)]
    if matched and not hits and removed:
        rules = sorted({e for n in removed for e in spec.exclude_modules if name_matches(n, e)})
        return ValueError(
            f"target {entry!r} matches {removed[:5]}, but exclude_modules {rules} removed every match. "
            f"Remove {entry!r} from target_modules or narrow exclude_modules"
        )
    if matched and not hits:  # every match is an adapter layer already, or inside one
        return ValueError(
            f"target {entry!r} matches {matched[:5]}, which are already adapted; give each module one adapter "
            f"(remove {entry!r} from target_modules)"
        )
    if hits:
        kinds = sorted({type(modules[n]).__name__ for n in hits})
        inner = [n for n in modules if n.startswith(hits[0] + ".") and spec.supports(modules[n])][:5]
        return ValueError(
            f"target {entry!r} matches only {kinds} modules, which {type(spec).__name__} cannot adapt. "
            f"Adaptable modules inside {hits[0]!r}: {inner or 'none'}"
        )
    near = _nearest_names(entry, list(modules))
    return ValueError(f"target {entry!r} matches no module of {type(model).__name__}. Nearest module names: {near}")


def _nothing_adaptable_error(
    model: nn.Module,
    spec: AdapterSpec,
    modules: dict[str, nn.Module],
    targets: str | list[str],
    chosen: list[str],
    before_exclusion: list[str],
) -> ValueError:
    if spec.exclude_modules and not chosen and before_exclusion:
        return ValueError(
            f"{type(spec).__name__}(target_modules={targets!r}) matches {before_exclusion[:5]}, but exclude_modules "
            f"{spec.exclude_modules} removed every match; narrow exclude_modules or widen target_modules"
        )
    linear = [n for n, m in modules.items() if spec.supports(m)][:8]
    return ValueError(
        f"{type(spec).__name__}(target_modules={targets!r}) matches no module it can adapt in {type(model).__name__}. "
        f"Adaptable modules include: {linear or 'none'}; nearest names: {_nearest_names(str(targets), list(modules))}"
    )


def resolve_targets(model: nn.Module, spec: AdapterSpec, protected: Sequence[str] = ()) -> list[str]:
    """Names of the modules ``spec`` adapts in ``model``; raises if it matches nothing.

    ``protected`` names (fully trainable modules) are never selected by the generic
    ``"all-linear"`` / default patterns.
    """
    modules = _scope(model, spec)
    targets = spec.target_modules if spec.target_modules is not None else spec.default_targets()
    generic = targets == "all-linear" or spec.target_modules is None
    adapters = [n for n, m in modules.items() if isinstance(m, AdapterLayer)]

    def excluded(name: str) -> bool:
        if any(name_matches(name, e) for e in spec.exclude_modules):
            return True
        if any(name == n or name.startswith(n + ".") for n in adapters):  # an adapter or inside one
            return True
        return generic and any(name == p or name.startswith(p + ".") for p in protected)

    chosen = _matched(model, modules, targets)
    before_exclusion = [n for n in chosen if spec.supports(modules[n])]
    chosen = [n for n in chosen if not excluded(n)]
    supported = [n for n in chosen if spec.supports(modules[n])]
    for entry in targets if isinstance(targets, list) else []:  # every explicit entry must match something adaptable
        hits = [n for n in chosen if name_matches(n, entry)]
        if not any(n in supported for n in hits):
            raise _unmatched_entry_error(model, spec, modules, entry, hits)
    if not supported:
        raise _nothing_adaptable_error(model, spec, modules, targets, chosen, before_exclusion)
    return spec.select(model, supported)


# --------------------------------------------------------------------------------------------
# Fingerprints: identify the base an adapter was made for
# --------------------------------------------------------------------------------------------
def module_fingerprint(module: nn.Module, exclude: Collection[str] = ()) -> str:
    """A short hash of a module's own weights (shape and 1,024 strided samples, rounded to
    bf16 so fp32/bf16 copies of one base agree), leaving out the parameters named in
    ``exclude`` (those an in-place adapter trains). Cheap even for large layers."""
    digest = hashlib.sha256()
    for name, param in sorted(module.named_parameters(recurse=False)):
        if name in exclude:
            continue
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // 1024)
        sample = flat[::step][:1024].to("cpu", torch.float32).to(torch.bfloat16).view(torch.int16)
        digest.update(f"{name}:{tuple(param.shape)}:".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def combine_fingerprints(per_module: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(per_module):
        digest.update(f"{name}={per_module[name]};".encode())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Injection
# --------------------------------------------------------------------------------------------
def trainable_matches(model: nn.Module, patterns: Sequence[str]) -> dict[str, list[str]]:
    """``entry -> full module names`` each ``trainable_modules`` entry selects (outermost
    matches only: a match inside another match of the same entry trains with it). Names inside
    adapter layers (``base_layer``, ``lora_A`` ...) are never selected."""
    modules = dict(model.named_modules())
    layers = [n for n, m in modules.items() if isinstance(m, AdapterLayer)]
    names = [n for n in modules if n and not any(n.startswith(a + ".") for a in layers)]
    matches: dict[str, list[str]] = {}
    for entry in patterns:
        hits = [n for n in names if name_matches(n, entry)]
        matches[entry] = [h for h in hits if not any(h.startswith(c + ".") for c in hits if c != h)]
    return matches


def _resolve_trainable(model: nn.Module, patterns: Sequence[str] | None) -> list[str]:
    patterns = check_str_list("trainable_modules", patterns, allow_none=True, allow_empty=True) or []
    for entry in patterns:
        check_name_pattern("trainable_modules", entry)
    chosen: list[str] = []
    for entry, hits in trainable_matches(model, patterns).items():
        if not hits:
            names = [n for n, _ in model.named_modules()]
            raise ValueError(
                f"trainable_modules entry {entry!r} matches no module of {type(model).__name__}. "
                f"Nearest module names: {_nearest_names(entry, names)}"
            )
        chosen += hits
    return list(dict.fromkeys(chosen))


def apply_adapter(
    model: nn.Module,
    adapter: AdapterSpec | Sequence[AdapterSpec],
    trainable_modules: Sequence[str] | None = None,
    norm_stats: NormStats = "train",
    check_gradients: bool = True,
) -> AdapterReport:
    """Inject ``adapter`` (one spec or several, e.g. ``[ExpertLoRA(...), LoRA(...)]``) into
    ``model`` in place, freeze everything else, and return the trainable-parameter report.

    ``trainable_modules`` are module-name patterns (same matching as targets) whose parameters
    train fully, e.g. a new classification head. ``norm_stats``: ``"train"`` lets BatchNorm-like
    layers update their running statistics as usual (checkpoints and exports keep them);
    ``"freeze"`` makes them always normalise with the base's statistics (see
    ``lightning_peft.trained_buffers``).

    ``check_gradients``: watch the first 3 backward passes and warn once, naming every adapter
    layer whose gradients were all ``None`` or zero (``lightning_peft.gradient_check``); the
    hooks then remove themselves. ``AdapterCallback`` passes ``False`` and checks itself.
    """
    check_choice("norm_stats", norm_stats, ("train", "freeze"))
    check_bool("check_gradients", check_gradients)
    specs = [adapter] if isinstance(adapter, AdapterSpec) else list(adapter)
    if not specs or not all(isinstance(s, AdapterSpec) for s in specs):
        raise TypeError(f"adapter must be an AdapterSpec (LoRA, QLoRA, BitFit, ...) or a list of them, got {adapter!r}")
    if getattr(model, RECORD_ATTRIBUTE, None) is not None or any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} already has adapters; load or remove them instead of applying twice")
    trainable = _resolve_trainable(model, trainable_modules)  # validates the entries
    # 1. resolve and validate every target, build every replacement: nothing is changed yet
    claimed = redirect_to_weight_readers(model, _claim(model, specs, trainable), trainable)
    replacements = _replacements(model, claimed)
    _refuse_nesting(claimed, replacements)
    check_weight_readers(model, replacements)
    fingerprints = _in_place_fingerprints(model, claimed, replacements)
    # 2. change the model
    model.requires_grad_(False)
    for name, new in replacements.items():
        model.set_submodule(name, new)
    hooks = [h for spec in specs for h in spec.attach(model, {n: model.get_submodule(n) for n, s in claimed.items() if s is spec})]
    rows = _enable_training(model, claimed, trainable)
    if norm_stats == "freeze":
        freeze_running_stats(model)
    buffers = running_stat_buffers(model)
    targets = {n: s.kind for n, s in claimed.items()}
    record = AdapterRecord(specs, targets, trainable, buffers, norm_stats, hooks=hooks, fingerprints=fingerprints)
    record.buffer_watch = BufferWatch(model, ignore=set(buffers) | set(trainable_state_keys(model)))
    object.__setattr__(model, RECORD_ATTRIBUTE, record)
    if check_gradients:
        GradientCheck(model)  # lives in the parameters' hooks until it concludes
    return make_report(model, rows, list(trainable_modules or []))


def _claim(model: nn.Module, specs: list[AdapterSpec], trainable: list[str]) -> dict[str, AdapterSpec]:
    """``module name -> spec`` for every target; raises when a module is claimed twice or is
    both adapted and fully trained."""
    claimed: dict[str, AdapterSpec] = {}
    for spec in specs:
        for name in resolve_targets(model, spec, protected=trainable):
            if name in claimed:
                raise ValueError(f"module {name!r} is targeted by both {claimed[name]!r} and {spec!r}; give each module one adapter")
            if any(name == t or name.startswith(t + ".") for t in trainable) and not spec.trains_base:
                raise ValueError(
                    f"module {name!r} is both adapted by {type(spec).__name__} and listed in trainable_modules; exclude it from one of them"
                )
            claimed[name] = spec
    return claimed


def _refuse_nesting(claimed: dict[str, AdapterSpec], replacements: dict[str, nn.Module]) -> None:
    """A module claimed inside another module that an adapter layer replaces (LoRA on
    ``mlp.down_proj`` with HRM on ``mlp``) would end up inside the outer layer's ``base_layer``:
    refused by name. Specs that change modules in place (FullFineTune, BitFit) nest freely."""
    for inner in claimed:
        parts = inner.split(".")
        outer = next((o for o in (".".join(parts[:i]) for i in range(1, len(parts))) if o in replacements), None)
        if outer is not None:
            raise ValueError(
                f"module {inner!r} ({type(claimed[inner]).__name__}) lies inside {outer!r}, which "
                f"{type(claimed[outer]).__name__} adapts as a whole; adapt one of them: add {inner!r} (or a pattern "
                f"for it) to exclude_modules of {type(claimed[inner]).__name__}, or narrow its targets"
            )


def _in_place_fingerprints(model: nn.Module, claimed: dict[str, AdapterSpec], replacements: dict[str, nn.Module]) -> dict[str, str]:
    """``module_fingerprint`` of what each in-place target leaves frozen (BitFit: all but the
    bias), for the targets that leave something frozen (not a full fine-tune's)."""
    out = {}
    for name, spec in claimed.items():
        if name in replacements:
            continue
        module = model.get_submodule(name)
        trained = set(spec.base_parameters_to_train(name, module))
        if any(n not in trained for n, _ in module.named_parameters(recurse=False)):
            out[name] = module_fingerprint(module, exclude=trained)
    return out


def _replacements(model: nn.Module, claimed: dict[str, AdapterSpec]) -> dict[str, nn.Module]:
    """The adapter layer that replaces each claimed module (specs that change the module in
    place, as BitFit, have none), stamped with its base fingerprint; the model is unchanged."""
    modules = dict(model.named_modules())
    replacements: dict[str, nn.Module] = {}
    for name, spec in claimed.items():
        new = spec.wrap(name, modules[name])
        if new is not modules[name]:
            new.base_fingerprint = module_fingerprint(modules[name])
            new.train(modules[name].training)  # an eval-mode model stays in eval mode (no adapter dropout)
            replacements[name] = new
    return replacements


def _enable_training(model: nn.Module, claimed: dict[str, AdapterSpec], trainable: list[str]) -> list[tuple[str, str, str, int]]:
    """Switch on the gradients of the adapter tensors, the base parameters specs train and the
    fully trained modules; returns the report rows."""
    rows: list[tuple[str, str, str, int]] = []
    for name, spec in claimed.items():
        module = model.get_submodule(name)
        is_layer = isinstance(module, AdapterLayer)
        base_params = [getattr(module, pname) for pname in spec.base_parameters_to_train(name, module)]
        for p in (module.adapter_parameters() if is_layer else []) + base_params:
            p.requires_grad_(True)
        detail = ", ".join(f"{k}={v}" for k, v in module.peft_metadata().items() if not isinstance(v, (list, dict))) if is_layer else ""
        # effective count: rank-masked storage counts active slots only
        count = (module.num_trainable() if is_layer else 0) + sum(p.numel() for p in base_params)
        rows.append((name, spec.kind, detail, count))
    for name in trainable:
        module = model.get_submodule(name)
        module.requires_grad_(True)
        rows.append((name, "trained", "all parameters", sum(p.numel() for p in module.parameters())))
    return rows


def make_report(model: nn.Module, rows: list[tuple[str, str, str, int]], trainable_patterns: Sequence[str] = ()) -> AdapterReport:
    """The report of ``model`` as adapted: ``rows`` plus, for fully trained modules (rows of
    kind ``"trained"``), the parameters they share with other modules (tied weights train
    both) and, for ``trainable_patterns`` entries, the full module names they matched."""
    params = list(model.parameters())  # deduplicated (tied weights count once)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    for layer in model.modules():
        if isinstance(layer, AdapterLayer):  # storage -> effective count (equal for plain LoRA)
            trainable += layer.num_trainable() - sum(p.numel() for p in layer.adapter_parameters() if p.requires_grad)
    notes: list[str] = []
    tied_all: dict[str, list[str]] = {}
    out_rows: list[tuple[str, str, str, int]] = []
    for name, kind, detail, count in rows:
        tied = tied_parameters(model, name) if kind == "trained" else {}
        if tied:
            tied_all.update(tied)
            others = sorted({o for outside in tied.values() for o in outside})
            detail = f"{detail}; tied with {', '.join(others)}"
            for own, outside in tied.items():
                notes.append(
                    f"{own} is tied to {', '.join(outside)} (one tensor): training {name!r} also trains "
                    f"{', '.join(sorted({o.rsplit('.', 1)[0] for o in outside}))}"
                )
        out_rows.append((name, kind, detail, count))
    matches = trainable_matches(model, trainable_patterns) if trainable_patterns else {}
    for entry, hits in matches.items():
        if hits != [entry]:
            notes.append(f"trainable_modules {json.dumps(entry)} -> {json.dumps(hits)}")
    found = adapter_record(model)
    if found is not None and found[1].norm_stats == "freeze":
        notes.append("norm_stats='freeze': normalisation layers keep the base's running statistics")
    elif found is not None and found[1].trained_buffers:
        kept = trained_buffer_names(model)
        notes.append(f"buffers that change in training, kept in checkpoints and the export ({len(kept)}): {', '.join(kept)}")
    return AdapterReport(
        rows=out_rows,
        trainable=trainable,
        total=sum(parameter_count(p) for p in params),
        notes=notes,
        tied=tied_all,
        trainable_matches=matches,
    )


def adapter_record(model: nn.Module) -> tuple[str, AdapterRecord] | None:
    """``(prefix, record)`` of the module inside ``model`` that ``apply_adapter`` was called on."""
    for name, module in model.named_modules():
        record = getattr(module, RECORD_ATTRIBUTE, None)
        if record is not None:
            return name, record
    return None


def trainable_state_keys(module: nn.Module) -> list[str]:
    """State-dict keys of ``module`` that define what training produced: parameters with
    ``requires_grad``, the adapter buffers of ``AdapterLayer``s (e.g. rank masks) and the
    record's trained buffers (running statistics), in ``state_dict`` order. Adapter-only
    checkpoints hold exactly these."""
    keep = {name for name, p in module.named_parameters() if p.requires_grad}
    for name, sub in module.named_modules():
        if isinstance(sub, AdapterLayer):
            keep |= {f"{name}.{k}" if name else k for k in sub.adapter_state_dict()}
    keep |= set(trained_buffer_names(module))
    return [k for k in module.state_dict(keep_vars=True) if k in keep]


def trained_buffer_names(module: nn.Module) -> list[str]:
    """State-dict names (relative to ``module``) of the buffers training changes (see
    ``trained_buffers``), as recorded by ``apply_adapter`` on ``module`` or a submodule."""
    found = adapter_record(module)
    if found is None:
        return []
    return [f"{found[0]}.{b}" if found[0] else b for b in found[1].trained_buffers]


def refresh_trained_buffers(module: nn.Module) -> list[str]:
    """Add the persistent buffers that changed since injection to the trained buffers of
    ``module``'s adapter record; returns the names added (relative to ``module``)."""
    found = adapter_record(module)
    if found is None or found[1].buffer_watch is None:
        return []
    prefix, record = found
    changed = record.buffer_watch.changed(module.get_submodule(prefix) if prefix else module)
    record.trained_buffers += changed
    return [f"{prefix}.{b}" if prefix else b for b in changed]
