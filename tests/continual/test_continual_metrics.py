"""continual_metrics against the definitions computed independently, bad matrices, and the
principal angles of known subspaces (identical, orthogonal, one inside the other, random)."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from lightning_peft import LoRA, apply_adapter
from lightning_peft.continual import continual_metrics, principal_angles, subspace_angles
from lightning_peft.library import AdapterLibrary


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


def add_lora(library: AdapterLibrary, name: str, factors: dict) -> None:
    """Store ``{module: (A, B)}`` as a LoRA entry (rank 2, alpha 2: scale 1)."""
    model = copy.deepcopy(library.model)
    apply_adapter(model, LoRA(rank=2, alpha=2.0, target_modules=["re:" + m for m in factors]), check_gradients=False)
    with torch.no_grad():
        for module, (a, b) in factors.items():
            model.get_submodule(module).lora_A.weight.copy_(a)
            model.get_submodule(module).lora_B.weight.copy_(b)
    library.add(name, model)


def test_principal_angles_over_pairs_and_modules(tmp_path):
    torch.manual_seed(0)
    library = AdapterLibrary(tmp_path / "lib", base=nn.Sequential(nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 8)))
    g = torch.Generator().manual_seed(1)
    a0, b0 = torch.randn(2, 16, generator=g), torch.randn(8, 2, generator=g)
    add_lora(library, "x", {"0": (a0, b0), "2": (torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g))})
    add_lora(library, "y", {"0": (3 * a0, b0 @ torch.tensor([[1.0, 1.0], [0.0, 1.0]]))})  # the same subspaces on "0"
    add_lora(library, "z", {"0": (torch.randn(2, 16, generator=g), torch.randn(8, 2, generator=g))})
    library.add_combination("mix", {"y": 1.0, "z": 0.5})  # not an adapter: no angles
    out = principal_angles(library)
    assert out["entries"] == ["x", "y", "z"] and [(p["a"], p["b"]) for p in out["pairs"]] == list(itertools.combinations("xyz", 2))
    xy = out["pairs"][0]
    assert set(xy["modules"]) == {"0"} and xy["A_overlap"] == pytest.approx(1.0) and xy["B_overlap"] == pytest.approx(1.0)
    xz = out["pairs"][1]
    assert xz["A_overlap"] < 1.0 and xz["A_chance"] == pytest.approx(2 / 16) and xz["B_chance"] == pytest.approx(2 / 8)
    assert out["summary"]["pairs"] == 3
    assert out["summary"]["A_overlap"] == pytest.approx(np.mean([p["A_overlap"] for p in out["pairs"]]))
    assert principal_angles(library, ["x", "z"])["summary"]["pairs"] == 1
    with pytest.raises(ValueError, match=r"\['mix'\] are not LoRA adapter entries"):
        principal_angles(library, ["x", "mix"])
