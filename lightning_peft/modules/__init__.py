"""Ready LightningModules: image classifier (timm), text classifier, causal LM and decoder
sequence classifier (transformers).

The modules build a plain model and never inject adapters themselves: add
``lightning_peft.AdapterCallback`` to the Trainer, which freezes the base and injects adapters
at ``setup`` (before optimizers are built, so ``configure_optimizers`` sees only what trains).

Classes are imported lazily (timm and transformers are slow to import).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

from lightning_peft.lazy_exports import lazy_exports

if TYPE_CHECKING:  # pragma: no cover
    import lightning as L

_EXPORTS = {
    "ImageClassifier": "lightning_peft.modules.image",
    "TextClassifier": "lightning_peft.modules.text",
    "CausalLM": "lightning_peft.modules.causal_lm",
    "SequenceClassifier": "lightning_peft.modules.sequence_classifier",
    "PPO": "lightning_peft.rl.ppo",  # lives in lightning_peft.rl (the rl extra); named here by configs and users
}

__all__ = sorted(
    [
        *_EXPORTS,
        "accuracy_metrics",
        "apply_base_state_dict",
        "check_datamodule_fits",
        "check_num_classes",
        "check_optim_args",
        "classification_step",
        "configure_adamw",
        "load_base_state_dict",
        "warmup_schedule",
    ]
)

Schedule = Literal["constant", "linear", "cosine"]


def check_optim_args(lr: float, weight_decay: float, warmup_steps: int, schedule: str = "constant") -> None:
    """Validate the optimizer arguments every ready module takes (errors name the argument)."""
    from lightning_peft.validation import check_choice, check_float, check_int

    check_float("lr", lr, low=0.0, low_open=True)
    check_float("weight_decay", weight_decay, low=0.0)
    check_int("warmup_steps", warmup_steps, low=0)
    check_choice("schedule", schedule, ("constant", "linear", "cosine"))


def configure_adamw(
    module: L.LightningModule,
    lr: float,
    weight_decay: float,
    warmup_steps: int = 0,
    schedule: Schedule = "constant",
) -> Any:
    """AdamW over the parameters that require grad, with an optional per-step LR schedule.

    Weight decay applies to matrices only (``p.ndim >= 2``); biases and norm scales are not
    decayed (decaying them hurts BitFit, whose only trainable tensors are biases).

    The LR multiplier at optimizer step ``t`` (``W`` warmup steps, ``T`` total steps from
    ``trainer.estimated_stepping_batches``) is ``(t + 1) / W`` for ``t < W``, then 1
    (constant), ``1 - p`` (linear) or ``(1 + cos(pi p)) / 2`` (cosine), ``p = (t - W) / (T - W)``.
    """
    import torch

    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            f"{type(module).__name__} has no parameter with requires_grad=True: the adapter "
            "callback froze everything. Check its target_modules / trainable_modules."
        )
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=lr)
    if warmup_steps == 0 and schedule == "constant":
        return optimizer

    total = None
    trainer = getattr(module, "_trainer", None)
    if trainer is not None:
        estimated = trainer.estimated_stepping_batches
        if estimated is not None and math.isfinite(estimated):
            total = int(estimated)
    if schedule != "constant" and total is None:
        raise ValueError(
            f"schedule={schedule!r} needs a finite number of steps; set trainer.max_steps or "
            "trainer.max_epochs, or use schedule='constant'."
        )

    scheduler = warmup_schedule(optimizer, warmup_steps, schedule, total)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def warmup_schedule(optimizer: Any, warmup_steps: int, schedule: Schedule, total: int | None) -> Any:
    """Torch's schedulers for ``configure_adamw``'s multiplier: ``LinearLR`` from ``1 / W`` to 1
    over the warmup (``(t + 1) / W``), then ``LinearLR`` to 0 (linear) or ``CosineAnnealingLR``
    (cosine) over the ``T - W`` remaining steps, chained by ``SequentialLR`` at step ``W``."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    decay_steps = max(1, (total or 0) - warmup_steps)
    parts = []
    if warmup_steps:
        parts.append(LinearLR(optimizer, start_factor=1.0 / warmup_steps, end_factor=1.0, total_iters=max(1, warmup_steps - 1)))
    if schedule == "linear":
        parts.append(LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=decay_steps))
    elif schedule == "cosine":
        parts.append(CosineAnnealingLR(optimizer, T_max=decay_steps))
    if len(parts) == 1:
        return parts[0]
    return SequentialLR(optimizer, parts, milestones=[warmup_steps])


def load_base_state_dict(path: str, prefix: str = "model.") -> dict[str, Any]:
    """Read a model state dict from ``path``: a plain ``torch.save(state_dict)`` file, a
    ``.safetensors`` file, or a Lightning ``.ckpt`` (its ``state_dict``, with ``prefix``
    stripped from keys that carry it).

    Nothing in the file runs: ``torch.save`` files are read with
    :func:`lightning_peft.safe_load.load_checkpoint_tensors`, which rebuilds tensors only (a
    checkpoint whose ``hyper_parameters`` pickle an ``nn.Module`` or a ``functools.partial``
    loads; those objects are not unpickled). A damaged file raises ``ValueError`` naming it."""
    from pathlib import Path

    from lightning_peft.safe_load import load_checkpoint_tensors, read_safetensors, tensor_state_dict

    file = Path(path)
    if not file.is_file():
        raise ValueError(
            f"base_checkpoint {path!r} does not exist. Train the base first (e.g. "
            "`lightning-peft fit --config configs/vit_digits_pretrain.yaml`) or set it to null."
        )
    if file.suffix == ".safetensors":
        obj: dict[str, Any] = read_safetensors(file)[0]
    else:
        obj = tensor_state_dict(load_checkpoint_tensors(file), path)
    if prefix and any(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix) :]: v for k, v in obj.items() if k.startswith(prefix)}
    # A base saved while wrapped by an adapter layer keeps its weights under `<name>.base_layer.`
    return {k.replace(".base_layer.", "."): v for k, v in obj.items()}


def apply_base_state_dict(model: Any, state_dict: dict[str, Any], source: str) -> list[str]:
    """Load ``state_dict`` into ``model`` non-strictly, skipping tensors whose shape differs
    (typically the classification head when the base was trained for other classes).

    Returns the names that were *not* loaded from the file (mismatched or missing) and reports
    them. Raises ``ValueError`` when nothing at all matches (wrong file for this model).
    """
    from lightning.pytorch.utilities import rank_zero_info

    own = model.state_dict()
    mismatched = sorted(k for k, v in state_dict.items() if k in own and tuple(v.shape) != tuple(own[k].shape))
    loadable = {k: v for k, v in state_dict.items() if k in own and k not in mismatched}
    if not loadable:
        raise ValueError(
            f"base_checkpoint {source!r} shares no tensor (same name and shape) with "
            f"{type(model).__name__}; was it saved from a different architecture / model_kwargs?"
        )
    result = model.load_state_dict(loadable, strict=False)
    unexpected = sorted(k for k in state_dict if k not in own)
    missing = sorted(result.missing_keys)
    rank_zero_info(
        f"Loaded {len(loadable)}/{len(own)} tensors of the base from {source!r}."
        + (f" Skipped (shape mismatch, re-initialised): {mismatched}." if mismatched else "")
        + (
            f" Not in the file (kept initialisation): {[k for k in missing if k not in mismatched]}."
            if len(missing) > len(mismatched)
            else ""
        )
        + (f" Ignored (not in the model): {unexpected}." if unexpected else "")
    )
    return missing


def check_datamodule_fits(module: L.LightningModule, attribute: str, capacity: int, message: str) -> None:
    """Raise ``ValueError(message.format(needed=..., capacity=...))`` when the trainer's
    datamodule needs more than the model has (``attribute``: e.g. ``num_classes``)."""
    datamodule = getattr(module.trainer, "datamodule", None) if module._trainer is not None else None
    needed = getattr(datamodule, attribute, None)
    if isinstance(needed, int) and needed > capacity:
        raise ValueError(message.format(needed=needed, capacity=capacity))


def check_num_classes(module: L.LightningModule, num_classes: int) -> None:
    """Raise ``ValueError`` when the trainer's datamodule has more classes than the head."""
    check_datamodule_fits(
        module,
        "num_classes",
        num_classes,
        "the datamodule has {needed} classes but the model's head has {capacity}; set model num_classes: {needed}.",
    )


def accuracy_metrics(num_classes: int) -> Any:
    """``nn.ModuleDict`` of one torchmetrics ``MulticlassAccuracy`` (micro: ``correct / total``)
    per stage, keyed ``train_acc``, ``val_acc``, ``test_acc``, for :func:`classification_step`.
    Their states are not persistent: checkpoints and adapter files do not change."""
    from torch import nn
    from torchmetrics.classification import MulticlassAccuracy

    return nn.ModuleDict({f"{stage}_acc": MulticlassAccuracy(num_classes, average="micro") for stage in ("train", "val", "test")})


def classification_step(
    module: L.LightningModule, logits: Any, labels: Any, stage: str, accuracy: Any, label_smoothing: float = 0.0
) -> Any:
    """Cross-entropy of ``logits [B, K]`` against ``labels [B]``; logs ``{stage}_loss`` and
    ``{stage}_acc`` (``accuracy``: the stage's metric from :func:`accuracy_metrics`; per step in
    training, over the epoch otherwise) and returns the loss."""
    import torch.nn.functional as F

    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    accuracy(logits.detach(), labels)  # the batch's value on step; Lightning computes and resets it per epoch
    on_step = stage == "train"
    module.log(f"{stage}_loss", loss, prog_bar=True, on_step=on_step, on_epoch=not on_step, batch_size=len(labels))
    module.log(f"{stage}_acc", accuracy, prog_bar=True, on_step=on_step, on_epoch=not on_step, batch_size=len(labels))
    return loss


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
