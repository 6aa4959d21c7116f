"""PPO, the RL datamodule, the task registry and the policy library."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import gymnasium  # noqa: F401  (a test dependency: fail loudly if missing)
import lightning as L
import numpy as np
import pytest
import torch
import torchrl  # noqa: F401  (a test dependency: fail loudly if missing)

from lightning_peft.rl.ppo import PPO, gae  # noqa: E402
from lightning_peft.rl.rollout import RLDataModule, evaluate_policy  # noqa: E402
from lightning_peft.rl.tasks import (  # noqa: E402
    get_task,
    make_env,
    registered_tasks,
    task_family,
)

REPO = Path(__file__).resolve().parents[2]

# rank <= min(d_in, d_out) on CartPole's 4 -> 64 -> 64 -> {2, 1} layers
CARTPOLE_RANKS = {"policy.0": 4, "value.0": 4, "policy.4": 2, "value.4": 1}


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` and its bytes."""
    return {p: (root / p).read_bytes() for p in _files(root) if (root / p).is_file()}


def _lora(rank: int = 8):
    from lightning_peft import LoRA

    return LoRA(
        rank=rank,
        alpha=2 * rank,
        target_modules="all-linear",
        rank_pattern={k: min(v, rank) for k, v in CARTPOLE_RANKS.items()},
    )


def _adapted(base_file: Path, task: str, seed: int):
    """A policy adapted from ``base_file`` with random (non-zero) LoRA tensors."""
    from lightning_peft import apply_adapter

    torch.manual_seed(seed)
    model = PPO(task, base_checkpoint=str(base_file), normalize_observations=False)
    apply_adapter(model, _lora())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.2)
    return model


@pytest.fixture()
def base_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = PPO("CartPole-v1", normalize_observations=False)
    return Path(model.save_policy(tmp_path / "base.safetensors"))


# ------------------------------------------------------------------------- numerics
def _hand_gae(reward, value, next_value, done, terminated, gamma, lmbda):
    T, E = len(reward), len(reward[0])
    adv = [[0.0] * E for _ in range(T)]
    for e in range(E):
        running = 0.0
        for t in reversed(range(T)):
            delta = reward[t][e] + gamma * (0.0 if terminated[t][e] else next_value[t][e]) - value[t][e]
            running = delta + gamma * lmbda * (0.0 if done[t][e] else running)
            adv[t][e] = running
    return adv


def test_gae_matches_hand_computation():
    gamma, lmbda = 0.9, 0.8
    reward = [[1.0, 0.5], [2.0, -1.0], [0.5, 1.0], [1.0, 2.0]]
    value = [[0.3, 0.1], [0.2, -0.4], [0.7, 0.2], [0.1, 0.9]]
    next_value = [[0.2, -0.4], [0.5, 0.2], [0.1, 0.9], [0.6, 1.5]]
    # env 0: episode truncated after t=1 (bootstraps from next_value[1]); env 1: terminated at t=2
    done = [[False, False], [True, False], [False, True], [False, False]]
    terminated = [[False, False], [False, False], [False, True], [False, False]]
    expected = _hand_gae(reward, value, next_value, done, terminated, gamma, lmbda)
    # a few entries spelled out: env 0, t=1 is the truncated step, so A = r + g V(s') - V(s)
    assert expected[1][0] == pytest.approx(2.0 + 0.9 * 0.5 - 0.2)
    # env 1, t=2 terminated: no bootstrap
    assert expected[2][1] == pytest.approx(1.0 - 0.2)
    t = lambda x, dt=torch.float32: torch.tensor(x, dtype=dt)  # noqa: E731
    adv, target = gae(t(reward), t(value), t(next_value), t(done, torch.bool), t(terminated, torch.bool), gamma, lmbda)
    assert adv.shape == (4, 2)
    torch.testing.assert_close(adv, t(expected))
    torch.testing.assert_close(target, t(expected) + t(value))
    model = PPO("CartPole-v1", gamma=gamma, gae_lambda=lmbda)
    adv2, _ = model.compute_advantages(t(reward), t(value), t(next_value), t(done, torch.bool), t(terminated, torch.bool))
    torch.testing.assert_close(adv2, adv)


def _batch(model: PPO, n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, model.observation_dim, generator=g)
    with torch.no_grad():
        dist = model.distribution(obs)
        action = dist.sample()
        # old log-probs shifted so that some ratios fall outside [1 - eps, 1 + eps]
        old = dist.log_prob(action) + torch.linspace(-0.6, 0.6, n)
    return {
        "observation": obs,
        "action": action,
        "sample_log_prob": old,
        "advantage": torch.randn(n, generator=g),
        "value_target": torch.randn(n, generator=g),
        "state_value": torch.randn(n, generator=g),
    }


@pytest.mark.parametrize("task", ["CartPole-v1", "Pendulum-v1"])
def test_clipped_loss_matches_hand_computation(task: str):
    torch.manual_seed(0)
    eps, c_v, c_e = 0.2, 0.5, 0.01
    model = PPO(task, clip_epsilon=eps, value_coef=c_v, entropy_coef=c_e, normalize_advantage=True)
    batch = _batch(model, 32, seed=1)
    out = model.ppo_loss(batch)

    obs, act = batch["observation"], batch["action"]
    if task == "CartPole-v1":
        logits = model.policy(obs)
        logp_all = logits - logits.logsumexp(-1, keepdim=True)
        logp = logp_all.gather(1, act.long().unsqueeze(1)).squeeze(1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    else:
        mean, log_std = model.policy(obs), model.log_std.weight
        var = torch.exp(2 * log_std)
        logp = (-((act - mean) ** 2) / (2 * var) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        entropy = (0.5 + 0.5 * math.log(2 * math.pi) + log_std).sum().expand(obs.shape[0])
    adv = batch["advantage"]
    adv = (adv - adv.mean()) / adv.std().clamp_min(1e-4)
    ratio = torch.exp(logp - batch["sample_log_prob"])
    assert ((ratio < 1 - eps) | (ratio > 1 + eps)).any(), "the batch must exercise clipping"
    objective = -torch.min(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv).mean()
    value = model.value(obs).squeeze(-1)
    value_loss = c_v * ((value - batch["value_target"]) ** 2).mean()
    entropy_loss = -c_e * entropy.mean()

    torch.testing.assert_close(out["loss_objective"], objective, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss_critic"], value_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss_entropy"], entropy_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], objective + value_loss + entropy_loss, rtol=1e-5, atol=1e-6)
    clipped = ((ratio < 1 - eps) | (ratio > 1 + eps)).float().mean()
    torch.testing.assert_close(out["clip_fraction"], clipped, rtol=1e-5, atol=1e-6)
    # gradients reach the policy, the value network (and log_std)
    out["loss"].backward()
    assert model.policy[0].weight.grad is not None and model.value[0].weight.grad is not None
    if task == "Pendulum-v1":
        assert model.log_std.weight.grad is not None


def test_observation_normaliser_running_statistics():
    model = PPO("Acrobot-v1")
    data = torch.randn(300, 6, generator=torch.Generator().manual_seed(0)) * torch.arange(1, 7) + 3.0
    for chunk in data.split(70):
        model.normalize(chunk, update=True)
    torch.testing.assert_close(model.obs_norm.mean, data.mean(0), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(model.obs_norm.var, data.var(0, unbiased=False), rtol=1e-3, atol=1e-3)
    normed = model.normalize(data)
    assert normed.mean(0).abs().max() < 1e-3 and (normed.std(0) - 1).abs().max() < 1e-2


# ------------------------------------------------------------------------- tasks
def test_physics_variants_and_inline_overrides():
    env = make_env("CartPole-v1/long-pole")
    raw = env.unwrapped
    assert raw.length == 1.0 and raw.polemass_length == pytest.approx(raw.masspole * 1.0)
    env = make_env("CartPole-v1?gravity=12&masspole=0.2")
    raw = env.unwrapped
    assert (raw.gravity, raw.masspole) == (12.0, 0.2) and raw.total_mass == pytest.approx(1.2)
    assert make_env("Acrobot-v1/heavy-link").unwrapped.LINK_MASS_2 == 2.0
    assert make_env("Pendulum-v1/mars").unwrapped.g == 3.7
    family = task_family("CartPole-v1", "length", [0.25, 1.0])
    assert family == ["CartPole-v1?length=0.25", "CartPole-v1?length=1"]
    assert get_task(family[1]).physics == {"length": 1.0}
    with pytest.raises(ValueError, match=r"unknown physics parameter 'lenght'.*known: \['force_mag', 'gravity', 'length'"):
        get_task("CartPole-v1?lenght=2")
    with pytest.raises(ValueError, match="positive"):
        get_task("CartPole-v1?length=-1")


def test_unknown_task_lists_registered_ones():
    names = registered_tasks()
    assert {"CartPole-v1", "Pendulum-v1", "Acrobot-v1", "MountainCarContinuous-v0"} <= set(names)
    assert "metaworld/reach-v3" in names and "CartPole-v1/long-pole" in names
    for make in (get_task, PPO, RLDataModule):
        with pytest.raises(ValueError) as info:
            make("CartPool-v1")
        message = str(info.value)
        assert "unknown RL task 'CartPool-v1'" in message
        assert "Did you mean 'CartPole-v1'" in message
        assert all(n in message for n in ("CartPole-v1", "Acrobot-v1", "Pendulum-v1/heavy", "metaworld/push-v3"))


def test_metaworld_task_without_metaworld_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "metaworld", None)  # as if the optional package were not installed
    with pytest.raises(ImportError, match=r"needs the optional package 'metaworld'.*lightning-peft\[rl\]"):
        make_env("metaworld/reach-v3")


def test_metaworld_reach_rollout():
    model = PPO("metaworld/reach-v3")
    dm = RLDataModule("metaworld/reach-v3", num_envs=2, rollout_steps=8, minibatch_size=8, update_epochs=1)
    dm.attach(model)
    batches = list(dm.dataset)
    assert batches[0]["observation"].shape == (8, 39) and batches[0]["action"].shape == (8, 4)


# ------------------------------------------------------------------------- datamodule
@pytest.mark.parametrize(
    ("task", "obs_dim", "action_shape"),
    [("CartPole-v1", 4, ()), ("Pendulum-v1/heavy", 3, (1,))],
)
def test_datamodule_yields_rollouts_of_the_right_shapes(task, obs_dim, action_shape):
    model = PPO(task)
    dm = RLDataModule(task, num_envs=3, rollout_steps=40, minibatch_size=32, update_epochs=2, seed=3)
    dm.attach(model)
    rollout = dm.dataset.collect()
    assert rollout["observation"].shape == (40, 3, obs_dim)
    assert rollout["action"].shape == (40, 3, *action_shape)
    for key in ("sample_log_prob", "state_value", "advantage", "value_target", "reward", "done"):
        assert rollout[key].shape == (40, 3), key
    torch.testing.assert_close(rollout["value_target"], rollout["advantage"] + rollout["state_value"])
    batches = list(dm.dataset)  # a second rollout, then 2 passes of ceil(120 / 32) = 4 minibatches
    assert len(batches) == 2 * 4 == dm.steps_per_rollout
    sizes = [b["observation"].shape[0] for b in batches]
    assert sizes == [32, 32, 32, 24] * 2
    assert batches[0]["action"].shape[1:] == action_shape
    stats = batches[0]["rollout_stats"]
    assert "rollout_stats" not in batches[1]
    assert stats["env_steps"] == 2 * 40 * 3
    if task == "Pendulum-v1/heavy":  # episodes of 200 steps: none finished within 80 steps
        assert stats["episodes"] == 0 and "episode_return" not in stats
    else:
        assert stats["episodes"] > 0 and stats["episode_return"] > 0


def test_episode_returns_are_tracked_per_environment():
    model = PPO("CartPole-v1")
    dm = RLDataModule("CartPole-v1", num_envs=2, rollout_steps=300, minibatch_size=600, update_epochs=1)
    dm.attach(model)
    rollout = dm.dataset.collect()
    tracker = dm.dataset.tracker
    # CartPole pays 1 per step, so each finished return equals its length
    assert tracker.episodes == int(rollout["done"].sum())
    assert list(tracker.finished_returns) == [float(n) for n in tracker.finished_lengths]
    assert sum(tracker.finished_lengths) <= 600


def test_mismatched_shapes_are_refused_and_nothing_written(tmp_path: Path, base_file: Path):
    model = PPO("CartPole-v1")
    message = r"task 'Pendulum-v1' does not fit the policy \(built for task 'CartPole-v1'\).*observation shape \(3,\)"
    with pytest.raises(ValueError, match=message):
        RLDataModule("Pendulum-v1").attach(model)
    root = tmp_path / "run"
    trainer = L.Trainer(default_root_dir=root, max_steps=2, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="does not fit the policy"):
        trainer.fit(model, RLDataModule("Acrobot-v1"))
    assert _files(root) == []
    # a base checkpoint from another environment
    message = r"base checkpoint .*base.safetensors' \(task 'CartPole-v1'\) does not fit this PPO policy \(task 'Acrobot-v1'"
    with pytest.raises(ValueError, match=message):
        PPO("Acrobot-v1", base_checkpoint=str(base_file), normalize_observations=False)
    # same shapes, different function: refused too
    message = r"trained with normalize_observations=False, but this PPO policy .* has normalize_observations=True"
    with pytest.raises(ValueError, match=message):
        PPO("CartPole-v1", base_checkpoint=str(base_file))
    with pytest.raises(ValueError, match="activation='tanh'"):
        PPO("CartPole-v1", base_checkpoint=str(base_file), normalize_observations=False, activation="relu")
    with pytest.raises(ValueError, match="observation of shape"):
        model.predict(torch.zeros(2, 5))


def test_evaluate_policy_and_policy_file_round_trip(tmp_path: Path):
    torch.manual_seed(0)
    model = PPO("Pendulum-v1")
    model.normalize(torch.randn(50, 3), update=True)
    path = model.save_policy(tmp_path / "p.safetensors")
    again = PPO.from_policy_file(path, task="Pendulum-v1/heavy")
    assert again.hparams["task"] == "Pendulum-v1/heavy"
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)
    result = evaluate_policy(again, "Pendulum-v1/heavy", episodes=2)
    assert len(result["returns"]) == 2 and result["mean_return"] < 0
    assert "success_rate" not in result


def test_a_policy_file_with_an_edited_setting_is_refused_naming_the_file(tmp_path: Path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    path = PPO("CartPole-v1").save_policy(tmp_path / "p.safetensors")
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta["hparams"] = json.dumps({**json.loads(meta["hparams"]), "activation": "gelu"})
    save_file(tensors, str(tmp_path / "edited.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"policy file .*edited.safetensors' records a setting.*activation.*'gelu'"):
        PPO.from_policy_file(tmp_path / "edited.safetensors")


# ------------------------------------------------------------------------- training
def test_ppo_trains_through_lightning(tmp_path: Path):
    torch.manual_seed(0)
    model = PPO("CartPole-v1", learning_rate=1e-3, normalize_observations=True)
    dm = RLDataModule("CartPole-v1", num_envs=2, rollout_steps=32, minibatch_size=32, update_epochs=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_steps=8,
        max_epochs=-1,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
    )
    trainer.fit(model, dm)
    assert trainer.global_step == 8 and trainer.current_epoch == 2  # 4 minibatch steps per rollout
    assert not torch.equal(before["policy.0.weight"], model.policy[0].weight)
    assert model.obs_norm.count > 100  # statistics updated while collecting from scratch
    metrics = trainer.callback_metrics
    assert {"rollout/episode_return", "rollout/env_steps", "train/loss"} <= set(metrics)
    assert float(metrics["rollout/env_steps"]) == 2 * 2 * 32


def test_lora_adaptation_freezes_the_base_and_keeps_obs_statistics(tmp_path: Path):
    from lightning_peft import AdapterCallback

    base = PPO("CartPole-v1", normalize_observations=True)
    base.normalize(torch.randn(64, 4, generator=torch.Generator().manual_seed(0)) * 2 + 1, update=True)
    base_file = base.save_policy(tmp_path / "base.safetensors")
    model = PPO("CartPole-v1/long-pole", base_checkpoint=str(base_file), normalize_observations=True)
    assert model.update_obs_norm is False  # adapting: the base's statistics stay
    base = {k: v.clone() for k, v in model.state_dict().items()}
    callback = AdapterCallback(adapter=_lora(), export_dir=str(tmp_path / "adapter"))
    dm = RLDataModule("CartPole-v1/long-pole", num_envs=2, rollout_steps=16, minibatch_size=16, update_epochs=1)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_steps=4,
        max_epochs=-1,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        callbacks=[callback],
    )
    trainer.fit(model, dm)
    state = model.state_dict()
    for key, value in base.items():
        net, _, rest = key.partition(".")
        adapted = f"{net}.{rest.replace('.', '.base_layer.', 1)}" if net in ("policy", "value") else key
        torch.testing.assert_close(state[adapted], value, msg=key)  # frozen base unchanged
    assert any(p.requires_grad and p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------- policy library
def test_policy_library_add_activate_merge_report(tmp_path: Path, base_file: Path):
    from lightning_peft import PolicyLibrary
    from lightning_peft.adapters.base import AdapterLayer

    root = tmp_path / "lib"
    lib = PolicyLibrary(root, base=str(base_file))
    tasks = ["CartPole-v1/long-pole", "CartPole-v1/heavy-pole", "CartPole-v1?length=2"]
    trained = {t: _adapted(base_file, t, seed=i) for i, t in enumerate(tasks)}
    for task, model in trained.items():
        entry = lib.add(task, model)
        lora_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if "lora_" in n)
        assert entry["tensor_bytes"] == lora_bytes and entry["kind"] == "lora"
        assert entry["ranks"]["policy.2"] == 8 and entry["ranks"]["value.4"] == 1
    assert lib.tasks == sorted(tasks)
    index = json.loads((root / "index.json").read_text())
    assert len(list((root / "adapters").iterdir())) == 3 and set(index["tasks"]) == set(tasks)

    obs = torch.randn(16, 4)

    def outputs(model):
        with torch.no_grad():
            x = model.normalize(obs)
            return model.distribution_params(x), model.state_value(x)

    layers_before = None
    for task in tasks + tasks[::-1]:
        live = lib.activate(task)
        want, got = outputs(trained[task]), outputs(live)
        torch.testing.assert_close(got, want)
        layers = [m for m in live.modules() if isinstance(m, AdapterLayer)]
        if layers_before is not None:  # same layout: tensors copied into the same layers
            assert all(a is b for a, b in zip(layers, layers_before))
        layers_before = layers
    live = lib.activate(tasks[0], merge=True)
    assert lib.merged and all(m.merged for m in live.modules() if isinstance(m, AdapterLayer))
    want = outputs(trained[tasks[0]])  # merged weights: another summation order, tolerance scaled to the outputs

    def leaves(x):
        return [x] if isinstance(x, torch.Tensor) else [t for item in x for t in leaves(item)]

    scale = max(1.0, *(float(t.abs().max()) for t in leaves(want)))
    torch.testing.assert_close(outputs(live), want, rtol=1e-5, atol=1e-5 * scale)
    live = lib.activate(tasks[1])  # unmerges first
    torch.testing.assert_close(outputs(live), outputs(trained[tasks[1]]))
    plain = PPO.from_policy_file(base_file)
    torch.testing.assert_close(outputs(lib.activate_base()), outputs(plain))

    report = lib.report()
    full = sum(v.numel() * v.element_size() for v in plain.state_dict().values())
    adapter = report["policies"][tasks[0]]["tensor_bytes"]
    assert report["full_copy_bytes"] == full
    assert report["policies"][tasks[0]]["ratio"] == pytest.approx(full / adapter)
    assert report["savings"] == pytest.approx(1 - (full + 3 * adapter) / (3 * full))
    assert report["projected_savings"][50] == pytest.approx(1 - 1 / 50 - adapter / full)
    assert "x smaller" in lib.format_report()

    # reopened from disk, same outputs
    again = PolicyLibrary(root)
    torch.testing.assert_close(outputs(again.activate(tasks[2])), outputs(trained[tasks[2]]))


def test_policy_library_accepts_adapter_callback_exports(tmp_path: Path, base_file: Path):
    from lightning_peft import PolicyLibrary, save_adapter

    model = _adapted(base_file, "CartPole-v1/moon", seed=5)
    save_adapter(model, tmp_path / "export")
    lib = PolicyLibrary(tmp_path / "lib", base=str(base_file))
    lib.add("CartPole-v1/moon", tmp_path / "export")
    obs = torch.randn(8, 4)
    torch.testing.assert_close(lib.activate("CartPole-v1/moon").predict(obs), model.predict(obs))


def test_policy_library_refuses_foreign_adapters_and_bad_tasks(tmp_path: Path, base_file: Path):
    from lightning_peft import PolicyLibrary, save_adapter

    root = tmp_path / "lib"
    lib = PolicyLibrary(root, base=str(base_file))
    lib.add("CartPole-v1/long-pole", _adapted(base_file, "CartPole-v1/long-pole", seed=0))
    snapshot = _snapshot(root)

    torch.manual_seed(123)
    other = Path(PPO("CartPole-v1", normalize_observations=False).save_policy(tmp_path / "other.safetensors"))
    foreign = _adapted(other, "CartPole-v1/moon", seed=1)
    with pytest.raises(ValueError) as info:
        lib.add("CartPole-v1/moon", foreign)
    message = str(info.value)
    assert foreign.base_fingerprint in message and lib.base_fingerprint in message
    assert "other.safetensors" in message and "base.safetensors" in message

    save_adapter(foreign, tmp_path / "foreign_export")
    with pytest.raises(ValueError, match=rf"was made for base .* but this library's base is {lib.base_fingerprint}"):
        lib.add("CartPole-v1/moon", tmp_path / "foreign_export")

    # the same base weights loaded without a recorded fingerprint still get compared tensor by tensor
    sneaky = _adapted(other, "CartPole-v1/moon", seed=1)
    sneaky.base_fingerprint = None
    with pytest.raises(ValueError, match="frozen base differs"):
        lib.add("CartPole-v1/moon", sneaky)

    with pytest.raises(ValueError, match="unknown RL task 'CartPole-v9'.*Registered tasks"):
        lib.add("CartPole-v9", foreign)
    with pytest.raises(ValueError, match=r"task 'Acrobot-v1' does not fit the policy.*observation shape \(6,\)"):
        lib.add("Acrobot-v1", foreign)
    with pytest.raises(ValueError, match="already in the library"):
        lib.add("CartPole-v1/long-pole", _adapted(base_file, "CartPole-v1/long-pole", seed=2))
    with pytest.raises(ValueError, match=r"not in the library; it holds \['CartPole-v1/long-pole'\]"):
        lib.activate("CartPole-v1/moon")
    with pytest.raises(ValueError, match="was built on base"):
        PolicyLibrary(root, base=str(other))
    assert _snapshot(root) == snapshot


# ------------------------------------------------------------------------- configs
def _run_config(name: str, tmp_path: Path, *extra: str):
    from lightning_peft.cli import cli_main

    return cli_main(
        [
            "fit",
            "--config",
            str(REPO / "configs" / name),
            "--trainer.max_steps=8",
            f"--trainer.default_root_dir={tmp_path / name}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            *extra,
        ]
    )


def test_configs_run_a_few_steps(tmp_path: Path):
    base = tmp_path / "policy.safetensors"
    cli = _run_config("rl_base.yaml", tmp_path, f"--model.init_args.export_path={base}")
    assert cli.trainer.global_step == 8 and base.is_file()
    cli = _run_config("rl_lora.yaml", tmp_path, f"--model.init_args.base_checkpoint={base}")
    assert cli.trainer.global_step == 8
    exported = list((tmp_path / "rl_lora.yaml").rglob("adapter/adapter_model.safetensors"))
    assert len(exported) == 1
    trainable = {n for n, p in cli.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    full = tmp_path / "full.safetensors"
    cli = _run_config("rl_full.yaml", tmp_path, f"--model.init_args.base_checkpoint={base}", f"--model.init_args.export_path={full}")
    assert cli.trainer.global_step == 8 and full.is_file()
    assert all(p.requires_grad for p in cli.model.parameters())
    # the adapter from the LoRA run goes into a library built on the same base
    from lightning_peft import PolicyLibrary

    lib = PolicyLibrary(tmp_path / "lib", base=str(base))
    lib.add("CartPole-v1/long-pole", exported[0].parent)
    assert lib.report()["policies"]["CartPole-v1/long-pole"]["ratio"] > 3


@pytest.mark.slow
def test_ppo_learns_cartpole(tmp_path: Path):
    """~40k environment steps of PPO lift CartPole's mean return far above random (~22)."""
    L.seed_everything(0)
    model = PPO("CartPole-v1", learning_rate=1e-3, lr_schedule="linear", gamma=0.98, gae_lambda=0.8, normalize_observations=False)
    dm = RLDataModule("CartPole-v1", num_envs=8, rollout_steps=128, minibatch_size=256, update_epochs=10)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_steps=40 * 40,
        max_epochs=-1,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, dm)
    assert float(trainer.callback_metrics["rollout/episode_return"]) > 150
    assert evaluate_policy(model, "CartPole-v1", episodes=5)["mean_return"] > 150


def test_success_rate_is_logged_where_the_environment_reports_it():
    from lightning_peft.rl.rollout import _EpisodeTracker

    tracker = _EpisodeTracker(num_envs=3, window=10)
    ok = np.ones(3, dtype=bool)
    # step 1: env 1 succeeds mid-episode
    tracker.step(np.ones(3), np.zeros(3, bool), {"success": np.array([0.0, 1.0, 0.0]), "_success": ok})
    # step 2: all finish; with SAME_STEP autoreset the last step's info is in "final_info"
    # and "success" is the next episode's reset info (ignored for finished environments)
    tracker.step(
        np.ones(3),
        np.ones(3, bool),
        {"final_info": {"success": np.array([1.0, 0.0, 0.0]), "_success": ok}, "success": np.ones(3), "_success": ok},
    )
    stats = tracker.stats()
    assert stats["episodes"] == 3 and stats["episode_return"] == 2.0
    assert stats["success_rate"] == pytest.approx(2 / 3)  # envs 0 and 1 succeeded, env 2 did not
    assert "success_rate" not in _EpisodeTracker(1, 10).stats()


# ------------------------------------------------------------------------- layout of lightning_peft.rl
def test_old_import_paths_and_config_class_paths_resolve_to_lightning_peft_rl():
    import importlib

    import lightning_peft
    import lightning_peft.datamodules as datamodules
    import lightning_peft.modules as modules
    from lightning_peft.rl import library, ppo, rollout, tasks

    old_new = {
        "lightning_peft.modules.ppo": ppo,
        "lightning_peft.datamodules.rl": rollout,
        "lightning_peft.rl_tasks": tasks,
        "lightning_peft.policy_library": library,
    }
    for old, new in old_new.items():
        assert importlib.import_module(old) is new  # the same module: private names and registries too
    assert modules.PPO is ppo.PPO and datamodules.RLDataModule is rollout.RLDataModule
    assert lightning_peft.PolicyLibrary is library.PolicyLibrary
    for config in sorted((REPO / "configs").glob("rl_*.yaml")):
        text = config.read_text()
        assert "lightning_peft.rl.ppo.PPO" in text and "lightning_peft.rl.rollout.RLDataModule" in text, config.name


def test_the_core_never_imports_lightning_peft_rl():
    import subprocess

    code = (
        "import sys, lightning_peft, lightning_peft.io, lightning_peft.targeting, lightning_peft.callbacks.adapter, "
        "lightning_peft.modules, lightning_peft.datamodules, lightning_peft.strategies\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('lightning_peft.rl', 'gymnasium', 'torchrl')))\n"
        "assert not bad, bad"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]


def test_ppo_linear_schedule_is_one_minus_step_over_max_steps():
    model = PPO("CartPole-v1", lr_schedule="linear", learning_rate=1.0)
    model.trainer = L.Trainer(max_steps=7, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    for step in range(10):
        assert scheduler.get_last_lr()[0] == pytest.approx(max(0.0, 1.0 - step / 7), abs=1e-9)
        optimizer.step()
        scheduler.step()


def test_policy_library_of_the_old_format_is_refused_with_how_to_rebuild(tmp_path: Path, base_file: Path):
    from lightning_peft import PolicyLibrary

    lib = PolicyLibrary(tmp_path / "lib", base=str(base_file))
    index = json.loads((lib.root / "index.json").read_text())
    index["format"] = "lightning_peft.policy_library/1"
    (lib.root / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"older lightning-peft.*Rebuild the library"):
        PolicyLibrary(lib.root)


def test_policy_library_fingerprint_is_the_core_scheme(base_file: Path):
    from lightning_peft.rl.policy_file import policy_fingerprint
    from lightning_peft.targeting import combine_fingerprints, module_fingerprint

    model = PPO.from_policy_file(base_file)
    linear = {n: module_fingerprint(m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert model.base_fingerprint == policy_fingerprint(model) == combine_fingerprints(linear)
