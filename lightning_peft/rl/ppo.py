"""PPO as a LightningModule: an actor-critic MLP policy trained with the clipped objective.

One Lightning *epoch* is one rollout: :class:`lightning_peft.rl.rollout.RLDataModule`
collects ``num_envs x rollout_steps`` transitions with the current policy, computes advantages
with :meth:`PPO.compute_advantages` (GAE) and serves ``update_epochs`` shuffled passes of
minibatches; each minibatch is one optimizer step here. The losses are in
:mod:`lightning_peft.rl.objective` (TorchRL's ``ClipPPOLoss``), the policy file format in
:mod:`lightning_peft.rl.policy_file`.

Networks (attribute names are what adapter targets refer to)::

    obs_norm  running mean/variance of observations (buffers), clips to +-obs_clip
    policy    Sequential(Linear(obs, h1), act, Linear(h1, h2), act, Linear(h2, n_out))
              n_out = number of discrete actions (logits) or the action dimension (Gaussian mean)
    value     Sequential(Linear(obs, h1), act, Linear(h1, h2), act, Linear(h2, 1))
    log_std   LogStd: ``log_std.weight [action_dim]`` (continuous actions only), the
              state-independent log standard deviation; a module so that adapter configs can
              name it in ``trainable_modules``

``policy.0``, ``policy.2``, ``policy.4``, ``value.0``, ``value.2`` and ``value.4`` are the linear
layers (``"all-linear"`` matches exactly these).
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from lightning_peft.io import atomic_write_file, state_mismatch
from lightning_peft.rl.networks import IndependentNormal, LogStd, describe_spaces, mlp
from lightning_peft.rl.normalization import RunningObsNorm
from lightning_peft.rl.objective import clip_ppo_loss, gae, ppo_losses
from lightning_peft.rl.policy_file import (
    POLICY_FORMAT,
    plain_keys,
    policy_fingerprint,
    policy_hparam_names,
    read_policy_metadata,
    read_policy_state,
)
from lightning_peft.validation import (
    InvalidArgumentError,
    InvalidArgumentTypeError,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_str,
)

__all__ = ["PPO", "LogStd", "RunningObsNorm", "gae", "policy_fingerprint"]

_read_policy_state = read_policy_state  # the old private name (tests/files/test_security.py imports it from here)


class PPO(L.LightningModule):
    """Proximal policy optimisation of a small actor-critic MLP on an RL task.

    Args:
        task: a task name from :mod:`lightning_peft.rl.tasks` (``"CartPole-v1"``,
            ``"CartPole-v1/long-pole"``, ``"Pendulum-v1?gravity=12"``, ``"metaworld/reach-v3"``).
            Only its observation and action spaces are used here; the datamodule runs the task.
        hidden_sizes: widths of the hidden layers of both the policy and the value network.
        activation: hidden non-linearity.
        learning_rate: Adam learning rate.
        lr_schedule: ``"linear"`` anneals the learning rate to 0 at ``trainer.max_steps``.
        gamma: discount factor.
        gae_lambda: GAE's lambda.
        clip_epsilon: PPO's clip range ``eps``.
        value_coef: weight of the value loss.
        entropy_coef: weight of the entropy bonus.
        normalize_advantage: standardise advantages per minibatch.
        clip_value_loss: also clip the value update to ``+-clip_epsilon`` around the old value.
        normalize_observations: normalise observations with running statistics (saved with the
            policy as buffers).
        update_obs_norm: keep updating those statistics during training. ``None`` means: yes
            when training from scratch, no when adapting a ``base_checkpoint`` (the adapted
            policy then sees inputs scaled exactly as its frozen base did, and an adapter file
            needs no statistics of its own).
        init_log_std: initial log standard deviation of Gaussian actions (continuous only).
        max_grad_norm: clip the gradient norm to this (unless the Trainer's
            ``gradient_clip_val`` is set); ``None`` disables.
        base_checkpoint: a trained policy to start from, loaded at construction (before any
            adapter is injected): a ``.safetensors`` file written by ``export_path`` or
            :meth:`save_policy`, or a Lightning ``.ckpt`` of a ``PPO`` run.
        export_path: after ``fit``, write the whole policy here (``.safetensors``); this is how
            ``configs/rl_base.yaml`` hands its base to ``configs/rl_lora.yaml``.
        cpu_threads: torch intra-op threads while fitting on CPU (restored afterwards). These
            MLPs see batches of a few hundred rows, where extra threads only add
            synchronisation (on small machines under load, markedly slower runs). ``None``
            leaves torch's setting alone.
    """

    def __init__(
        self,
        task: str = "CartPole-v1",
        hidden_sizes: Sequence[int] = (64, 64),
        activation: Literal["tanh", "relu"] = "tanh",
        learning_rate: float = 3e-4,
        lr_schedule: Literal["constant", "linear"] = "constant",
        gamma: float = 0.99,
        gae_lambda: float = 0.95,
        clip_epsilon: float = 0.2,
        value_coef: float = 0.5,
        entropy_coef: float = 0.0,
        normalize_advantage: bool = True,
        clip_value_loss: bool = False,
        normalize_observations: bool = True,
        update_obs_norm: bool | None = None,
        init_log_std: float = 0.0,
        max_grad_norm: float | None = 0.5,
        base_checkpoint: str | None = None,
        export_path: str | None = None,
        cpu_threads: int | None = 1,
    ) -> None:
        super().__init__()
        from lightning_peft.rl.tasks import get_task, task_spaces

        hidden_sizes = _check_args(**{k: v for k, v in locals().items() if k in _CHECKED})
        spec = get_task(task)  # unknown task -> ValueError listing the registered ones
        self.save_hyperparameters()
        self.hparams["hidden_sizes"] = hidden_sizes
        self.hparams["task"] = spec.name

        obs_space, act_space = task_spaces(spec)
        self.observation_shape, self.action_kind, self.action_dim, low, high = describe_spaces(spec.name, obs_space, act_space)
        obs_dim = self.observation_dim
        act = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]

        self.obs_norm = RunningObsNorm(obs_dim)
        self.normalize_observations = normalize_observations
        self.policy = mlp([obs_dim, *hidden_sizes, self.action_dim], act, out_gain=0.01)
        self.value = mlp([obs_dim, *hidden_sizes, 1], act, out_gain=1.0)
        if self.action_kind == "continuous":
            self.log_std = LogStd(self.action_dim, init_log_std)
            self.register_buffer("action_low", torch.as_tensor(low, dtype=torch.float32))
            self.register_buffer("action_high", torch.as_tensor(high, dtype=torch.float32))
        self.update_obs_norm = (base_checkpoint is None if update_obs_norm is None else bool(update_obs_norm)) and normalize_observations
        self._ppo_loss: Any = None
        #: fingerprint and source of the base this policy started from (None: from scratch)
        self.base_fingerprint: str | None = None
        self.base_source: str | None = None
        if base_checkpoint is not None:
            self.load_policy_weights(base_checkpoint)

    # ------------------------------------------------------------------ policy
    @property
    def observation_dim(self) -> int:
        return int(np.prod(self.observation_shape))

    def normalize(self, obs: Tensor, update: bool = False) -> Tensor:
        """Flatten ``obs [N, *obs_shape]`` to ``[N, D]`` and normalise (optionally updating)."""
        obs = torch.as_tensor(obs, dtype=torch.float32, device=self.obs_norm.mean.device)
        obs = obs.reshape(obs.shape[0], -1)
        if obs.shape[-1] != self.observation_dim:
            raise ValueError(
                f"observation of shape {tuple(obs.shape[1:])} does not fit this policy, which "
                f"expects {self.observation_shape} (task {self.hparams['task']!r})"
            )
        if not self.normalize_observations:
            return obs
        if update:
            self.obs_norm.update(obs)
        return self.obs_norm(obs)

    def distribution_params(self, observation: Tensor) -> Any:
        """Distribution parameters from normalised observations ``[B, D]``.

        Discrete: logits ``[B, n]``. Continuous: ``(loc [B, A], scale [B, A])``.
        """
        out = self.policy(observation)
        if self.action_kind == "discrete":
            return out
        return out, self.log_std().exp().expand_as(out)

    def distribution(self, observation: Tensor) -> torch.distributions.Distribution:
        """The action distribution ``pi(.|s)`` for normalised observations ``[B, D]``."""
        params = self.distribution_params(observation)
        if self.action_kind == "discrete":
            return torch.distributions.Categorical(logits=params)
        return IndependentNormal(*params)

    def state_value(self, observation: Tensor) -> Tensor:
        """``V(s)`` ``[B]`` for normalised observations ``[B, D]``."""
        return self.value(observation).squeeze(-1)

    def forward(self, observation: Tensor) -> Tensor:
        """Greedy action for raw observations ``[B, *obs_shape]`` (inference)."""
        return self.predict(observation, deterministic=True)

    @torch.no_grad()
    def predict(self, observation: Any, deterministic: bool = True) -> Tensor:
        """Actions for raw observations ``[B, *obs_shape]``, ready for ``env.step``.

        Discrete: ``[B]`` int64. Continuous: ``[B, A]`` clipped to the action bounds.
        """
        dist = self.distribution(self.normalize(observation))
        if deterministic:
            action = dist.probs.argmax(-1) if self.action_kind == "discrete" else dist.mean
        else:
            action = dist.sample()
        return self.env_action(action)

    def env_action(self, action: Tensor) -> Tensor:
        if self.action_kind == "continuous":
            return torch.maximum(torch.minimum(action, self.action_high), self.action_low)
        return action

    @torch.no_grad()
    def rollout_step(self, observation: Any) -> dict[str, Tensor]:
        """One acting step while collecting: normalise (updating the statistics when training
        does), sample ``a ~ pi(.|s)``. Returns ``observation`` (normalised ``[N, D]``),
        ``action`` (as sampled: ``[N]`` or ``[N, A]``, unclipped so its log-prob is exact),
        ``sample_log_prob [N]`` and ``env_action`` (clipped, for ``env.step``)."""
        obs = self.normalize(observation, update=self.update_obs_norm and self.training)
        dist = self.distribution(obs)
        action = dist.sample()
        return {
            "observation": obs,
            "action": action,
            "sample_log_prob": dist.log_prob(action),
            "env_action": self.env_action(action),
        }

    @torch.no_grad()
    def compute_advantages(
        self,
        reward: Tensor,
        value: Tensor,
        next_value: Tensor,
        done: Tensor,
        terminated: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """GAE with this module's ``gamma`` and ``gae_lambda``; see :func:`gae`."""
        return gae(
            reward,
            value,
            next_value,
            done,
            terminated,
            self.hparams["gamma"],
            self.hparams["gae_lambda"],
        )

    # ------------------------------------------------------------------ loss
    def _loss_module(self) -> Any:
        """TorchRL's ``ClipPPOLoss`` over this module's networks (:func:`~lightning_peft.rl.objective.clip_ppo_loss`).

        Built lazily and kept out of the module tree (no second copy of the parameters in the
        ``state_dict``, and adapter targeting such as ``"all-linear"`` does not walk into it).
        """
        if self._ppo_loss is None:
            self.__dict__["_ppo_loss"] = clip_ppo_loss(self)  # bypasses nn.Module: not registered as a submodule
        loss = self._ppo_loss
        device = self.obs_norm.mean.device
        if loss.clip_epsilon.device != device:
            loss.to(device)
        return loss

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state["_ppo_loss"] = None  # rebuilt lazily; holds bound methods
        return state

    def ppo_loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The PPO losses on a minibatch (keys as produced by the RL datamodule); see
        :func:`~lightning_peft.rl.objective.ppo_losses` for the keys in and out."""
        return ppo_losses(self._loss_module(), batch)

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        losses = self.ppo_loss(batch)
        n = batch["observation"].shape[0]
        self.log_dict(
            {
                "train/loss": losses["loss"].detach(),
                "train/loss_policy": losses["loss_objective"].detach(),
                "train/loss_value": losses["loss_critic"].detach(),
                "train/entropy": losses["entropy"],
                "train/clip_fraction": losses["clip_fraction"],
                "train/kl_approx": losses["kl_approx"],
            },
            on_step=True,
            on_epoch=False,
            batch_size=n,
        )
        stats = batch.get("rollout_stats")
        if stats:
            # One set of rollout statistics per epoch (= per rollout), logged at epoch level so
            # that EarlyStopping on "rollout/episode_return" and every logger see each rollout.
            self.log_dict(
                {f"rollout/{k}": float(v) for k, v in stats.items() if k != "episode_return"},
                on_step=False,
                on_epoch=True,
                batch_size=1,
            )
            if "episode_return" in stats:
                self.log(
                    "rollout/episode_return", float(stats["episode_return"]), on_step=False, on_epoch=True, prog_bar=True, batch_size=1
                )
        return losses["loss"]

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError(
                "PPO has no trainable parameters: every parameter is frozen. Check the adapter's target_modules / trainable_modules."
            )
        optimizer = torch.optim.Adam(params, lr=self.hparams["learning_rate"], eps=1e-5)
        max_steps = getattr(self.trainer, "max_steps", -1) if self._trainer is not None else -1
        if self.hparams["lr_schedule"] == "linear" and max_steps and max_steps > 0:
            # factor 1 - step / max_steps, 0 from max_steps on
            sched = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=max_steps)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return optimizer

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        if gradient_clip_val is None and self.hparams["max_grad_norm"] is not None:
            gradient_clip_val, gradient_clip_algorithm = self.hparams["max_grad_norm"], "norm"
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_fit_start(self) -> None:
        threads = self.hparams.get("cpu_threads")
        if threads and self.device.type == "cpu":
            self.__dict__["_saved_threads"] = torch.get_num_threads()
            torch.set_num_threads(int(threads))

    def on_fit_end(self) -> None:
        saved = self.__dict__.pop("_saved_threads", None)
        if saved is not None:
            torch.set_num_threads(saved)
        self._export()

    def _export(self) -> None:
        path = self.hparams.get("export_path")
        if not path or (self._trainer is not None and not self.trainer.is_global_zero):
            return
        if set(self.state_dict()) != set(plain_keys(self)):
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(
                f"PPO: export_path={path!r} writes plain policies; this one carries adapters, "
                "which AdapterCallback(export_dir=...) exports. Nothing written to export_path."
            )
            return
        self.save_policy(path)

    # ------------------------------------------------------------------ files
    def policy_metadata(self) -> dict[str, str]:
        allowed = policy_hparam_names(PPO)
        hp = {k: v for k, v in self.hparams.items() if k in allowed}
        return {
            "format": POLICY_FORMAT,
            "task": str(self.hparams["task"]),
            "hparams": json.dumps(hp, sort_keys=True, default=list),
            "observation_shape": json.dumps(list(self.observation_shape)),
            "action": json.dumps([self.action_kind, self.action_dim]),
        }

    def save_policy(self, path: str | os.PathLike) -> str:
        """Write the whole policy (weights and observation statistics) to ``path``
        (``.safetensors``, written atomically). Refuses a policy with adapter layers injected:
        export those with ``save_adapter`` and keep the base file as it was."""
        from safetensors.torch import save

        state = self.state_dict()
        base_keys = set(plain_keys(self))
        if set(state) != base_keys:
            extra = sorted(set(state) - base_keys)[:4]
            raise ValueError(
                f"save_policy writes a plain (adapter-free) policy, but this one has adapter "
                f"tensors ({extra} ...). Save the adapter with lightning_peft.save_adapter or "
                "merge it first."
            )
        data = save(
            {k: v.detach().cpu().contiguous() for k, v in state.items()},
            metadata=self.policy_metadata(),
        )
        path = os.fspath(path)
        atomic_write_file(path, lambda f: f.write(data))
        return path

    @classmethod
    def from_policy_file(cls, path: str | os.PathLike, task: str | None = None) -> PPO:
        """Rebuild a policy saved by :meth:`save_policy` (optionally for another task of the same
        family: same spaces, different physics)."""
        path = os.fspath(path)
        _, saved = read_policy_metadata(path)
        allowed = policy_hparam_names(cls)
        hp = {k: v for k, v in saved.items() if k in allowed}
        if task is not None:
            hp["task"] = task
        try:
            return cls(**hp, base_checkpoint=path)
        except (InvalidArgumentError, InvalidArgumentTypeError) as error:  # a setting the file records, not the caller's
            raise ValueError(f"policy file {path!r} records a setting this PPO refuses: {error} (the file is damaged or edited)") from error

    def load_policy_weights(self, path: str | os.PathLike) -> None:
        """Load a trained policy's weights (see ``base_checkpoint``) into this module.

        Refuses, naming both sides, a file whose tensors do not fit (another environment's
        observation/action shapes, other hidden sizes, or a file holding adapter tensors).
        """
        path = os.fspath(path)
        state, source, saved_hp = read_policy_state(path)
        # Settings that change the function without changing any tensor shape.
        for key in ("activation", "normalize_observations"):
            if key in saved_hp and saved_hp[key] != self.hparams[key]:
                raise ValueError(
                    f"base checkpoint {path!r} (task {source!r}) was trained with {key}="
                    f"{saved_hp[key]!r}, but this PPO policy (task {self.hparams['task']!r}) has "
                    f"{key}={self.hparams[key]!r}; set model.init_args.{key} to match the base"
                )
        expected = self.state_dict()
        details = state_mismatch(expected, state)
        if details:
            raise ValueError(
                f"base checkpoint {path!r} (task {source!r}) does not fit this PPO policy "
                f"(task {self.hparams['task']!r}, observation {self.observation_shape}, "
                f"{self.action_kind} action dim {self.action_dim}, hidden sizes "
                f"{self.hparams['hidden_sizes']}): {details}"
            )
        state = {k: state[k] for k in expected}
        self.load_state_dict(state, strict=True)
        self.base_fingerprint = policy_fingerprint(self)
        self.base_source = f"{path} (task {source})"


def _check_args(
    task: Any,
    hidden_sizes: Any,
    activation: Any,
    learning_rate: Any,
    lr_schedule: Any,
    gamma: Any,
    gae_lambda: Any,
    clip_epsilon: Any,
    value_coef: Any,
    entropy_coef: Any,
    normalize_advantage: Any,
    clip_value_loss: Any,
    normalize_observations: Any,
    update_obs_norm: Any,
    init_log_std: Any,
    max_grad_norm: Any,
    base_checkpoint: Any,
    export_path: Any,
    cpu_threads: Any,
) -> list[int]:
    """Validate :class:`PPO`'s arguments (each error names the argument); returns the hidden sizes as a list."""
    check_str("task", task)
    if isinstance(hidden_sizes, (str, bytes)) or not isinstance(hidden_sizes, (list, tuple)) or not hidden_sizes:
        raise InvalidArgumentTypeError(
            "hidden_sizes", f"hidden_sizes must be a non-empty list of positive widths, e.g. [64, 64], got {hidden_sizes!r}"
        )
    hidden_sizes = [check_int(f"hidden_sizes[{i}]", h, low=1) for i, h in enumerate(hidden_sizes)]
    check_choice("activation", activation, ("tanh", "relu"))
    check_float("learning_rate", learning_rate, low=0.0, low_open=True)
    check_choice("lr_schedule", lr_schedule, ("constant", "linear"))
    for name, value in (("gamma", gamma), ("gae_lambda", gae_lambda), ("clip_epsilon", clip_epsilon)):
        check_float(name, value, 0.0, 1.0, low_open=True)
    check_float("value_coef", value_coef, low=0.0)
    check_float("entropy_coef", entropy_coef, low=0.0)
    for name, flag in (
        ("normalize_advantage", normalize_advantage),
        ("clip_value_loss", clip_value_loss),
        ("normalize_observations", normalize_observations),
    ):
        check_bool(name, flag)
    check_bool("update_obs_norm", update_obs_norm, allow_none=True)
    check_float("init_log_std", init_log_std)
    check_float("max_grad_norm", max_grad_norm, low=0.0, low_open=True, allow_none=True)
    check_str("base_checkpoint", base_checkpoint, allow_none=True)
    check_str("export_path", export_path, allow_none=True)
    check_int("cpu_threads", cpu_threads, low=1, allow_none=True)
    return hidden_sizes


_CHECKED = frozenset(inspect.signature(_check_args).parameters)
