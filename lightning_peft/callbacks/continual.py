"""``ContinualAdapterCallback``: LiteLoRA continual fine-tuning into an adapter library, in one ``fit``.

Design: one ``trainer.fit`` over a :class:`~lightning_peft.datamodules.ContinualDataModule`, which
serves task ``t``'s loaders during its ``epochs_per_task`` epochs. The callback

* at ``setup`` checks everything before anything changes (the datamodule, every task's label space
  against the head, the library's base and names, the bank entries), opens (or creates) the library
  on the plain base ``pl_module.<base_module>``, and begins the first task (``begin_task``: LiteLoRA
  layers whose frozen bank is the library's adapters). It sets the trainer to reload the loaders
  every epoch and to run ``tasks x epochs_per_task`` epochs;
* before every optimizer step adds the gradient of ``l0_penalty`` (the L0 term depends only on the
  gates, so adding its gradient once per step equals adding it to the loss, without being scaled by
  gradient accumulation or AMP's loss scale) and logs ``litelora/gate`` (``E[gamma]``) and
  ``litelora/l0``;
* when the epoch's task changes, and at ``on_train_end``: ends the task (``end_task``: recruit or
  reuse, library entries written, plain base back), evaluates every task seen so far with its own
  library entry activated (row ``t`` of the accuracy matrix), begins the next task and rebuilds the
  optimizers (``configure_optimizers``) for its new parameters;
* writes ``<log_dir>/<results_file>`` (JSON: per task recruited/reused, gate, coefficients, bytes;
  the accuracy matrix and ``continual_metrics``; principal angles between the library's adapters)
  after every task, and logs ``continual/average_accuracy``, ``continual/forgetting``,
  ``continual/adapters``.

A run cut short (``max_steps``) ends the task in progress at ``on_train_end``; later tasks are not
trained. Single process only (the library is one directory written by one writer).

Resuming (``trainer.fit(..., ckpt_path=...)`` after a crash or preemption): the callback's state
(the tasks, the task in progress, the decisions and accuracy rows so far) is in the checkpoint.
Before the model's tensors load, the module's ``on_load_checkpoint`` (wrapped at ``setup``) checks
that the checkpoint's task sequence is this run's, that the library holds every entry of the tasks
it finished and none of a task it has not, then begins the task in progress with the bank it had,
so its LiteLoRA tensors, optimizer state and epoch load as saved. The library must be the one the
interrupted run wrote (a relative ``library_dir`` is below the log dir, which a new logger version
changes: give the path). Entries the library already has are refused at ``configure_optimizers``
(wrapped too) unless such a checkpoint accounts for them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_peft.adapters.litelora import LiteLoRA, litelora_gates
from lightning_peft.continual import TaskDecision, begin_task, continual_metrics, end_task, l0_penalty, principal_angles
from lightning_peft.continual.library_view import adapter_entries
from lightning_peft.io import atomic_write_file, remove_adapter
from lightning_peft.validation import InvalidArgumentTypeError, check_choice, check_float, check_str, check_str_list

__all__ = ["ContinualAdapterCallback"]


class _ResumeHook:
    """Stands in for ``pl_module.on_load_checkpoint``: the sequence's state first (the task in
    progress begun, so its tensors load), then the class's own hook. A class, not a closure, so
    the module stays picklable."""

    def __init__(self, callback: ContinualAdapterCallback, pl_module: pl.LightningModule) -> None:
        self.callback, self.pl_module = callback, pl_module

    def __call__(self, checkpoint: dict[str, Any]) -> None:
        self.callback._resume(checkpoint)
        type(self.pl_module).on_load_checkpoint(self.pl_module, checkpoint)


class _BegunCheck:
    """Stands in for ``pl_module.configure_optimizers``: refuses library entries of this run's
    tasks that no checkpoint accounted for, then the class's own hook."""

    def __init__(self, callback: ContinualAdapterCallback, pl_module: pl.LightningModule) -> None:
        self.callback, self.pl_module = callback, pl_module

    def __call__(self) -> Any:
        if self.callback._clashes:
            raise ValueError(self.callback._clash_message())
        return type(self.pl_module).configure_optimizers(self.pl_module)


class ContinualAdapterCallback(Callback):
    """Trains a :class:`~lightning_peft.datamodules.ContinualDataModule`'s tasks one after the
    other into an ``AdapterLibrary`` with LiteLoRA's recruit-or-reuse gate (see the module docstring).

    Args:
        adapter: the ``LiteLoRA`` spec of every task.
        library_dir: the library's directory; relative paths are below the trainer's log dir. An
            existing library is reused (its adapters join the bank; its base must be this model's).
        base_module: attribute path of the plain base inside the LightningModule (``"model"`` for
            ``ImageClassifier``; ``""``: the LightningModule itself). Module names in the library
            are relative to it.
        bank: library entries the first task's bank starts from (default: every LoRA adapter entry
            already in the library); later tasks add what they recruit.
        eval_split: the split of every task evaluated after each task (``"test"`` or ``"val"``).
        results_file: the JSON written into the log dir after every task.
        gate_lr: learning rate of the gates' ``log_alpha`` in their own optimizer group (no weight
            decay, constant: schedulers built by ``configure_optimizers`` do not know the group).
            The gate has to travel a few units of ``log_alpha`` within one task to close, which the
            model's learning rate rarely allows in a short task. ``None``: the gates stay in the
            model's optimizer groups.

    After ``fit``: ``decisions`` (one ``TaskDecision`` per trained task), ``accuracy`` (the rows of
    the matrix), ``library`` (the ``AdapterLibrary``; ``library.activate(task)`` runs a task),
    ``results`` (what the JSON holds). The model is left as the plain base.
    """

    def __init__(
        self,
        adapter: LiteLoRA,
        library_dir: str = "library",
        base_module: str = "model",
        bank: list[str] | None = None,
        eval_split: Literal["val", "test"] = "test",
        results_file: str = "continual.json",
        gate_lr: float | None = None,
    ) -> None:
        if not isinstance(adapter, LiteLoRA):
            raise InvalidArgumentTypeError("adapter", f"adapter must be a LiteLoRA spec, got {type(adapter).__name__}")
        check_str("library_dir", library_dir)
        check_str("base_module", base_module, allow_empty=True)
        check_str_list("bank", bank, allow_none=True, allow_empty=True)
        check_choice("eval_split", eval_split, ("val", "test"))
        check_str("results_file", results_file)
        check_float("gate_lr", gate_lr, low=0.0, low_open=True, allow_none=True)
        if Path(results_file).name != results_file:
            raise ValueError(f"results_file must be a file name inside the log dir, got {results_file!r}")
        self.adapter, self.library_dir, self.base_module = adapter, library_dir, base_module
        self.bank = None if bank is None else list(bank)
        self.eval_split, self.results_file, self.gate_lr = eval_split, results_file, None if gate_lr is None else float(gate_lr)
        self.library: Any = None
        self.decisions: list[Any] = []
        self.accuracy: list[list[float]] = []
        self.results: dict[str, Any] = {}
        self.current: int | None = None  # the task being trained, None when none is
        self._datamodule: Any = None
        self._base: torch.nn.Module | None = None
        self._clashes: list[str] = []  # this run's task entries already in the library (a resume must explain them)

    # --- checks and start ----------------------------------------------------------------------
    def _continual_datamodule(self, trainer: pl.Trainer) -> Any:
        from lightning_peft.datamodules.continual import ContinualDataModule

        datamodule = trainer.datamodule
        if not isinstance(datamodule, ContinualDataModule):
            raise TypeError(
                "ContinualAdapterCallback needs a ContinualDataModule (lightning_peft.datamodules.ContinualDataModule(tasks=[...])) "
                f"as the trainer's datamodule, got {type(datamodule).__name__}"
            )
        return datamodule

    def _check_label_spaces(self, datamodule: Any, pl_module: pl.LightningModule) -> None:
        head = getattr(pl_module, "num_classes", None)
        if not isinstance(head, int):
            rank_zero_info(f"ContinualAdapterCallback: {type(pl_module).__name__} has no num_classes; task label spaces not checked")
            return
        needs = {name: datamodule.label_space(i) for i, name in enumerate(datamodule.task_names)}
        too_big = {name: n for name, n in needs.items() if n > head}
        if too_big:
            raise ValueError(
                f"tasks {too_big} need more outputs than the model's head has ({head}): every label must be < num_classes. "
                f"Set model num_classes to {max(too_big.values())} or remap the tasks' labels."
            )

    def _library_root(self, trainer: pl.Trainer) -> Path:
        root = Path(self.library_dir)
        return root if root.is_absolute() else Path(trainer.log_dir or trainer.default_root_dir) / root

    @staticmethod
    def _open_library(root: Path, base: torch.nn.Module) -> Any:
        from lightning_peft.library import AdapterLibrary

        return AdapterLibrary(root, base=base)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.library is not None:
            return
        from lightning_peft.callbacks.adapter import AdapterCallback

        if any(isinstance(c, AdapterCallback) for c in trainer.callbacks):
            raise ValueError("ContinualAdapterCallback injects its own adapters: remove AdapterCallback from the trainer's callbacks")
        if trainer.world_size > 1:
            raise ValueError("ContinualAdapterCallback runs in one process (one library writer); use devices=1")
        datamodule = self._continual_datamodule(trainer)
        base = pl_module.get_submodule(self.base_module) if self.base_module else pl_module
        self._check_label_spaces(datamodule, pl_module)
        root = self._library_root(trainer)
        if self.bank and not root.exists():
            raise ValueError(f"bank names entries {self.bank} but there is no library at {root}: set library_dir to an existing library")
        library = self._open_library(root, base)  # another base: refused here
        clashes = [n for name in datamodule.task_names for n in (name, f"{name}_adapter") if n in library]
        known = adapter_entries(library)
        unknown = [n for n in (self.bank or []) if n not in known]
        if unknown:
            raise ValueError(f"bank entries {unknown} are not adapter entries of the library; its adapter entries are {known}")
        self.library, self._datamodule, self._base = library, datamodule, base
        trainer.reload_dataloaders_every_n_epochs = 1  # the loaders follow the task
        if trainer.fit_loop.max_epochs != datamodule.total_epochs:
            rank_zero_info(
                f"ContinualAdapterCallback: {datamodule.num_tasks} tasks x {datamodule.epochs_per_task} epochs = "
                f"{datamodule.total_epochs} epochs (trainer max_epochs {trainer.fit_loop.max_epochs} replaced)"
            )
            trainer.fit_loop.max_epochs = datamodule.total_epochs
        pl_module.on_load_checkpoint = _ResumeHook(self, pl_module)  # type: ignore[method-assign]
        pl_module.configure_optimizers = _BegunCheck(self, pl_module)  # type: ignore[method-assign]
        self._clashes = clashes
        if not clashes:  # else only a checkpoint of this sequence can say which task runs (_resume)
            self._begin(0, bank=self.bank)

    def _clash_message(self) -> str:
        return (
            f"the library at {self.library.root} already has entries {self._clashes}; rename the tasks or use another "
            "library_dir (or resume the run that wrote them: trainer.fit(..., ckpt_path=...))"
        )

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # a failed fit (a refused resume, a crash) writes nothing more and leaves the plain base,
        # as a finished one does; the library keeps the tasks that ended. Lightning calls no
        # teardown hook after an exception: hand the module's hooks back here
        if self.current is not None:
            remove_adapter(self._base)
            self.current = None
        self.teardown(trainer, pl_module, "fit")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for hook, kind in (("on_load_checkpoint", _ResumeHook), ("configure_optimizers", _BegunCheck)):
            if isinstance(pl_module.__dict__.get(hook), kind):
                del pl_module.__dict__[hook]

    # --- resuming ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "tasks": list(self._datamodule.task_names) if self._datamodule is not None else [],
            "current": self.current,
            "decisions": [d.to_dict() for d in self.decisions],
            "accuracy": [list(row) for row in self.accuracy],
        }

    def _resume(self, checkpoint: dict[str, Any]) -> None:
        """Checks the checkpoint's sequence against this run's and the library, then begins the
        task in progress (nothing changes before every check passed)."""
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is None:
            if self._clashes:
                raise ValueError(self._clash_message() + "; the checkpoint has no ContinualAdapterCallback state to resume from")
            return
        if not isinstance(state, dict):
            raise ValueError(f"the checkpoint's ContinualAdapterCallback state is a {type(state).__name__}, not the dict it writes")
        tasks = list(self._datamodule.task_names)
        if state.get("tasks") != tasks:
            raise ValueError(
                f"the checkpoint is of the task sequence {state.get('tasks')}, this run's is {tasks}: "
                "resume with the same ContinualDataModule"
            )
        current = state.get("current")
        if not isinstance(current, int) or not 0 <= current < len(tasks):
            raise ValueError(f"the checkpoint has no task in progress (current={current!r}): its sequence had ended; nothing to resume")
        try:
            decisions = [TaskDecision(**d) for d in state.get("decisions", [])]
        except TypeError as exc:
            raise ValueError(f"the checkpoint's ContinualAdapterCallback decisions are not ones this version writes ({exc})") from None
        if [d.task for d in decisions] != tasks[:current]:
            finished = [d.task for d in decisions]
            raise ValueError(f"the checkpoint's decisions {finished} do not match its task in progress {tasks[current]!r}")
        done = [n for d in decisions for n in (d.task, d.adapter) if n is not None]
        root = self.library.root
        missing = [n for n in done if n not in self.library]
        if missing:
            raise ValueError(
                f"the checkpoint finished tasks whose entries {missing} are not in the library at {root}: resume with the library "
                "the interrupted run wrote (set library_dir to its path)"
            )
        unfinished = [n for n in self._clashes if n not in done]
        if unfinished:
            raise ValueError(
                f"the library at {root} has entries {unfinished} of tasks the checkpoint has not finished (a run cut short by "
                "max_steps ends its task in progress): remove them (AdapterLibrary.remove) or resume from a later checkpoint"
            )
        if self.current is not None:  # setup began the first task: the checkpoint's may differ in bank
            remove_adapter(self._base)
        self.decisions, self.accuracy, self._clashes = decisions, [[float(a) for a in row] for row in state.get("accuracy", [])], []
        self._begin(current)
        rank_zero_info(f"ContinualAdapterCallback: resumed at task {current} {tasks[current]!r} ({current} finished)")

    def _begin(self, index: int, bank: list[str] | None = None) -> None:
        name = self._datamodule.task_names[index]
        if bank is None and self.bank is not None:  # later tasks: the chosen start plus what was recruited since
            bank = self.bank + [d.adapter for d in self.decisions if d.adapter is not None]
        begin_task(self._base, self.library, self.adapter, name, bank=bank)
        self.current = index
        shown = bank if bank is not None else adapter_entries(self.library)
        rank_zero_info(f"ContinualAdapterCallback: task {index} {name!r}, bank {shown}")

    # --- training ------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._group_gates(trainer)

    def _group_gates(self, trainer: pl.Trainer) -> None:
        """Move the gates' ``log_alpha`` into their own group of the first optimizer (``gate_lr``)."""
        if self.gate_lr is None or not trainer.optimizers:
            return
        gates = [g.log_alpha for g in litelora_gates(self._base).values() if g.log_alpha.requires_grad]
        if not gates:
            return
        ids = {id(p) for p in gates}
        optimizer = trainer.optimizers[0]
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        optimizer.add_param_group({"params": gates, "lr": self.gate_lr, "weight_decay": 0.0})

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        index = self._datamodule.task_for_epoch(trainer.current_epoch)
        if self.current is None or index == self.current:
            return
        self._finish(trainer, pl_module)
        self._begin(index)
        trainer.strategy.setup_optimizers(trainer)  # the new task's LiteLoRA parameters
        self._group_gates(trainer)
        pl_module.train()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        gates = [g for g in litelora_gates(self._base).values() if g.log_alpha.requires_grad]
        with torch.enable_grad():
            penalty = l0_penalty(self._base)
            if gates:
                grads = torch.autograd.grad(penalty, [g.log_alpha for g in gates])
                for gate, grad in zip(gates, grads):
                    gate.log_alpha.grad = grad if gate.log_alpha.grad is None else gate.log_alpha.grad + grad
        if gates and trainer.logger is not None:
            with torch.no_grad():
                expected = sum(float(g.expected()) for g in gates) / len(gates)
            pl_module.log_dict({"litelora/gate": expected, "litelora/l0": float(penalty.detach())}, on_step=True, on_epoch=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.current is not None:
            self._finish(trainer, pl_module)

    # --- end of a task -------------------------------------------------------------------------
    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        index = self.current
        assert index is not None
        name = self._datamodule.task_names[index]
        decision = end_task(self._base, self.library, name)
        self.decisions.append(decision)
        self.current = None
        rank_zero_info(
            f"ContinualAdapterCallback: task {name!r} {'recruited ' + str(decision.adapter) if decision.recruited else 'reused the bank'} "
            f"(E[gate] {decision.gate:.3f}, {decision.bytes} bytes)"
        )
        self.accuracy.append([self._evaluate(pl_module, j) for j in range(index + 1)])
        self._write(trainer, pl_module)

    @torch.no_grad()
    def _evaluate(self, pl_module: pl.LightningModule, index: int) -> float:
        """Accuracy on task ``index``'s ``eval_split`` with its library entry active."""
        was_training = pl_module.training
        self.library.activate(self._datamodule.task_names[index])
        pl_module.eval()
        correct = total = 0
        try:
            for i, batch in enumerate(self._datamodule.task_loader(index, self.eval_split)):
                batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
                labels = batch["labels"] if isinstance(batch, dict) else batch[1]
                predictions = pl_module.predict_step(batch, i)
                correct += int((predictions == labels).sum())
                total += int(labels.numel())
        finally:
            self.library.deactivate()
            pl_module.train(was_training)
        if total == 0:
            raise ValueError(f"task {self._datamodule.task_names[index]!r} has an empty {self.eval_split} split: nothing to evaluate")
        return correct / total

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = continual_metrics(self.accuracy)
        adapters = [d.adapter for d in self.decisions if d.adapter is not None]
        angles = principal_angles(self.library) if len(adapter_entries(self.library)) > 1 else None
        self.results = {
            "tasks": self._datamodule.task_names[: len(self.decisions)],
            "decisions": [d.to_dict() for d in self.decisions],
            "accuracy": self.accuracy,
            "metrics": metrics,
            "adapters_kept": len(adapters),
            "adapters_avoided": len(self.decisions) - len(adapters),
            "bytes_added": sum(d.bytes for d in self.decisions),
            "library": str(self.library.root) if hasattr(self.library, "root") else self.library_dir,
            "principal_angles": None if angles is None else {"entries": angles["entries"], "summary": angles["summary"]},
            "spec": self.adapter.to_config(),
        }
        directory = Path(trainer.log_dir or trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_file(directory / self.results_file, lambda f: f.write(json.dumps(self.results, indent=2).encode()))
        if trainer.logger is not None:
            scalars = {"continual/average_accuracy": metrics["average_accuracy"], "continual/adapters": float(len(adapters))}
            if metrics["forgetting"] is not None:
                scalars["continual/forgetting"] = metrics["forgetting"]
            trainer.logger.log_metrics(scalars, step=trainer.global_step)
