"""``lightning-peft merge``: an adapter export folded into its base, written in the base's format.

    lightning-peft merge --base <transformers model dir | config.yaml> --adapter <export dir> --out <dir> [--overwrite]

Everything is checked before anything is written: the export (a damaged file is refused), the
output directory (an existing one is refused unless ``--overwrite``), the base (built, then
``load_adapter`` refuses one whose weights differ from the recorded fingerprints).

* ``--base`` a directory with a ``config.json``: a transformers model, loaded with the class its
  ``architectures`` names (``AutoModel`` otherwise). The merged model is written with
  ``save_pretrained`` (plus the base's tokenizer files), so ``AutoModel.from_pretrained(out)``
  loads it; trained modules that lie outside the transformers model (a classification head next
  to the encoder) go to ``extra_trainable.safetensors`` with the export's keys.
* ``--base`` a ``.yaml`` run config: the LightningModule of its ``model:`` section, parsed and
  instantiated by the CLI's own parser (the same ``class_path`` rules as ``lightning-peft fit``).
  The merged module's state dict is written to ``model.safetensors`` (load it with
  ``safetensors.torch.load_model``), the config next to it as ``config.yaml``.

Merging: every adapter layer folds its update into its base weight (``merge_adapter``) and is
replaced by that plain layer; a QLoRA layer merges into the *dequantized* weight (its
dequantized weight plus the update, summed in fp32 and stored in the model's dtype), which
replaces the quantized layer (said on stdout and in ``merge_info.json``).

Verification, before writing: the adapted and the merged model's outputs on a probe batch
(token ids ``[2, 16]``, or pixels, or the module's ``example_input_array``; each adapter layer on
random inputs where the model takes none of these) must agree:
``max |merged - adapted| <= tol * max(1, max |adapted|)``, ``tol`` = 1e-4 for float32 outputs and
2e-2 for bfloat16/float16 ones or when quantized weights were dequantized. The output is written into a temporary directory next to
``--out`` and renamed into place: an interrupted or refused merge leaves nothing behind.
"""

from __future__ import annotations

import argparse
import inspect
import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_peft.cli_handoff import HandoffError, check_export_dir, check_out_dir, run_handoff

#: relative probe tolerance per output dtype (scaled by ``max(1, max |adapted|)``)
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 2e-2, torch.float16: 2e-2}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
)
#: models with at least this many parameters show a progress bar on stderr while merging
PROGRESS_MIN_PARAMETERS = 50_000_000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-peft merge",
        description="Fold an adapter export into its base model and write the merged model in the base's own format.",
    )
    parser.add_argument("--base", required=True, type=Path, help="a transformers model directory, or the run's .yaml config")
    parser.add_argument("--adapter", required=True, type=Path, help="the adapter export directory (…/adapter)")
    parser.add_argument("--out", required=True, type=Path, help="where to write the merged model (a new directory)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser


# --------------------------------------------------------------------------------------------
# The base
# --------------------------------------------------------------------------------------------
def _attach(root: nn.Module, dotted: str, module: nn.Module) -> None:
    """``root.<dotted> = module``, creating empty parent modules on the way."""
    *parents, leaf = dotted.split(".")
    node = root
    for part in parents:
        if not hasattr(node, part):
            node.add_module(part, nn.Module())
        node = getattr(node, part)
    node.add_module(leaf, module)


def _stand_in(root_name: str, transformers_model: nn.Module, extra: dict[str, torch.Tensor]) -> nn.Module:
    """A module laid out as the one the adapter was saved from: the transformers model at its
    export root, and the trained tensors outside it (``extra``) as plain parameters, so that
    ``load_adapter`` checks and loads everything under the names the export uses."""
    if not root_name:
        if extra:
            raise HandoffError(f"the export has trained tensors outside its transformers model ({sorted(extra)[:4]}) but no export root")
        return transformers_model
    holder = nn.Module()
    _attach(holder, root_name, transformers_model)
    for key, tensor in extra.items():
        module_name, _, param = key.rpartition(".")
        if module_name and not _has_module(holder, module_name):
            _attach(holder, module_name, nn.Module())
        owner = holder.get_submodule(module_name) if module_name else holder
        owner.register_parameter(param, nn.Parameter(torch.zeros_like(tensor), requires_grad=False))
    return holder


def _has_module(root: nn.Module, name: str) -> bool:
    try:
        root.get_submodule(name)
    except AttributeError:
        return False
    return True


def _registered_architecture(name: object) -> type:
    """The transformers class ``config.json``'s ``architectures`` names, only if transformers' own
    auto-class registry lists it (its model mappings); ``AutoModel`` for anything else, so a
    file never picks an arbitrary attribute of the package."""
    import transformers
    from transformers.models.auto import modeling_auto

    known = {
        cls_name
        for mapping_name in dir(modeling_auto)
        if mapping_name.startswith("MODEL_") and mapping_name.endswith("_MAPPING_NAMES")
        for value in getattr(modeling_auto, mapping_name).values()
        for cls_name in (value if isinstance(value, (tuple, list)) else (value,))
    }
    if isinstance(name, str) and name in known:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    return transformers.AutoModel


def _load_transformers(base: Path) -> nn.Module:
    from lightning_peft.datamodules.text import hub_offline

    hub_offline()

    try:
        config = json.loads((base / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise HandoffError(f"--base {str(base)!r}: config.json is unreadable ({err})") from err
    names = config.get("architectures") or [] if isinstance(config, dict) else []
    cls = _registered_architecture(names[0] if names else None)
    if not (base / "model.safetensors").is_file() and not (base / "model.safetensors.index.json").is_file():
        # pytorch_model.bin is a pickle: a file that could run code is never read
        raise HandoffError(f"--base {str(base)!r} has no model.safetensors; save the base with save_pretrained (safetensors)")
    try:
        # safetensors only, and never code shipped with the model directory
        return cls.from_pretrained(str(base), local_files_only=True, use_safetensors=True, trust_remote_code=False).eval()
    except Exception as err:  # noqa: BLE001 - transformers raises OSError/ValueError/EnvironmentError variants
        raise HandoffError(f"--base {str(base)!r} could not be loaded as a transformers model ({type(err).__name__}: {err})") from err


def _load_from_config(path: Path) -> nn.Module:
    """The LightningModule of the config's ``model:`` section, through the CLI's parser."""
    import yaml
    from jsonargparse import ArgumentError
    from lightning.pytorch import LightningModule, seed_everything
    from lightning.pytorch.cli import LightningArgumentParser

    from lightning_peft.cli_errors import ConfigError, instantiation_error, parse_error

    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise HandoffError(f"--base {str(path)!r} is not valid YAML ({err})") from err
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise HandoffError(f"--base {str(path)!r} has no 'model:' section with a class_path; pass the run's config (or a model directory)")
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_lightning_class_args(LightningModule, "model", subclass_mode=True, required=True)
    try:
        parsed = parser.parse_object({"model": config["model"]})
    except ArgumentError as err:
        error = parse_error(str(err), ["--config", str(path)])
        raise HandoffError(f"--base {str(path)!r}: {error.key + ': ' if error.key else ''}{error.message}") from err
    seed = config.get("seed_everything")
    if isinstance(seed, int) and not isinstance(seed, bool):
        seed_everything(seed, verbose=False)
    try:
        model = parser.instantiate_classes(parsed).model
    except Exception as err:  # noqa: BLE001 - a class refusing a value: said in one line when we can
        short: ConfigError | None = instantiation_error(err, parsed)
        if short is None:
            raise
        raise HandoffError(f"--base {str(path)!r}: {short.key + ': ' if short.key else ''}{short.message}") from err
    return model.eval()


# --------------------------------------------------------------------------------------------
# The probe
# --------------------------------------------------------------------------------------------
def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    raise HandoffError(f"the model returned {type(output).__name__}, which holds no tensor to compare")


def _hf_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        return config
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            return config
    return None


def _probe_call(model: nn.Module) -> tuple[str, Any] | None:
    """``(description, call)``: a deterministic probe batch for ``model``, or ``None`` when no
    probe input can be made for it (the per-layer probe is used then)."""
    generator = torch.Generator().manual_seed(0)
    example = getattr(model, "example_input_array", None)
    if example is not None:
        if isinstance(example, dict):
            return "example_input_array", lambda: model(**example)
        if isinstance(example, (list, tuple)):
            return "example_input_array", lambda: model(*example)
        return "example_input_array", lambda: model(example)
    config = _hf_config(model)
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    if config is not None and "input_ids" in params and getattr(config, "vocab_size", None):
        ids = torch.randint(0, int(config.vocab_size), (2, 16), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, 12:] = 0  # one padded row: the mask path is compared too
        kwargs = {"input_ids": ids, **({"attention_mask": mask} if "attention_mask" in params else {})}
        return "input_ids [2, 16]", lambda: model(**kwargs)
    if config is not None and "pixel_values" in params and getattr(config, "image_size", None):
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        pixels = torch.randn(2, getattr(config, "num_channels", 3), size, size, generator=generator)
        return f"pixel_values [2, {pixels.shape[1]}, {size}, {size}]", lambda: model(pixel_values=pixels)
    return None


def _layer_inputs(layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    out = {}
    for name, layer in layers.items():
        width = getattr(layer, "in_features", None)
        if isinstance(width, int):
            out[name] = torch.randn(4, width, generator=generator)
    return out


def _tolerance(reference: torch.Tensor) -> float:
    return TOLERANCE.get(reference.dtype, 2e-2) * max(1.0, float(reference.detach().abs().max()))


# --------------------------------------------------------------------------------------------
# Merge
# --------------------------------------------------------------------------------------------
def _model_dtype(model: nn.Module, layers: dict[str, Any]) -> torch.dtype:
    """The floating dtype most of the model's parameters outside the adapter layers have."""
    inside = {id(p) for layer in layers.values() for p in layer.parameters()}
    counts = Counter(p.dtype for p in model.parameters() if id(p) not in inside and p.is_floating_point())
    return counts.most_common(1)[0][0] if counts else torch.get_default_dtype()


def _bake(model: nn.Module, names: list[str]) -> tuple[int, str | None]:
    """Merge every adapter layer and put the plain merged layer in its place; returns how many
    quantized (QLoRA) layers were dequantized first, and from which dtype."""
    from tqdm import tqdm

    from lightning_peft.adapters.lora import dequantized_weight
    from lightning_peft.io import adapter_layers, merge_adapter

    layers = adapter_layers(model)
    dtype = _model_dtype(model, layers)
    big = sum(p.numel() for p in model.parameters()) >= PROGRESS_MIN_PARAMETERS
    merge_adapter(model, keep_original=False)  # refuses (nothing merged) if a layer cannot be merged
    dequantized, source_dtype = 0, None
    for name in tqdm(names, desc="merging", unit="layer", file=sys.stderr, disable=True if not big else None):
        layer = layers[name]
        replacement = layer.base_layer
        if getattr(layer, "_merged_module", None) is not None:  # QLoRA: a quantized base
            # W = dequant(q(W0)) + s B A, summed in fp32 and stored in the model's dtype (the
            # layer's own merged copy stays in the dequantized dtype, too coarse for a hand-off)
            dense = dequantized_weight(layer.base_layer)
            source_dtype = str(dense.dtype).removeprefix("torch.")
            bias = layer.base_layer.bias
            replacement = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device=dense.device, dtype=dtype)
            replacement.weight.copy_(dense.float() + layer.delta_weight().to(dense.device))
            if bias is not None:
                replacement.bias.copy_(bias)
            replacement.requires_grad_(False)
            dequantized += 1
        model.set_submodule(name, replacement)
    return dequantized, source_dtype


def merge(argv: list[str]) -> dict[str, Any]:
    """``lightning-peft merge ...`` (``argv`` without the ``merge``); returns what
    ``merge_info.json`` records."""
    from lightning_peft.io import EXTRA_NAME, adapter_layers, atomic_write_dir, load_adapter, read_adapter

    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    adapter, out, base = args.adapter, args.out, args.base
    check_export_dir(adapter)
    check_out_dir(out, args.overwrite)
    if not base.exists():
        raise HandoffError(f"--base {str(base)!r} does not exist; pass the base model directory or the run's .yaml config")
    is_config = base.is_file() and base.suffix in (".yaml", ".yml")
    if not is_config and not (base.is_dir() and (base / "config.json").is_file()):
        raise HandoffError(f"--base {str(base)!r} is neither a transformers model directory (with config.json) nor a .yaml run config")
    meta, _, extra = read_adapter(adapter)  # a damaged export is refused here
    if is_config:
        model = _load_from_config(base)
        target: nn.Module = model
    else:
        target = _load_transformers(base)
        model = _stand_in(meta["export_root"], target, extra)
    try:
        load_adapter(model, adapter)  # fingerprints: a different base is refused, model unchanged
    except ValueError as err:
        raise HandoffError(f"the adapter does not fit --base {str(base)!r}: {err}") from err
    model.eval()
    layers = adapter_layers(model)
    names = list(layers)
    probe = _probe_call(target)
    for layer in layers.values():
        if hasattr(layer, "dequantize_without_grad"):
            # the reference is the QLoRA maths, x dequant(q(W0))^T + s x A^T B^T: on CPU,
            # bitsandbytes' 4-bit inference kernel rounds further than that (~4 % here)
            layer.dequantize_without_grad = True
    with torch.no_grad():
        if probe is not None:
            reference = {"model": _first_tensor(probe[1]()).clone()}
        else:
            inputs = _layer_inputs(layers)
            reference = {name: layers[name](x).clone() for name, x in inputs.items()}
        kinds = sorted({type(layer.spec).__name__ if hasattr(layer, "spec") else type(layer).__name__ for layer in layers.values()})
        dequantized, dequant_dtype = _bake(model, names)
        if probe is not None:
            merged = {"model": _first_tensor(probe[1]())}
        else:
            merged = {name: model.get_submodule(name)(x) for name, x in inputs.items()}
    if not reference:
        raise HandoffError("nothing to verify the merge on: the model takes no probe input and no adapter layer has in_features")
    diffs = {k: float((merged[k].float() - reference[k].float()).abs().max()) for k in reference}
    coarsest = TOLERANCE.get(getattr(torch, dequant_dtype), 2e-2) if dequant_dtype else 0.0
    tols = {k: max(_tolerance(reference[k]), coarsest * max(1.0, float(reference[k].abs().max()))) for k in reference}
    worst = max(diffs, key=lambda k: diffs[k] / tols[k])
    if diffs[worst] > tols[worst]:
        raise HandoffError(
            f"the merged model does not reproduce the adapted one: max |merged - adapted| = {diffs[worst]:.3g} > {tols[worst]:.3g} "
            f"({worst}); nothing was written. This adapter kind cannot be merged exactly; load it with load_adapter instead."
        )
    info = {
        "base": str(base),
        "adapter": str(adapter),
        "format": "lightning-module safetensors" if is_config else "transformers save_pretrained",
        "adapter_kinds": kinds,
        "layers_merged": len(names),
        "dequantized_layers": dequantized,
        "dequantized_dtype": dequant_dtype,
        "probe": probe[0] if probe is not None else f"each adapter layer on random inputs [4, in_features] ({len(reference)} layers)",
        "max_abs_diff": diffs[worst],
        "tolerance": tols[worst],
        "tolerance_rule": "max |merged - adapted| <= tol * max(1, max |adapted|); tol 1e-4 (float32), "
        "2e-2 (bfloat16/float16 outputs or dequantized weights)",
        "base_fingerprint": meta["base_fingerprint"],
    }

    def write(tmp: Path) -> None:
        from safetensors.torch import save_file, save_model

        if is_config:
            save_model(model, str(tmp / "model.safetensors"))  # shared (tied) tensors stored once
            shutil.copyfile(base, tmp / "config.yaml")
        else:
            target.save_pretrained(str(tmp), safe_serialization=True)
            for name in TOKENIZER_FILES:
                if (base / name).is_file():
                    shutil.copyfile(base / name, tmp / name)
            if extra:
                state = dict(model.named_parameters())
                save_file({k: state[k].detach().contiguous() for k in extra}, tmp / EXTRA_NAME, metadata={"format": "pt"})
        info["seconds"] = round(time.perf_counter() - start, 2)
        (tmp / "merge_info.json").write_text(json.dumps(info, indent=2))

    atomic_write_dir(out, write)
    quant = (
        f"; {dequantized} quantized layers were dequantized (from {dequant_dtype}) and merged into the dense weights" if dequantized else ""
    )
    extra_note = (
        f"; trained modules outside the model in {EXTRA_NAME}: {sorted({k.rsplit('.', 1)[0] for k in extra})}"
        if extra and not is_config
        else ""
    )
    print(
        f"lightning-peft merge: {len(names)} {'/'.join(kinds)} layers merged into {base.name}{quant}\n"
        f"  verified on {info['probe']}: max |merged - adapted| = {diffs[worst]:.3g} <= {tols[worst]:.3g}\n"
        f"  wrote {out} ({info['format']}{extra_note}) in {info['seconds']:.1f} s",
        flush=True,
    )
    return info


def main(argv: list[str]) -> None:
    run_handoff(merge, argv)
