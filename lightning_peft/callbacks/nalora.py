"""NALoRACallback: drives NA-LoRA's gate control in a Lightning run.

``AdapterCallback`` adds it automatically when its adapter contains an ``NALoRA`` spec (it is the
spec's ``training_callbacks``); add it yourself only when you inject adapters with
``apply_adapter`` inside a LightningModule. Every constant lives on the spec; the callback only
calls ``NALoRAController`` (``lightning_peft.adapters.nalora_control``) at the right moments:

* ``on_train_batch_start``: the batch's ``attention_mask`` (a dict batch) weights the next
  forward's gate statistics, so padding does not count;
* ``on_before_optimizer_step`` (after backward, before gradient clipping): statistics (all-reduced
  over DDP ranks), refreshes, masked gradients zeroed, rows saved;
* an optimizer step post-hook: per-row step rescaling and masked rows restored.

Its state (EMAs, masks, groups) is the callback's ``state_dict``, so ``fit(ckpt_path=...)``
resumes exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn


class NALoRACallback(Callback):
    """Runs ``NALoRAController`` over the model's NA-LoRA gate layers (see module docstring).

    Args:
        log_metrics: log ``nalora/*`` (kept fraction, groups, layers with step scaling) per step.
    """

    def __init__(self, log_metrics: bool = True) -> None:
        from lightning_peft.validation import check_bool

        check_bool("log_metrics", log_metrics)
        self.log_metrics = log_metrics
        self.controller: Any = None
        self._loaded: dict[str, Any] | None = None
        self._handles: list[Any] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_peft.adapters.nalora_control import NALoRAController

        if self.controller is None:
            self.controller = NALoRAController(pl_module)
        if self._loaded is not None:
            self.controller.load_state_dict(self._loaded)
            self._loaded = None
        if not self.controller.active:
            rank_zero_warn(f"lightning-peft NA-LoRA is {self.controller.describe()}")
            return
        rank_zero_info(f"lightning-peft NA-LoRA: {self.controller.describe()}")
        for optimizer in trainer.optimizers:
            self._handles.append(optimizer.register_step_post_hook(lambda opt, args, kwargs: self.controller.after_step(opt)))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.controller is not None:
            self.controller.close()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.controller is not None and self.controller.active:
            mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            self.controller.set_token_mask(mask if isinstance(mask, torch.Tensor) else None)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        if self.controller is None or not self.controller.active:
            return
        self.controller.before_step(trainer.global_step, optimizer)
        if self.log_metrics and pl_module._trainer is not None and trainer.logger is not None:
            pl_module.log_dict(self.controller.metrics(), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.controller is None or not self.controller.active else self.controller.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.controller is not None:
            self.controller.load_state_dict(state_dict)
        else:
            self._loaded = state_dict
