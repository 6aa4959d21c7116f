"""LiteLoRA continual fine-tuning on an adapter library (pure torch; the Lightning callback and
``benchmarks/continual.py`` both use it): ``begin_task`` / ``l0_penalty`` / ``end_task`` around
each task's training, ``continual_metrics`` of the accuracy matrix, ``principal_angles`` between
the library's adapter subspaces."""

from lightning_peft.continual.metrics import continual_metrics
from lightning_peft.continual.subspaces import principal_angles, subspace_angles
from lightning_peft.continual.tasks import TaskDecision, begin_task, end_task, l0_penalty

__all__ = ["TaskDecision", "begin_task", "continual_metrics", "end_task", "l0_penalty", "principal_angles", "subspace_angles"]
