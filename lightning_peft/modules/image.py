"""Image classification with any timm model."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from lightning_peft.modules import (
    Schedule,
    accuracy_metrics,
    apply_base_state_dict,
    check_num_classes,
    check_optim_args,
    classification_step,
    configure_adamw,
    load_base_state_dict,
)
from lightning_peft.validation import check_float, check_int, check_mapping, check_str


class ImageClassifier(L.LightningModule):
    """A timm model (``self.model``) trained with cross-entropy on ``(images, labels)`` batches.

    ``images [B, C, H, W]`` -> ``logits [B, num_classes]``; logs ``train_loss``/``train_acc``,
    ``val_loss``/``val_acc`` and ``test_loss``/``test_acc``.

    Args:
        model_name: a timm architecture name, built with ``pretrained=False`` (nothing is
            downloaded), e.g. ``"vit_tiny_patch16_224"``.
        num_classes: size of the classification head.
        model_kwargs: extra ``timm.create_model`` arguments, e.g. for 16x16 grey digits
            ``{img_size: 16, patch_size: 4, embed_dim: 64, depth: 4, num_heads: 4, in_chans: 1}``.
        base_checkpoint: a pretrained base to start from: a ``torch.save``'d state dict of the
            timm model, a ``.safetensors`` file, or a Lightning ``.ckpt`` of this module.
            Tensors whose shape differs (the head, when the base had other classes) are skipped
            and re-initialised, with a message. ``None`` starts from random weights.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay (matrices only).
        warmup_steps: linear LR warmup steps.
        schedule: LR schedule after warmup.
        label_smoothing: cross-entropy label smoothing.
    """

    def __init__(
        self,
        model_name: str = "vit_tiny_patch16_224",
        num_classes: int = 10,
        model_kwargs: dict[str, Any] | None = None,
        base_checkpoint: str | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 0,
        schedule: Schedule = "constant",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        check_str("model_name", model_name)
        check_int("num_classes", num_classes, low=1)
        check_mapping("model_kwargs", model_kwargs, lambda key, v: v)
        check_str("base_checkpoint", base_checkpoint, allow_none=True)
        check_optim_args(lr, weight_decay, warmup_steps, schedule)
        check_float("label_smoothing", label_smoothing, 0.0, 1.0, high_open=True)
        self.save_hyperparameters()
        import timm

        if not timm.is_model(model_name):
            raise ValueError(f"timm has no model named {model_name!r}; see `timm.list_models('*vit*')`.")
        kwargs = dict(model_kwargs or {})
        if "pretrained" in kwargs or "num_classes" in kwargs:
            raise ValueError(
                "model_kwargs must not set 'pretrained' (weights are never downloaded; use "
                "base_checkpoint) or 'num_classes' (use the num_classes argument)."
            )
        self.model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **kwargs)
        self.num_classes = num_classes
        self.accuracy = accuracy_metrics(num_classes)
        if base_checkpoint is not None:
            apply_base_state_dict(self.model, load_base_state_dict(base_checkpoint), base_checkpoint)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def setup(self, stage: str) -> None:
        check_num_classes(self, self.num_classes)

    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        images, labels = batch
        smoothing = self.hparams.label_smoothing if stage == "train" else 0.0
        return classification_step(self, self(images), labels, stage, self.accuracy[f"{stage}_acc"], label_smoothing=smoothing)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(images).argmax(dim=-1)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        return configure_adamw(self, hp.lr, hp.weight_decay, hp.warmup_steps, hp.schedule)
