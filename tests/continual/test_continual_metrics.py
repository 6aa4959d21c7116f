"""continual_metrics against the definitions computed independently, bad matrices, and the
principal angles of known subspaces (identical, orthogonal, one inside the other, random)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from lightning_peft.continual import continual_metrics, principal_angles, subspace_angles


def test_metrics_follow_the_definitions():
    rng = np.random.default_rng(0)
    t = 5
    acc = np.triu(rng.uniform(0.3, 1.0, size=(t, t))).T  # lower triangle; zeros above
    acc[np.triu_indices(t, 1)] = np.nan  # ignored
    got = continual_metrics(acc)
    final = acc[t - 1]
    assert got["tasks"] == t and got["average_accuracy"] == pytest.approx(final.mean())
    forgetting = [max(acc[i][j] for i in range(j, t - 1)) - final[j] for j in range(t - 1)]
    assert got["forgetting"] == pytest.approx(np.mean(forgetting))
    assert got["backward_transfer"] == pytest.approx(np.mean([final[j] - acc[j][j] for j in range(t - 1)]))
    assert got["average_incremental_accuracy"] == pytest.approx(np.mean([acc[i][: i + 1].mean() for i in range(t)]))
    assert [row for row in got["matrix"]] == [acc[i][: i + 1].tolist() for i in range(t)]
    assert got["per_task"][0]["history"] == acc[:, 0].tolist() and got["per_task"][-1]["forgetting"] is None


def test_no_forgetting_and_one_task():
    flat = continual_metrics([[0.9], [0.9, 0.8], [0.9, 0.8, 0.7]])
    assert flat["forgetting"] == 0.0 and flat["backward_transfer"] == 0.0
    improving = continual_metrics([[0.5], [0.7, 0.9]])
    assert improving["backward_transfer"] == pytest.approx(0.2) and improving["forgetting"] == pytest.approx(-0.2)
    one = continual_metrics([[0.8]])
    assert one["forgetting"] is None and one["backward_transfer"] is None and one["average_accuracy"] == 0.8


@pytest.mark.parametrize(
    "acc, match",
    [([], "non-empty"), ([[0.5], [0.4]], "row 1"), ([[float("nan")]], r"acc\[0\]\[0\]"), (np.zeros(3), "2-d"), ([["a"]], "finite")],
)
def test_bad_matrices_are_refused(acc, match):
    with pytest.raises(ValueError, match=match):
        continual_metrics(acc)


def test_subspace_angles_of_known_subspaces():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(10, 6, generator=g, dtype=torch.float64))[0]
    a, b = basis[:, :3], basis[:, 3:]
    same = subspace_angles(a, a @ torch.randn(3, 3, generator=g, dtype=torch.float64))  # same span, other basis
    assert same["overlap"] == pytest.approx(1.0) and max(same["degrees"]) < 1e-4
    orthogonal = subspace_angles(a, b)
    assert orthogonal["overlap"] == pytest.approx(0.0, abs=1e-12) and min(orthogonal["degrees"]) == pytest.approx(90.0)
    inside = subspace_angles(a[:, :1], a)
    assert inside["ranks"] == [1, 3] and inside["overlap"] == pytest.approx(1.0) and inside["chance"] == pytest.approx(0.3)
    tilted = subspace_angles(a[:, :1], (a[:, :1] + b[:, :1]) / math.sqrt(2))
    assert tilted["degrees"] == [pytest.approx(45.0)]
    assert subspace_angles(torch.zeros(10, 2), a)["overlap"] is None  # a zero factor spans nothing


class FactorsOnly:
    """Just the two things principal_angles reads from a library."""

    def __init__(self, factors: dict):
        self.factors = factors
        self.names = list(factors)

    def lora_factors(self, name: str) -> dict:
        if name not in self.factors:
            raise ValueError(name)
        return self.factors[name]


def test_principal_angles_over_pairs_and_modules():
    g = torch.Generator().manual_seed(1)
    a0, b0 = torch.randn(2, 16, generator=g), torch.randn(8, 2, generator=g)
    lib = FactorsOnly(
        {
            "x": {"m": (a0, b0, 1.0), "n": (torch.randn(2, 16, generator=g), torch.randn(8, 2, generator=g), 1.0)},
            "y": {"m": (3 * a0, b0 @ torch.tensor([[1.0, 1.0], [0.0, 1.0]]), 2.0)},  # the same subspaces on m
            "z": {"m": (torch.randn(2, 16, generator=g), torch.randn(8, 2, generator=g), 1.0)},
        }
    )
    out = principal_angles(lib)
    assert out["entries"] == ["x", "y", "z"] and [(p["a"], p["b"]) for p in out["pairs"]] == list(itertools.combinations("xyz", 2))
    xy = out["pairs"][0]
    assert set(xy["modules"]) == {"m"} and xy["A_overlap"] == pytest.approx(1.0) and xy["B_overlap"] == pytest.approx(1.0)
    xz = out["pairs"][1]
    assert xz["A_overlap"] < 1.0 and xz["A_chance"] == pytest.approx(2 / 16) and xz["B_chance"] == pytest.approx(2 / 8)
    assert out["summary"]["pairs"] == 3
    assert out["summary"]["A_overlap"] == pytest.approx(np.mean([p["A_overlap"] for p in out["pairs"]]))
    assert principal_angles(lib, ["x", "z"])["summary"]["pairs"] == 1
    with pytest.raises(ValueError, match=r"\['w'\] are not LoRA adapter entries"):
        principal_angles(lib, ["x", "w"])
