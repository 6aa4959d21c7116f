"""Which modules get which adapter: matching, injection, freezing, and the report.

``apply_adapter`` validates everything first (targets exist, types fit, ranks fit, no module
claimed twice) and builds every replacement before it touches the model, so a bad spec leaves
the model exactly as it was.
"""

from __future__ import annotations

import ast
import difflib
import functools
import hashlib
import inspect
import json
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_peft.adapters.base import AdapterLayer, AdapterSpec, name_matches
from lightning_peft.gradient_check import GradientCheck
from lightning_peft.trained_buffers import BufferWatch, NormStats, freeze_running_stats, running_stat_buffers
from lightning_peft.validation import check_bool, check_choice, check_name_pattern, check_str_list

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
        lines = [f"{'module':<{width}}  {'adapter':<8}  {'detail':<22}  {'trainable':>11}"]
        lines += [f"{m:<{width}}  {k:<8}  {d:<22}  {n:>11,}" for m, k, d, n in self.rows]
        lines.append(f"trainable {self.trainable:,} / total {self.total:,} parameters ({100 * self.trainable_fraction:.3f}%)")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


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


def resolve_targets(model: nn.Module, spec: AdapterSpec, protected: Sequence[str] = ()) -> list[str]:
    """Names of the modules ``spec`` adapts in ``model``; raises if it matches nothing.

    ``protected`` names (fully trainable modules) are never selected by the generic
    ``"all-linear"`` / default patterns.
    """
    modules = dict(model.named_modules())
    if spec.module_path:
        if spec.module_path not in modules:
            near = _nearest_names(spec.module_path, list(modules))
            raise ValueError(f"module_path {spec.module_path!r} is not a submodule of {type(model).__name__}; nearest names: {near}")
        prefix = spec.module_path + "."
        modules = {n: m for n, m in modules.items() if n == spec.module_path or n.startswith(prefix)}
    targets = spec.target_modules if spec.target_modules is not None else spec.default_targets()
    generic = targets == "all-linear" or spec.target_modules is None
    adapters = [n for n, m in modules.items() if isinstance(m, AdapterLayer)]

    def excluded(name: str) -> bool:
        if any(name_matches(name, e) for e in spec.exclude_modules):
            return True
        if any(name == n or name.startswith(n + ".") for n in adapters):  # an adapter or inside one
            return True
        return generic and any(name == p or name.startswith(p + ".") for p in protected)

    if targets == "all-linear":
        heads = output_head_names(model)
        chosen = [n for n, m in modules.items() if isinstance(m, nn.Linear) and n not in heads]
    elif isinstance(targets, str):
        pattern = re.compile(targets.removeprefix("re:"))
        chosen = [n for n in modules if pattern.fullmatch(n)]
    else:
        chosen = [n for n in modules if any(name_matches(n, e) for e in targets)]
    before_exclusion = [n for n in chosen if spec.supports(modules[n])]
    chosen = [n for n in chosen if not excluded(n)]
    supported = [n for n in chosen if spec.supports(modules[n])]

    # every explicit entry must match something adaptable
    for entry in targets if isinstance(targets, list) else []:
        hits = [n for n in chosen if name_matches(n, entry)]
        if not any(n in supported for n in hits):
            matched = [n for n in modules if name_matches(n, entry)]
            removed = [n for n in matched if any(name_matches(n, e) for e in spec.exclude_modules)]
            if matched and not hits and removed:
                rules = sorted({e for n in removed for e in spec.exclude_modules if name_matches(n, e)})
                raise ValueError(
                    f"target {entry!r} matches {removed[:5]}, but exclude_modules {rules} removed every match. "
                    f"Remove {entry!r} from target_modules or narrow exclude_modules"
                )
            if matched and not hits:  # every match is an adapter layer already, or inside one
                raise ValueError(
                    f"target {entry!r} matches {matched[:5]}, which are already adapted; give each module one adapter "
                    f"(remove {entry!r} from target_modules)"
                )
            if hits:
                kinds = sorted({type(modules[n]).__name__ for n in hits})
                inner = [n for n in modules if n.startswith(hits[0] + ".") and spec.supports(modules[n])][:5]
                raise ValueError(
                    f"target {entry!r} matches only {kinds} modules, which {type(spec).__name__} cannot adapt. "
                    f"Adaptable modules inside {hits[0]!r}: {inner or 'none'}"
                )
            raise ValueError(
                f"target {entry!r} matches no module of {type(model).__name__}. "
                f"Nearest module names: {_nearest_names(entry, list(modules))}"
            )
    if not supported:
        if spec.exclude_modules and not chosen and before_exclusion:
            raise ValueError(
                f"{type(spec).__name__}(target_modules={targets!r}) matches {before_exclusion[:5]}, but exclude_modules "
                f"{spec.exclude_modules} removed every match; narrow exclude_modules or widen target_modules"
            )
        linear = [n for n, m in modules.items() if spec.supports(m)][:8]
        raise ValueError(
            f"{type(spec).__name__}(target_modules={targets!r}) matches no module it can adapt in {type(model).__name__}. "
            f"Adaptable modules include: {linear or 'none'}; nearest names: {_nearest_names(str(targets), list(modules))}"
        )
    return supported


# --------------------------------------------------------------------------------------------
# Fingerprints: identify the base an adapter was made for
# --------------------------------------------------------------------------------------------
def module_fingerprint(module: nn.Module) -> str:
    """A short hash of a module's own weights (shape and 1,024 strided samples, rounded to
    bf16 so fp32/bf16 copies of one base agree). Cheap even for large layers."""
    digest = hashlib.sha256()
    for name, param in sorted(module.named_parameters(recurse=False)):
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
    trainable_patterns = list(trainable_modules or [])

    # 1. resolve and validate every target, build every replacement: nothing is changed yet
    claimed: dict[str, AdapterSpec] = {}
    for spec in specs:
        for name in resolve_targets(model, spec, protected=trainable):
            if name in claimed:
                raise ValueError(f"module {name!r} is targeted by both {claimed[name]!r} and {spec!r}; give each module one adapter")
            if any(name == t or name.startswith(t + ".") for t in trainable) and not spec.trains_base:
                raise ValueError(
                    f"module {name!r} is both adapted by {type(spec).__name__} and listed in trainable_modules; "
                    "exclude it from one of them"
                )
            claimed[name] = spec
    claimed = _redirect_to_weight_readers(model, claimed, trainable)
    modules = dict(model.named_modules())
    replacements: dict[str, nn.Module] = {}
    for name, spec in claimed.items():
        new = spec.wrap(name, modules[name])
        if new is not modules[name]:
            new.base_fingerprint = module_fingerprint(modules[name])
            new.train(modules[name].training)  # an eval-mode model stays in eval mode (no adapter dropout)
            replacements[name] = new
    _check_weight_readers(model, replacements)

    # 2. change the model
    model.requires_grad_(False)
    for name, new in replacements.items():
        model.set_submodule(name, new)
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
    if norm_stats == "freeze":
        freeze_running_stats(model)
    buffers = running_stat_buffers(model)
    record = AdapterRecord(specs, {n: s.kind for n, s in claimed.items()}, trainable, buffers, norm_stats)
    record.buffer_watch = BufferWatch(model, ignore=set(buffers) | set(trainable_state_keys(model)))
    object.__setattr__(model, RECORD_ATTRIBUTE, record)
    if check_gradients:
        GradientCheck(model)  # lives in the parameters' hooks until it concludes
    return make_report(model, rows, trainable_patterns)


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


def make_report(
    model: nn.Module, rows: list[tuple[str, str, str, int]], trainable_patterns: Sequence[str] = ()
) -> AdapterReport:
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
        rows=out_rows, trainable=trainable, total=sum(parameter_count(p) for p in params),
        notes=notes, tied=tied_all, trainable_matches=matches,
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


# --------------------------------------------------------------------------------------------
# Parents that read a child's weights instead of calling it
# --------------------------------------------------------------------------------------------
def _redirect_to_weight_readers(model: nn.Module, claimed: dict[str, AdapterSpec], trainable: Sequence[str] = ()) -> dict[str, AdapterSpec]:
    """Targets moved to the ``nn.MultiheadAttention`` that applies them (before any wrap).

    An attention module reads ``out_proj.weight`` and its packed q/k/v weights itself, so:

    * the attention module itself targeted by name: one layer adapts q, k, v and out;
    * its ``out_proj`` targeted by name: only out is adapted (``out_proj`` is wrapped by a layer
      that hands the parent its effective weight);
    * ``out_proj`` picked by ``"all-linear"`` (or the spec's default targets): the attention
      module is adapted instead, q, k, v and out (q/k/v are linear maps too);
    * both targeted: ``out_proj`` is dropped (the attention layer adapts out).

    Raises (before anything changes) when a ``trainable_modules`` entry lies inside an adapted
    attention module, which the adapter layer replaces."""
    modules = dict(model.named_modules())
    out: dict[str, AdapterSpec] = {}
    for name, spec in claimed.items():
        parent_name = name.rpartition(".")[0]
        parent = modules.get(parent_name) if "." in name else None
        is_out_proj = isinstance(parent, nn.MultiheadAttention) and parent.out_proj is modules[name]
        generic = spec.target_modules is None or spec.target_modules == "all-linear"
        if is_out_proj and parent_name in claimed:
            continue
        if is_out_proj and generic and spec.supports(parent):
            out.setdefault(parent_name, spec)
            continue
        out[name] = spec
    for name, module in modules.items():
        if name in out and isinstance(module, nn.MultiheadAttention):
            inside = [t for t in trainable if t.startswith(name + ".")]
            if inside:
                raise ValueError(
                    f"trainable_modules {inside} lie inside {name!r} (nn.MultiheadAttention), which "
                    f"{type(out[name]).__name__} adapts as a whole: drop them from trainable_modules, "
                    f"or exclude {name!r} from the targets"
                )
    return out


@functools.lru_cache(maxsize=256)
def _forward_attribute_reads(cls: type) -> frozenset[tuple[str, ...]]:
    """Every ``self.a.b...`` chain (two names or more) in ``cls.forward`` and the methods of
    ``cls`` it calls (transitively), e.g. ``("proj", "weight")``; empty where the source cannot
    be read. Read from the AST, so comments and strings do not count."""
    chains: set[tuple[str, ...]] = set()
    seen: set[str] = set()
    todo = ["forward"]
    while todo:
        method = todo.pop()
        if method in seen:
            continue
        seen.add(method)
        fn = getattr(cls, method, None)
        if not inspect.isfunction(fn) or fn.__qualname__.split(".")[0] == "Module":  # nn.Module's own methods
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        except (OSError, TypeError, SyntaxError):  # no source (compiled, dynamic, builtin): nothing known
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name) and node.func.value.id == "self":
                todo.append(node.func.attr)  # self.method(...): follow it
            if isinstance(node, ast.Attribute):
                parts: list[str] = []
                inner: ast.expr = node
                while isinstance(inner, ast.Attribute):
                    parts.append(inner.attr)
                    inner = inner.value
                if isinstance(inner, ast.Name) and inner.id == "self" and len(parts) >= 2:
                    chains.add(tuple(reversed(parts)))
    return frozenset(chains)


def _keep_off_fused_path(module: nn.Module, args: tuple) -> None:
    """A no-op forward pre-hook. ``nn.TransformerEncoderLayer``'s fused inference path
    (``torch._transformer_encoder_layer_fwd``) reads its children's weights directly and is
    skipped when any submodule has a hook: adapter layers inside one carry this hook."""


def _check_weight_readers(model: nn.Module, replacements: dict[str, nn.Module]) -> None:
    """Refuse replacements whose parent reads an attribute of the replaced child that the
    adapter layer lacks (``self.proj.weight`` in ``forward`` instead of ``self.proj(x)``).
    Called once every replacement is built and nothing in ``model`` has changed yet; when
    everything passes, keeps torch's fused transformer paths off the adapted blocks."""
    modules = dict(model.named_modules())
    problems = []
    for name, new in replacements.items():
        parts = name.split(".")
        for depth in range(len(parts)):  # every ancestor, the model itself included
            owner_name = ".".join(parts[:depth])
            owner = modules[owner_name]
            if type(owner).forward is nn.TransformerEncoderLayer.forward:
                continue  # reads weights only on its fused path, which the hook below keeps off
            rel = tuple(parts[depth:])
            read = {chain[len(rel)] for chain in _forward_attribute_reads(type(owner)) if len(chain) > len(rel) and chain[: len(rel)] == rel}
            missing = sorted(attr for attr in read if not hasattr(new, attr))
            if missing:
                problems.append((name, owner_name, type(owner).__name__, ".".join(rel), missing, type(new).__name__))
    if problems:
        name, owner_name, owner_type, rel, missing, new_type = problems[0]
        reads = ", ".join(f"self.{rel}.{m}" for m in missing)
        names = list(dict.fromkeys(p[0] for p in problems))
        exclude = [name] if len(names) == 1 else sorted({n.rsplit(".", 1)[-1] for n in names})
        more = f" The same holds for {len(names) - 1} more: {names[1:6]}." if len(names) > 1 else ""
        raise ValueError(
            f"cannot adapt {name!r}: its parent {owner_name or '<model>'!r} ({owner_type}) reads {reads} in forward, "
            f"which {new_type} does not have (the parent uses the child's weights itself instead of only calling "
            f"self.{rel}(...)).{more} Exclude it (exclude_modules={exclude!r}), train it fully (trainable_modules=[{name!r}]) "
            "or target the modules the parent calls instead. The model was not changed."
        )
    for name, new in replacements.items():
        parts = name.split(".")
        owners = [modules[".".join(parts[:d])] for d in range(len(parts))]
        if any(isinstance(o, nn.TransformerEncoderLayer) for o in owners):
            new.register_forward_pre_hook(_keep_off_fused_path)
        for owner in owners:
            if isinstance(owner, nn.TransformerEncoder):
                owner.use_nested_tensor = False  # its nested-tensor fast path reads the layers' weights directly
