"""Shared pieces of the datamodules with fixed splits: stratified splitting and the loaders."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset


def stratified_split(labels: Any, fractions: tuple[float, float], seed: int) -> tuple[list[int], list[int], list[int]]:
    """Split ``range(len(labels))`` into train/val/test index lists, stratified by label.

    ``fractions`` = (val_fraction, test_fraction); the rest is train. Deterministic for a given
    ``seed`` (scikit-learn's ``train_test_split`` with a fixed ``random_state``). Each returned
    list is sorted so iteration order does not depend on the shuffling.
    """
    from sklearn.model_selection import train_test_split

    val_fraction, test_fraction = fractions
    indices = list(range(len(labels)))
    labels = list(labels)
    held_out = val_fraction + test_fraction
    if held_out <= 0:
        return indices, [], []
    n_classes = len(set(labels))
    for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if 0 < fraction and int(fraction * len(labels)) < n_classes:
            raise ValueError(
                f"{name}={fraction} of {len(labels)} examples leaves fewer than one example per "
                f"class ({n_classes} classes) in a stratified split; use more data or a larger fraction."
            )
    train_idx, rest_idx = train_test_split(indices, test_size=held_out, stratify=labels, random_state=seed)
    if test_fraction <= 0:
        return sorted(train_idx), sorted(rest_idx), []
    if val_fraction <= 0:
        return sorted(train_idx), [], sorted(rest_idx)
    rest_labels = [labels[i] for i in rest_idx]
    val_idx, test_idx = train_test_split(
        rest_idx,
        test_size=test_fraction / held_out,
        stratify=rest_labels,
        random_state=seed,
    )
    return sorted(train_idx), sorted(val_idx), sorted(test_idx)


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Validate the validation/test split fractions (each in ``[0, 1)``, together below 1)."""
    from lightning_peft.validation import InvalidArgumentError, check_float

    check_float("val_fraction", val_fraction, 0.0, 1.0, high_open=True)
    check_float("test_fraction", test_fraction, 0.0, 1.0, high_open=True)
    if val_fraction + test_fraction >= 1.0:
        raise InvalidArgumentError(
            "val_fraction",
            f"val_fraction + test_fraction must be < 1 (got {val_fraction} + {test_fraction}); nothing would be left to train on.",
        )


def check_loader_args(batch_size: int, eval_batch_size: int | None, seed: int, num_workers: int) -> None:
    """Validate the data-loader arguments every ready datamodule takes."""
    from lightning_peft.validation import check_int

    check_int("batch_size", batch_size, low=1)
    check_int("eval_batch_size", eval_batch_size, low=1, allow_none=True)
    check_int("seed", seed)
    check_int("num_workers", num_workers, low=0)


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
