"""``torch.compile`` of LoRA-adapted models: one graph, compiled once, eager's gradients.

The guarantees ``docs/compile.md`` states, on a whole timm ViT block and a whole transformers
Llama decoder layer (both built tiny, no download): ``fullgraph=True`` traces (no graph break),
several training steps and adapters switched in place with the same layout reuse the first
compilation (frames counted by a ``CompileCounterWithBackend``), and gradients equal eager's.
``backend="aot_eager"`` traces exactly what inductor would receive (dynamo + AOTAutograd's joint
graph) without inductor's slow C++ compile, so these tests stay fast; inductor itself is measured
in ``benchmarks/lora_step.py`` (``*_compiled`` variants).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from lightning_peft import LoRA, apply_adapter
from lightning_peft.adapters.kernels import lora as lora_kernels
from lightning_peft.adapters.lora import LoRALinear
from lightning_peft.memory import SavedTensorMeter

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from compile_memory import LlamaLayer  # noqa: E402  (one Llama decoder layer with its rotary embedding)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def vit_block(dropout: float = 0.0, dtype: torch.dtype = torch.float64, adapt: bool = True) -> nn.Module:
    from timm.models.vision_transformer import Block

    torch.manual_seed(0)
    block = Block(dim=32, num_heads=4, mlp_ratio=2.0, qkv_bias=True).to(dtype)
    if not adapt:
        return block.requires_grad_(False)
    apply_adapter(block, LoRA(rank=4, alpha=8.0, target_modules=["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"], dropout=dropout))
    randomise_lora_b(block)
    return block


def llama_layer(adapt: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = LlamaLayer(hidden=32, intermediate=64, heads=4, kv_heads=2).double()
    if not adapt:
        return model.requires_grad_(False)
    apply_adapter(
        model, LoRA(rank=4, alpha=8.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    )
    randomise_lora_b(model)
    return model


def randomise_lora_b(model: nn.Module) -> None:
    """B = 0 at init would hide every error in A's path: give B values of the size A's have."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(std=0.2)


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def inputs(model: nn.Module, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 8, 32, generator=gen, dtype=torch.float64, requires_grad=True)


def loss_and_grads(fn, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    loss = fn(x).square().mean()
    return loss.detach(), list(torch.autograd.grad(loss, [x, *trainable(model)]))


def assert_all_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for g, w in zip(got, want, strict=True):
        # fp64 on both sides: eager and compiled differ only by summation order
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9 * max(w.abs().max().item(), 1.0))


@pytest.mark.parametrize("build", [vit_block, llama_layer], ids=["timm_vit_block", "llama_decoder_layer"])
def test_a_whole_block_compiles_once_in_one_graph_with_eager_gradients(build):
    """``fullgraph=True`` (a graph break raises), three optimizer steps, one compiled frame."""
    eager, model = build(), build()
    model.load_state_dict(eager.state_dict())
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    opt_eager = torch.optim.SGD(trainable(eager), lr=0.1)
    opt_compiled = torch.optim.SGD(trainable(model), lr=0.1)
    for step in range(3):
        x = inputs(model, step)
        loss_e, grads_e = loss_and_grads(eager, eager, x)
        loss_c, grads_c = loss_and_grads(compiled, model, x)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-10, atol=0.0)
        assert_all_close(grads_c, grads_e)
        for opt, model_, grads in ((opt_eager, eager, grads_e), (opt_compiled, model, grads_c)):
            for p, g in zip(trainable(model_), grads[1:], strict=True):
                p.grad = g
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times over 3 training steps"
    assert counter.op_count > 0


def test_switching_adapters_of_the_same_layout_in_place_does_not_recompile():
    """Copying another adapter's values into ``lora_A`` / ``lora_B`` (``.copy_``) keeps every
    guard valid: the compiled block runs the new adapter without recompiling."""
    model = vit_block()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = inputs(model, 0)
    before = compiled(x).detach()
    other = vit_block()
    with torch.no_grad():
        for layer, src in zip(lora_layers(model), lora_layers(other), strict=True):
            layer.lora_A.weight.copy_(torch.randn_like(src.lora_A.weight))
            layer.lora_B.weight.copy_(torch.randn_like(src.lora_B.weight))
    loss_c, grads_c = loss_and_grads(compiled, model, x)
    loss_e, grads_e = loss_and_grads(model, model, x)
    assert counter.frame_count == 1, "an in-place adapter switch recompiled"
    assert not torch.allclose(compiled(x).detach(), before), "the switched adapter was not used"
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-10, atol=0.0)
    assert_all_close(grads_c, grads_e)


def test_merge_and_unmerge_under_compile_recompile_once_then_reuse_both_graphs():
    """``merge()`` flips the layer's ``merged`` flag, a guarded attribute: the merged model
    compiles once more (the documented cost) and is exact; after ``unmerge()`` the first graph
    is reused (no third compile) and gives the unmerged outputs again."""
    model = vit_block()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = inputs(model, 0).detach()
    with torch.no_grad():
        unmerged = compiled(x)
        for layer in lora_layers(model):
            layer.merge()
        merged = compiled(x)
        eager_merged = model(x)
        for layer in lora_layers(model):
            layer.unmerge()
        again = compiled(x)
    assert counter.frame_count == 2
    torch.testing.assert_close(merged, eager_merged, rtol=1e-10, atol=1e-12)
    # the merged weight is W0 + s B A with s B A formed in fp32: equal to the unmerged block up to fp32 rounding
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-6 * unmerged.abs().max().item())
    torch.testing.assert_close(again, unmerged, rtol=0.0, atol=0.0)


def test_dropout_in_training_compiles_in_one_graph_and_matches_eager_with_the_same_seed():
    """Dropout's mask comes from the global generator in both modes (``aot_eager`` keeps the
    random op as it is), so with one seed compiled and eager draw the same masks."""
    eager, model = vit_block(dropout=0.25), vit_block(dropout=0.25)
    model.load_state_dict(eager.state_dict())
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = inputs(model, 0)
    torch.manual_seed(7)
    loss_c, grads_c = loss_and_grads(compiled, model, x)
    torch.manual_seed(7)
    loss_e, grads_e = loss_and_grads(eager, eager, x)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-10, atol=0.0)
    assert_all_close(grads_c, grads_e)
    model.eval()
    eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-10, atol=1e-12)
        assert not torch.allclose(compiled(x), model.train()(x)), "dropout had no effect in training"
    assert counter.frame_count == 2  # train and eval: ``training`` is a guarded flag


@pytest.mark.parametrize("recompute_input", [True, False])
def test_the_memory_recompute_option_traces_and_is_exact_under_compile(recompute_input):
    """Under compile the kernel saves its input (reading ``grad_fn`` would break the graph) and
    leaves recomputation to AOTAutograd's partitioner: both settings trace to one graph and
    give eager's gradients (eager itself recomputes when ``recompute_input`` is on)."""
    eager, model = vit_block(), vit_block()
    for m in (eager, model):
        for layer in lora_layers(m):
            layer.recompute_input = recompute_input
    model.load_state_dict(eager.state_dict())
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = inputs(model, 3)
    _, grads_c = loss_and_grads(compiled, model, x)
    _, grads_e = loss_and_grads(eager, eager, x)
    assert_all_close(grads_c, grads_e)
    assert counter.frame_count == 1


def saved_bytes(fn, x: torch.Tensor) -> int:
    fn(x).sum().backward()  # compile (or warm up) outside the meter
    with SavedTensorMeter() as meter:
        out = fn(x)
    out.sum().backward()
    return meter.bytes


@pytest.mark.parametrize("merge_rows", [0.0, math.inf], ids=["merge_allowed", "unmerged"])
@pytest.mark.parametrize("build", [vit_block, llama_layer], ids=["timm_vit_block", "llama_decoder_layer"])
def test_with_materialised_recompute_allowed_compiled_lora_saves_what_eager_lora_saves(build, merge_rows, monkeypatch):
    """Under compile the partitioner, not our node, picks what backward keeps. By default it saves
    the adapter inputs (``dA``'s GEMM materialises them, and materialised values are banned from
    recompute); with ``ban_recompute_materialized_backward=False`` it recomputes them, and the
    bytes LoRA adds to the frozen base's are eager's (docs/compile.md, "Memory under compile")."""
    import torch._functorch.config as functorch_config

    # eager takes the merged weight W + s B A from N >= d_in rows; compiled never does (it would keep W'-sized tensors)
    monkeypatch.setattr(lora_kernels, "MERGE_MIN_ROWS_PER_COLUMN", merge_rows)
    frozen, ours = build(adapt=False), build()
    x = inputs(ours, 0)
    eager_extra = saved_bytes(ours, x) - saved_bytes(frozen, x)
    extra = {}
    for ban in (True, False):
        with functorch_config.patch(ban_recompute_materialized_backward=ban):
            torch._dynamo.reset()
            compiled = [torch.compile(m, backend="aot_eager_decomp_partition", fullgraph=True) for m in (ours, frozen)]
            extra[ban] = saved_bytes(compiled[0], x) - saved_bytes(compiled[1], x)
    # the default keeps adapter inputs (at least one more tensor of the block input's size) ...
    assert extra[True] >= extra[False] + x.numel() * x.element_size()
    assert extra[False] <= 1.05 * eager_extra  # ... allowed to recompute, it keeps what eager keeps
