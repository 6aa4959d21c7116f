"""io.remove_adapter undoes apply_adapter: bases back, record dropped, everything frozen."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_peft import LoRA, apply_adapter, merge_adapter, remove_adapter
from lightning_peft.adapters.base import AdapterLayer
from lightning_peft.targeting import adapter_record


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))


@pytest.mark.parametrize("merged", [False, True])
def test_remove_adapter_restores_the_plain_model(merged):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 6)
    plain_out = model(x)
    apply_adapter(model, LoRA(rank=2, target_modules=["0", "2"]), trainable_modules=["4"], check_gradients=False)
    with torch.no_grad():
        for layer in (m for m in model.modules() if isinstance(m, AdapterLayer)):
            for p in layer.adapter_parameters():
                p.normal_()
    assert not torch.allclose(model(x), plain_out)
    if merged:
        merge_adapter(model)
    assert remove_adapter(model) == 2
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert adapter_record(model) is None
    assert not any(p.requires_grad for p in model.parameters())  # the trained head is frozen again too
    assert model.state_dict().keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), key  # merged weights unmerged exactly
    torch.testing.assert_close(model(x), plain_out, rtol=0, atol=0)
    apply_adapter(model, LoRA(rank=2, target_modules=["0"]), check_gradients=False)  # can be adapted again


def test_remove_adapter_from_a_parent_module_and_without_adapters():
    outer = nn.Sequential(_model())
    apply_adapter(outer[0], LoRA(rank=2, target_modules=["2"]), check_gradients=False)
    assert remove_adapter(outer) == 1 and adapter_record(outer) is None
    with pytest.raises(ValueError, match="no adapters to remove"):
        remove_adapter(outer)
