"""The declared adapter contract (``lightning_peft/adapters/base.py``).

The worked example in ``docs/DEVELOPING.md`` ("Adding an adapter") runs as written: one file's
worth of code plus a registry entry gives an adapter that applies, trains, saves, loads and
merges with nothing else changed. Specs are re-targeted by copy, never mutated. The input
recomputation that reads autograd's ``_saved_*`` internals still finds its recipes (so a torch
upgrade that renames them fails here instead of silently costing memory).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_peft import LoRA, apply_adapter, load_adapter, merge_adapter, save_adapter, unmerge_adapter
from lightning_peft.adapters import registry
from lightning_peft.adapters.base import AdapterLayer
from lightning_peft.adapters.kernels.recompute import input_recipe

DEVELOPING = Path(__file__).resolve().parents[2] / "docs" / "DEVELOPING.md"


def _worked_example() -> dict:
    text = DEVELOPING.read_text()
    section = text[text.index("## Adding an adapter") :]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    code = next(b for b in blocks if "class OutputScale(AdapterSpec)" in b)
    namespace: dict = {"__name__": "developing_example"}
    exec(compile(code, str(DEVELOPING), "exec"), namespace)  # noqa: S102 - our own documentation
    return namespace


@pytest.fixture()
def output_scale(monkeypatch):
    ns = _worked_example()
    spec_cls = ns["OutputScale"]
    monkeypatch.setattr(registry, "_USER", dict(registry._USER))  # registration stays local to the test
    registry.register_adapter(spec_cls)
    return spec_cls


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def test_the_documented_adapter_applies_saves_loads_and_merges(output_scale, tmp_path):
    model = _model()
    report = apply_adapter(model, output_scale(target_modules=["0"]))
    layer = model[0]
    assert isinstance(layer, AdapterLayer) and layer.base_fingerprint is not None and layer.base_shape == [8, 6]
    assert report.trainable == 8
    with torch.no_grad():
        layer.scale.normal_()
    x = torch.randn(5, 6)
    expected = model(x)
    save_adapter(model, tmp_path / "export")
    fresh = load_adapter(_model(), tmp_path / "export")
    torch.testing.assert_close(fresh(x), expected)
    base_weight = model[0].base_layer.weight.detach().clone()
    merge_adapter(model)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    unmerge_adapter(model)
    assert torch.equal(model[0].base_layer.weight, base_weight)


def test_the_documented_adapter_refuses_what_it_cannot_adapt(output_scale):
    with pytest.raises(TypeError, match=r"OutputScale cannot adapt '1'"):
        output_scale().check("1", nn.ReLU())


def test_retargeted_is_a_validated_copy_and_leaves_the_spec_alone():
    spec = LoRA(rank=2, target_modules="all-linear", module_path="encoder", rank_pattern={"q": 4})
    pinned = spec.retargeted(["encoder.q", "head"])
    assert pinned is not spec and type(pinned) is LoRA
    assert pinned.target_modules == ["re:" + re.escape("encoder.q"), "re:head"] and pinned.module_path is None
    assert pinned.rank == 2 and pinned.rank_pattern == {"q": 4}
    assert spec.target_modules == "all-linear" and spec.module_path == "encoder"
    with pytest.raises(ValueError, match="target_modules must not be an empty list"):
        spec.retargeted([])


def test_every_spec_declares_training_callbacks_and_check():
    for name in registry.registered_adapters():
        cls = registry.adapter_class(name)
        assert isinstance(cls.training_callbacks, tuple)
        assert callable(cls.check) and callable(cls.retargeted)


def _frozen_rms_norm(d):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return LlamaRMSNorm(d).requires_grad_(False)


@pytest.mark.parametrize(
    ("producer", "kind"),
    [
        (lambda h: nn.functional.layer_norm(h, (h.shape[-1],), torch.ones(h.shape[-1], requires_grad=True)), "layer_norm"),
        (nn.functional.gelu, "gelu"),
        (nn.functional.silu, "silu"),
        (lambda h: h * h.detach().sigmoid().requires_grad_(), "mul"),
        (lambda h: _frozen_rms_norm(h.shape[-1])(h), "rms_norm"),
    ],
)
def test_input_recipes_are_found_in_this_torch(producer, kind):
    """Reads ``grad_fn._saved_*`` (autograd internals): a torch that renames them fails here."""
    h = torch.randn(4, 8, requires_grad=True)
    recipe = input_recipe(producer(h))
    assert recipe is not None and recipe[0] == kind
