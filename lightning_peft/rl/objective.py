"""The PPO objective: GAE advantages and TorchRL's clipped loss over a policy's networks.

Losses per minibatch of ``B`` transitions (``r = exp(log pi(a|s) - log pi_old(a|s))``,
``A`` = GAE advantage standardised over the minibatch, ``R`` = GAE value target)::

    L_clip    = -mean_B min(r A, clip(r, 1 - eps, 1 + eps) A)
    L_value   = value_coef * mean_B (V(s) - R)^2
    L_entropy = -entropy_coef * mean_B H[pi(.|s)]
    loss      = L_clip + L_value + L_entropy

The three terms come from TorchRL's ``ClipPPOLoss`` and the advantages from TorchRL's functional
``generalized_advantage_estimate`` (``docs/rl.md`` says why those pieces and not TorchRL's
collectors or environments). TorchRL and tensordict are imported lazily.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_peft.rl.networks import IndependentNormal

__all__ = ["clip_ppo_loss", "gae", "ppo_losses"]


def gae(
    reward: Tensor,
    value: Tensor,
    next_value: Tensor,
    done: Tensor,
    terminated: Tensor,
    gamma: float,
    lmbda: float,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over ``[T, E]`` tensors (time first, then envs).

    ``delta_t = r_t + gamma * (1 - terminated_t) * V(s'_t) - V(s_t)`` and
    ``A_t = delta_t + gamma * lmbda * (1 - done_t) * A_{t+1}``; returns ``(A, A + V)``.
    ``next_value`` is ``V`` of the observation that followed step ``t`` -- for a truncated
    episode, the final observation -- so truncation bootstraps while termination does not.

    Delegates to ``torchrl.objectives.value.functional.generalized_advantage_estimate``, which
    wants ``[E, T, 1]``.
    """
    from torchrl.objectives.value.functional import generalized_advantage_estimate

    def to_etf(x: Tensor) -> Tensor:
        return x.transpose(0, 1).unsqueeze(-1)

    adv, target = generalized_advantage_estimate(
        gamma,
        lmbda,
        to_etf(value.float()),
        to_etf(next_value.float()),
        to_etf(reward.float()),
        to_etf(done.bool()),
        to_etf(terminated.bool()),
        time_dim=-2,
    )
    return adv.squeeze(-1).transpose(0, 1), target.squeeze(-1).transpose(0, 1)


def clip_ppo_loss(module: Any) -> Any:
    """TorchRL's ``ClipPPOLoss`` over ``module``'s networks (a :class:`~lightning_peft.rl.ppo.PPO`).

    ``functional=False``: the loss calls ``module.distribution_params`` and ``module.value``
    directly, so it always sees the current layers -- including adapter layers injected after
    it was built.
    """
    from torchrl.objectives import ClipPPOLoss

    hp = module.hparams
    loss = ClipPPOLoss(
        _actor(module),
        _critic(module),
        clip_epsilon=hp["clip_epsilon"],
        entropy_bonus=True,
        entropy_coeff=float(hp["entropy_coef"]),
        critic_coeff=float(hp["value_coef"]),
        loss_critic_type="l2",
        normalize_advantage=hp["normalize_advantage"],
        clip_value=bool(hp["clip_value_loss"]),
        functional=False,
    )
    loss.set_keys(
        action="action",
        sample_log_prob="sample_log_prob",
        value="state_value",
        advantage="advantage",
        value_target="value_target",
    )
    return loss


def _actor(module: Any) -> Any:
    """``observation -> distribution parameters -> action`` as a probabilistic tensordict module."""
    from tensordict.nn import ProbabilisticTensorDictModule, ProbabilisticTensorDictSequential, TensorDictModule

    if module.action_kind == "discrete":
        dist_keys, dist_cls = ["logits"], torch.distributions.Categorical
    else:
        dist_keys, dist_cls = ["loc", "scale"], IndependentNormal
    head = TensorDictModule(module.distribution_params, in_keys=["observation"], out_keys=dist_keys)
    sample = ProbabilisticTensorDictModule(in_keys=dist_keys, out_keys=["action"], distribution_class=dist_cls)
    return ProbabilisticTensorDictSequential(head, sample)


def _critic(module: Any) -> Any:
    from tensordict.nn import TensorDictModule

    def value_column(observation: Tensor) -> Tensor:
        return module.value(observation)  # [B, 1], the layout TorchRL's loss expects

    return TensorDictModule(value_column, in_keys=["observation"], out_keys=["state_value"])


def ppo_losses(loss_module: Any, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """``loss_module`` (from :func:`clip_ppo_loss`) on a minibatch of the RL datamodule.

    ``batch``: ``observation [B, D]`` (normalised), ``action [B]``/``[B, A]``,
    ``sample_log_prob [B]``, ``advantage [B]``, ``value_target [B]``, ``state_value [B]``.
    Returns ``loss`` (the total) and the terms ``loss_objective``, ``loss_critic``
    (already times ``value_coef``), ``loss_entropy`` (already times ``-entropy_coef``) plus
    diagnostics (``entropy``, ``clip_fraction``, ``kl_approx``, ``explained_variance``).
    """
    from tensordict import TensorDict

    n = batch["observation"].shape[0]
    columns = {key: batch[key].reshape(n, 1) for key in ("advantage", "value_target", "state_value")}
    td = TensorDict(
        {"observation": batch["observation"], "action": batch["action"], "sample_log_prob": batch["sample_log_prob"], **columns},
        batch_size=[n],
    )
    out = loss_module(td)
    result = {key: value.reshape(()) if value.numel() == 1 else value for key, value in out.items()}
    zero = result["loss_objective"].new_zeros(())
    result.setdefault("loss_critic", zero)  # absent when value_coef == 0
    result.setdefault("loss_entropy", zero)
    result["loss"] = result["loss_objective"] + result["loss_critic"] + result["loss_entropy"]
    return result
