"""tensors_swapped_in: read a module with other tensor values without writing to it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_peft.state_swap import tensors_swapped_in


def tied_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5), nn.BatchNorm1d(5))
    model[1].weight = model[0].weight  # a head tied to the embedding
    return model


def test_swap_keeps_ties_and_restores_the_original_objects() -> None:
    model = tied_model()
    weight, mean = model[0].weight, model[2].running_mean
    before = weight.detach().clone()
    new_weight, new_mean = torch.full((5, 3), 2.0, dtype=torch.float64), torch.ones(5)
    with tensors_swapped_in(model, {"0.weight": new_weight, "2.running_mean": new_mean}):
        assert model[0].weight is model[1].weight  # the tie holds inside
        assert torch.equal(model[1].weight, torch.full((5, 3), 2.0))
        assert model[1].weight.dtype == torch.float32 and model[1].weight.requires_grad
        assert torch.equal(model[2].running_mean, new_mean)
        assert [n for n, _ in model.named_parameters()] == ["0.weight", "1.bias", "2.weight", "2.bias"]
    assert model[0].weight is weight and model[1].weight is weight and model[2].running_mean is mean
    assert torch.equal(weight, before)  # never written


def test_swap_restores_after_an_error_and_refuses_unknown_names() -> None:
    model = tied_model()
    weight = model[0].weight
    with pytest.raises(RuntimeError, match="inside"):
        with tensors_swapped_in(model, {"1.weight": torch.zeros(5, 3)}):
            raise RuntimeError("inside")
    assert model[0].weight is weight and model[1].weight is weight
    with pytest.raises(KeyError, match="neither parameters nor buffers"):
        with tensors_swapped_in(model, {"3.weight": torch.zeros(1)}):
            pass
