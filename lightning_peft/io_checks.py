"""Validation of adapter files before anything is loaded: damaged, partial or foreign files.

``load_adapter`` calls :func:`check_metadata` on the file's description and then
:func:`plan_load`, which works out, *without changing the model*, everything loading would do:
the specs (through the registry), the adapter layers each target would become (built on a
throwaway ``copy.deepcopy`` of that one module), and the exact tensor every state key would
receive. Every problem is collected and reported at once, naming the file, the module and the
tensor:

* the model lacks a target, or its shape differs (does not fit: load it into its base);
* the base weights differ from the recorded fingerprints, or the fingerprints were removed
  (refused unless ``strict_base=False``, the only problems that flag lifts);
* a tensor the specs imply is missing, a tensor maps to nothing, a shape or dtype kind differs,
  or a value is NaN/inf (the file is damaged).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_peft.adapters.base import AdapterLayer, AdapterSpec
from lightning_peft.adapters.registry import spec_from_config
from lightning_peft.targeting import adapter_record, combine_fingerprints, module_fingerprint

PEFT_PREFIX = "base_model.model."
FORMAT_VERSION = 1


def _damaged(source: str, what: str) -> ValueError:
    return ValueError(f"adapter file {source!r} is damaged: {what}. Re-export it with save_adapter from the trained model.")


def check_metadata(meta: Any, source: str) -> dict[str, Any]:
    """Check the structure of a file's ``lightning_peft`` metadata (types of every field the
    loader reads); returns it. Raises ``ValueError`` naming ``source`` and the field."""
    if not isinstance(meta, dict):
        raise _damaged(source, f"its metadata is a {type(meta).__name__}, not a JSON object")
    if "format_version" not in meta:
        raise _damaged(source, "its metadata lacks 'format_version'")
    if meta["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"adapter file {source!r} has format {meta['format_version']!r}; this lightning-peft reads format "
            f"{FORMAT_VERSION}. Load it with the version that wrote it, or re-export it."
        )
    fields: dict[str, tuple[type | tuple[type, ...], str]] = {
        "specs": (list, "a list"),
        "targets": (dict, "an object"),
        "record_prefix": (str, "a string"),
        "export_root": (str, "a string"),
        "trainable_modules": (list, "a list"),
        "base_model": (str, "a string"),
        "base_fingerprint": (str, "a string"),
    }
    for key, (kind, words) in fields.items():
        if key not in meta:
            raise _damaged(source, f"its metadata lacks {key!r}")
        if not isinstance(meta[key], kind):
            raise _damaged(source, f"metadata {key!r} must be {words}, got {type(meta[key]).__name__}")
    if not isinstance(meta.get("peft_layout", False), bool):
        raise _damaged(source, "metadata 'peft_layout' must be true or false")
    if meta.get("norm_stats", "train") not in ("train", "freeze"):
        raise _damaged(source, f"metadata 'norm_stats' must be 'train' or 'freeze', got {meta.get('norm_stats')!r}")
    buffers = meta.get("trained_buffers", [])
    if not (isinstance(buffers, list) and all(isinstance(b, str) and b for b in buffers)):
        raise _damaged(source, "metadata 'trained_buffers' must be a list of buffer names")
    if not meta["specs"]:
        raise _damaged(source, "its metadata names no adapter spec")
    if not all(isinstance(t, str) and t for t in meta["trainable_modules"]):
        raise _damaged(source, "metadata 'trainable_modules' must be module names")
    if not meta["targets"]:
        raise _damaged(source, "its metadata names no adapted module")
    for name, entry in meta["targets"].items():
        where = f"metadata target {name!r}"
        if not name or not isinstance(entry, dict):
            raise _damaged(source, f"{where} is not an object")
        spec = entry.get("spec")
        if type(spec) is not int or not 0 <= spec < len(meta["specs"]):
            raise _damaged(source, f"{where} names spec {spec!r}, but the file has specs 0..{len(meta['specs']) - 1}")
        if not isinstance(entry.get("kind"), str):
            raise _damaged(source, f"{where} lacks its adapter 'kind'")
        if "fingerprint" in entry and not isinstance(entry["fingerprint"], str):
            raise _damaged(source, f"{where} has a fingerprint that is not a string")
        shape = entry.get("shape")
        if shape is not None and not (isinstance(shape, list) and len(shape) == 2 and all(type(s) is int and s > 0 for s in shape)):
            raise _damaged(source, f"{where} has shape {shape!r}, not [out_features, in_features]")
    return meta


class _Tracked(dict):  # type: ignore[type-arg]
    """A dict that remembers which keys were read (which file tensors a conversion used)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.used: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self.used.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        if key in self:
            self.used.add(key)
        return super().get(key, default)


@dataclass
class LoadPlan:
    """What ``load_adapter`` will do, worked out without touching the model."""

    specs: list[AdapterSpec] | None  # None: the model already has the adapters
    apply_prefix: str  # the submodule apply_adapter is called on
    trainable: list[str]
    state: dict[str, torch.Tensor]  # model key -> value (already in the target's dtype)
    warnings: list[str] = field(default_factory=list)


def _meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers live on the meta device (shapes and
    dtypes, no memory)."""
    memo: dict[int, Any] = {}
    for t in [*module.parameters(), *module.buffers()]:
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


def _would_be(spec: AdapterSpec, name: str, module: nn.Module) -> nn.Module:
    """What ``spec.wrap`` makes of ``module``, built on a throwaway copy: on the meta device
    when the spec can wrap that (no memory), else on a real copy (e.g. QLoRA quantizes). The
    throwaway adapter's random init does not advance the caller's random streams."""
    devices = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        try:
            return spec.wrap(name, _meta_copy(module))
        except Exception:  # noqa: BLE001 - the meta device is only a shortcut; the real copy decides
            return spec.wrap(name, copy.deepcopy(module))


def _meta(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v if v.device.type == "meta" else torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in tensors.items()}


def _kind_of(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "float" if dtype.is_floating_point else "integer"


def _layer_tensors(
    layer: AdapterLayer,
    target: str,
    prefix: str,
    own: dict[str, torch.Tensor],
    entry: dict[str, Any],
    peft_layout: bool,
    pool: dict[str, torch.Tensor],
    damage: list[str],
) -> dict[str, torch.Tensor]:
    """The adapter tensors (model keys) ``layer`` gets from the file tensors ``own`` (keys
    relative to the layer; ``prefix`` is their file prefix), converted from peft's layout when
    ``peft_layout``. Problems go to ``damage``; trained base tensors inside the layer to ``pool``."""
    expected = layer.adapter_state_dict()
    if peft_layout:
        tracked = _Tracked(own)
        try:
            converted = layer.from_peft_state_dict(tracked, entry)
        except KeyError as error:
            key = str(error.args[0]) if error.args else "?"
            if "." not in key:  # a metadata field the conversion needs, not a tensor
                damage.append(f"{target!r}: its metadata entry lacks {key!r}")
            else:
                try:  # all the absent ones, where the layer can list them (a meta throwaway may not)
                    absent = set(layer.peft_state_dict()) - set(own)
                except Exception:  # noqa: BLE001
                    absent = set()
                missing = sorted({key} | absent)
                damage.append(f"{target!r}: missing tensors {[prefix + k for k in missing][:6]}")
            return {}
        except (ValueError, RuntimeError, TypeError, IndexError) as error:
            damage.append(f"{target!r}: its tensors do not fit its saved metadata ({error})")
            return {}
        # an identity conversion passes tensors through: those not in the layer are leftovers
        reads = set(tracked.used)
        passed = {k for k in own if dict.get(converted, k) is own[k]}
        used = reads | {k for k in passed if k in expected}
        converted = {k: v for k, v in converted.items() if k not in passed or k in expected}
    else:
        converted = {k: v for k, v in own.items() if k in expected}
        used = set(converted)
    for k in sorted(set(own) - used):
        if k.startswith("base_layer."):  # a trained base tensor inside the layer (a spec that trains_base)
            pool[f"{target}.{k}"] = own[k]
        else:
            damage.append(f"{target!r}: unknown tensor {prefix + k!r}")
    missing = sorted(set(expected) - set(converted))
    if missing:
        damage.append(f"{target!r}: missing tensors {[prefix + k for k in missing][:6]}")
    unknown = sorted(set(converted) - set(expected))
    if unknown:
        damage.append(f"{target!r}: its tensors convert to unknown adapter tensors {unknown[:6]}")
    return {f"{target}.{k}": v for k, v in converted.items() if k in expected}


class _Planner:
    """The state ``plan_load`` builds up: the model's modules, how file names map onto them,
    and the problems found so far, in three kinds (the model does not fit the file; the base
    differs, which ``strict_base=False`` lifts; the file itself is damaged)."""

    def __init__(self, model: nn.Module, source: str, meta: dict[str, Any]) -> None:
        self.model, self.source, self.meta = model, source, meta
        self.export_root: str = meta["export_root"]
        self.modules = dict(model.named_modules())
        # the model may be the saved top-level module or the export root itself (e.g. a bare HF model)
        self.offset = "" if not self.export_root or self.export_root in self.modules else self.export_root
        self.warnings: list[str] = []
        self.fit: list[str] = []
        self.base: list[str] = []
        self.damage: list[str] = []
        self.state: dict[str, torch.Tensor] = {}
        self.pool: dict[str, torch.Tensor] = {}  # model key -> value, for everything outside adapter layers
        self.replaced: dict[str, dict[str, torch.Tensor]] = {}  # target -> its would-be layer's state (meta)
        self.required: list[str] = []
        self.existing = adapter_record(model)

    def local(self, name: str) -> str | None:
        """A file's module name as a name in this model (``None``: outside it)."""
        if not self.offset:
            return name
        return name[len(self.offset) + 1 :] if name.startswith(self.offset + ".") else None

    def model_key(self, file_key: str) -> str:
        rel = file_key[len(PEFT_PREFIX) :]
        return f"{self.export_root}.{rel}" if self.export_root and not self.offset else rel

    def specs(self) -> list[AdapterSpec] | None:
        """The file's specs (through the registry) when the model has no adapters yet."""
        if self.existing is not None:
            return None
        specs = [spec_from_config(config, f"{self.source} (spec {i})") for i, config in enumerate(self.meta["specs"])]
        for name, entry in self.meta["targets"].items():
            if specs[entry["spec"]].kind != entry["kind"]:
                kind = specs[entry["spec"]].kind
                self.damage.append(f"target {name!r} has kind {entry['kind']!r} but its spec {entry['spec']} is a {kind!r}")
        return specs

    def group(
        self, tensors: dict[str, torch.Tensor], extra: dict[str, torch.Tensor]
    ) -> tuple[dict[str, str], dict[str, dict[str, torch.Tensor]]]:
        """``(file prefix per target, file tensors per target)`` (longest matching target
        prefix); tensors of no target go to the pool."""
        root = self.export_root
        file_prefix = {self.local(n): PEFT_PREFIX + (n[len(root) + 1 :] if root else n) + "." for n in self.meta["targets"]}
        file_prefix.pop(None, None)
        groups: dict[str, dict[str, torch.Tensor]] = {t: {} for t in file_prefix}
        for key, value in tensors.items():
            if not key.startswith(PEFT_PREFIX):
                self.damage.append(f"tensor {key!r} is not under {PEFT_PREFIX!r}")
                continue
            owner = max((t for t, p in file_prefix.items() if key.startswith(p)), key=len, default=None)
            if owner is None:
                self.pool[self.model_key(key)] = value
            else:
                groups[owner][key[len(file_prefix[owner]) :]] = value
        if not self.offset:
            self.pool.update(extra)
        elif extra:
            self.warnings.append(
                f"{len(extra)} trained tensors outside {root!r} ({sorted(extra)[:3]}...) were not loaded: this model has no such modules"
            )
        return file_prefix, groups  # type: ignore[return-value]

    def _existing_layer(self, target: str, module: nn.Module, entry: dict[str, Any]) -> tuple[nn.Module, str | None] | None:
        """``(layer, its base fingerprint)`` of a model that already has adapters, or ``None``
        (a problem was recorded)."""
        shape = entry.get("shape")
        if not isinstance(module, AdapterLayer):
            if shape is not None or "fingerprint" in entry:
                self.fit.append(f"{target!r}: has no adapter in this model (it has adapters elsewhere)")
                return None
            return module, None
        if module.spec.kind != entry["kind"]:
            self.fit.append(f"{target!r}: holds a {module.spec.kind!r} adapter here, the file a {entry['kind']!r} one")
            return None
        if shape and module.base_shape != shape:
            self.fit.append(f"{target!r}: shape {module.base_shape} != saved {shape}")
            return None
        return module, module.base_fingerprint

    def _new_layer(self, spec: AdapterSpec, target: str, module: nn.Module, entry: dict[str, Any]) -> tuple[nn.Module, str | None] | None:
        """``(what spec.wrap would make of module, the base fingerprint)``, built on a throwaway
        copy, or ``None`` (a problem was recorded)."""
        shape = entry.get("shape")
        if shape and isinstance(module, nn.Linear) and [module.out_features, module.in_features] != shape:
            self.fit.append(f"{target!r}: shape [out={module.out_features}, in={module.in_features}] != saved {shape}")
            return None
        try:
            layer = _would_be(spec, target, module)
        except (TypeError, ValueError) as error:
            self.fit.append(f"{target!r}: {error}")
            return None
        self.required += [f"{target}.{p}" for p in spec.base_parameters_to_train(target, layer)]
        return layer, (module_fingerprint(module) if isinstance(layer, AdapterLayer) else None)

    def target(self, name: str, entry: dict[str, Any], specs: list[AdapterSpec] | None, prefix: str, own: dict[str, torch.Tensor]) -> None:
        """Check one target (the module it is or would become, its base, its tensors) and
        add the tensors it receives to the plan."""
        target = self.local(name)
        module = self.modules.get(target) if target is not None else None
        if module is None:
            self.fit.append(f"{target!r}: no such module" if target else f"{name!r}: outside this model")
            return
        if specs is None:
            found = self._existing_layer(target, module, entry)
        else:
            found = self._new_layer(specs[entry["spec"]], target, module, entry)
        if found is None:
            return
        layer, current = found
        if not isinstance(layer, AdapterLayer):  # changed in place (BitFit, full): plain module tensors
            # the frozen part's fingerprint (older files and full fine-tunes record none)
            if "fingerprint" in entry and module_fingerprint(module, exclude=set(own)) != entry["fingerprint"]:
                self.base.append(f"{target!r}: frozen base weights differ from the ones the adapter was trained on")
            self.pool.update({f"{target}.{k}": v for k, v in own.items()})
            return
        if "fingerprint" not in entry:
            self.base.append(f"{target!r}: the file records no base fingerprint for it (removed or damaged)")
        elif current != entry["fingerprint"]:
            self.base.append(f"{target!r}: base weights differ from the ones the adapter was trained on")
        if specs is not None:
            self.replaced[target] = _meta(dict(layer.state_dict(keep_vars=True)))
        self.state.update(_layer_tensors(layer, target, prefix, own, entry, bool(self.meta.get("peft_layout")), self.pool, self.damage))

    def would_be_state(self) -> dict[str, torch.Tensor]:
        """Every key the loaded model will have (meta tensors for new layers); pool tensors
        with a counterpart join the plan."""
        shapes: dict[str, torch.Tensor] = {
            k: v for k, v in self.model.state_dict(keep_vars=True).items() if not any(k.startswith(t + ".") for t in self.replaced)
        }
        for t, layer_state in self.replaced.items():
            shapes.update({f"{t}.{k}": v for k, v in layer_state.items()})
        for key, value in self.pool.items():
            if key not in shapes:
                self.damage.append(f"tensor {key!r} has no counterpart in this {type(self.model).__name__}")
            else:
                self.state[key] = value
        return shapes

    def trainable(self, shapes: dict[str, torch.Tensor]) -> tuple[str, list[str]]:
        """``(the prefix apply_adapter runs on, trainable_modules relative to it)``; records the
        tensors those modules imply that the file lacks."""
        meta = self.meta
        prefix = self.local(meta["record_prefix"]) if meta["record_prefix"] else ""
        trainable: list[str] = []
        if prefix is None or (prefix and prefix not in self.modules):
            self.fit.append(f"the adapters were applied to {meta['record_prefix']!r}, which this model lacks")
            prefix = ""
        for entry_name in meta["trainable_modules"]:
            t = self.local(entry_name)
            if t is None or t not in self.modules:
                continue  # outside the export root this model is (warned about with the tensors)
            trainable.append(t[len(prefix) + 1 :] if prefix else t)
            ids = {id(p) for p in self.modules[t].parameters()}
            self.required += [n for n, p in self.model.named_parameters() if id(p) in ids]
        missing_required = [k for k in dict.fromkeys(self.required) if k not in self.state and k in shapes]
        if missing_required:
            self.damage.append(f"missing trained tensors {missing_required[:6]}")
        return prefix, trainable

    def check_values(self, shapes: dict[str, torch.Tensor]) -> None:
        """Shape, dtype kind and finiteness of every planned tensor (also after the cast to
        the model's dtype, which replaces the value in the plan)."""
        nonfinite: list[str] = []
        for key, value in list(self.state.items()):
            like = shapes[key]
            if tuple(value.shape) != tuple(like.shape):
                self.damage.append(f"tensor {key!r}: saved shape {tuple(value.shape)} != model {tuple(like.shape)}")
                continue
            if _kind_of(value.dtype) != _kind_of(like.dtype):
                self.damage.append(f"tensor {key!r}: saved dtype {value.dtype} cannot hold the model's {like.dtype} values")
                continue
            cast = value.to(like.dtype) if value.dtype != like.dtype else value
            if (cast.is_floating_point() or cast.is_complex()) and not bool(torch.isfinite(cast).all()):
                nonfinite.append(key)
                continue
            self.state[key] = cast
        if nonfinite:
            self.damage.append(f"non-finite values (NaN/inf, in the file or after casting to the model's dtype) in {nonfinite[:6]}")

    def raise_problems(self, describe: Callable[[nn.Module], str], base_lift: str | None) -> None:
        """One ``ValueError`` with every problem found, if any; ``base_lift`` says what lets a
        changed base load (named only when that alone would make the file load; ``None``:
        nothing does)."""
        fit, base, damage, meta = self.fit, self.base, self.damage, self.meta
        if not (fit or base or damage):
            return
        problems = fit + base + damage
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} in all)" if len(problems) > 8 else "")
        if not fit and not base:
            raise ValueError(
                f"adapter file {self.source!r} is damaged or incomplete: {shown}. Re-export it with save_adapter from the trained model."
            )
        this = describe(self.model.get_submodule(self.export_root) if self.export_root and not self.offset else self.model)
        lift = base_lift is not None and not fit and not damage  # lifting the base checks would make exactly this load
        raise ValueError(
            f"adapter at {self.source!r} was made for base {meta['base_model']!r} (fingerprint {meta['base_fingerprint']}), "
            f"and does not fit this {this!r}: {shown}. Load it into the base it was trained on"
            + (f" (or {base_lift} if you changed the base on purpose)." if lift else ".")
        )

    def retargeted(self, specs: list[AdapterSpec], prefix: str) -> list[AdapterSpec]:
        """Each spec pinned to exactly the modules the file names for it (relative to ``prefix``)."""
        out = []
        for i, spec in enumerate(specs):
            names = [t for n, e in self.meta["targets"].items() if e["spec"] == i and (t := self.local(n)) is not None]
            if not names:
                model = type(self.model).__name__
                raise ValueError(f"adapter file {self.source!r}: spec {i} ({spec.kind}) adapts none of the modules of this {model}")
            out.append(spec.retargeted([n[len(prefix) + 1 :] if prefix else n for n in names]))
        return out


def plan_load(
    model: nn.Module,
    source: str,
    meta: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    extra: dict[str, torch.Tensor],
    strict_base: bool,
    describe: Callable[[nn.Module], str],
    base_lift: str | None = "pass strict_base=False",
) -> LoadPlan:
    """Validate the file against ``model`` and return the plan; raises ``ValueError`` with
    every problem found (see the module docstring). ``model`` is not changed. ``base_lift``:
    what the error suggests for a changed base (``None`` where the caller has no such option)."""
    planner = _Planner(model, source, meta)
    specs = planner.specs()
    file_prefix, groups = planner.group(tensors, extra)
    for name, entry in meta["targets"].items():
        target = planner.local(name)
        planner.target(name, entry, specs, file_prefix.get(target, ""), groups.pop(target, {}) if target is not None else {})
    recorded = {n: e["fingerprint"] for n, e in meta["targets"].items() if "fingerprint" in e}
    if combine_fingerprints(recorded) != meta["base_fingerprint"]:
        planner.base.append("the per-module fingerprints do not combine to the recorded base fingerprint (edited or damaged)")
    if not strict_base:
        planner.base = []
    shapes = planner.would_be_state()
    prefix, trainable = planner.trainable(shapes)
    planner.check_values(shapes)
    planner.raise_problems(describe, base_lift)
    if specs is not None:
        specs = planner.retargeted(specs, prefix)
    return LoadPlan(specs=specs, apply_prefix=prefix, trainable=trainable, state=planner.state, warnings=planner.warnings)
