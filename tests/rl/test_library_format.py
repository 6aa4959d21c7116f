"""PolicyLibrary format 3: each task is an ``lightning_peft.io`` adapter export."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium  # noqa: F401  (a test dependency: fail loudly if missing)
import pytest
import torch

from lightning_peft import LoRA, PolicyLibrary, apply_adapter, load_adapter
from lightning_peft.rl.ppo import PPO


@pytest.fixture()
def library(tmp_path: Path) -> tuple[PolicyLibrary, PPO, Path]:
    torch.manual_seed(0)
    base_file = Path(PPO("Pendulum-v1", normalize_observations=True).save_policy(tmp_path / "base.safetensors"))
    lib = PolicyLibrary(tmp_path / "lib", base=base_file)
    adapted = PPO("Pendulum-v1", base_checkpoint=str(base_file), normalize_observations=True)
    apply_adapter(adapted, LoRA(rank=2, target_modules=["policy.0", "value.0"]), trainable_modules=["log_std"])
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.2)
    adapted.normalize(torch.randn(32, 3) * 3 - 1, update=True)  # the task's own observation statistics
    lib.add("Pendulum-v1/heavy", adapted)
    return lib, adapted, base_file


def _outputs(model: PPO, obs: torch.Tensor):
    with torch.no_grad():
        x = model.normalize(obs)
        return model.distribution_params(x), model.state_value(x)


def test_a_task_is_an_io_export_that_load_adapter_loads(library):
    lib, adapted, base_file = library
    entry = lib.index["tasks"]["Pendulum-v1/heavy"]
    task_dir = lib.root / entry["file"]
    assert sorted(p.name for p in task_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert entry["file_bytes"] == sum(p.stat().st_size for p in task_dir.iterdir())
    assert json.loads((lib.root / "index.json").read_text())["format"] == "lightning_peft.policy_library/3"
    obs = torch.randn(8, 3)
    loaded = load_adapter(PPO.from_policy_file(base_file), task_dir)  # the plain io loader
    torch.testing.assert_close(_outputs(loaded, obs), _outputs(adapted, obs))
    torch.testing.assert_close(_outputs(PolicyLibrary(lib.root, cache=False).activate("Pendulum-v1/heavy"), obs), _outputs(adapted, obs))
    torch.testing.assert_close(_outputs(lib.activate_base(), obs), _outputs(PPO.from_policy_file(base_file), obs))
    lib.remove("Pendulum-v1/heavy")
    assert not task_dir.exists() and lib.tasks == []


def test_a_format_2_library_is_refused_with_how_to_rebuild(library):
    lib, _, _ = library
    index = json.loads((lib.root / "index.json").read_text())
    index["format"] = "lightning_peft.policy_library/2"
    (lib.root / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"policy_library/2.*one safetensors file per task.*Rebuild the library"):
        PolicyLibrary(lib.root)
