"""Tiny deterministic models and data shared by the callback and strategy tests and scripts.

``TinyTransformer``: ``x [B, T, 8]`` -> embed -> ``blocks`` (pre-LayerNorm single-head
attention + MLP) -> norm -> mean over T -> ``head`` -> logits ``[B, classes]``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

IN_FEATURES, SEQ, CLASSES = 8, 6, 4
LORA_TARGETS = ["q", "k", "v", "o", "fc1", "fc2"]
HEAD = ["model.head"]


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        att = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / math.sqrt(h.shape[-1]), dim=-1)
        x = x + self.o(att @ self.v(h))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    def __init__(self, dim: int = 16, depth: int = 2, unused_layer: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(IN_FEATURES, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, CLASSES)
        # a layer that forward never uses: an adapter on it gets no gradient
        self.unused = nn.Linear(dim, dim) if unused_layer else None
        self.activation_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.head(self.norm(x).mean(dim=1))


class Classifier(pl.LightningModule):
    """An ordinary LightningModule that knows nothing about adapters.

    ``optimize_all``: build the optimizer over every parameter (frozen ones included), as
    careless user code does. ``scheduler``: add a StepLR so resuming must restore it too.
    """

    def __init__(
        self,
        dim: int = 16,
        depth: int = 2,
        lr: float = 1e-2,
        unused_layer: bool = False,
        activation_checkpointing: bool = False,
        optimize_all: bool = False,
        scheduler: bool = True,
    ) -> None:
        super().__init__()
        self.model = TinyTransformer(dim, depth, unused_layer)
        self.model.activation_checkpointing = activation_checkpointing
        self.lr, self.optimize_all, self.use_scheduler = lr, optimize_all, scheduler
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> Any:
        params = list(self.parameters()) if self.optimize_all else [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.01)
        if not self.use_scheduler:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def make_dataset(n: int = 64, seed: int = 0) -> TensorDataset:
    """A learnable task: the class is the argmax of four fixed projections of the mean input."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, SEQ, IN_FEATURES, generator=g)
    w = torch.randn(IN_FEATURES, CLASSES, generator=g)
    y = (x.mean(dim=1) @ w).argmax(dim=-1)
    return TensorDataset(x, y)


def make_loader(n: int = 64, batch_size: int = 8, seed: int = 0) -> DataLoader:
    return DataLoader(make_dataset(n, seed), batch_size=batch_size, shuffle=False)


def probe_input(seed: int = 123) -> torch.Tensor:
    return torch.randn(5, SEQ, IN_FEATURES, generator=torch.Generator().manual_seed(seed))


def lora_callback(rank: int = 4, targets: list[str] | None = None, **kwargs: Any) -> Any:
    """``AdapterCallback``: LoRA (``alpha=8``) on ``targets`` (default: every linear of the
    blocks) and the head trained fully; ``kwargs`` go to the callback."""
    from lightning_peft import AdapterCallback, LoRA

    return AdapterCallback(LoRA(rank=rank, alpha=8, target_modules=targets or LORA_TARGETS), trainable_modules=HEAD, **kwargs)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A detached CPU copy of the whole tensor; an FSDP2 ``DTensor`` shard is all-gathered
    (a collective: every rank calls it for the same tensors in the same order)."""
    from lightning_peft.adapters.rank_ops import full_tensor

    return full_tensor(tensor).detach().cpu().clone()


def base_name(name: str) -> str:
    """The pre-injection name of a (frozen) parameter: drop ``base_layer.``."""
    return name.replace(".base_layer.", ".")


def count_checkpoint_writes() -> list[str]:
    """Patch ``AtomicCheckpointIO.save_checkpoint`` to record the file names this process writes;
    returns the (live) list."""
    from lightning_peft.callbacks.adapter import AtomicCheckpointIO

    writes: list[str] = []
    save = AtomicCheckpointIO.save_checkpoint

    def counting_save(self, checkpoint, path, storage_options=None):  # type: ignore[no-untyped-def]
        writes.append(Path(path).name)
        return save(self, checkpoint, path, storage_options)

    AtomicCheckpointIO.save_checkpoint = counting_save  # type: ignore[method-assign]
    return writes
