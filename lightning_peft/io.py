"""Adapter files, and merging adapters into base weights.

An export is a directory with

* ``adapter_model.safetensors``: the adapter tensors, keyed ``base_model.model.<module>.<tensor>``
  relative to the *export root* (for transformers models, the ``PreTrainedModel`` that holds
  the adapters, so Hugging Face ``peft.PeftModel.from_pretrained`` loads it), with our own
  description in the safetensors metadata under ``"lightning_peft"``;
* ``adapter_config.json``: a peft ``LoraConfig`` where peft can represent the adapter, else
  our own config (``"peft_type": "LIGHTNING_PEFT"``);
* ``extra_trainable.safetensors`` (only if needed): trained tensors outside the export root
  (e.g. a classification head next to the transformers encoder).

Files are written to a temporary directory and moved into place, so an interrupted save never
leaves a half-written adapter.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lightning_peft.adapters.base import AdapterLayer, AdapterSpec
from lightning_peft.adapters.registry import spec_from_config as _registry_spec_from_config
from lightning_peft.io_checks import FORMAT_VERSION, PEFT_PREFIX, check_metadata, plan_load
from lightning_peft.safe_load import read_safetensors
from lightning_peft.targeting import (
    RECORD_ATTRIBUTE,
    AdapterRecord,
    adapter_record,
    apply_adapter,
    combine_fingerprints,
    refresh_trained_buffers,
    trained_buffer_names,
)

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
EXTRA_NAME = "extra_trainable.safetensors"


# --------------------------------------------------------------------------------------------
# Merge
# --------------------------------------------------------------------------------------------
def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def merge_adapter(model: nn.Module, keep_original: bool = True) -> int:
    """Fold every adapter into its base weight; returns how many layers were merged.

    With ``keep_original`` (default) each base weight's exact value is kept in host memory so
    that ``unmerge_adapter`` restores it bit for bit; otherwise unmerging subtracts the update
    (exact up to rounding)."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no adapter layers to merge")
    refused = {name: reason for name, layer in layers.items() if (reason := layer.merge_refusal()) is not None}
    if refused:  # before merging any layer: the model stays as it was
        raise ValueError(f"cannot merge the adapter of {sorted(refused)[:4]}: {next(iter(refused.values()))}. Nothing was merged.")
    done: list[AdapterLayer] = []
    try:
        for layer in layers.values():
            if not layer.merged:
                layer.merge(keep_original=keep_original)
                done.append(layer)
    except BaseException:
        for layer in done:  # a layer failing half-way leaves the model as it was, not half merged
            layer.unmerge()
        raise
    return len(layers)


def unmerge_adapter(model: nn.Module) -> int:
    """Undo ``merge_adapter``; returns how many layers were unmerged."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no adapter layers to unmerge")
    for layer in layers.values():
        layer.unmerge()
    return len(layers)


# --------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------
def _export_root(model: nn.Module, layer_names: list[str]) -> str:
    """The outermost transformers ``PreTrainedModel`` holding every adapter layer, else ``""``
    (keys are then relative to ``model`` itself)."""
    transformers = sys.modules.get("transformers")
    if transformers is None or not layer_names or isinstance(model, transformers.PreTrainedModel):
        return ""
    for name, module in model.named_modules():  # parents come before their children
        if name and isinstance(module, transformers.PreTrainedModel) and all(n.startswith(name + ".") for n in layer_names):
            return name
    return ""


def _relative(name: str, root: str) -> str:
    return name[len(root) + 1 :] if root else name


def _peft_entries(layers: dict[str, AdapterLayer]) -> tuple[bool, float, list[dict[str, Any]]] | None:
    """``(use_rslora, dropout, entries)``: the global scaling the layers agree on and each
    layer's ``peft_config_entry``, or ``None`` when peft cannot represent one of them."""
    scalings = {s for layer in layers.values() if (s := layer.peft_scaling()) is not None}
    if len(scalings) > 1:
        return None
    use_rslora, dropout = next(iter(scalings)) if scalings else (False, 0.0)
    entries = []
    for name, layer in layers.items():
        entry = layer.peft_config_entry(name, use_rslora)
        if entry is None:
            return None
        entries.append(entry)
    return use_rslora, dropout, entries


def _peft_patterns(entries: list[dict[str, Any]]) -> tuple[int, float, dict[str, int], dict[str, float]]:
    """``(r, lora_alpha, rank_pattern, alpha_pattern)``: the most common rank and alpha, plus
    pattern entries for the targets of uniform entries that differ and every explicit one."""
    ranks = [e["rank"] for e in entries if "rank" in e] + [r for e in entries for r in e.get("rank_pattern", {}).values()]
    alphas = [e["alpha"] for e in entries if "alpha" in e] + [a for e in entries for a in e.get("alpha_pattern", {}).values()]
    rank = Counter(ranks).most_common(1)[0][0]
    alpha = Counter(alphas).most_common(1)[0][0]
    uniform = [(t, e) for e in entries if "rank" in e for t in e["target_modules"]]
    rank_pattern = {t: e["rank"] for t, e in uniform if e["rank"] != rank}
    alpha_pattern = {t: e["alpha"] for t, e in uniform if e["alpha"] != alpha}
    for entry in entries:
        rank_pattern.update(entry.get("rank_pattern", {}))
        alpha_pattern.update(entry.get("alpha_pattern", {}))
    return rank, alpha, rank_pattern, alpha_pattern


def _peft_config(
    specs: list[AdapterSpec], layers: dict[str, AdapterLayer], extra_modules: list[str], base_name: str | None
) -> dict[str, Any] | None:
    """A peft ``LoraConfig`` dict, or ``None`` when peft cannot represent the adapter (each
    layer says whether and how through ``peft_scaling`` / ``peft_config_entry``)."""
    found = _peft_entries(layers) if layers and not any(s.trains_base for s in specs) else None
    if found is None:
        return None
    use_rslora, dropout, entries = found
    target_parameters = [t for e in entries for t in e.get("target_parameters", [])]
    if target_parameters and dropout > 0:
        return None  # peft's parameter targets take no dropout
    use_dora = {bool(e.get("use_dora")) for e in entries}
    if len(use_dora) > 1:
        return None  # peft's use_dora is one setting for every target
    rank, alpha, rank_pattern, alpha_pattern = _peft_patterns(entries)
    uniform = sorted(t for e in entries if "rank" in e for t in e["target_modules"])
    target_modules = uniform + [t for e in entries if "rank" not in e for t in e.get("target_modules", [])]
    extra = {"target_parameters": target_parameters} if target_parameters else {}
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_name,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "use_rslora": use_rslora,
        "use_dora": use_dora == {True},
        "target_modules": target_modules or None,
        **extra,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": extra_modules or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _base_name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    return str(name) if name else type(model).__name__


def state_mismatch(current: Mapping[str, torch.Tensor], saved: Mapping[str, torch.Tensor], required: Iterable[str] | None = None) -> str:
    """What keeps ``saved`` from loading into a module whose state dict is ``current``:
    ``"missing [...]; unexpected [...]; shape [...]"`` (only the parts that apply), or ``""``.
    ``required``: the keys that must be present (default: all of ``current``)."""
    missing = [k for k in (current if required is None else required) if k not in saved]
    unexpected = [k for k in saved if k not in current]
    wrong = [
        f"{k}: saved {tuple(v.shape)} != model {tuple(current[k].shape)}"
        for k, v in saved.items()
        if k in current and tuple(v.shape) != tuple(current[k].shape)
    ]
    parts = (
        f"missing {missing[:6]}" if missing else "",
        f"unexpected {unexpected[:6]}" if unexpected else "",
        f"shape {wrong[:4]}" if wrong else "",
    )
    return "; ".join(p for p in parts if p)


_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _no_space(error: BaseException | None) -> bool:
    """Whether ``error`` or an error it was raised from is a full disk: safetensors (Rust)
    reports one as ``SafetensorError("... code: 28, kind: StorageFull ...")``, ``torch.save`` as a
    ``RuntimeError("... unexpected pos ...")`` raised while handling the ``OSError``."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if getattr(error, "errno", None) in _NO_SPACE or any(s in str(error) for s in ("No space left", "StorageFull", "code: 28,")):
            return True
        error = error.__cause__ or error.__context__
    return False


def _write_error(error: BaseException, path: Path, kept: str) -> OSError:
    """``error`` re-raised with the path it concerns and, for a full disk, what to do."""
    code = getattr(error, "errno", None)
    if _no_space(error):
        code = errno.ENOSPC
        message = (
            f"could not write {str(path)!r}: the disk is full (no space left on the device holding "
            f"{str(path.parent)!r}). {kept} Free some space or write elsewhere."
        )
    else:
        message = f"could not write {str(path)!r}: {error}. {kept}"
    return OSError(code, message) if code is not None else OSError(message)


def atomic_write_file(path: str | os.PathLike[str], write: Any) -> Path:
    """Call ``write(f)`` on a temporary file next to ``path``, fsync it, then rename it over
    ``path``: a crash mid-write never leaves a truncated file (the old one stays). A failed
    write (e.g. a full disk) raises ``OSError`` naming ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as error:  # noqa: BLE001 - OSError, or a writer's own error for a full disk
        if not isinstance(error, OSError) and not _no_space(error):
            raise
        kept = "The previous file there is unchanged." if path.exists() else "Nothing was written."
        raise _write_error(error, path, kept) from error
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_dir(path: Path, write: Any) -> None:
    """``write(tmp_dir)``, fsync, then swap ``tmp_dir`` in for ``path``; on any failure the
    previous ``path`` stays as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    old = None
    try:
        try:
            write(tmp)
            for file in tmp.iterdir():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        except Exception as error:  # noqa: BLE001 - OSError, or safetensors' own error for a full disk
            if not isinstance(error, OSError) and not _no_space(error):
                raise
            kept = "The previous export there is unchanged." if path.exists() else "Nothing was written."
            raise _write_error(error, path, kept) from error
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            if old is not None:
                os.replace(old, path)  # put the previous export back
                old = None
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _trained_tensors(
    model: nn.Module, layers: dict[str, AdapterLayer], root: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """``(inside, outside, trained buffer names)``: every trained tensor outside the adapter
    layers (parameters with ``requires_grad``, buffers training changes), split by whether it
    lies inside the export root."""
    layer_ids = {id(p) for layer in layers.values() for p in layer.adapter_parameters()}
    buffers = dict(model.named_buffers())
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in layer_ids]
    trained_buffers = [(n, buffers[n]) for n in trained_buffer_names(model)]  # e.g. BatchNorm statistics
    inside: dict[str, torch.Tensor] = {}
    outside: dict[str, torch.Tensor] = {}
    for name, tensor in trained + trained_buffers:
        (inside if not root or name.startswith(root + ".") else outside)[name] = tensor
    return inside, outside, [n for n, _ in trained_buffers]


def _target_entries(model: nn.Module, record_prefix: str, record: AdapterRecord) -> dict[str, dict[str, Any]]:
    """The metadata ``targets``: per adapted module (full name) its spec index, kind and, for
    adapter layers, hyper-parameters, base fingerprint and shape."""
    spec_index = {id(s): i for i, s in enumerate(record.specs)}
    targets = {}
    for name, kind in record.targets.items():
        full = f"{record_prefix}.{name}" if record_prefix else name
        module = model.get_submodule(full)
        spec = module.spec if isinstance(module, AdapterLayer) else None
        entry: dict[str, Any] = {"spec": spec_index.get(id(spec), _spec_for_kind(record.specs, kind)), "kind": kind}
        if isinstance(module, AdapterLayer):
            entry.update(module.peft_metadata())
            entry["fingerprint"] = module.base_fingerprint
            entry["shape"] = module.base_shape
        elif name in record.fingerprints:  # changed in place (BitFit): its frozen part's fingerprint
            entry["fingerprint"] = record.fingerprints[name]
        targets[full] = entry
    return targets


def _write_export(
    tmp: Path, tensors: dict[str, torch.Tensor], outside: dict[str, torch.Tensor], meta: dict[str, Any], config: dict[str, Any]
) -> None:
    """The three files of an export into the temporary directory ``tmp``."""
    metadata = {"format": "pt", "lightning_peft": json.dumps(meta)}
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / WEIGHTS_NAME, metadata=metadata)
    if outside:
        save_file({k: v.detach().contiguous().cpu() for k, v in outside.items()}, tmp / EXTRA_NAME, metadata={"format": "pt"})
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))


def save_adapter(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write ``model``'s adapter (adapter tensors + every other trained tensor) to ``path``.

    ``model`` is the module ``apply_adapter`` was called on, or any module containing it.
    Returns the directory."""
    found = adapter_record(model)
    if found is None:
        raise ValueError(f"{type(model).__name__} has no adapter: call apply_adapter (or use AdapterCallback) first")
    record_prefix, record = found
    refresh_trained_buffers(model)  # buffers changed since injection are trained state too
    layers = adapter_layers(model)
    merged = [n for n, l in layers.items() if l.merged]
    if merged:
        raise ValueError(f"adapters are merged into the base ({merged[:3]}...): call unmerge_adapter(model) before saving")
    root = _export_root(model, list(layers))
    inside, outside, trained_buffers = _trained_tensors(model, layers, root)
    tensors = {PEFT_PREFIX + _relative(name, root): param for name, param in inside.items()}
    targets = _target_entries(model, record_prefix, record)
    meta = {
        "format_version": FORMAT_VERSION,
        "trained_buffers": trained_buffers,
        "norm_stats": record.norm_stats,
        "specs": [s.to_config() for s in record.specs],
        "targets": targets,
        "record_prefix": record_prefix,
        "export_root": root,
        "trainable_modules": [f"{record_prefix}.{t}" if record_prefix else t for t in record.trainable_modules],
        "base_model": _base_name(model.get_submodule(root) if root else model),
        "base_fingerprint": combine_fingerprints({n: e["fingerprint"] for n, e in targets.items() if "fingerprint" in e}),
    }
    extra_module_names = sorted({_relative(n, root).rsplit(".", 1)[0] for n in inside})
    # peft would drop buffers silently (it loads only parameters of modules_to_save): our format
    peft_config = (
        None
        if (outside and not root) or trained_buffers
        else _peft_config(
            record.specs, {_relative(n, root): l for n, l in layers.items()}, [m for m in extra_module_names if m], meta["base_model"]
        )
    )
    config = peft_config or {"peft_type": "LIGHTNING_PEFT", **{k: meta[k] for k in ("specs", "base_model", "base_fingerprint")}}
    meta["peft_layout"] = peft_config is not None  # layer tensors in peft's layout (load converts back)
    for name, layer in layers.items():
        state = layer.peft_state_dict() if peft_config is not None else layer.adapter_state_dict()
        tensors.update({PEFT_PREFIX + _relative(name, root) + "." + key: value for key, value in state.items()})
    out = Path(path)
    atomic_write_dir(out, functools.partial(_write_export, tensors=tensors, outside=outside, meta=meta, config=config))
    return out


def _spec_for_kind(specs: list[AdapterSpec], kind: str) -> int:
    return next(i for i, s in enumerate(specs) if s.kind == kind)


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------
def read_adapter(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(metadata, tensors, extra tensors)`` of an export directory. A file that is truncated,
    not safetensors, or whose metadata is malformed raises ``ValueError`` naming it."""
    path = Path(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {str(path)!r}: is it an adapter export directory?")
    tensors, metadata = read_safetensors(weights)
    raw = metadata.get("lightning_peft")
    if raw is None:
        raise ValueError(f"{str(weights)!r} was not written by lightning-peft (no 'lightning_peft' metadata); load it with peft instead")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"adapter file {str(weights)!r} is damaged: its 'lightning_peft' metadata is not valid JSON ({error})") from error
    check_metadata(meta, str(weights))
    extra: dict[str, torch.Tensor] = {}
    if (path / EXTRA_NAME).exists():
        extra, _ = read_safetensors(path / EXTRA_NAME)
    return meta, tensors, extra


def spec_from_config(config: dict[str, Any], source: str | None = None) -> AdapterSpec:
    """The spec a file describes (``{"class_path", "init_args"}``), resolved only through the
    adapter registry (:mod:`lightning_peft.adapters.registry`); ``source`` names the file in
    errors."""
    return _registry_spec_from_config(config, source)


def load_adapter(model: nn.Module, path: str | os.PathLike[str], strict_base: bool = True) -> nn.Module:
    """Load an export written by ``save_adapter`` into ``model``.

    A model without adapters gets them injected first (same specs, same modules). Before
    anything is changed, everything is checked (see :mod:`lightning_peft.io_checks`): the
    metadata, the specs (only registered adapter kinds), every adapted module (it must exist,
    have the saved shape and, with ``strict_base``, the base weights the adapter was trained on,
    as recorded by its fingerprint), and every tensor (each one the specs imply is present, none
    is unknown, shapes and dtypes fit, values are finite). Any problem raises ``ValueError``
    naming the file, the modules and the tensors, and leaves ``model`` exactly as it was."""
    source = str(Path(path) / WEIGHTS_NAME)
    meta, tensors, extra = read_adapter(path)
    plan = plan_load(model, source, meta, tensors, extra, strict_base, _base_name)
    for message in plan.warnings:
        warnings.warn(message, stacklevel=2)
    # what a failure half-way restores: requires_grad flags and every tensor about to be overwritten
    grad_flags = {id(p): p.requires_grad for p in model.parameters()}
    before = _named_tensors(model)
    originals = {k: before[k].detach().clone() for k in plan.state if k in before}
    root = model.get_submodule(plan.apply_prefix) if plan.apply_prefix else model
    if plan.specs is not None:
        # validates first: raises with root unchanged
        apply_adapter(root, plan.specs, trainable_modules=plan.trainable, norm_stats=meta.get("norm_stats", "train"))
    try:
        targets = _named_tensors(model)
        lost = [k for k in plan.state if k not in targets]
        if lost:
            raise RuntimeError(f"after injecting the adapters, the model has no {lost[:4]} (a bug: please report it)")
        with torch.no_grad():
            for key, value in plan.state.items():
                targets[key].copy_(value)
    except BaseException:
        if plan.specs is not None:
            _remove_adapters(root)
        with torch.no_grad():
            for key, value in originals.items():
                before[key].copy_(value)
        for p in model.parameters():
            p.requires_grad_(grad_flags.get(id(p), p.requires_grad))
        raise
    return model


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_buffers(remove_duplicate=False)), **dict(model.named_parameters(remove_duplicate=False))}


def _remove_hooks(module: nn.Module) -> None:
    record = module.__dict__.pop(RECORD_ATTRIBUTE, None)
    for handle in getattr(record, "hooks", []):
        handle.remove()


def _remove_adapters(root: nn.Module) -> None:
    """Undo ``apply_adapter`` on ``root`` (only used when a load fails half-way)."""
    for name, module in list(root.named_modules()):
        if isinstance(module, AdapterLayer):
            root.set_submodule(name, module.base_layer)
    _remove_hooks(root)


def remove_adapter(model: nn.Module) -> int:
    """Undo ``apply_adapter`` (or ``load_adapter``) on ``model`` or any module containing the one
    it was applied to: every adapter layer is unmerged if merged and replaced by the
    ``base_layer`` it wraps, the adapter record is dropped, and every parameter is frozen again
    (``requires_grad=False``, as ``apply_adapter`` left the base). Returns how many adapter
    layers were removed; a model without adapters raises ``ValueError``.

    Not undone: a ``norm_stats="freeze"`` hook keeps its normalisation layers on their running
    statistics."""
    found = adapter_record(model)
    layers = adapter_layers(model)
    if found is None and not layers:
        raise ValueError(f"{type(model).__name__} has no adapters to remove")
    for name, layer in layers.items():
        if layer.merged:
            layer.unmerge()  # the base weight gets its exact value back before it is put back
        model.set_submodule(name, layer.base_layer)
    if found is not None:
        prefix = found[0]
        _remove_hooks(model.get_submodule(prefix) if prefix else model)
    model.requires_grad_(False)
    return len(layers)
