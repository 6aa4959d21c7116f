"""ExpertLoRA: fused 3-D experts (OLMoE, Qwen2-MoE, Mixtral) and nn.ModuleList experts.

Gradients against a dense reference, merge == unmerged, export/import with per-expert ranks
(0 included), peft interop where peft can represent the adapter, and the MoE failure modes
users report (merges that drop expert deltas, experts left frozen, dense per-expert deltas).
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import transformers
from torch import nn

from lightning_peft import ExpertLoRA, LoRA, apply_adapter, load_adapter, merge_adapter, save_adapter, unmerge_adapter
from lightning_peft.adapters.experts import (
    FusedExpertsLoRA,
    ModuleListExpertsLoRA,
    expert_layers,
    expert_linear,
    sort_by_expert,
)
from lightning_peft.allocation.rank_ops import effective_parameters

VOCAB = 64


def tiny_moe(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts_per_tok=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        max_position_embeddings=64,
    )
    if kind == "olmoe":
        cfg = transformers.OlmoeConfig(intermediate_size=48, num_experts=4, **common)
        model = transformers.OlmoeForCausalLM(cfg)
    elif kind == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(
            intermediate_size=64,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            num_experts=4,
            decoder_sparse_step=1,
            **common,
        )
        model = transformers.Qwen2MoeForCausalLM(cfg)
    elif kind == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=40, num_local_experts=4, **common)
        model = transformers.MixtralForCausalLM(cfg)
    else:
        raise ValueError(kind)
    model.set_experts_implementation("eager")
    for name, p in model.named_parameters():  # larger than the 0.02 default: routing and outputs far from uniform
        if p.ndim == 3 or name.endswith("gate.weight"):
            nn.init.normal_(p, std=0.2)
    return model.eval()


class Expert(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.w1, self.w3 = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))


class ListMoE(nn.Module):
    """A small MoE block with separate nn.Linear experts (transformers 4.x Mixtral style)."""

    def __init__(self, d: int = 16, hidden: int = 24, num_experts: int = 4, top_k: int = 2) -> None:
        super().__init__()
        self.gate = nn.Linear(d, num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(d, hidden) for _ in range(num_experts))
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = torch.softmax(self.gate(x), dim=-1)
        weights, idx = torch.topk(probs, self.top_k, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(idx == e)
            if len(token):
                out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        return out.reshape(shape)


class ListMoEModel(nn.Module):
    def __init__(self, layers: int = 2, d: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, d)
        self.blocks = nn.ModuleList(ListMoE(d) for _ in range(layers))
        self.head = nn.Linear(d, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


FUSED = ["olmoe", "qwen2_moe", "mixtral"]
LAYOUTS = [*FUSED, "list"]


def make(kind: str, seed: int = 0) -> nn.Module:
    return ListMoEModel() if kind == "list" else tiny_moe(kind, seed)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def ids_batch(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def assert_scaled_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    """``|got - want| <= rel * (|want| + max(1, max|want|))``: float32 sums taken in another order
    (another kernel, a merged weight, peft's code) differ by about eps times the magnitude, so an
    absolute tolerance flakes on large outputs (1e-5 failed once on logits of magnitude ~21)."""
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * max(1.0, float(want.detach().abs().max())))


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 3) -> None:
    """Give every expert adapter non-zero B (and distinct ranks, one pruned expert)."""
    g = torch.Generator().manual_seed(seed)
    for i, layer in enumerate(expert_layers(model).values()):
        layer.set_ranks([0, 2, layer.max_rank, 1][: layer.num_experts] + [3] * max(0, layer.num_experts - 4), seed=i)
        for p in layer.lora_B.values():  # inactive slots stay zero, as rank changes leave them
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 * layer.rank_mask[:, None, :])


# --------------------------------------------------------------------------------------------
# Forward / gradients
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", LAYOUTS)
def test_starts_equal_to_base_and_counts_effective_parameters(kind):
    model = make(kind)
    x = ids_batch()
    ref = logits(model, x)
    report = apply_adapter(model, ExpertLoRA(rank=2, max_rank=4))
    assert_scaled_close(logits(model, x), ref)
    layers = expert_layers(model)
    assert len(layers) == 2
    expected = sum(layer.num_experts * 2 * layer.slot_cost() for layer in layers.values())
    assert report.trainable == expected  # effective budget (rank 2), not the rank-4 storage
    for layer in layers.values():
        assert all(p.requires_grad for p in layer.adapter_parameters())
        layer.set_ranks([0, 1, 4, 2][: layer.num_experts])
        assert layer.num_trainable() == 7 * layer.slot_cost() == effective_parameters(layer)
        assert layer.lora_A[next(iter(layer.shapes))].shape[1] == 4  # storage shape never changes


def _reference_fused(layer: FusedExpertsLoRA, hidden, idx, weights):
    """Per-expert loop with explicit W + s B A (dense, autograd): what the adapter must equal."""
    base, out = layer.base_layer, torch.zeros_like(hidden)
    for e in range(layer.num_experts):
        token, slot = torch.where(idx == e)
        if not len(token):
            continue
        mats = {}
        for name in (layer.layout["up"], "down_proj"):
            w = getattr(base, name)[e]
            w = w.t() if layer.layout["transposed"] else w
            if name in layer.shapes:
                a, b = layer.factors(name)
                w = w + layer.scale * b[e] @ a[e]
            mats[name] = w
        h = hidden[token] @ mats[layer.layout["up"]].t()
        gate, up = h.chunk(2, dim=-1)
        h = base.act_fn(gate) * up
        y = h @ mats["down_proj"].t()
        out = out.index_add(0, token, y * weights[token, slot, None])
    return out


@pytest.mark.parametrize("kind", FUSED)
def test_fused_layer_matches_dense_reference_values_and_gradients(kind):
    model = make(kind)
    apply_adapter(model, ExpertLoRA(rank=2, max_rank=4))
    randomize(model)
    layer = model.model.layers[0].mlp.experts
    torch.manual_seed(5)
    hidden = torch.randn(20, 32, requires_grad=True)
    idx = torch.stack([torch.randperm(4)[:2] for _ in range(20)])
    weights = torch.rand(20, 2)
    out = layer(hidden, idx, weights)
    ref = _reference_fused(layer, hidden, idx, weights)
    assert_scaled_close(out, ref)
    grad = torch.randn_like(out)
    params = [hidden, *layer.lora_A.values(), *layer.lora_B.values()]
    got = torch.autograd.grad(out, params, grad)
    want = torch.autograd.grad(ref, params, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * float(w.abs().max()))
    pruned = layer.rank_mask.sum(1) == 0
    assert pruned.any()
    for g in got[1:]:  # a pruned expert's (and any inactive slot's) factors get exactly zero gradient
        assert g[pruned].abs().max() == 0


def test_expert_linear_gradcheck_float64():
    torch.manual_seed(0)
    n, k, e, d_in, d_out, r = 5, 2, 3, 4, 6, 2
    idx = torch.tensor([[0, 1], [2, 0], [1, 2], [0, 2], [1, 0]])
    perm, _, offs = sort_by_expert(idx, e)
    x = torch.randn(n, d_in, dtype=torch.float64, requires_grad=True)
    w = torch.randn(e, d_in, d_out, dtype=torch.float64)
    a = torch.randn(e, r, d_in, dtype=torch.float64, requires_grad=True)
    b = torch.randn(e, d_out, r, dtype=torch.float64, requires_grad=True)
    fn = lambda x, a, b: expert_linear(x, perm // k, offs, w, a, b, 0.7, False)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, a, b))


def test_module_list_experts_train_only_on_routed_tokens():
    model = ListMoEModel()
    x = ids_batch()
    ref = logits(model, x)
    apply_adapter(model, ExpertLoRA(rank=2, max_rank=3))
    layer = model.blocks[0].experts
    assert isinstance(layer, ModuleListExpertsLoRA) and len(layer) == 4 and isinstance(layer[1], Expert)
    assert_scaled_close(logits(model, x), ref)
    randomize(model)

    # expert 2 receives no token at all: its factors get no gradient, every routed one does
    def never_two(module, args, out):
        out = out.clone()
        out[:, 2] = -1e4
        return out

    model.blocks[0].gate.register_forward_hook(never_two)
    logits(model, x).square().mean().backward()
    for key in layer.shapes:
        per_expert = layer.lora_B[key].grad.abs().sum(dim=(1, 2))
        assert per_expert[2] == 0 and per_expert[0] == 0  # not routed / pruned (rank 0)
        assert (per_expert[[1, 3]] > 0).all()


def test_no_dense_per_expert_delta_is_saved():
    """The point of the design: nothing the size of an expert weight stack is built or saved."""
    model = tiny_moe("olmoe")
    apply_adapter(model, ExpertLoRA(rank=2))
    randomize(model)
    stack = {tuple(p.shape) for n, p in model.named_parameters() if p.ndim == 3 and "lora" not in n}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved_shapes = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved_shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits(model, ids_batch()).sum().backward()
    assert saved_shapes and not (set(saved_shapes) & stack)


# --------------------------------------------------------------------------------------------
# Merge
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", LAYOUTS)
def test_merge_equals_unmerged_and_unmerge_restores(kind):
    model = make(kind)
    apply_adapter(model, [ExpertLoRA(rank=2, max_rank=4), LoRA(rank=2, target_modules=["head"] if kind == "list" else ["q_proj"])])
    randomize(model)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    x = ids_batch()
    with torch.no_grad():
        unmerged = logits(model, x)
        assert merge_adapter(model) == (3 if kind == "list" else 4)
        merged = logits(model, x)
        changed = [n for n, p in model.named_parameters() if not p.requires_grad and not torch.equal(p, base_weights[n])]
        # every expert with r_e > 0 had its delta folded in (no silently dropped experts)
        assert any("experts" in n for n in changed)
        torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5 * float(unmerged.abs().max()))
        unmerge_adapter(model)
        for n, p in model.named_parameters():
            if not p.requires_grad:
                assert torch.equal(p, base_weights[n]), n
        assert torch.allclose(logits(model, x), unmerged, atol=1e-6)


def test_merge_warns_when_rounding_drops_expert_deltas():
    model = tiny_moe("olmoe").to(torch.bfloat16)
    apply_adapter(model, ExpertLoRA(rank=2))
    with torch.no_grad():
        for layer in expert_layers(model).values():
            for p in layer.lora_B.values():
                p.fill_(1e-6)  # far below bf16 resolution of weights ~0.2
    with pytest.warns(UserWarning, match="lost to rounding"):
        merge_adapter(model)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", LAYOUTS)
def test_export_import_keeps_per_expert_ranks_including_zero(kind, tmp_path):
    model = make(kind)
    apply_adapter(model, ExpertLoRA(rank=2, max_rank=4))
    randomize(model)
    x = ids_batch()
    with torch.no_grad():
        want = logits(model, x)
    ranks = {n: l.ranks for n, l in expert_layers(model).items()}
    assert any(0 in r for r in ranks.values())
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"  # representable: zero-padded uniform rank per layer
    fresh = make(kind)
    load_adapter(fresh, tmp_path / "adapter")
    assert {n: l.ranks for n, l in expert_layers(fresh).items()} == ranks
    with torch.no_grad():
        assert_scaled_close(logits(fresh, x), want)


def test_our_format_when_peft_cannot_represent_it(tmp_path):
    model = tiny_moe("olmoe")
    # peft's parameter targets take no dropout: with a dropout LoRA on attention, we write our format
    apply_adapter(model, [ExpertLoRA(rank=2, max_rank=4), LoRA(rank=2, dropout=0.1, target_modules=["q_proj"])])
    randomize(model)
    model.eval()
    x = ids_batch()
    with torch.no_grad():
        want = logits(model, x)
    save_adapter(model, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["peft_type"] == "LIGHTNING_PEFT"
    fresh = tiny_moe("olmoe").eval()
    load_adapter(fresh, tmp_path / "ours")
    assert [l.ranks for l in expert_layers(fresh).values()] == [l.ranks for l in expert_layers(model).values()]
    with torch.no_grad():
        assert_scaled_close(logits(fresh, x), want)


@pytest.mark.parametrize("kind", ["olmoe", "mixtral", "list"])
def test_peft_loads_the_export_with_the_same_outputs(kind, tmp_path):
    import peft

    model = make(kind)
    targets = ["head"] if kind == "list" else ["q_proj", "v_proj"]
    apply_adapter(model, [ExpertLoRA(rank=2, max_rank=4), LoRA(rank=3, alpha=6.0, target_modules=targets)])
    randomize(model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n and p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    x = ids_batch()
    with torch.no_grad():
        want = logits(model, x)
    save_adapter(model, tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(make(kind), str(tmp_path / "adapter"))
    with torch.no_grad():
        got = logits(peft_model, x)
    assert_scaled_close(got, want, rel=1e-4)  # peft's own code: another summation order


# --------------------------------------------------------------------------------------------
# Robustness
# --------------------------------------------------------------------------------------------
def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="matches no module"):
        apply_adapter(nn.Sequential(nn.Linear(4, 4)), ExpertLoRA())
    with pytest.raises(ValueError, match="max_rank"):
        ExpertLoRA(rank=4, max_rank=2)
    with pytest.raises(ValueError, match="larger than the expert matrices"):
        apply_adapter(tiny_moe("olmoe"), ExpertLoRA(rank=8, max_rank=64))
    with pytest.raises(ValueError, match="not expert matrices"):
        apply_adapter(tiny_moe("olmoe"), ExpertLoRA(projections=["w9"]))
    layer = next(iter(expert_layers(_applied("olmoe")).values()))
    with pytest.raises(ValueError, match="outside"):
        layer.set_ranks([9, 0, 0, 0])


def _applied(kind: str) -> nn.Module:
    model = make(kind)
    apply_adapter(model, ExpertLoRA(rank=2, max_rank=4))
    return model


class _NestedExpert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ffn = nn.ModuleDict({"w1": nn.Linear(8, 16), "w2": nn.Linear(16, 8)})


def test_module_list_experts_take_a_nested_linear_by_path_or_key():
    """A nested expert linear is listed as available by its key (``ffn_w1``) and by its path
    (``ffn.w1``); either name adapts that linear only."""
    for name in ("ffn.w1", "ffn_w1"):
        model = nn.Module()
        model.experts = nn.ModuleList([_NestedExpert() for _ in range(3)])
        apply_adapter(model, ExpertLoRA(rank=2, projections=[name]))
        layer = expert_layers(model)["experts"]
        assert layer.paths == {"ffn_w1": "ffn.w1"} and list(layer.shapes) == ["ffn_w1"]


def test_projection_subset_and_deepcopy():
    model = tiny_moe("olmoe")
    apply_adapter(model, ExpertLoRA(rank=2, projections=["down_proj"]))
    layer = model.model.layers[0].mlp.experts
    assert list(layer.shapes) == ["down_proj"] and layer.slot_cost() == 48 + 32
    listed = _applied("list")
    randomize(listed)
    clone = copy.deepcopy(listed)
    x = ids_batch()
    with torch.no_grad():
        for p in expert_layers(clone)["blocks.0.experts"].lora_B.values():
            p.zero_()  # hooks of the copy must use the copy's factors, not the original's
        assert not torch.allclose(logits(clone, x), logits(listed, x))


def test_training_step_changes_only_active_slots():
    model = tiny_moe("qwen2_moe")
    apply_adapter(model, ExpertLoRA(rank=2, max_rank=4))
    randomize(model)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(ids_batch(), labels=ids_batch()).loss.backward()
        opt.step()
    for name, layer in expert_layers(model).items():
        for which, dim in (("A", 2), ("B", 1)):
            for key, p in getattr(layer, f"lora_{which}").items():
                moved = (p.detach() - before[f"{name}.lora_{which}.{key}"]).abs().sum(dim=dim)  # [E, R]
                assert moved[~layer.rank_mask].max() == 0  # inactive slots never move (weight decay included)
                assert moved[layer.rank_mask].sum() > 0


def test_loop_fallback_equals_grouped_mm(monkeypatch):
    """The per-expert loop (used where grouped_mm is unavailable) computes the same thing."""
    from lightning_peft.adapters.kernels import grouped

    model = _applied("mixtral")
    randomize(model)
    x = ids_batch()
    out = logits(model, x)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    monkeypatch.setattr(grouped, "gmm_usable", lambda kind, t: False)
    loop = logits(model, x)
    loop.square().mean().backward()
    assert_scaled_close(loop, out)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6)


def test_torch_compile_one_graph_no_recompile_on_rank_change():
    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounterWithBackend

    model = _applied("olmoe")
    randomize(model)
    x = ids_batch()
    want = logits(model, x)
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=backend)
    got = compiled(x).logits
    got.sum().backward()
    assert_scaled_close(got, want)
    assert backend.frame_count == 1  # no graph break (custom autograd node, opaque loop ops)
    for layer in expert_layers(model).values():
        layer.set_ranks([4, 0, 2, 3])  # static shapes: a rank change is a buffer write, not a new graph
    again = compiled(x).logits
    assert backend.frame_count == 1
    assert_scaled_close(again, logits(model, x))
