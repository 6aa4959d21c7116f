"""An RL DataModule: rollouts collected from gymnasium vector environments by the current policy.

``RLDataModule`` serves an :class:`RolloutDataset` (an ``IterableDataset``). Each time Lightning
starts an epoch it iterates the dataset once, which

1. steps ``num_envs`` copies of the task for ``rollout_steps`` steps with the LightningModule's
   current policy (``module.rollout_step``), environments and episodes carrying over from one
   rollout to the next;
2. computes ``V(s)`` and ``V(s')`` in two batched passes and GAE advantages and value targets
   (``module.compute_advantages``);
3. yields ``update_epochs`` shuffled passes over the ``N = num_envs * rollout_steps``
   transitions in minibatches of ``minibatch_size``.

So one epoch = one rollout, one minibatch = one optimizer step, and ``trainer.max_steps`` counts
optimizer steps (``env steps = max_steps / (update_epochs * ceil(N / minibatch_size)) * N``).

Each minibatch is a dict::

    observation      [B, D]   normalised observation the action was taken in
    action           [B] (discrete, int64) or [B, A] (continuous, unclipped sample)
    sample_log_prob  [B]      log pi_old(a|s)
    state_value      [B]      V_old(s)
    advantage        [B]      GAE advantage
    value_target     [B]      advantage + V_old(s)
    rollout_stats    dict of floats, on the first minibatch of each rollout only: the mean
                     ``episode_return`` and ``episode_length`` over the last ``episode_window``
                     finished episodes, ``success_rate`` when the environment reports
                     ``info["success"]`` (Meta-World), ``episodes`` and ``env_steps`` so far.

The module needs ``rollout_step``, ``state_value``, ``normalize``, ``compute_advantages``,
``observation_shape``, ``action_kind`` and ``action_dim`` (:class:`~lightning_peft.rl.ppo.PPO`
has them).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from lightning_peft.rl.normalization import RunningReturnScale
from lightning_peft.validation import check_bool, check_int, check_str

__all__ = ["RLDataModule", "RolloutDataset", "evaluate_policy", "check_policy_fits_task"]

_REQUIRED = ("rollout_step", "state_value", "normalize", "compute_advantages", "observation_shape", "action_kind", "action_dim")


def check_policy_fits_task(module: Any, task: str) -> None:
    """Raise ``ValueError`` when ``module``'s observation/action shapes do not fit ``task``."""
    from gymnasium import spaces

    from lightning_peft.rl.tasks import get_task, task_spaces

    missing = [name for name in _REQUIRED if not hasattr(module, name)]
    if missing:
        raise TypeError(
            f"RLDataModule needs a policy module with {list(_REQUIRED)}; "
            f"{type(module).__name__} lacks {missing}. Use lightning_peft.rl.ppo.PPO."
        )
    spec = get_task(task)
    obs_space, act_space = task_spaces(spec)
    problems = []
    if int(np.prod(obs_space.shape)) != int(np.prod(module.observation_shape)):
        problems.append(f"observation shape {tuple(obs_space.shape)} vs the policy's {module.observation_shape}")
    if isinstance(act_space, spaces.Discrete):
        env_action = ("discrete", int(act_space.n))
    elif isinstance(act_space, spaces.Box):
        env_action = ("continuous", int(np.prod(act_space.shape)))
    else:
        env_action = (type(act_space).__name__, -1)
    if env_action != (module.action_kind, module.action_dim):
        problems.append(
            f"{env_action[0]} actions of size {env_action[1]} vs the policy's {module.action_kind} actions of size {module.action_dim}"
        )
    if problems:
        policy_task = getattr(module, "hparams", {}).get("task", "?")
        raise ValueError(
            f"task {spec.name!r} does not fit the policy (built for task {policy_task!r}): "
            + "; ".join(problems)
            + ". Use the same environment family for the model and the data."
        )


class _EpisodeTracker:
    """Per-environment running return/length/success, and a window of finished episodes."""

    def __init__(self, num_envs: int, window: int) -> None:
        self.returns = np.zeros(num_envs, dtype=np.float64)
        self.lengths = np.zeros(num_envs, dtype=np.int64)
        self.success = np.zeros(num_envs, dtype=bool)
        self.reports_success = False
        self.finished_returns: deque[float] = deque(maxlen=window)
        self.finished_lengths: deque[int] = deque(maxlen=window)
        self.finished_success: deque[float] = deque(maxlen=window)
        self.episodes = 0

    def _success(self, info: dict[str, Any], n: int) -> np.ndarray | None:
        if "success" not in info:
            return None
        self.reports_success = True
        mask = np.asarray(info.get("_success", np.ones(n, dtype=bool)), dtype=bool)
        return np.asarray(info["success"]).astype(bool) & mask

    def step(self, reward: np.ndarray, done: np.ndarray, info: dict[str, Any]) -> None:
        self.returns += reward
        self.lengths += 1
        n = len(done)
        # With SAME_STEP autoreset a finished environment's step info is in info["final_info"]
        # (info itself then holds the next episode's reset info).
        for source, mask in ((info, ~done), (info.get("final_info", {}), done)):
            flags = self._success(source, n) if isinstance(source, dict) else None
            if flags is not None:
                self.success |= flags & mask
        for i in np.flatnonzero(done):
            self.finished_returns.append(float(self.returns[i]))
            self.finished_lengths.append(int(self.lengths[i]))
            if self.reports_success:
                self.finished_success.append(float(self.success[i]))
            self.returns[i], self.lengths[i], self.success[i] = 0.0, 0, False
            self.episodes += 1

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {"episodes": float(self.episodes)}
        if self.finished_returns:
            out["episode_return"] = float(np.mean(self.finished_returns))
            out["episode_length"] = float(np.mean(self.finished_lengths))
        if self.finished_success:
            out["success_rate"] = float(np.mean(self.finished_success))
        return out


class RolloutDataset(IterableDataset):
    """Iterating once = one rollout with the current policy, then its PPO minibatches."""

    def __init__(
        self,
        task: str,
        num_envs: int,
        rollout_steps: int,
        minibatch_size: int,
        update_epochs: int,
        seed: int,
        episode_window: int,
        normalize_rewards: bool,
    ) -> None:
        super().__init__()
        self.task = task
        self.num_envs = num_envs
        self.rollout_steps = rollout_steps
        self.minibatch_size = minibatch_size
        self.update_epochs = update_epochs
        self.seed = seed
        self.normalize_rewards = normalize_rewards
        self.module: Any = None
        self.env: Any = None
        self._obs: np.ndarray | None = None
        self.tracker = _EpisodeTracker(num_envs, episode_window)
        self.env_steps = 0
        self.rollouts = 0
        self._reward_scale: RunningReturnScale | None = None
        self._rng = torch.Generator().manual_seed(seed)

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None

    def _ensure_env(self) -> None:
        if self.env is None:
            from lightning_peft.rl.tasks import make_vector_env

            self.env = make_vector_env(self.task, self.num_envs, seed=self.seed)
            self._obs, _ = self.env.reset(seed=self.seed)

    @torch.no_grad()
    def collect(self) -> dict[str, Tensor]:
        """One rollout: ``[T, E]`` tensors (``observation``/``next_observation`` ``[T, E, D]``)."""
        if self.module is None:
            raise RuntimeError("RolloutDataset has no policy; RLDataModule.setup() attaches it")
        self._ensure_env()
        module = self.module
        T, E = self.rollout_steps, self.num_envs
        obs_list, next_obs_list, act_list, logp_list = [], [], [], []
        rewards = np.zeros((T, E), dtype=np.float32)
        dones = np.zeros((T, E), dtype=bool)
        terms = np.zeros((T, E), dtype=bool)
        if self.normalize_rewards and self._reward_scale is None:
            self._reward_scale = RunningReturnScale(E, float(module.hparams.get("gamma", 0.99)))
        for t in range(T):
            step = module.rollout_step(self._obs)
            env_action = step["env_action"].cpu().numpy()
            next_obs, reward, terminated, truncated, info = self.env.step(env_action)
            done = np.logical_or(terminated, truncated)
            self.tracker.step(np.asarray(reward, dtype=np.float64), done, info)
            # The observation that followed step t: the final one for a finished episode
            # (SAME_STEP autoreset puts it in info["final_obs"]), else the next one.
            follow = np.array(next_obs, dtype=np.float32, copy=True)
            for i in np.flatnonzero(done):
                follow[i] = info["final_obs"][i]
            obs_list.append(step["observation"].cpu())
            next_obs_list.append(torch.as_tensor(follow.reshape(E, -1)))
            act_list.append(step["action"].cpu())
            logp_list.append(step["sample_log_prob"].cpu())
            r = np.asarray(reward, dtype=np.float32)
            if self._reward_scale is not None:
                r = self._reward_scale(r.astype(np.float64), done).astype(np.float32)
            rewards[t], dones[t], terms[t] = r, done, terminated
            self._obs = next_obs
        self.env_steps += T * E
        self.rollouts += 1
        observation = torch.stack(obs_list)  # [T, E, D], already normalised
        # Normalise the following observations with the statistics as they are now (no update).
        next_observation = module.normalize(torch.stack(next_obs_list).reshape(T * E, -1))
        device = module.obs_norm.mean.device if hasattr(module, "obs_norm") else "cpu"
        value = module.state_value(observation.reshape(T * E, -1).to(device)).reshape(T, E).cpu()
        next_value = module.state_value(next_observation.to(device)).reshape(T, E).cpu()
        reward_t = torch.as_tensor(rewards)
        done_t = torch.as_tensor(dones)
        term_t = torch.as_tensor(terms)
        advantage, value_target = module.compute_advantages(reward_t, value, next_value, done_t, term_t)
        return {
            "observation": observation,
            "action": torch.stack(act_list),
            "sample_log_prob": torch.stack(logp_list),
            "state_value": value,
            "advantage": advantage.cpu(),
            "value_target": value_target.cpu(),
            "reward": reward_t,
            "done": done_t,
            "terminated": term_t,
        }

    def stats(self) -> dict[str, float]:
        return {**self.tracker.stats(), "env_steps": float(self.env_steps)}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rollout = self.collect()
        n = self.rollout_steps * self.num_envs
        flat = {
            k: rollout[k].reshape(n, *rollout[k].shape[2:])
            for k in ("observation", "action", "sample_log_prob", "state_value", "advantage", "value_target")
        }
        stats = self.stats()
        first = True
        for _ in range(self.update_epochs):
            perm = torch.randperm(n, generator=self._rng)
            for start in range(0, n, self.minibatch_size):
                idx = perm[start : start + self.minibatch_size]
                batch: dict[str, Any] = {k: v[idx] for k, v in flat.items()}
                if first:
                    batch["rollout_stats"] = stats
                    first = False
                yield batch


class RLDataModule(L.LightningDataModule):
    """Rollouts of ``task`` collected each epoch by the LightningModule's current policy.

    Args:
        task: a task name from :mod:`lightning_peft.rl.tasks` (unknown names raise
            ``ValueError`` listing the registered ones). Must have the observation and action
            shapes of the model's task (checked at ``setup``, before anything is written).
        num_envs: environments stepped in lock-step (``gymnasium.vector.SyncVectorEnv``).
        rollout_steps: steps per environment per rollout (``T``).
        minibatch_size: transitions per optimizer step.
        update_epochs: passes over each rollout.
        seed: environment seed (env ``i`` gets ``seed + i``; rank ``k`` of a multi-process run
            adds ``10_000 k``) and minibatch shuffling seed.
        episode_window: finished episodes averaged in ``rollout/episode_return``.
        normalize_rewards: scale rewards by the running std of the discounted return (helps
            Pendulum and MountainCarContinuous; logged returns stay raw).
    """

    def __init__(
        self,
        task: str = "CartPole-v1",
        num_envs: int = 8,
        rollout_steps: int = 128,
        minibatch_size: int = 256,
        update_epochs: int = 4,
        seed: int = 0,
        episode_window: int = 100,
        normalize_rewards: bool = False,
    ) -> None:
        super().__init__()
        from lightning_peft.rl.tasks import get_task

        check_str("task", task)
        for name, value in (
            ("num_envs", num_envs),
            ("rollout_steps", rollout_steps),
            ("minibatch_size", minibatch_size),
            ("update_epochs", update_epochs),
            ("episode_window", episode_window),
        ):
            check_int(name, value, low=1)
        check_int("seed", seed)
        check_bool("normalize_rewards", normalize_rewards)
        self.task = get_task(task).name  # unknown task -> ValueError listing registered tasks
        self.save_hyperparameters()
        self.dataset = RolloutDataset(
            self.task,
            num_envs,
            rollout_steps,
            minibatch_size,
            update_epochs,
            seed,
            episode_window,
            normalize_rewards,
        )

    @property
    def steps_per_rollout(self) -> int:
        """Optimizer steps per epoch (per rollout)."""
        n = self.env_steps_per_rollout
        return self.hparams["update_epochs"] * math.ceil(n / self.hparams["minibatch_size"])

    @property
    def env_steps_per_rollout(self) -> int:
        return self.hparams["num_envs"] * self.hparams["rollout_steps"]

    def attach(self, module: Any) -> None:
        """Use ``module``'s policy for collection (done by ``setup`` under a Trainer)."""
        check_policy_fits_task(module, self.task)
        self.dataset.module = module

    def prepare_data(self) -> None:
        # Lightning calls this before loggers create their directories and before callbacks'
        # setup (SaveConfigCallback writes config.yaml there): a policy that does not fit the
        # task is refused here with nothing written.
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.lightning_module is not None:
            check_policy_fits_task(trainer.lightning_module, self.task)

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.lightning_module is None:
            raise RuntimeError("RLDataModule.setup needs a Trainer with a LightningModule")
        if self.dataset.env is None and trainer.global_rank:
            # under DDP each rank collects different episodes
            self.dataset.seed = self.hparams["seed"] + 10_000 * trainer.global_rank
            self.dataset._rng.manual_seed(self.dataset.seed)
        self.attach(trainer.lightning_module)

    def train_dataloader(self) -> DataLoader:
        # batch_size=None: the dataset yields ready minibatches; num_workers=0: collection must
        # run in the process that owns the policy being trained.
        return DataLoader(self.dataset, batch_size=None, num_workers=0)

    def teardown(self, stage: str) -> None:
        # Keep the environments between fit calls (resuming continues the episodes).
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"env_steps": self.dataset.env_steps, "rollouts": self.dataset.rollouts, "episodes": self.dataset.tracker.episodes}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.dataset.env_steps = int(state_dict.get("env_steps", 0))
        self.dataset.rollouts = int(state_dict.get("rollouts", 0))
        self.dataset.tracker.episodes = int(state_dict.get("episodes", 0))


@torch.no_grad()
def evaluate_policy(
    module: Any,
    task: str,
    episodes: int = 10,
    seed: int = 10_000,
    deterministic: bool = True,
    max_steps: int = 100_000,
) -> dict[str, Any]:
    """Run ``episodes`` full episodes of ``task`` (env ``i`` seeded ``seed + i``) with
    ``module.predict`` and return ``mean_return``, ``std_return``, ``returns`` and, where the
    environment reports ``info["success"]``, ``success_rate``. Observation statistics are not
    updated."""
    from lightning_peft.rl.tasks import make_env

    check_policy_fits_task(module, task)
    was_training = module.training
    module.eval()
    envs = [make_env(task) for _ in range(episodes)]
    obs = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(envs)])
    returns = np.zeros(episodes)
    success = np.zeros(episodes, dtype=bool)
    reports_success = False
    alive = np.ones(episodes, dtype=bool)
    steps = 0
    try:
        while alive.any() and steps < max_steps:
            idx = np.flatnonzero(alive)
            actions = module.predict(obs[idx], deterministic=deterministic).cpu().numpy()
            for j, i in enumerate(idx):
                o, r, term, trunc, info = envs[i].step(actions[j])
                returns[i] += float(r)
                if "success" in info:
                    reports_success = True
                    success[i] |= bool(info["success"])
                obs[i] = o
                if term or trunc:
                    alive[i] = False
            steps += 1
    finally:
        for env in envs:
            env.close()
        module.train(was_training)
    out: dict[str, Any] = {
        "mean_return": float(returns.mean()),
        "std_return": float(returns.std()),
        "returns": returns.tolist(),
    }
    if reports_success:
        out["success_rate"] = float(success.mean())
    return out
