"""The host-cost benchmark's baselines compute real LoRA: the minimal ``autograd.Function`` and the
plain two-matmul layer give the values and gradients of ours on the same weights
(``benchmarks/host_overhead.py``; timings are not asserted)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import host_overhead as ho  # noqa: E402


def lora_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]


def copy_lora(src: nn.Module, dst: nn.Module) -> None:
    """Ours' A and B into a baseline (``nn.Linear`` factors or bare parameters)."""
    with torch.no_grad():
        for s, d in zip(lora_layers(src), lora_layers(dst), strict=True):
            for name in ("lora_A", "lora_B"):
                target = getattr(d, name)
                (target.weight if isinstance(target, nn.Linear) else target).copy_(getattr(s, name).weight)


def grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    x = x.clone().requires_grad_(True)
    out = model(x)
    params = [p for p in model.parameters() if p.requires_grad]
    return [out.detach(), *torch.autograd.grad(out.square().sum(), [x, *params])]


def test_minimal_and_plain_baselines_match_ours():
    torch.manual_seed(0)
    base, x = ho.Stack(3), torch.randn(ho.BATCH, ho.WIDTH)
    ours = ho.ours(copy.deepcopy(base))
    reference = grads(ours, x)
    for layer in (ho.MinimalLoRALayer, ho.PlainLoRALayer):
        baseline = ho.replace_linears(copy.deepcopy(base), layer)
        copy_lora(ours, baseline)
        for a, b in zip(grads(baseline, x), reference, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, b.abs().max().item()))


def test_grouped_qkv_case_matches_the_minimal_function():
    torch.manual_seed(0)
    base, x = ho.QKVStack(2), torch.randn(ho.BATCH, ho.WIDTH)
    ours = ho.ours(copy.deepcopy(base), group_shared_inputs=True)
    assert all(layer._group is not None for layer in lora_layers(ours))
    minimal = ho.replace_linears(copy.deepcopy(base), ho.MinimalLoRALayer)
    copy_lora(ours, minimal)
    for a, b in zip(grads(minimal, x), grads(ours, x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, b.abs().max().item()))


def test_unguarded_compile_keeps_its_graph_to_itself():
    """Without module guards a compiled graph matches any model of the same structure that runs
    the same ``forward`` code; the benchmark's unguarded variant gets its own code object, so the
    frozen model (same class, other layers) still runs eagerly and right, and ours compiles to its
    own values."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    base, x = ho.Stack(2), torch.randn(ho.BATCH, ho.WIDTH)
    ours, frozen = ho.ours(copy.deepcopy(base)), ho.frozen(copy.deepcopy(base))
    expected = ours(x)
    unguarded = ho.unguarded_compile(copy.deepcopy(ours), backend="aot_eager")
    torch.testing.assert_close(unguarded(x), expected)
    assert type(frozen).forward.__code__ is not type(unguarded._orig_mod).forward.__code__
    torch.testing.assert_close(torch.compile(frozen, backend="aot_eager")(x), base(x))
    torch._dynamo.reset()
