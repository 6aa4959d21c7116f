"""``lightning-peft inspect``: what an adapter export or a training checkpoint holds.

    lightning-peft inspect <export dir | checkpoint .ckpt> [--json]

Reports the adapter kinds (with their settings), the adapted modules (targets) and their ranks
(per expert where they differ), the trained modules besides the adapters, the trainable tensors'
bytes and parameter count, the base model and its fingerprint, and whether Hugging Face peft can
load it (and why not). Nothing runs code from the file: exports are safetensors (read by
``read_adapter``, which refuses damaged ones), checkpoints are read with
:func:`lightning_peft.safe_load.load_checkpoint_tensors` (never unpickled).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from lightning_peft.cli_handoff import HandoffError, run_handoff


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-peft inspect", description="Describe an adapter export or a training checkpoint.")
    parser.add_argument("path", type=Path, help="an adapter export directory or a checkpoint file (.ckpt)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
    return parser


def _bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _spec_summaries(configs: list[Any], source: str) -> list[dict[str, Any]]:
    """Kind, class path and settings of each spec config (resolved through the registry only)."""
    from lightning_peft.adapters.registry import spec_from_config

    out = []
    for config in configs:
        spec = spec_from_config(config, source)
        out.append({"kind": spec.kind, "class_path": config["class_path"], "init_args": config.get("init_args", {})})
    return out


def _rank_of(entry: dict[str, Any]) -> Any:
    """A target's rank, or its per-expert ranks where they differ."""
    ranks = entry.get("ranks")
    if isinstance(ranks, list) and ranks and len({json.dumps(r, sort_keys=True) for r in ranks}) > 1:
        return ranks
    for key in ("rank", "max_rank", "state_dim"):
        if key in entry:
            return entry[key]
    return None


def _peft_status(path: Path, extra: dict[str, torch.Tensor]) -> dict[str, Any]:
    from lightning_peft.io import CONFIG_NAME, EXTRA_NAME

    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except FileNotFoundError:
        return {"loadable": False, "reason": f"no {CONFIG_NAME}: load it with lightning_peft.load_adapter"}
    except (OSError, json.JSONDecodeError) as err:
        raise HandoffError(f"{str(path / CONFIG_NAME)!r} is damaged ({err}); re-export the adapter") from err
    if not isinstance(config, dict):
        raise HandoffError(f"{str(path / CONFIG_NAME)!r} is damaged (not a JSON object); re-export the adapter")
    if config.get("peft_type") != "LORA":
        return {
            "loadable": False,
            "reason": f"peft_type {config.get('peft_type')!r}: lightning-peft's own format (peft cannot represent this adapter); "
            "load it with lightning_peft.load_adapter",
        }
    notes = "peft.PeftModel.from_pretrained(<base transformers model>, this directory) loads it"
    if extra:
        heads = sorted({k.rsplit(".", 1)[0] for k in extra})
        notes += f"; the modules outside that model ({heads}) are in {EXTRA_NAME}, which peft does not read"
    if importlib.util.find_spec("peft") is None:
        notes += " (peft is not installed here)"
    return {"loadable": True, "reason": notes}


def inspect_export(path: Path) -> dict[str, Any]:
    from lightning_peft.io import WEIGHTS_NAME, read_adapter

    meta, tensors, extra = read_adapter(path)
    source = str(path / WEIGHTS_NAME)
    targets = {name: {"kind": e["kind"], "rank": _rank_of(e), "shape": e.get("shape")} for name, e in meta["targets"].items()}
    all_tensors = {**tensors, **extra}
    return {
        "source": str(path),
        "type": "export",
        "base_model": meta["base_model"],
        "base_fingerprint": meta["base_fingerprint"],
        "adapters": _spec_summaries(meta["specs"], source),
        "kinds": dict(Counter(t["kind"] for t in targets.values())),
        "targets": targets,
        "ranks": _rank_counts(targets),
        "trainable_modules": meta["trainable_modules"],
        "trainable_bytes": _bytes(all_tensors),
        "trainable_parameters": sum(t.numel() for t in all_tensors.values()),
        "peft": _peft_status(path, extra),
    }


def _rank_counts(targets: dict[str, dict[str, Any]]) -> dict[str, int]:
    return dict(Counter(json.dumps(t["rank"]) for t in targets.values()))


def _adapter_state(checkpoint: dict[str, Any], source: str) -> dict[str, Any]:
    """The ``AdapterCallback`` state of a Lightning checkpoint."""
    callbacks = checkpoint.get("callbacks")
    found = (
        [v for k, v in callbacks.items() if isinstance(v, dict) and isinstance(v.get("adapter"), list)]
        if isinstance(callbacks, dict)
        else []
    )
    if not found:
        raise HandoffError(
            f"{source!r} holds no AdapterCallback state: it is not a checkpoint of a run trained with lightning_peft.AdapterCallback"
        )
    return found[0]


def inspect_checkpoint(path: Path) -> dict[str, Any]:
    from lightning_peft.safe_load import load_checkpoint_tensors, tensor_state_dict

    source = str(path)
    checkpoint = load_checkpoint_tensors(path)  # never unpickles anything outside the allowlist
    state = _adapter_state(checkpoint, source)
    tensors = tensor_state_dict(checkpoint, path)
    layers = sorted({k.split(".base_layer.")[0] for k in tensors if ".base_layer." in k})
    adapter_only = not layers
    patterns = [p for p in state.get("trainable_modules") or [] if isinstance(p, str)]
    if adapter_only:
        trainable = tensors
    else:  # a full checkpoint: the adapter layers' own tensors and the trained modules' (by name)
        trainable = {
            k: v
            for k, v in tensors.items()
            if (".base_layer." not in k and any(k.startswith(layer + ".") for layer in layers))
            or any(k == p or k.startswith(p + ".") or f".{p}." in f".{k}" for p in patterns)
        }
    targets: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        if key.endswith("lora_A.weight") and ".base_layer." not in key:
            rank = tensor.shape[-2] if tensor.dim() >= 2 else None
            targets[key.removesuffix(".lora_A.weight")] = {"kind": "lora", "rank": rank, "shape": None}
    specs = _spec_summaries(state["adapter"], source)
    return {
        "source": source,
        "type": "adapter-only checkpoint" if adapter_only else "full checkpoint",
        "base_model": None,
        "base_fingerprint": state.get("base_fingerprint"),
        "adapters": specs,
        "kinds": dict(Counter(t["kind"] for t in targets.values())) or {s["kind"]: None for s in specs},
        "targets": targets,
        "ranks": _rank_counts(targets),
        "trainable_modules": patterns,
        "trainable_bytes": _bytes(trainable),
        "trainable_parameters": sum(t.numel() for t in trainable.values()),
        "epoch": checkpoint.get("epoch"),
        "global_step": checkpoint.get("global_step"),
        "peft": {
            "loadable": False,
            "reason": "a training checkpoint: export it (AdapterCallback(export_dir=...) or lightning_peft.save_adapter) for peft",
        },
    }


def describe(report: dict[str, Any]) -> str:
    """The human-readable report."""
    lines = [f"{report['source']}: {report['type']}"]
    for spec in report["adapters"]:
        settings = {k: v for k, v in spec["init_args"].items() if v not in (None, [], {}, False)}
        lines.append(f"  adapter: {spec['kind']} ({spec['class_path']}) {json.dumps(settings, sort_keys=True)}")
    kinds = ", ".join(f"{k} x{n}" if n is not None else k for k, n in report["kinds"].items())
    lines.append(f"  targets: {len(report['targets'])} modules ({kinds})")
    ranks = ", ".join(f"rank {r}: {n}" for r, n in report["ranks"].items())
    if ranks:
        lines.append(f"  ranks: {ranks}")
    for name, target in list(report["targets"].items())[:6]:
        lines.append(f"    {name}: {target['kind']}, rank {json.dumps(target['rank'])}")
    if len(report["targets"]) > 6:
        lines.append(f"    ... ({len(report['targets']) - 6} more)")
    lines.append(f"  trained modules: {report['trainable_modules'] or 'none'}")
    lines.append(f"  trainable: {report['trainable_parameters']:,} parameters, {report['trainable_bytes']:,} bytes")
    if report.get("base_model"):
        lines.append(f"  base model: {report['base_model']}")
    lines.append(f"  base fingerprint: {report['base_fingerprint']}")
    peft = report["peft"]
    lines.append(f"  peft can load it: {'yes' if peft['loadable'] else 'no'} ({peft['reason']})")
    return "\n".join(lines)


def inspect_path(argv: list[str]) -> dict[str, Any]:
    """``lightning-peft inspect ...`` (``argv`` without the ``inspect``); returns the report."""
    args = build_parser().parse_args(argv)
    path: Path = args.path
    if not path.exists():
        raise HandoffError(f"{str(path)!r} does not exist; pass an adapter export directory or a .ckpt checkpoint")
    report = inspect_export(path) if path.is_dir() else inspect_checkpoint(path)
    print(json.dumps(report, indent=2, default=str) if args.json else describe(report), flush=True)
    return report


def main(argv: list[str]) -> None:
    run_handoff(inspect_path, argv)
