"""Causal language modelling with a Hugging Face transformers model."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch

from lightning_peft.modules import Schedule, check_datamodule_fits, check_optim_args, configure_adamw
from lightning_peft.modules.text import build_transformers_model
from lightning_peft.validation import check_mapping, check_str

#: A small Llama (about 0.5M parameters) whose vocabulary matches the byte-level
#: ``BBCLanguageModelingDataModule`` (256 bytes + BOS + EOS). Layer widths are multiples of 32,
#: as bitsandbytes' 4-bit packing on CPU requires (for QLoRA).
DEFAULT_LLAMA_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 258,
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "bos_token_id": 256,
    "eos_token_id": 257,
    "pad_token_id": None,
    "tie_word_embeddings": False,
}


def _ppl(loss: torch.Tensor) -> torch.Tensor:
    # Clamp so a diverged run logs a large finite number, not inf.
    return torch.exp(loss.clamp(max=math.log(1e6)))


class CausalLM(L.LightningModule):
    """A transformers ``AutoModelForCausalLM`` (``self.model``) trained on next-token loss.

    Batches are dicts with ``input_ids [B, T]``, optional ``attention_mask [B, T]`` and
    ``labels [B, T]`` (the model shifts them: position ``t`` predicts token ``t + 1``; label
    ``-100`` is ignored). The loss is the mean token cross-entropy ``L``; perplexity is
    ``exp(L)``. Logs ``train_loss``/``train_ppl`` and ``val_loss``/``val_ppl`` (and test_*).

    Args:
        model_path: local directory of a pretrained causal LM.
        config: a randomly initialised model from a config dict with ``model_type``. When both
            are ``None``: ``DEFAULT_LLAMA_CONFIG`` (hidden 128, 2 layers, byte vocab of 258).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay (matrices only).
        warmup_steps: linear LR warmup steps.
        schedule: LR schedule after warmup.
    """

    def __init__(
        self,
        model_path: str | None = None,
        config: dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        schedule: Schedule = "constant",
    ) -> None:
        super().__init__()
        check_str("model_path", model_path, allow_none=True)
        check_mapping("config", config, lambda key, v: v)
        check_optim_args(lr, weight_decay, warmup_steps, schedule)
        self.save_hyperparameters()
        if model_path is None and config is None:
            config = dict(DEFAULT_LLAMA_CONFIG)
        self.model = build_transformers_model("AutoModelForCausalLM", model_path, config, None)
        from torchmetrics import MeanMetric

        # Token-weighted mean loss over an evaluation epoch; perplexity = exp(mean), which is not
        # the mean of per-batch exp(loss).
        self._eval_loss = MeanMetric()

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().num_embeddings)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)

    def setup(self, stage: str) -> None:
        check_datamodule_fits(
            self,
            "vocab_size",
            self.vocab_size,
            "the datamodule's vocabulary has {needed} tokens but the model embeds only {capacity}; "
            "set model config vocab_size: {needed} (or use a matching tokenizer_path).",
        )

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        out = self(batch["input_ids"], batch.get("attention_mask"), batch["labels"])
        loss = out.loss
        batch_size = len(batch["input_ids"])
        if stage == "train":
            self.log("train_loss", loss, prog_bar=True, batch_size=batch_size)
            self.log("train_ppl", _ppl(loss.detach()), prog_bar=True, batch_size=batch_size)
        else:
            labels = batch["labels"]
            n_targets = (labels[:, 1:] != -100).sum()  # shifted targets that count in the loss
            self._eval_loss.update(loss.detach(), weight=n_targets)
        return loss

    def _log_eval_epoch(self, stage: str) -> None:
        mean = self._eval_loss.compute()
        self._eval_loss.reset()
        self.log(f"{stage}_loss", mean, prog_bar=True)
        self.log(f"{stage}_ppl", _ppl(mean), prog_bar=True)

    def on_validation_epoch_start(self) -> None:
        self._eval_loss.reset()

    def on_test_epoch_start(self) -> None:
        self._eval_loss.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_eval_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval_epoch("test")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test")

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        return configure_adamw(self, hp.lr, hp.weight_decay, hp.warmup_steps, hp.schedule)
