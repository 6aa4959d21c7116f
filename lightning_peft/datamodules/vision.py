"""Vision datamodules built on data that ships with installed packages (no downloads).

``DigitsDataModule`` serves scikit-learn's ``load_digits``: 1,797 real 8x8 grey-scale images of
the digits 0-9 (about 180 per class).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft.datamodules.base import SplitDataModule, check_fractions, check_loader_args, stratified_split
from lightning_peft.validation import InvalidArgumentError, InvalidArgumentTypeError, check_int

# Statistics of ``load_digits().images / 16`` over all 1,797 images. They are fixed constants
# (not recomputed per split or per class filter) so that a base pretrained on digits 0-4 and an
# adapter trained on digits 5-9 see identically scaled pixels.
DIGITS_MEAN = 0.3053
DIGITS_STD = 0.3760


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
        check_int("image_size", image_size, low=1)
        check_loader_args(batch_size, eval_batch_size, seed, num_workers)
        check_fractions(val_fraction, test_fraction)
        if classes is not None:
            if isinstance(classes, (str, bytes)) or not isinstance(classes, (list, tuple)):
                raise InvalidArgumentTypeError("classes", f"classes must be a list of digits 0-9 or None, got {classes!r}")
            if len(classes) < 2:
                raise InvalidArgumentError("classes", f"classes must be at least two digits 0-9, got {classes}.")
            for i, c in enumerate(classes):
                check_int(f"classes[{i}]", c)
            bad = [c for c in classes if not 0 <= c <= 9]
            if bad:
                raise InvalidArgumentError("classes", f"classes must be digits 0-9, got {bad} in {classes}.")
            if len(set(classes)) != len(classes):
                raise InvalidArgumentError("classes", f"classes must be distinct digits, got duplicates: {classes}; list each digit once.")
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
        train_idx, val_idx, test_idx = stratified_split(y.tolist(), (self.val_fraction, self.test_fraction), self.seed)
        self.train_set = TensorDataset(x[train_idx], y[train_idx])
        self.val_set = TensorDataset(x[val_idx], y[val_idx])
        self.test_set = TensorDataset(x[test_idx], y[test_idx])

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False, self.eval_batch_size)
