"""The LoRA layer: math against a reference, gradients, dropout, autocast, merge/unmerge."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.adapters.kernels import lora as lora_kernels
from lightning_peft.adapters.kernels import recompute as recompute_kernels
from lightning_peft.adapters.lora import LoRA, LoRALinear, lora_forward


def reference(x, base, a, b, scale):
    return base(x) + scale * (x @ a.t()) @ b.t()


def make_layer(d_in=16, d_out=12, rank=4, dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out).to(dtype).requires_grad_(False)
    layer = LoRALinear(base, rank, alpha=8.0, **kwargs).to(dtype)
    nn.init.normal_(layer.lora_B.weight)  # non-zero B so every gradient path is exercised
    return layer


@pytest.mark.parametrize(
    "producer",
    [lambda x: x, F.gelu, F.silu, lambda x: F.layer_norm(x, x.shape[-1:]), lambda x: F.silu(x) * x.cos()],
    ids=["leaf", "gelu", "silu", "layernorm", "mul"],
)
@pytest.mark.parametrize("chunk_elements", [None, 32], ids=["whole", "chunked"])
@pytest.mark.parametrize("merge_rows", [0.0, math.inf], ids=["merged", "unmerged"])
def test_forward_and_gradients_match_reference(producer, chunk_elements, merge_rows, monkeypatch):
    monkeypatch.setattr(lora_kernels, "MERGE_MIN_ROWS_PER_COLUMN", merge_rows)  # base GEMMs on W + s B A, or on W
    if chunk_elements is not None:  # 32 elements = 2 rows of 16: 15 rows replay in 8 chunks, one partial
        monkeypatch.setattr(recompute_kernels, "REPLAY_CHUNK_ELEMENTS", chunk_elements)
    layer = make_layer()
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    params = [x, layer.lora_A.weight, layer.lora_B.weight]
    ours = layer(producer(x))
    ref = reference(producer(x), layer.base_layer, layer.lora_A.weight, layer.lora_B.weight, layer.scale)
    torch.testing.assert_close(ours, ref)
    grad = torch.randn_like(ref)
    for g_ours, g_ref in zip(torch.autograd.grad(ours, params, grad), torch.autograd.grad(ref, params, grad)):
        torch.testing.assert_close(g_ours, g_ref)


def test_chunked_replay_never_materialises_the_whole_input(monkeypatch):
    """On CPU, dA's replay of an elementwise producer runs in row chunks into one reused buffer
    (one [r, d] result accumulated), so no [N, d] copy of the input is made in backward."""
    monkeypatch.setattr(recompute_kernels, "REPLAY_CHUNK_ELEMENTS", 64)
    buffers, real_gelu, real_replay = [], recompute_kernels._REPLAY_INTO["gelu"], recompute_kernels.replay

    def spy(tensors, extra, out):
        buffers.append((out.shape[0], out.untyped_storage().data_ptr()))
        return real_gelu(tensors, extra, out)

    def whole(*args):
        raise AssertionError("the whole input was replayed")

    monkeypatch.setitem(recompute_kernels._REPLAY_INTO, "gelu", spy)
    monkeypatch.setattr(recompute_kernels, "replay", whole)
    layer = make_layer()
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    layer(F.gelu(x)).sum().backward()
    assert [rows for rows, _ in buffers] == [4, 4, 4, 4, 4, 1]  # 21 rows, chunks of 64 // 16 = 4
    assert len({ptr for _, ptr in buffers}) == 1  # one buffer, reused

    buffers.clear()  # at most four chunks' worth (16 rows here) is cache-resident: replayed whole
    monkeypatch.setattr(recompute_kernels, "replay", real_replay)
    layer(F.gelu(x[:, :5])).sum().backward()
    assert buffers == []


@pytest.mark.parametrize("min_elements", [0, 1 << 40], ids=["transposed", "direct"])
def test_lora_b_gradient_is_exact_and_in_b_layout_in_both_forms(min_elements, monkeypatch):
    """``dB`` is ``dy^T u`` either as it reads or as ``(u^T dy)^T`` (``thin_outer``, above 128
    rows): the same gradient, accumulated into ``B``'s own (contiguous) layout, step after step."""
    monkeypatch.setattr(lora_kernels, "THIN_OUTER_MIN_ELEMENTS", min_elements)
    layer = make_layer()
    x = torch.randn(2, 80, 16, dtype=torch.float64)  # 160 rows: above thin_outer's row floor
    a, b = layer.lora_A.weight, layer.lora_B.weight
    ref_grad = torch.autograd.grad(reference(x, layer.base_layer, a, b, layer.scale).square().sum(), b)[0]
    for step in (1, 2):  # the first step stores the gradient, the second accumulates into it
        layer(x).square().sum().backward()
        assert b.grad.is_contiguous()
        torch.testing.assert_close(b.grad, step * ref_grad)


def test_backward_is_five_gemms_and_nothing_arithmetic_besides():
    """The scale rides in the GEMMs (``addmm(alpha=s, beta=0)`` for ``dA``/``dB``, ``beta`` for
    ``dx``): one layer's backward is ``dy B``, ``g A`` + ``dy W``, ``dA``, ``dB`` and no ``mul``
    (each would be one more op in eager, one more kernel under ``torch.compile``)."""
    from torch.profiler import ProfilerActivity, profile

    layer = make_layer(dtype=torch.float32)
    x = torch.randn(5, 16, requires_grad=True)
    out, grad_out = layer(x), torch.randn(5, 12)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out.backward(grad_out)
    counts = {e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::")}
    gemms = {k: counts.get(k, 0) for k in ("aten::mm", "aten::addmm", "aten::addmm_")}
    assert gemms == {"aten::mm": 2, "aten::addmm": 2, "aten::addmm_": 1}, counts
    assert counts.get("aten::mul", 0) == counts.get("aten::mul_", 0) == 0


@pytest.mark.parametrize("merge_rows", [0.0, math.inf], ids=["merged", "unmerged"])
def test_gradcheck_fused_and_unfused(merge_rows, monkeypatch):
    monkeypatch.setattr(lora_kernels, "MERGE_MIN_ROWS_PER_COLUMN", merge_rows)
    layer = make_layer()
    x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    a = layer.lora_A.weight.detach().clone().requires_grad_(True)
    b = layer.lora_B.weight.detach().clone().requires_grad_(True)
    w, bias = layer.base_layer.weight, layer.base_layer.bias
    assert torch.autograd.gradcheck(lambda x, a, b: lora_forward(F.gelu(x), w, bias, a, b, 2.0), (x, a, b))
    assert torch.autograd.gradcheck(lambda x, a, b: lora_forward(x, None, None, a, b, 2.0), (x, a, b))
    # a base that trains (the fused node then also returns weight/bias gradients)
    w2, b2 = w.detach().clone().requires_grad_(True), bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w2, b2, a: lora_forward(x, w2, b2, a, b, 2.0), (x, w2, b2, a))


def test_merged_weight_is_taken_by_row_count_and_never_saved(monkeypatch):
    """From ``N >= c d_in`` rows the forward GEMM runs on ``W + s B A`` (from ``N >= c d_out`` also
    ``dx``'s): one GEMM over the activations, no thin ``[N, d_out]`` update; nothing more is saved."""
    from torch.profiler import ProfilerActivity, profile

    layer = make_layer(d_in=16, d_out=12, dtype=torch.float32)
    c = lora_kernels.MERGE_MIN_ROWS_PER_COLUMN
    calls = {}
    low, mid, high = math.ceil(8 * c), math.ceil(14 * c), math.ceil(20 * c)  # below c d_out, between, above c d_in
    for rows in (low, mid, high):
        x = torch.randn(rows, 16, requires_grad=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = layer(x)
        saved = sum(t.numel() for t in out.grad_fn.saved_tensors)
        with profile(activities=[ProfilerActivity.CPU]) as prof_back:
            out.backward(torch.randn_like(out))
        in_place = [sum(e.count for e in p.key_averages() if e.key == "aten::addmm_") for p in (prof, prof_back)]
        calls[rows] = in_place, saved - rows * 16
    # forward: the thin update is added in place only when unmerged; backward: g A + beta dy W
    assert calls[low][0] == [1, 1] and calls[mid][0] == [1, 0] and calls[high][0] == [0, 0], calls
    assert len({extra - rows * 4 for rows, (_, extra) in calls.items()}) == 1  # u [N, r], A, B, W: no W'


def test_bf16_update_below_the_weights_last_bit_is_not_merged_away():
    """In bf16, ``W + s B A`` would round a small update back to ``W``: it stays separate.

    ``W = +-1`` in alternate columns, so ``x W^T = 0`` for ``x = 1``, while each entry of
    ``s B A`` (4e-6) is far below bf16's last bit at 1.0 (2^-8 is half of it): merged, the output
    would be exactly 0; unmerged it is the update's ``32 * 4e-6``."""
    base = nn.Linear(32, 8, bias=False).to(torch.bfloat16).requires_grad_(False)
    base.weight.data.copy_(torch.tensor([1.0, -1.0]).repeat(8, 16))
    layer = LoRALinear(base, rank=4, alpha=4.0).to(torch.bfloat16)  # s = 1
    layer.lora_A.weight.data.fill_(1e-3)
    layer.lora_B.weight.data.fill_(1e-3)
    x = torch.ones(math.ceil(2 * 32 * lora_kernels.MERGE_MIN_ROWS_PER_COLUMN), 32, dtype=torch.bfloat16)  # above both merge thresholds
    update = x.float() @ layer.lora_A.weight.float().t() @ layer.lora_B.weight.float().t()
    torch.testing.assert_close(layer(x).float(), update, rtol=2e-2, atol=0.0)


def test_initial_output_equals_base_and_scaling():
    base = nn.Linear(16, 8)
    layer = LoRALinear(base, rank=4, alpha=8.0)
    x = torch.randn(2, 16)
    torch.testing.assert_close(layer(x), base(x))  # B starts at zero
    assert layer.scale == 2.0
    assert LoRALinear(nn.Linear(16, 8), rank=4, alpha=8.0, use_rslora=True).scale == pytest.approx(8.0 / math.sqrt(4))
    gaussian = LoRALinear(nn.Linear(64, 64), rank=16, alpha=1.0, init="gaussian")
    assert gaussian.lora_A.weight.std().item() == pytest.approx(1 / 16, rel=0.1)


def test_dropout_matches_reference_with_same_mask():
    layer = make_layer(dropout=0.5)
    x = torch.randn(6, 16, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(3)
    ours = layer(x)
    torch.manual_seed(3)
    mask = torch.empty_like(x, dtype=torch.bool).bernoulli_(0.5)
    ref = layer.base_layer(x) + layer.scale * ((x * mask / 0.5) @ layer.lora_A.weight.t()) @ layer.lora_B.weight.t()
    torch.testing.assert_close(ours, ref)
    params = [x, layer.lora_A.weight, layer.lora_B.weight]
    for g1, g2 in zip(torch.autograd.grad(ours.sum(), params), torch.autograd.grad(ref.sum(), params)):
        torch.testing.assert_close(g1, g2)
    layer.eval()
    torch.testing.assert_close(layer(x), reference(x, layer.base_layer, layer.lora_A.weight, layer.lora_B.weight, layer.scale))


def test_autocast_runs_in_activation_dtype_and_keeps_param_grads_fp32():
    layer = make_layer(dtype=torch.float32)
    x = torch.randn(8, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = F.layer_norm(x, (16,))
        y = layer(out)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32 and layer.lora_B.weight.grad.dtype == torch.float32
    assert x.grad.dtype == torch.float32
    ref = reference(F.layer_norm(x, (16,)), layer.base_layer, layer.lora_A.weight, layer.lora_B.weight, layer.scale)
    torch.testing.assert_close(y.float(), ref, atol=0.1, rtol=0.05)


def test_input_recompute_saves_the_input_and_gives_identical_gradients():
    from lightning_peft.memory import SavedTensorMeter

    x = torch.randn(32, 64, requires_grad=True)
    results = {}
    for recompute in (True, False):
        torch.manual_seed(0)
        layer = LoRALinear(nn.Linear(64, 64).requires_grad_(False), 4, 8.0, recompute_input=recompute)
        nn.init.normal_(layer.lora_B.weight)
        with SavedTensorMeter(layer) as meter:
            y = layer(F.gelu(x))
        grads = torch.autograd.grad(y.square().sum(), [x, layer.lora_A.weight, layer.lora_B.weight])
        results[recompute] = (meter.bytes, grads)
    saved_with, grads_with = results[True]
    saved_without, grads_without = results[False]
    assert saved_without - saved_with == x.numel() * x.element_size()  # the GELU output is not kept
    for a, b in zip(grads_with, grads_without):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_input_is_recomputed_not_saved(dtype):
    """A frozen RMSNorm (transformers' Llama one: ``w * (h * rsqrt(mean h^2 + eps)).to(dtype)``)
    saves only ``w`` for its output's product; LoRA recomputes its input from the norm's input
    and ``rstd`` (folded into dA's GEMM in fp32, replayed with the cast in 16-bit) instead of
    keeping a copy, with the gradients of a layer that keeps it. (In fp64 the norm computes in
    fp32 and casts back: a cast whose dtype autograd does not record, so that input is kept.)"""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from lightning_peft.memory import SavedTensorMeter

    torch.manual_seed(0)
    norm = LlamaRMSNorm(64).to(dtype).requires_grad_(False)
    nn.init.uniform_(norm.weight, 0.5, 1.5)
    x = torch.randn(3, 11, 64, dtype=dtype, requires_grad=True)
    results = {}
    for recompute in (True, False):
        torch.manual_seed(1)
        layer = LoRALinear(nn.Linear(64, 48).to(dtype).requires_grad_(False), 4, 8.0, recompute_input=recompute)
        nn.init.normal_(layer.lora_B.weight)
        with SavedTensorMeter(layer) as meter:
            y = layer(norm(x))
        grads = torch.autograd.grad(y.float().square().sum(), [x, layer.lora_A.weight, layer.lora_B.weight])
        results[recompute] = (meter.bytes, y, grads)
    (saved_with, y_with, grads_with), (saved_without, y_without, grads_without) = results[True], results[False]
    assert saved_without - saved_with == x.numel() * x.element_size()  # the norm's output is not kept
    torch.testing.assert_close(y_with, y_without, rtol=0, atol=0)
    tol = {torch.float32: 1e-5, torch.bfloat16: 0}[dtype]  # bf16: the very values saved, replayed
    for a, b in zip(grads_with, grads_without):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


def test_recompute_is_disabled_under_checkpointing():
    from torch.utils.checkpoint import checkpoint

    layer = make_layer(dtype=torch.float32)
    x = torch.randn(8, 16, requires_grad=True)
    y1 = checkpoint(lambda t: layer(F.gelu(t)), x, use_reentrant=False)
    g1 = torch.autograd.grad(y1.sum(), [x, layer.lora_A.weight])
    y2 = layer(F.gelu(x))
    g2 = torch.autograd.grad(y2.sum(), [x, layer.lora_A.weight])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_merge_unmerge_exact_and_without_copy():
    layer = make_layer(dtype=torch.float32)
    original = layer.base_layer.weight.detach().clone()
    x = torch.randn(5, 16)
    before = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.base_layer(x), before, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, original)
    layer.merge(keep_original=False)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, original, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "rank must be an int >= 1"),
        ({"rank": -2}, "rank must be an int >= 1"),
        ({"rank": 2.5}, "rank must be an int"),
        ({"alpha": 0}, "alpha must be a finite number > 0"),
        ({"dropout": 1.0}, "dropout must be a number in"),
        ({"init": "orthogonal"}, "init must be"),
        ({"target_modules": []}, "empty list"),
        ({"rank_pattern": {"q": 0}}, "rank_pattern"),
    ],
)
def test_bad_spec_arguments_are_rejected(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        LoRA(**kwargs)


def test_compiles_in_one_graph_with_the_same_gradients():
    """``torch.compile(fullgraph=True)`` traces the node (the input recipe is skipped under
    compile, where reading ``grad_fn`` would break the graph) and gives eager's gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).double().requires_grad_(False)
    layers = [LoRALinear(model[1], 4, 8.0), LoRALinear(model[3], 4, 8.0)]  # fp64: eager and compiled round alike
    model[1], model[3] = layers
    for layer in layers:
        nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(6, 16, dtype=torch.float64, requires_grad=True)
    params = [x] + [p for p in model.parameters() if p.requires_grad]

    def grads(fn):
        return torch.autograd.grad(fn(x).square().sum(), params)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for got, want in zip(grads(compiled), grads(model)):
        torch.testing.assert_close(got, want)
