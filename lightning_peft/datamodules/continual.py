"""``ContinualDataModule``: a sequence of tasks served one after the other in one ``fit``.

Task ``t`` trains during epochs ``[t * epochs_per_task, (t + 1) * epochs_per_task)``: the train and
val loaders are the current task's (the trainer must reload them every epoch;
``ContinualAdapterCallback`` sets ``reload_dataloaders_every_n_epochs=1`` and the epoch count).
Evaluation on every task seen so far is the callback's (``task_loader``), so this module has no
``test_dataloader`` of its own.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
from torch.utils.data import DataLoader

from lightning_peft.validation import InvalidArgumentError, InvalidArgumentTypeError, check_int, check_str_list

__all__ = ["ContinualDataModule"]


class ContinualDataModule(L.LightningDataModule):
    """Tasks trained in sequence, each a ``LightningDataModule`` with train/val(/test) loaders.

    Args:
        tasks: the task datamodules, in training order (at least one).
        epochs_per_task: training epochs of each task (``>= 1``).
        task_names: names of the tasks (the library's entry names); default ``task0``, ``task1``, ...
    """

    def __init__(self, tasks: list[L.LightningDataModule], epochs_per_task: int = 1, task_names: list[str] | None = None) -> None:
        super().__init__()
        if isinstance(tasks, L.LightningDataModule) or not isinstance(tasks, (list, tuple)):
            raise InvalidArgumentTypeError("tasks", f"tasks must be a list of LightningDataModules, got {type(tasks).__name__}")
        if len(tasks) == 0:
            raise InvalidArgumentError("tasks", "tasks is empty: give at least one task datamodule to train")
        bad = [i for i, t in enumerate(tasks) if not isinstance(t, L.LightningDataModule)]
        if bad:
            raise InvalidArgumentTypeError("tasks", f"tasks{bad} are not LightningDataModules ({[type(tasks[i]).__name__ for i in bad]})")
        check_int("epochs_per_task", epochs_per_task, low=1)
        names = check_str_list("task_names", task_names, allow_none=True)
        if names is None:
            names = [f"task{i}" for i in range(len(tasks))]
        if len(names) != len(tasks):
            raise InvalidArgumentError("task_names", f"task_names has {len(names)} names for {len(tasks)} tasks; give one name per task")
        if len(set(names)) != len(names) or any(not n.strip() for n in names):
            raise InvalidArgumentError("task_names", f"task_names must be distinct non-empty names, got {names}")
        self.tasks, self.epochs_per_task, self.task_names = list(tasks), epochs_per_task, list(names)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def total_epochs(self) -> int:
        return self.num_tasks * self.epochs_per_task

    def task_for_epoch(self, epoch: int) -> int:
        """The task trained in ``epoch`` (the last one after the schedule ends)."""
        return min(epoch // self.epochs_per_task, self.num_tasks - 1)

    @property
    def current_task(self) -> int:
        trainer = self.trainer
        return 0 if trainer is None else self.task_for_epoch(trainer.current_epoch)

    def prepare_data(self) -> None:
        for task in self.tasks:
            task.prepare_data()

    def setup(self, stage: str) -> None:
        for task in self.tasks:
            task.trainer = self.trainer
            task.setup(stage)

    def train_dataloader(self) -> Any:
        return self.tasks[self.current_task].train_dataloader()

    def val_dataloader(self) -> Any:
        return self.tasks[self.current_task].val_dataloader()

    def task_loader(self, index: int, split: Literal["val", "test"]) -> DataLoader:
        """Task ``index``'s ``split`` loader (what the callback evaluates after every task)."""
        task = self.tasks[index]
        return task.test_dataloader() if split == "test" else task.val_dataloader()

    def label_space(self, index: int) -> int:
        """How many head outputs task ``index`` needs: its ``num_classes`` when it declares one,
        else ``1 + the largest label`` of its training batches (``(inputs, labels)`` tuples or
        dicts with ``"labels"``)."""
        task = self.tasks[index]
        declared = getattr(task, "num_classes", None)
        if isinstance(declared, int):
            return declared
        largest = -1
        for batch in task.train_dataloader():
            labels = batch["labels"] if isinstance(batch, dict) else batch[1]
            largest = max(largest, int(labels.max()))
        return largest + 1
