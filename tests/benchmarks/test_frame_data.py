"""The FRAME benchmark's multi-task data builder (``benchmarks/frame_data.py``): the stated
tasks and label sets, deterministic builds, and the word-order corruption it claims."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import frame_data as fd  # noqa: E402


@pytest.fixture(scope="module")
def small() -> tuple[list[fd.Example], list[fd.Example]]:
    return fd.build_tasks(max_per_class=10)


def test_tasks_labels_and_prefixes(small):
    train, test = small
    for split in (train, test):
        assert {e.task for e in split} == set(fd.TASKS)
        for e in split:
            assert 0 <= e.label < len(fd.TASKS[e.task])
            assert e.text.startswith(fd.PREFIX[e.task] + " ")
    counts = fd.summary(train + test)
    # 10 articles per topic -> 50 topic and 50 order examples; 10 paragraphs per pydoc family
    assert counts["topic"] == dict.fromkeys(fd.TASKS["topic"], 10)
    assert sum(counts["order"].values()) == 50 and min(counts["order"].values()) >= 20
    assert counts["pydoc"] == dict.fromkeys(fd.TASKS["pydoc"], 10)
    # held-out share per label is the stated fraction
    assert fd.summary(test)["topic"] == dict.fromkeys(fd.TASKS["topic"], 2)


def test_builds_are_deterministic(small):
    again = fd.build_tasks(max_per_class=10)
    assert again == small


def test_every_pydoc_topic_has_a_family():
    paragraphs, labels = fd.pydoc_paragraphs()
    assert len(paragraphs) > 500
    assert set(labels) == set(range(len(fd.TASKS["pydoc"])))
    assert all(fd.PYDOC_MIN_WORDS <= len(p.split()) <= fd.PYDOC_MAX_WORDS for p in paragraphs)


def test_scrambled_passage_is_the_intact_one_with_swapped_pairs():
    text = "Headline here\n\n" + " ".join(f"w{i}" for i in range(100))
    intact = fd._order_example(text, False, random.Random(0))
    scrambled = fd._order_example(text, True, random.Random(0))
    a, b = intact.text.split()[3:], scrambled.text.split()[3:]  # drop "word order :"
    assert (intact.label, scrambled.label) == (0, 1) and len(a) == fd.ORDER_WORDS
    assert sorted(a) == sorted(b)
    moved = [i for i in range(len(a)) if a[i] != b[i]]
    assert len(moved) == 2 * fd.ORDER_SWAPS
    for i in moved[::2]:
        assert (b[i], b[i + 1]) == (a[i + 1], a[i])
