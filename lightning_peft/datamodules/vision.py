"""Vision datamodules built on data that ships with installed packages (no downloads).

``DigitsDataModule`` serves scikit-learn's ``load_digits``: 1,797 real 8x8 grey-scale images of
the digits 0-9 (about 180 per class).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft.datamodules.base import SplitDataModule

# Statistics of ``load_digits().images / 16`` over all 1,797 images. They are fixed constants
# (not recomputed per split or per class filter) so that a base pretrained on digits 0-4 and an
# adapter trained on digits 5-9 see identically scaled pixels.
DIGITS_MEAN = 0.3053
DIGITS_STD = 0.3760


def stratified_split(
    labels: Any, fractions: tuple[float, float], seed: int
) -> tuple[list[int], list[int], list[int]]:
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
    train_idx, rest_idx = train_test_split(
        indices, test_size=held_out, stratify=labels, random_state=seed
    )
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


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}.")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1 (got {val_fraction} + {test_fraction}); "
            "nothing would be left to train on."
        )


class DigitsDataModule(SplitDataModule):
    """scikit-learn digits as ``[B, 1, S, S]`` float images with integer labels ``[B]``.

    Pixels ``x in {0..16}`` become ``(x / 16 - DIGITS_MEAN) / DIGITS_STD`` on the 8x8 grid, then
    are bilinearly resized to ``image_size x image_size``.

    Args:
        image_size: side ``S`` of the images served (8 keeps the original resolution).
        classes: keep only these digits; labels are remapped to ``0..k-1`` in the given order
            (``[5, 6, 7, 8, 9]`` makes 5 -> 0, ..., 9 -> 4). ``None`` keeps all ten digits.
        batch_size: training batch size.
        eval_batch_size: validation/test batch size (default: ``batch_size``).
        val_fraction: share of the (filtered) images held out for validation, stratified.
        test_fraction: share held out for testing, stratified.
        seed: seed of the split and of the training shuffle order.
        num_workers: DataLoader workers (0 = load in the main process; the data is in memory).
    """

    def __init__(
        self,
        image_size: int = 16,
        classes: list[int] | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        _check_fractions(val_fraction, test_fraction)
        if classes is not None:
            if len(classes) < 2:
                raise ValueError(f"classes needs at least two digits, got {classes}.")
            bad = [c for c in classes if not 0 <= int(c) <= 9]
            if bad:
                raise ValueError(f"classes must be digits 0-9; got {bad}.")
            if len(set(classes)) != len(classes):
                raise ValueError(f"classes has duplicates: {classes}.")
        self.save_hyperparameters()
        self.image_size = image_size
        self.classes = list(classes) if classes is not None else None
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes is not None else 10

    def load_arrays(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All (filtered, remapped) images ``[N, 1, S, S]`` float32 and labels ``[N]`` int64."""
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32)  # [1797, 8, 8], values 0..16
        targets = torch.tensor(digits.target, dtype=torch.long)
        if self.classes is not None:
            keep = torch.zeros_like(targets, dtype=torch.bool)
            remapped = torch.full_like(targets, -1)
            for new_label, digit in enumerate(self.classes):
                mask = targets == int(digit)
                keep |= mask
                remapped[mask] = new_label
            images, targets = images[keep], remapped[keep]
        x = (images / 16.0 - DIGITS_MEAN) / DIGITS_STD
        x = x.unsqueeze(1)  # [N, 1, 8, 8]
        if self.image_size != 8:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return x.contiguous(), targets

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:  # fit then test: split once, reuse
            return
        x, y = self.load_arrays()
        train_idx, val_idx, test_idx = stratified_split(
            y.tolist(), (self.val_fraction, self.test_fraction), self.seed
        )
        self.train_set = TensorDataset(x[train_idx], y[train_idx])
        self.val_set = TensorDataset(x[val_idx], y[val_idx])
        self.test_set = TensorDataset(x[test_idx], y[test_idx])

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False, self.eval_batch_size)
