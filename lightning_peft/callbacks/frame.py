"""FRAMECallback: the orders' own optimizer group, and orders and expert loads in the logger.

``AdapterCallback`` adds it for a ``FRAME`` spec (``FRAME.training_callbacks``); it can also be
listed by hand. At ``on_fit_start`` (after ``configure_optimizers``, before a resumed
optimizer state is loaded, so a resumed run finds the same group layout) it moves every
trained FRAME order out of the group the module put it in into a group of its own: learning
rate ``order_lr`` of the layer's spec (``None``: the source group's), ``weight_decay=0``, the
source group's other settings. A learning-rate scheduler of that optimizer gets the new group
too (its ``base_lrs`` and, for ``LambdaLR``-like schedulers, the source group's multiplier), so
warmup and decay apply to the orders in the same proportion. A group that already holds only
orders (e.g. from ``frame_parameter_groups``, or the no-decay group of a model whose only 1-D
trainables are the orders) stays, with ``weight_decay=0`` and the specs' ``order_lr``.

It also scales each layer's balance-loss gradient by ``1 / accumulate_grad_batches``, as
Lightning scales the loss. Every ``log_every_n_steps`` optimizer steps it logs, per FRAME layer and expert, the order
(``frame/<layer>/order_<e>``) and the routing load of the last training batch (the fraction of
token-to-expert assignments, ``frame/<layer>/load_<e>``), plus the mean balance loss
(``frame/balance_loss``). One host transfer per logging step.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_peft.adapters.frame import MERGE_REFUSAL, FRAMELinear, frame_layers
from lightning_peft.validation import check_bool, check_int

# schedulers whose per-group state is base_lrs (+ lr_lambdas / min_lrs), which this callback extends
_KNOWN_SCHEDULERS = (
    "LambdaLR", "MultiplicativeLR", "StepLR", "MultiStepLR", "ConstantLR", "LinearLR", "ExponentialLR",
    "CosineAnnealingLR", "CosineAnnealingWarmRestarts", "PolynomialLR", "ReduceLROnPlateau",
)  # fmt: skip


class FRAMECallback(Callback):
    """Own optimizer group for FRAME's orders, and logging of orders and expert loads.

    Args:
        log_orders: log every expert's order.
        log_load: log every expert's routing load and the balance loss.
        log_every_n_steps: logging period in optimizer steps (``None``: the trainer's).
    """

    def __init__(self, log_orders: bool = True, log_load: bool = True, log_every_n_steps: int | None = None) -> None:
        check_bool("log_orders", log_orders)
        check_bool("log_load", log_load)
        check_int("log_every_n_steps", log_every_n_steps, low=1, allow_none=True)
        self.log_orders, self.log_load, self.log_every_n_steps = log_orders, log_load, log_every_n_steps
        self._logged_step = -1

    # --- optimizer groups --------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        layers = frame_layers(pl_module)
        if not layers:
            rank_zero_warn("FRAMECallback: the model has no FRAME layers; the callback does nothing", category=UserWarning)
            return
        self._refuse_merge_at_end(trainer)
        for layer in layers.values():  # Lightning divides each micro-batch's loss by this: so must the balance term
            layer.balance_grad_scale = 1.0 / trainer.accumulate_grad_batches
        orders = {id(m.orders): m for m in layers.values() if isinstance(m.orders, nn.Parameter) and m.orders.requires_grad}
        if orders:
            for optimizer in trainer.optimizers:
                self._regroup(trainer, optimizer, orders)

    @staticmethod
    def _refuse_merge_at_end(trainer: pl.Trainer) -> None:
        from lightning_peft.callbacks.adapter import AdapterCallback

        if any(isinstance(c, AdapterCallback) and c.merge_on_fit_end for c in trainer.callbacks):
            raise ValueError(f"AdapterCallback(merge_on_fit_end=True) cannot merge FRAME: {MERGE_REFUSAL}. Set merge_on_fit_end=False.")

    def _regroup(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, orders: dict[int, FRAMELinear]) -> None:
        added: list[tuple[int, dict[str, Any]]] = []  # (source group index, new group)
        for index, group in enumerate(list(optimizer.param_groups)):
            taken = [p for p in group["params"] if id(p) in orders]
            if not taken:
                continue
            if len(taken) == len(group["params"]):  # already a group of orders only: give it their settings
                self._set_order_group(trainer, optimizer, index, {orders[id(p)].spec.order_lr for p in taken})
                continue
            group["params"] = [p for p in group["params"] if id(p) not in orders]
            by_lr: dict[float | None, list[nn.Parameter]] = {}
            for p in taken:
                by_lr.setdefault(orders[id(p)].spec.order_lr, []).append(p)
            base = group.get("initial_lr", group["lr"])
            factor = group["lr"] / base if base else 1.0  # what a scheduler has applied so far
            for order_lr, params in by_lr.items():
                new = {k: v for k, v in group.items() if k != "params"}
                new_base = base if order_lr is None else order_lr
                new.update(params=params, lr=new_base * factor, weight_decay=0.0)
                if "initial_lr" in group:
                    new["initial_lr"] = new_base
                added.append((index, new))
        for _, new in added:
            optimizer.add_param_group(new)
        if added:
            self._extend_schedulers(trainer, optimizer, added)

    @staticmethod
    def _set_order_group(trainer: pl.Trainer, optimizer: torch.optim.Optimizer, index: int, order_lrs: set[float | None]) -> None:
        group = optimizer.param_groups[index]
        group["weight_decay"] = 0.0
        if len(order_lrs) != 1 or None in order_lrs:
            return  # the group's own lr (several specs' orders in one group: it cannot take each one's)
        order_lr = next(iter(order_lrs))
        base = group.get("initial_lr", group["lr"])
        group["lr"] = order_lr * (group["lr"] / base if base else 1.0)
        if "initial_lr" in group:
            group["initial_lr"] = order_lr
        for config in trainer.lr_scheduler_configs:
            base_lrs = getattr(config.scheduler, "base_lrs", None)
            if getattr(config.scheduler, "optimizer", None) is optimizer and isinstance(base_lrs, list) and len(base_lrs) > index:
                base_lrs[index] = order_lr

    @staticmethod
    def _extend_schedulers(trainer: pl.Trainer, optimizer: torch.optim.Optimizer, added: list[tuple[int, dict[str, Any]]]) -> None:
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if getattr(scheduler, "optimizer", None) is not optimizer:
                continue
            if type(scheduler).__name__ not in _KNOWN_SCHEDULERS:
                rank_zero_warn(
                    f"FRAMECallback: {type(scheduler).__name__} keeps per-group settings this callback cannot extend; the "
                    "orders' group may not follow it. Build the groups in configure_optimizers with "
                    "lightning_peft.adapters.frame.frame_parameter_groups instead.",
                    category=UserWarning,
                )
            for index, new in added:
                for name in ("base_lrs", "lr_lambdas", "min_lrs", "_last_lr"):
                    values = getattr(scheduler, name, None)
                    if isinstance(values, list) and len(values) > index:
                        value = {"base_lrs": new.get("initial_lr", new["lr"]), "_last_lr": new["lr"]}.get(name, values[index])
                        values.append(value)

    # --- logging -----------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        every = self.log_every_n_steps or trainer.log_every_n_steps
        step = trainer.global_step
        if step == self._logged_step or step % every != 0 or not (self.log_orders or self.log_load):
            return
        self._logged_step = step
        metrics = frame_metrics(pl_module, self.log_orders, self.log_load)
        if metrics:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False)


def frame_metrics(model: nn.Module, orders: bool = True, load: bool = True) -> dict[str, float]:
    """``{"frame/<layer>/order_<e>": ..., "frame/<layer>/load_<e>": ..., "frame/balance_loss": ...}``
    for the FRAME layers of ``model`` (loads: from the last training forward). One host transfer."""
    names, values = [], []
    balances = []
    for name, layer in frame_layers(model).items():
        if orders:
            names += [f"frame/{name}/order_{e}" for e in range(layer.num_experts)]
            values.append(layer.orders.detach().float())
        if load and layer.last_load is not None:
            names += [f"frame/{name}/load_{e}" for e in range(layer.num_experts)]
            values.append(layer.last_load.float().to(layer.orders.device))
        if load and layer.last_balance_loss is not None:
            balances.append(layer.last_balance_loss.float().to(layer.orders.device))
    if balances:
        names.append("frame/balance_loss")
        values.append(torch.stack(balances).mean().reshape(1))
    if not values:
        return {}
    flat = torch.cat([v.reshape(-1) for v in values]).cpu().tolist()
    return dict(zip(names, flat))
