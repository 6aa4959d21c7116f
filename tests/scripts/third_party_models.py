"""LightningModules shaped like public projects that know nothing about adapters.

* ``MNISTLitModule`` + ``SimpleDenseNet``: the shape of the Lightning-Hydra project template's
  MNIST module: the network is an ``nn.Module`` passed in, the optimizer a ``functools.partial``,
  both pickled by ``save_hyperparameters``; BatchNorm in the network; torchmetrics metrics;
  the optimizer built over *all* parameters. Data: scikit-learn's 8x8 digits (64 features).
* ``OfflineLightningTransformer``: Lightning's own demo ``LightningTransformer``
  (``nn.Transformer``, so ``nn.MultiheadAttention``), used unchanged except that
  ``prepare_data`` does not download WikiText-2 and a ``validation_step`` logs a loss.
* ``MaskedLMModule``: a transformers BERT masked-LM module in the style of Lightning's
  BERT-on-GLUE tutorial, built from a small config (no download); the output decoder is tied to
  the word embeddings.
"""

from __future__ import annotations

import functools
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.demos.transformer import LightningTransformer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy


# --------------------------------------------------------------------------------------------
# Hydra-template style: BatchNorm MLP, pickled hyperparameters
# --------------------------------------------------------------------------------------------
class SimpleDenseNet(nn.Module):
    def __init__(self, input_size: int = 64, lin1_size: int = 32, lin2_size: int = 32, output_size: int = 10) -> None:
        super().__init__()
        self.model = nn.Sequential(
            nn.Linear(input_size, lin1_size),
            nn.BatchNorm1d(lin1_size),
            nn.ReLU(),
            nn.Linear(lin1_size, lin2_size),
            nn.BatchNorm1d(lin2_size),
            nn.ReLU(),
            nn.Linear(lin2_size, output_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.flatten(1))


class MNISTLitModule(pl.LightningModule):
    def __init__(self, net: nn.Module, optimizer: Any, scheduler: Any = None, compile: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)  # pickles `net` and the partial optimizer
        self.net = net
        self.train_acc = MulticlassAccuracy(num_classes=10)
        self.val_acc = MulticlassAccuracy(num_classes=10)
        self.val_loss = MeanMetric()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_loss(F.cross_entropy(logits, y))
        self.val_acc(logits, y)
        self.log("val/loss", self.val_loss, on_epoch=True)
        self.log("val/acc", self.val_acc, on_epoch=True)

    def configure_optimizers(self) -> Any:
        optimizer = self.hparams.optimizer(params=self.trainer.model.parameters())
        return {"optimizer": optimizer}


def mnist_module(seed: int = 0) -> MNISTLitModule:
    torch.manual_seed(seed)
    return MNISTLitModule(SimpleDenseNet(), functools.partial(torch.optim.Adam, lr=3e-2, weight_decay=0.0))


def digits_loader(split: str, batch_size: int = 32) -> DataLoader:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    part = slice(0, 256) if split == "train" else slice(1500, 1628)
    return DataLoader(TensorDataset(x[part], y[part]), batch_size=batch_size, shuffle=False)


# --------------------------------------------------------------------------------------------
# Lightning's transformer demo (nn.Transformer)
# --------------------------------------------------------------------------------------------
VOCAB, SEQ = 48, 8


class OfflineLightningTransformer(LightningTransformer):
    """The demo module as is, on local data."""

    def prepare_data(self) -> None:  # the demo downloads WikiText-2 here
        pass

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        inputs, target = batch
        self.log("val_loss", F.nll_loss(self(inputs, target), target.view(-1)))


def transformer_module(seed: int = 0) -> OfflineLightningTransformer:
    torch.manual_seed(seed)
    return OfflineLightningTransformer(vocab_size=VOCAB)


def token_loader(n: int = 24, batch_size: int = 4, seed: int = 1) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (n, SEQ + 1), generator=g)
    return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=batch_size, shuffle=False)


# --------------------------------------------------------------------------------------------
# transformers BERT masked LM (tied decoder)
# --------------------------------------------------------------------------------------------
class MaskedLMModule(pl.LightningModule):
    def __init__(self, learning_rate: float = 5e-3) -> None:
        super().__init__()
        from transformers import BertConfig, BertForMaskedLM

        self.save_hyperparameters()
        config = BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=SEQ,
            tie_word_embeddings=True,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        self.model = BertForMaskedLM(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, target = batch
        return F.cross_entropy(self(inputs).flatten(0, 1), target.flatten())

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        inputs, target = batch
        self.log("val_loss", F.cross_entropy(self(inputs).flatten(0, 1), target.flatten()))

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.hparams.learning_rate)


def masked_lm_module(seed: int = 0) -> MaskedLMModule:
    torch.manual_seed(seed)
    return MaskedLMModule()


def eval_outputs(module: pl.LightningModule, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The module's eval-mode outputs on ``batch`` (its inputs, and the demo's target tokens)."""
    was_training = module.training
    module.eval()
    with torch.no_grad():
        out = module(*batch) if isinstance(module, LightningTransformer) else module(batch[0])
    module.train(was_training)
    return out
