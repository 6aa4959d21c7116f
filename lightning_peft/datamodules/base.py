"""Shared loaders for the datamodules with fixed splits."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset


class SplitDataModule(L.LightningDataModule):
    """Train/val loaders over ``train_set`` / ``val_set`` (set in ``setup``) with
    ``batch_size``, ``eval_batch_size``, ``num_workers``; training batches are shuffled by a
    generator seeded with ``seed``, so the order is reproducible. Subclasses with a test split
    add ``test_dataloader`` (``self._loader(self.test_set, False, self.eval_batch_size)``)."""

    batch_size: int
    eval_batch_size: int
    seed: int
    num_workers: int
    train_set: Dataset | None = None
    val_set: Dataset | None = None

    def _loader(self, dataset: Dataset | None, shuffle: bool, batch_size: int) -> DataLoader:
        if dataset is None:
            raise RuntimeError("Call setup() before requesting a dataloader.")
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False, self.eval_batch_size)
