"""Reinforcement learning on top of the core: tasks, the PPO LightningModule, rollout data,
observation normalisation and the policy library (one base plus one adapter per task).

Needs the ``rl`` extra (``pip install lightning-peft[rl]``: gymnasium, torchrl). Nothing in the
core imports this package; gymnasium, torchrl and tensordict are imported only inside it, and
names here are imported lazily.

=====================  ==================================================================
``rl.tasks``           task names -> gymnasium environments with physics overrides
``rl.normalization``   running observation statistics, reward scaling, one moment update
``rl.networks``        the actor-critic MLPs, the Gaussian head, space description
``rl.objective``       GAE and TorchRL's clipped PPO loss over a ``PPO`` module
``rl.policy_file``     policy files: format, fingerprint, reading policies and checkpoints
``rl.ppo``             the ``PPO`` LightningModule
``rl.rollout``         ``RLDataModule``: rollouts from vector environments; ``evaluate_policy``
``rl.library``         ``PolicyLibrary``: one base, many task adapters, one live policy
``rl.library_store``   the library's index, its format, paths kept inside the root
``rl.library_layout``  adapter layouts of task exports, rebuilt from io's load plans
``rl.library_report``  the library's byte accounting
=====================  ==================================================================
"""

from lightning_peft.lazy_exports import lazy_exports

_EXPORTS = {
    "PPO": "lightning_peft.rl.ppo",
    "RunningObsNorm": "lightning_peft.rl.normalization",
    "gae": "lightning_peft.rl.objective",
    "policy_fingerprint": "lightning_peft.rl.policy_file",
    "RLDataModule": "lightning_peft.rl.rollout",
    "RolloutDataset": "lightning_peft.rl.rollout",
    "evaluate_policy": "lightning_peft.rl.rollout",
    "PolicyLibrary": "lightning_peft.rl.library",
    "TaskSpec": "lightning_peft.rl.tasks",
    "get_task": "lightning_peft.rl.tasks",
    "register_task": "lightning_peft.rl.tasks",
    "registered_tasks": "lightning_peft.rl.tasks",
    "task_family": "lightning_peft.rl.tasks",
    "make_env": "lightning_peft.rl.tasks",
    "make_vector_env": "lightning_peft.rl.tasks",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
