"""PolicyLibrary is the RL layer on AdapterLibrary: a format-3 library (entries without a
``type``) gains exact combinations and mixed batches, and still reopens."""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_peft import AdapterLibrary, LoRA, PolicyLibrary, apply_adapter
from lightning_peft.rl.ppo import PPO


def test_a_policy_library_combines_its_lora_tasks_and_reopens(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base_file = Path(PPO("CartPole-v1", hidden_sizes=(32, 32), normalize_observations=False).save_policy(tmp_path / "base.safetensors"))
    lib = PolicyLibrary(tmp_path / "lib", base=base_file)
    assert isinstance(lib, AdapterLibrary)
    adapted = {}
    for seed, task in enumerate(["CartPole-v1/long-pole", "CartPole-v1/heavy-pole"]):
        model = PPO("CartPole-v1", hidden_sizes=(32, 32), normalize_observations=False, base_checkpoint=str(base_file))
        apply_adapter(model, LoRA(rank=1, target_modules=["policy.2", "value.2"]), check_gradients=False)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        lib.add(task, model)
        adapted[task] = model.eval()
    assert all("type" not in e for e in lib.index["tasks"].values())  # format 3's task entries, as before
    lib.add_combination("mix", {"CartPole-v1/long-pole": 0.25, "CartPole-v1/heavy-pole": 0.75})
    again = PolicyLibrary(tmp_path / "lib", base=base_file)  # the index with a combination reopens
    assert again.tasks == sorted([*adapted, "mix"])
    obs = torch.randn(3, 4, generator=torch.Generator().manual_seed(9))
    factors = {t: again.lora_factors(t) for t in adapted}
    plain = PPO.from_policy_file(base_file).eval()
    with torch.no_grad():
        for module in ("policy.2", "value.2"):
            layer = plain.get_submodule(module)
            for task, w in (("CartPole-v1/long-pole", 0.25), ("CartPole-v1/heavy-pole", 0.75)):
                a, b, s = factors[task][module]
                layer.weight += w * s * b @ a
        torch.testing.assert_close(again.activate("mix").policy(obs), plain.policy(obs))
        with again.per_sample(["CartPole-v1/heavy-pole", None, "CartPole-v1/long-pole"]) as policy:
            mixed = policy.policy(obs)
        assert again.active == "mix"
        torch.testing.assert_close(mixed[0], adapted["CartPole-v1/heavy-pole"].policy(obs[:1])[0])
        torch.testing.assert_close(mixed[1], again.activate_base().policy(obs[1:2])[0])
        torch.testing.assert_close(mixed[2], adapted["CartPole-v1/long-pole"].policy(obs[2:])[0])
