"""The continual benchmark's pieces (``benchmarks/continual*.py``): the task splits, the four
methods' loops on a tiny backbone (matrix shape, storage counts, the library methods' exact
retention of earlier tasks) and the summary wiring into ``continual_metrics``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import continual as bench  # noqa: E402
import continual_data as cd  # noqa: E402
import continual_methods as cm  # noqa: E402


def test_digits_split_is_disjoint_and_pretraining_sees_only_digits_0_to_4():
    from sklearn.datasets import load_digits

    labels = torch.tensor(load_digits().target)
    test, pool, pretrain = cd.digits_split(labels)
    used = [i for c in range(10) for i in test[c] + pool[c]]
    assert len(used) == len(set(used)) and not set(used) & set(pretrain)
    assert {int(labels[i]) for i in pretrain} == set(cd.PRETRAIN_CLASSES)
    for c in range(10):
        assert {int(labels[i]) for i in test[c] + pool[c]} == {c}
        assert len(test[c]) == cd.DIGITS_TEST_PER_CLASS and len(pool[c]) >= cd.DIGITS_TRAIN_PER_CLASS


def test_vision_tasks_are_balanced_pairs_with_seed_independent_test_sets():
    a, b = cd.vision_tasks(0, train_per_class=10), cd.vision_tasks(1, train_per_class=10)
    assert [t.name for t in a] == [f"digits_{x}{y}" for x, y in cd.VISION_PAIRS]
    for ta, tb in zip(a, b):
        assert ta.x_train.shape == (20, 1, 16, 16) and int(ta.y_train.sum()) == 10
        assert torch.equal(ta.x_test, tb.x_test) and torch.equal(ta.y_test, tb.y_test)
    assert not all(torch.equal(ta.x_train, tb.x_train) for ta, tb in zip(a, b))


def test_one_vs_rest_split_balances_and_keeps_test_out_of_train():
    labels = [c for c in range(5) for _ in range(30)]
    split = cd.one_vs_rest_indices(labels, seed=0, train_per_side=8, test_per_side=8)
    assert len(split) == 5
    for k, (train, test) in enumerate(split):
        assert not set(train) & {i for _, t in split for i in t}  # no test article of any task trains
        assert sum(labels[i] == k for i in train) == 8 and len(train) == 16
        assert sum(labels[i] == k for i in test) == 8 and len(test) == 16
        assert {labels[i] for i in test if labels[i] != k} == set(range(5)) - {k}
    assert cd.one_vs_rest_indices(labels, 0, 8, 8) == split and cd.one_vs_rest_indices(labels, 1, 8, 8) != split


class TinyBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 12), nn.Linear(12, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def tiny_tasks(count: int = 2) -> list[cd.Task]:
    g = torch.Generator().manual_seed(0)
    tasks = []
    for t in range(count):
        x = torch.randn(48, 16, generator=g)
        y = (x[:, t] > 0).long()
        tasks.append(cd.Task(f"t{t}", x[:32], y[:32], x[32:], y[32:]))
    return tasks


@pytest.mark.parametrize("method", cm.METHODS)
def test_methods_fill_the_matrix_and_count_storage(method):
    torch.manual_seed(0)
    base, tasks = TinyBackbone(), tiny_tasks()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    budget = cm.Budget(steps=3, batch=8, rank=2, alpha=4.0)
    result = cm.run_method(method, base, tasks, budget, seed=0, width=8)
    acc = result["acc"]
    assert [len(row) for row in acc] == [1, 2] and all(0.0 <= a <= 1.0 for row in acc for a in row)
    lora_bytes = 4 * 2 * (16 + 12 + 12 + 8)  # rank 2: A [2, d_in] + B [d_out, 2] on fc1 and fc2, fp32
    assert result["head_bytes"] == 2 * 4 * (2 * 8 + 2)
    if method == "lora_per_task":
        assert result["adapters_kept"] == 2 and result["adapter_bytes"] == 2 * lora_bytes
    elif method == "shared_lora":
        assert result["adapters_kept"] == 1 and result["adapter_bytes"] == lora_bytes
    elif method == "full_ft":
        assert result["adapters_kept"] == 0 and result["adapter_bytes"] == 4 * sum(p.numel() for p in base.parameters())
    else:  # litelora: the first task always recruits; the second recruits or keeps only coefficients
        decisions = result["tasks"]
        assert decisions[0]["recruited"] and result["adapters_kept"] == sum(d["recruited"] for d in decisions)
        assert result["adapter_bytes"] == sum(d["bytes"] for d in decisions) >= lora_bytes
    if method in cm.LIBRARY_METHODS:
        # earlier tasks' library entries are never trained again: exactly the same accuracy
        assert acc[1][0] == acc[0][0]
    # the base the caller passed is left untouched (each method trains its own copy)
    assert base.state_dict().keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_method_labels_expand_litelora_per_l0_weight():
    labels = bench.labels(["litelora", "shared_lora"], [0.5, 2.0])
    assert labels == ["litelora_l0=0.5", "litelora_l0=2", "shared_lora"]
    method, budget = bench.method_of(labels[1], cm.Budget(l0_weight=0.01))
    assert method == "litelora" and budget.l0_weight == 2.0
    assert bench.method_of("full_ft", cm.Budget()) == ("full_ft", cm.Budget())


def test_summary_and_anchor_wiring():
    runs = {
        m: [
            {
                "acc": [[1.0], [0.5 + 0.1 * s, 0.8]],
                "adapters_kept": k,
                "adapter_bytes": 100 * k,
                "head_bytes": 8,
                "backbone_bytes": 64,
                "seconds": 1.0,
            }
            for s in range(3)
        ]
        for m, k in (("litelora_l0=1", 1), ("lora_per_task", 2))
    }
    seq = {"methods": {m: bench.summarize(r) for m, r in runs.items()}}
    lite = seq["methods"]["litelora_l0=1"]
    assert lite["forgetting"]["values"] == pytest.approx([0.5, 0.4, 0.3])
    assert lite["average_accuracy"]["values"] == pytest.approx([0.65, 0.7, 0.75])
    assert lite["accuracy_matrix_mean"][1][0] == pytest.approx(0.6)
    anchor = bench.anchor_reading(seq)["litelora_l0=1"]
    assert anchor["fewer_adapters_than_per_task"] == pytest.approx(0.5) and anchor["bytes_ratio_vs_per_task"] == pytest.approx(0.5)
