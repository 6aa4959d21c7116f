"""The public API the layout change promised to keep: every name ``lightning_peft`` exported
before it, every class path a config names, and the old module paths of moved files."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

import lightning_peft

# what `from lightning_peft import ...` gave before the layout change (issue 10): never shrink it
EXPORTED_BEFORE = [
    "AdaLoRA", "AdapterCallback", "AdapterFSDP2Strategy", "AdapterReport", "AdapterSpec", "AdaptiveCheckpointCallback",
    "BitFit", "ExpertImportanceCallback", "ExpertLoRA", "FullFineTune", "LoRA", "PolicyLibrary", "QLoRA",
    "apply_adapter", "load_adapter", "merge_adapter", "save_adapter", "unmerge_adapter",
]  # fmt: skip
# module paths of files that moved, with a name each must still give
OLD_PATHS = {
    "lightning_peft.adapters.experts": "ExpertLoRA",
    "lightning_peft.adapters.rank_ops": "drop_slots",
    "lightning_peft.checkpointing": "plan_blocks",
    "lightning_peft.memory": "find_blocks",
    "lightning_peft.policy_library": "PolicyLibrary",
    "lightning_peft.rl_tasks": "get_task",
    "lightning_peft.modules.ppo": "PPO",
    "lightning_peft.datamodules.rl": "RLDataModule",
    "lightning_peft.callbacks.adaptive_checkpoint": "AdaptiveCheckpointCallback",
}
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def class_paths(node: object) -> list[str]:
    if isinstance(node, dict):
        own = [node["class_path"]] if isinstance(node.get("class_path"), str) else []
        return own + [p for value in node.values() for p in class_paths(value)]
    if isinstance(node, list):
        return [p for value in node for p in class_paths(value)]
    return []


@pytest.mark.parametrize("name", EXPORTED_BEFORE)
def test_every_name_exported_before_still_resolves(name: str) -> None:
    assert name in lightning_peft.__all__ and name in dir(lightning_peft)
    assert getattr(lightning_peft, name) is not None


def test_every_exported_name_resolves() -> None:
    missing = [n for n in lightning_peft.__all__ if getattr(lightning_peft, n, None) is None]
    assert not missing
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchName'"):
        lightning_peft.NoSuchName  # noqa: B018


@pytest.mark.parametrize("module, name", sorted(OLD_PATHS.items()))
def test_old_module_paths_resolve(module: str, name: str) -> None:
    assert getattr(importlib.import_module(module), name) is not None


def test_every_config_class_path_resolves() -> None:
    paths = sorted({p for config in CONFIGS.glob("*.yaml") for p in class_paths(yaml.safe_load(config.read_text()))})
    assert any(p.startswith("lightning_peft.") for p in paths)
    for path in paths:
        module, _, name = path.rpartition(".")
        assert getattr(importlib.import_module(module), name) is not None, path


def test_adapter_library_is_exported() -> None:
    from lightning_peft.library import AdapterLibrary

    assert "AdapterLibrary" in lightning_peft.__all__ and lightning_peft.AdapterLibrary is AdapterLibrary


def test_litelora_names_are_exported() -> None:
    from lightning_peft.adapters.litelora import LiteLoRA
    from lightning_peft.callbacks.continual import ContinualAdapterCallback
    from lightning_peft.datamodules.continual import ContinualDataModule

    assert {"LiteLoRA", "ContinualAdapterCallback"} <= set(lightning_peft.__all__)
    assert lightning_peft.LiteLoRA is LiteLoRA and lightning_peft.ContinualAdapterCallback is ContinualAdapterCallback
    assert importlib.import_module("lightning_peft.datamodules").ContinualDataModule is ContinualDataModule
