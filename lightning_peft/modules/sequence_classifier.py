"""Sequence (or per-token) classification with a transformers decoder, e.g. for state tracking."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from torch import nn

from lightning_peft.modules import (
    Schedule,
    apply_base_state_dict,
    check_datamodule_fits,
    check_num_classes,
    check_optim_args,
    classification_step,
    configure_adamw,
    load_base_state_dict,
)
from lightning_peft.modules.text import build_transformers_model
from lightning_peft.validation import check_choice, check_int, check_mapping, check_str

#: A small Llama for :class:`~lightning_peft.datamodules.state_tracking.StateTrackingDataModule`
#: (vocabulary: PAD 0, BOS 1, EOS 2, three symbols; about 0.1M parameters).
DEFAULT_DECODER_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 6,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 4096,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}

_AUTO = {"sequence": "AutoModelForSequenceClassification", "token": "AutoModelForTokenClassification"}
_TARGET_OF_HEAD = {"sequence": "accept", "token": "state"}


def _decoder_state_dict(path: str) -> dict[str, Any]:
    """A transformers model's state dict from ``path``: a Lightning ``.ckpt`` of ``CausalLM`` or
    of this module (keys ``model.model.*``: the LightningModule's ``model.`` is dropped) or the
    model's own ``state_dict()`` (keys ``model.*`` and ``lm_head.*``, kept as they are)."""
    state = load_base_state_dict(path, prefix="")
    if any(k.startswith("model.model.") for k in state):
        state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    return state


class SequenceClassifier(L.LightningModule):
    """A transformers decoder with a linear head (``self.model``; the head is ``model.score``).

    ``head="sequence"``: ``transformers``' ``*ForSequenceClassification`` (Llama:
    ``LlamaForSequenceClassification``), whose logits ``[B, K]`` are the head applied to the
    hidden state of the *last non-padding token* of each row (the rightmost position whose id is
    not ``config.pad_token_id``; with right padding that is the last real token, which in a
    causal decoder has seen the whole sequence). ``head="token"``: ``*ForTokenClassification``,
    logits ``[B, T, K]`` at every position, labels ``[B, T]`` with ``-100`` ignored.

    Batches are dicts with ``input_ids [B, T]``, ``attention_mask [B, T]`` and ``labels``.
    The loss is the mean cross-entropy over labelled rows (tokens); logs ``{stage}_loss`` and
    ``{stage}_acc``.

    Args:
        model_path: local directory of a pretrained transformers model (loaded with the head).
        config: a randomly initialised model from a config dict with ``model_type``; when both
            are ``None``, ``DEFAULT_DECODER_CONFIG``. ``pad_token_id`` defaults to 0 (the state
            tracking data's ``PAD``); pooling needs it.
        num_classes: labels of the head.
        head: ``"sequence"`` (one label per row) or ``"token"`` (one label per position).
        base_checkpoint: start the decoder from this file: a ``CausalLM`` Lightning ``.ckpt``, a
            state dict or ``.safetensors``; tensors absent or of another shape (the LM head, the
            classification head) keep their initialisation, with a message.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay (matrices only).
        warmup_steps: linear LR warmup steps.
        schedule: LR schedule after warmup.
    """

    def __init__(
        self,
        model_path: str | None = None,
        config: dict[str, Any] | None = None,
        num_classes: int = 2,
        head: Literal["sequence", "token"] = "sequence",
        base_checkpoint: str | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        schedule: Schedule = "constant",
    ) -> None:
        super().__init__()
        check_str("model_path", model_path, allow_none=True)
        check_mapping("config", config, lambda key, v: v)
        check_int("num_classes", num_classes, low=2)
        check_choice("head", head, ("sequence", "token"))
        check_str("base_checkpoint", base_checkpoint, allow_none=True)
        check_optim_args(lr, weight_decay, warmup_steps, schedule)
        self.save_hyperparameters()
        if model_path is None:
            config = {"pad_token_id": 0, **(config if config is not None else DEFAULT_DECODER_CONFIG), "num_labels": num_classes}
        self.model = build_transformers_model(_AUTO[head], model_path, config, None)
        if head == "sequence" and getattr(self.model.config, "pad_token_id", None) is None:
            raise ValueError(f"the model at {model_path!r} has no pad_token_id: sequence pooling finds the last real token by it; set one.")
        if int(self.model.config.num_labels) != num_classes:
            raise ValueError(f"the model at {model_path!r} has {self.model.config.num_labels} labels, not num_classes={num_classes}.")
        if base_checkpoint is not None:
            apply_base_state_dict(self.model, _decoder_state_dict(base_checkpoint), base_checkpoint)
        from torchmetrics.classification import MulticlassAccuracy

        self.accuracy = nn.ModuleDict(
            {f"{s}_acc": MulticlassAccuracy(num_classes, average="micro", ignore_index=-100) for s in ("train", "val", "test")}
        )
        self.num_classes, self.head = num_classes, head

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().num_embeddings)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def setup(self, stage: str) -> None:
        check_num_classes(self, self.num_classes)
        check_datamodule_fits(
            self, "vocab_size", self.vocab_size, "the datamodule's vocabulary has {needed} tokens but the model embeds only {capacity}."
        )
        datamodule = getattr(self.trainer, "datamodule", None)
        target = getattr(datamodule, "target", None)
        if isinstance(target, str) and target != _TARGET_OF_HEAD[self.head]:
            wanted = {v: k for k, v in _TARGET_OF_HEAD.items()}.get(target)
            fix = f"set model head: {wanted}" if wanted else "use CausalLM for next_token"
            raise ValueError(f"the datamodule's target is {target!r} but the model's head is {self.head!r}; {fix}.")

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        logits, labels = self(batch["input_ids"], batch.get("attention_mask")), batch["labels"]
        if self.head == "token":  # [B, T, K] -> [B*T, K]; -100 rows are ignored by both
            logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        return classification_step(self, logits, labels, stage, self.accuracy[f"{stage}_acc"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test")

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        return configure_adamw(self, hp.lr, hp.weight_decay, hp.warmup_steps, hp.schedule)
