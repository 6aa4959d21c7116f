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
import re
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


def _layer_tensors(layer: AdapterLayer, target: str, prefix: str, own: dict[str, torch.Tensor], entry: dict[str, Any],
                   peft_layout: bool, pool: dict[str, torch.Tensor], damage: list[str]) -> dict[str, torch.Tensor]:
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


def plan_load(model: nn.Module, source: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
              extra: dict[str, torch.Tensor], strict_base: bool, describe: Callable[[nn.Module], str]) -> LoadPlan:
    """Validate the file against ``model`` and return the plan; raises ``ValueError`` with
    every problem found (see the module docstring). ``model`` is not changed."""
    export_root: str = meta["export_root"]
    modules = dict(model.named_modules())
    # the model may be the saved top-level module or the export root itself (e.g. a bare HF model)
    offset = "" if not export_root or export_root in modules else export_root

    def local(name: str) -> str | None:
        if not offset:
            return name
        return name[len(offset) + 1 :] if name.startswith(offset + ".") else None

    def model_key(file_key: str) -> str:
        rel = file_key[len(PEFT_PREFIX) :]
        return f"{export_root}.{rel}" if export_root and not offset else rel

    warnings: list[str] = []
    fit: list[str] = []  # the model does not fit the file
    base: list[str] = []  # base weights differ / fingerprints missing (strict_base)
    damage: list[str] = []  # the file itself is wrong

    existing = adapter_record(model)
    specs: list[AdapterSpec] | None = None
    if existing is None:
        specs = [spec_from_config(config, f"{source} (spec {i})") for i, config in enumerate(meta["specs"])]
        for name, entry in meta["targets"].items():
            if specs[entry["spec"]].kind != entry["kind"]:
                damage.append(f"target {name!r} has kind {entry['kind']!r} but its spec {entry['spec']} is a {specs[entry['spec']].kind!r}")

    # --- file tensors by target (longest matching target prefix) -----------------------------
    file_prefix = {local(n): PEFT_PREFIX + (n[len(export_root) + 1 :] if export_root else n) + "." for n in meta["targets"]}
    file_prefix.pop(None, None)
    groups: dict[str, dict[str, torch.Tensor]] = {t: {} for t in file_prefix}
    pool: dict[str, torch.Tensor] = {}  # model key -> value, for everything outside adapter layers
    for key, value in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            damage.append(f"tensor {key!r} is not under {PEFT_PREFIX!r}")
            continue
        owner = max((t for t, p in file_prefix.items() if key.startswith(p)), key=len, default=None)
        if owner is None:
            pool[model_key(key)] = value
        else:
            groups[owner][key[len(file_prefix[owner]) :]] = value
    if not offset:
        pool.update(extra)
    elif extra:
        warnings.append(
            f"{len(extra)} trained tensors outside {export_root!r} ({sorted(extra)[:3]}...) were not loaded: this model has no such modules"
        )

    # --- every target: the module it is or would become, its base, its tensors -----------------
    state: dict[str, torch.Tensor] = {}
    replaced: dict[str, dict[str, torch.Tensor]] = {}  # target -> its would-be layer's state (meta)
    required: list[str] = []
    for name, entry in meta["targets"].items():
        target = local(name)
        module = modules.get(target) if target is not None else None
        if module is None:
            fit.append(f"{target!r}: no such module" if target else f"{name!r}: outside this model")
            continue
        shape = entry.get("shape")
        if existing is not None:
            if not isinstance(module, AdapterLayer):
                if shape is not None or "fingerprint" in entry:
                    fit.append(f"{target!r}: has no adapter in this model (it has adapters elsewhere)")
                    continue
            elif getattr(module.spec, "kind", None) != entry["kind"]:
                fit.append(f"{target!r}: holds a {module.spec.kind!r} adapter here, the file a {entry['kind']!r} one")
                continue
            if shape and isinstance(module, AdapterLayer) and [module.out_features, module.in_features] != shape:
                fit.append(f"{target!r}: shape {[module.out_features, module.in_features]} != saved {shape}")
                continue
            layer, current = module, (module.base_fingerprint if isinstance(module, AdapterLayer) else None)
        else:
            if shape and hasattr(module, "in_features") and [module.out_features, module.in_features] != shape:
                fit.append(f"{target!r}: shape [out={module.out_features}, in={module.in_features}] != saved {shape}")
                continue
            assert specs is not None
            spec = specs[entry["spec"]]
            try:
                layer = _would_be(spec, target, module)
            except (TypeError, ValueError) as error:
                fit.append(f"{target!r}: {error}")
                continue
            current = module_fingerprint(module) if isinstance(layer, AdapterLayer) else None
            required += [f"{target}.{p}" for p in spec.base_parameters_to_train(target, layer)]
        own = groups.pop(target, {})
        if not isinstance(layer, AdapterLayer):  # changed in place (BitFit, full): plain module tensors
            pool.update({f"{target}.{k}": v for k, v in own.items()})
            continue
        if "fingerprint" not in entry:
            base.append(f"{target!r}: the file records no base fingerprint for it (removed or damaged)")
        elif current != entry["fingerprint"]:
            base.append(f"{target!r}: base weights differ from the ones the adapter was trained on")
        if existing is None:
            replaced[target] = _meta(dict(layer.state_dict(keep_vars=True)))
        state.update(_layer_tensors(layer, target, file_prefix[target], own, entry, bool(meta.get("peft_layout")), pool, damage))
        del layer  # a throwaway copy: one at a time
    recorded = {n: e["fingerprint"] for n, e in meta["targets"].items() if "fingerprint" in e}
    if combine_fingerprints(recorded) != meta["base_fingerprint"]:
        base.append("the per-module fingerprints do not combine to the recorded base fingerprint (edited or damaged)")
    if not strict_base:
        base = []

    # --- the would-be state: every key the loaded model will have -----------------------------
    shapes: dict[str, torch.Tensor] = {
        k: v for k, v in model.state_dict(keep_vars=True).items() if not any(k.startswith(t + ".") for t in replaced)
    }
    for t, layer_state in replaced.items():
        shapes.update({f"{t}.{k}": v for k, v in layer_state.items()})
    for key, value in pool.items():
        if key not in shapes:
            damage.append(f"tensor {key!r} has no counterpart in this {type(model).__name__}")
        else:
            state[key] = value

    # --- tensors the specs imply outside adapter layers ---------------------------------------
    prefix = local(meta["record_prefix"]) if meta["record_prefix"] else ""
    trainable: list[str] = []
    if prefix is None or (prefix and prefix not in modules):
        fit.append(f"the adapters were applied to {meta['record_prefix']!r}, which this model lacks")
        prefix = ""
    for entry_name in meta["trainable_modules"]:
        t = local(entry_name)
        if t is None or t not in modules:
            continue  # outside the export root this model is (warned about with the tensors)
        trainable.append(t[len(prefix) + 1 :] if prefix else t)
        ids = {id(p) for p in modules[t].parameters()}
        required += [n for n, p in model.named_parameters() if id(p) in ids]
    missing_required = [k for k in dict.fromkeys(required) if k not in state and k in shapes]
    if missing_required:
        damage.append(f"missing trained tensors {missing_required[:6]}")

    # --- values: shape, dtype kind, finiteness (also after the cast to the model's dtype) ------
    nonfinite: list[str] = []
    for key, value in list(state.items()):
        like = shapes[key]
        if tuple(value.shape) != tuple(like.shape):
            damage.append(f"tensor {key!r}: saved shape {tuple(value.shape)} != model {tuple(like.shape)}")
            continue
        if _kind_of(value.dtype) != _kind_of(like.dtype):
            damage.append(f"tensor {key!r}: saved dtype {value.dtype} cannot hold the model's {like.dtype} values")
            continue
        cast = value.to(like.dtype) if value.dtype != like.dtype else value
        if cast.is_floating_point() or cast.is_complex():
            if not bool(torch.isfinite(cast).all()):
                nonfinite.append(key)
                continue
        state[key] = cast
    if nonfinite:
        damage.append(f"non-finite values (NaN/inf, in the file or after casting to the model's dtype) in {nonfinite[:6]}")

    if fit or base or damage:
        problems = fit + base + damage
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} in all)" if len(problems) > 8 else "")
        if not fit and not base:
            raise ValueError(f"adapter file {source!r} is damaged or incomplete: {shown}. Re-export it with save_adapter from the trained model.")
        this = describe(model.get_submodule(export_root) if export_root and not offset else model)
        lift = not fit and not damage  # strict_base=False would make exactly this load
        raise ValueError(
            f"adapter at {source!r} was made for base {meta['base_model']!r} (fingerprint {meta['base_fingerprint']}), "
            f"and does not fit this {this!r}: {shown}. Load it into the base it was trained on"
            + (" (or pass strict_base=False if you changed the base on purpose)." if lift else ".")
        )
    if specs is not None:  # each spec adapts exactly the modules the file names for it
        for i, spec in enumerate(specs):
            names = [t for n, e in meta["targets"].items() if e["spec"] == i and (t := local(n)) is not None]
            spec.target_modules = ["re:" + re.escape(n[len(prefix) + 1 :] if prefix else n) for n in names]
            spec.module_path = None
    return LoadPlan(specs=specs, apply_prefix=prefix, trainable=trainable, state=state, warnings=warnings)
