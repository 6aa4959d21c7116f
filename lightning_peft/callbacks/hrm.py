"""HRMCalibrationCallback: balanced-truncation initialisation of HRM adapters at fit start.

``AdapterCallback`` adds it for ``HRM`` specs (``HRM.training_callbacks``). At ``on_train_start``
(after the strategy set the model up and the train dataloader exists, before the first step) it
takes the first ``calibration_batches`` batches of the train dataloader, moves them to the device
and runs ``lightning_peft.calibrate_hrm`` on the LightningModule: no gradients, eval mode, the
HRM layers switched off. The batches are run through ``pl_module.hrm_calibration_forward(batch)``
when the module defines it, else ``default_forward`` (a dict batch as keyword arguments of
``forward``, filtered to the ones it takes).

DDP: every rank runs the calibration forward (so a strategy whose forward uses collectives cannot
stall), each on its own first batches; then rank 0's calibrated tensors are broadcast and copied
into every rank's layers, so all ranks start from identical weights (what DDP requires).

Skipped when every calibrated layer already is (the layers' ``calibrated`` buffer: a resumed
checkpoint or a loaded export holds it), so resuming never overwrites trained weights. The global
torch RNG state is restored afterwards, so calibrating does not change the order in which a
shuffled dataloader serves the training batches.
"""

from __future__ import annotations

from itertools import islice
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_peft.hrm_calibration import HRMCalibrationReport, calibrate_hrm, default_forward, hrm_layers
from lightning_peft.validation import check_int


def _first_loader(loader: Any) -> Any:
    """The train dataloader itself, or the first of several (a list or dict of loaders)."""
    if isinstance(loader, dict):
        return next(iter(loader.values()))
    if isinstance(loader, (list, tuple)) and loader and hasattr(loader[0], "__iter__") and not hasattr(loader, "shape"):
        return loader[0]
    return loader


class HRMCalibrationCallback(Callback):
    """Calibrate every ``HRM(init="balanced_truncation")`` layer from the train dataloader at fit
    start (see the module docstring). ``report`` holds the last ``HRMCalibrationReport``.

    Args:
        batches: how many train batches to use (default: the largest ``calibration_batches`` of
            the HRM specs).
    """

    def __init__(self, batches: int | None = None) -> None:
        self.batches = check_int("batches", batches, low=1, allow_none=True)
        self.report: HRMCalibrationReport | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        layers = {n: l for n, l in hrm_layers(pl_module).items() if l.spec.init == "balanced_truncation"}
        if not layers or all(bool(l.calibrated) for l in layers.values()):
            return
        loader = _first_loader(trainer.train_dataloader)
        if loader is None:
            raise ValueError("HRM calibration needs the train dataloader, but the trainer has none")
        count = self.batches or max(l.spec.calibration_batches for l in layers.values())
        rng = torch.get_rng_state()
        try:
            batches = [trainer.strategy.batch_to_device(b) for b in islice(iter(loader), count)]
        finally:
            torch.set_rng_state(rng)  # the shuffled training order stays what it would have been
        forward = getattr(pl_module, "hrm_calibration_forward", None)
        report = calibrate_hrm(
            pl_module, batches, forward=(lambda _m, b: forward(b)) if callable(forward) else default_forward, max_batches=count
        )
        if trainer.world_size > 1:
            self._broadcast(trainer, layers)
            report = trainer.strategy.broadcast(report, src=0)
        self.report = report
        rank_zero_info(f"lightning-peft: {report}")

    @staticmethod
    def _broadcast(trainer: pl.Trainer, layers: dict[str, Any]) -> None:
        """Rank 0's calibrated tensors into every rank's layers."""
        state = {n: {k: v.detach().cpu() for k, v in l.adapter_state_dict().items()} for n, l in layers.items()}
        state = trainer.strategy.broadcast(state, src=0)
        with torch.no_grad():
            for name, layer in layers.items():
                current = layer.adapter_state_dict()
                for key, value in state[name].items():
                    current[key].copy_(value)
