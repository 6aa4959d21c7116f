"""Policy files: the safetensors format ``PPO.save_policy`` writes, the base fingerprint, and
reading a policy's tensors from a policy file or a Lightning checkpoint without running code."""

from __future__ import annotations

import inspect
import json
import os
from typing import Any

from torch import Tensor, nn

from lightning_peft.library.fingerprint import module_fingerprints
from lightning_peft.targeting import combine_fingerprints

__all__ = ["POLICY_FORMAT", "plain_keys", "policy_fingerprint", "policy_hparam_names", "read_policy_metadata", "read_policy_state"]

POLICY_FORMAT = "lightning_peft.ppo_policy/1"


def policy_fingerprint(model: nn.Module) -> str:
    """The fingerprint of a policy's base weights: the core's per-module fingerprints combined
    with :func:`~lightning_peft.targeting.combine_fingerprints`. Buffers (observation statistics)
    are not part of it: a library treats updated statistics as task state."""
    return combine_fingerprints(module_fingerprints(model))


def read_policy_metadata(path: str) -> tuple[dict[str, str], dict[str, Any]]:
    """``(metadata, saved hyper-parameters)`` of a policy file, refused by name when it is missing,
    damaged or not a policy file."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"policy file {path!r} does not exist")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except Exception as error:  # noqa: BLE001 - SafetensorError & co: the file is unreadable
        raise ValueError(f"policy file {path!r} is damaged or not a safetensors file ({error})") from error
    if meta.get("format") != POLICY_FORMAT:
        raise ValueError(f"{path!r} is not a policy file written by PPO.save_policy")
    return meta, _parse_hparams(path, meta)


def _parse_hparams(path: str, meta: dict[str, str], default: str = "") -> dict[str, Any]:
    try:
        hp = json.loads(meta.get("hparams", default))
    except json.JSONDecodeError as error:
        raise ValueError(f"policy file {path!r} is damaged: its 'hparams' metadata is not valid JSON ({error})") from error
    if not isinstance(hp, dict):
        raise ValueError(f"policy file {path!r} is damaged: its 'hparams' metadata is not a JSON object")
    return hp


def policy_hparam_names(cls: type) -> set[str]:
    """``cls.__init__`` arguments a policy file records: all but where the weights come from or go."""
    return set(inspect.signature(cls.__init__).parameters) - {"self", "base_checkpoint", "export_path"}


def plain_keys(module: Any) -> list[str]:
    """State-dict keys of an adapter-free policy: Linear layers at even Sequential indices."""
    keys = [f"obs_norm.{b}" for b in ("mean", "var", "count")]
    depth = len(module.hparams["hidden_sizes"]) + 1
    for net in ("policy", "value"):
        for i in range(depth):
            keys += [f"{net}.{2 * i}.weight", f"{net}.{2 * i}.bias"]
    if module.action_kind == "continuous":
        keys += ["log_std.weight", "action_low", "action_high"]
    return keys


def read_policy_state(path: str) -> tuple[dict[str, Tensor], str, dict[str, Any]]:
    """``(state, task, hyper-parameters)`` of a policy file or a Lightning checkpoint.

    Nothing in the file is unpickled into live objects: a ``.ckpt`` is read with
    :func:`lightning_peft.safe_load.load_checkpoint_tensors` (tensors and plain data only;
    anything else it pickles comes back as an inert placeholder)."""
    from lightning_peft.safe_load import load_checkpoint_tensors, read_safetensors, tensor_state_dict

    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"base checkpoint {path!r} does not exist (train one with configs/rl_base.yaml, "
            "which exports it via model.init_args.export_path)"
        )
    if path.endswith(".safetensors"):
        state, meta = read_safetensors(path)
        return state, str(meta.get("task", "unknown")), _parse_hparams(path, meta, default="{}")
    ckpt = load_checkpoint_tensors(path)
    if "state_dict" not in ckpt:
        raise ValueError(f"base checkpoint {path!r} is neither a .safetensors policy file nor a Lightning checkpoint with a 'state_dict'")
    hp = ckpt.get("hyper_parameters", {}) or {}
    hp = dict(hp) if isinstance(hp, dict) else {}
    return tensor_state_dict(ckpt, path), str(hp.get("task", "unknown")), hp
