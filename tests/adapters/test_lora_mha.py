"""LoRA on nn.MultiheadAttention (packed and separate q/k/v weights, out_proj), the transformer
blocks built from it, and the refusal of parents that read a replaced child's weights."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from lightning_peft.adapters.lora import LoRA, LoRAEffectiveWeightLinear, LoRALinear
from lightning_peft.adapters.lora_mha import LoRAMultiheadAttention, LoRAOutProjection
from lightning_peft.io import load_adapter, merge_adapter, save_adapter, unmerge_adapter
from lightning_peft.targeting import apply_adapter


def close(actual, expected, rtol=1e-5):
    """Relative comparison, with an absolute floor scaled to the expected magnitude."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(expected.abs().max().item(), 1e-12))


def randomize_b(model, seed=1):
    """Non-zero B factors, so the update (and every gradient path) is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def effective(layer, p, w0):
    if p not in layer.projections:
        return w0
    return w0 + layer.scale * layer.lora_B[p] @ layer.lora_A[p]


def reference(layer, q, k, v, need_weights=True, **kwargs):
    """F.multi_head_attention_forward with the effective weights written out by hand."""
    base = layer.base_layer
    if base.batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    common = dict(
        bias_k=base.bias_k, bias_v=base.bias_v, add_zero_attn=base.add_zero_attn, dropout_p=base.dropout,
        out_proj_weight=effective(layer, "out", base.out_proj.weight), out_proj_bias=base.out_proj.bias,
        training=base.training, need_weights=need_weights, **kwargs,
    )  # fmt: skip
    if base._qkv_same_embed_dim:
        wq, wk, wv = base.in_proj_weight.chunk(3)
        in_w = torch.cat([effective(layer, "q", wq), effective(layer, "k", wk), effective(layer, "v", wv)])
        out, weights = F.multi_head_attention_forward(q, k, v, base.embed_dim, base.num_heads, in_w, base.in_proj_bias, **common)
    else:
        out, weights = F.multi_head_attention_forward(
            q, k, v, base.embed_dim, base.num_heads, None, base.in_proj_bias, use_separate_proj_weight=True,
            q_proj_weight=effective(layer, "q", base.q_proj_weight), k_proj_weight=effective(layer, "k", base.k_proj_weight),
            v_proj_weight=effective(layer, "v", base.v_proj_weight), **common,
        )  # fmt: skip
    return (out.transpose(0, 1) if base.batch_first else out), weights


def make_mha(batch_first=True, bias=True, kdim=None, vdim=None, dtype=torch.float64, rank=3, projections=("q", "k", "v", "out")):
    torch.manual_seed(0)
    base = nn.MultiheadAttention(12, 3, bias=bias, batch_first=batch_first, kdim=kdim, vdim=vdim).to(dtype).requires_grad_(False)
    layer = LoRAMultiheadAttention(base, rank=rank, alpha=6.0, projections=projections)
    randomize_b(layer)
    return layer


def inputs(layer, n=2, lq=4, lk=5, dtype=torch.float64, self_attention=False):
    gen = torch.Generator().manual_seed(2)
    base = layer.base_layer

    def shape(length, dim):
        return (n, length, dim) if base.batch_first else (length, n, dim)

    q = torch.randn(shape(lq, base.embed_dim), generator=gen, dtype=dtype)
    if self_attention:
        return q, q, q
    return q, torch.randn(shape(lk, base.kdim), generator=gen, dtype=dtype), torch.randn(shape(lk, base.vdim), generator=gen, dtype=dtype)


# --------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("need_weights", [True, False], ids=["need_weights", "sdpa"])
@pytest.mark.parametrize("layout", ["packed", "kdim_vdim"])
def test_forward_and_gradients_match_reference(batch_first, bias, need_weights, layout):
    kd = {"kdim": 7, "vdim": 10} if layout == "kdim_vdim" else {}
    layer = make_mha(batch_first, bias, **kd)
    assert layer.base_layer._qkv_same_embed_dim == (layout == "packed")
    q, k, v = (t.requires_grad_(True) for t in inputs(layer))
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1, -2:] = True  # padded keys of the second sequence
    ours, w_ours = layer(q, k, v, key_padding_mask=mask, need_weights=need_weights)
    ref, w_ref = reference(layer, q, k, v, key_padding_mask=mask, need_weights=need_weights)
    close(ours, ref, rtol=1e-10)
    if need_weights:
        close(w_ours, w_ref, rtol=1e-10)
    else:
        assert w_ours is None
    params = [q, k, v, *layer.lora_A.values(), *layer.lora_B.values()]
    grad = torch.randn_like(ref)
    for g_ours, g_ref in zip(torch.autograd.grad(ours, params, grad), torch.autograd.grad(ref, params, grad)):
        close(g_ours, g_ref, rtol=1e-10)
    assert all(p.grad is None for p in layer.base_layer.parameters())


@pytest.mark.parametrize("layout", ["packed", "kdim_vdim"])
def test_outputs_equal_a_plain_attention_with_the_effective_weights(layout):
    """Independent of the layer's code path: a plain module holding W0 + s*B*A."""
    kd = {"kdim": 7, "vdim": 10} if layout == "kdim_vdim" else {}
    layer = make_mha(**kd)
    plain = copy.deepcopy(layer.base_layer)
    with torch.no_grad():
        for name, weight in layer.effective_weights().items():
            plain.get_parameter(name).copy_(weight)
    q, k, v = inputs(layer)
    close(layer(q, k, v)[0], plain(q, k, v)[0], rtol=1e-10)


@pytest.mark.parametrize("projections", [("q", "v"), ("k",), ("out",)])
@pytest.mark.parametrize("layout", ["packed", "kdim_vdim"])
def test_a_subset_of_projections_matches_reference(projections, layout):
    kd = {"kdim": 7, "vdim": 10} if layout == "kdim_vdim" else {}
    layer = make_mha(projections=projections, **kd)
    assert sorted(layer.lora_A) == sorted(projections)
    q, k, v = inputs(layer)
    close(layer(q, k, v)[0], reference(layer, q, k, v)[0], rtol=1e-10)
    assert not torch.allclose(layer(q, k, v)[0], layer.base_layer(q, k, v)[0])


def test_eval_fused_path_uses_the_adapted_weights():
    """Under no_grad in eval, nn.MultiheadAttention takes its fused native kernel (self-attention,
    batch_first, need_weights=False): it must see the adapted weights, not the base's."""
    layer = make_mha(dtype=torch.float32).eval()
    x, _, _ = inputs(layer, dtype=torch.float32, self_attention=True)
    with torch.no_grad():
        fused, _ = layer(x, x, x, need_weights=False)
        ref, _ = reference(layer, x, x, x, need_weights=False)
        base, _ = layer.base_layer(x, x, x, need_weights=False)
    close(fused, ref, rtol=1e-4)
    assert (fused - base).abs().max() > 1e-2 * base.abs().max()  # the update is visible


def test_starts_equal_to_base_and_scales():
    torch.manual_seed(0)
    base = nn.MultiheadAttention(12, 3, batch_first=True)
    layer = LoRAMultiheadAttention(base, rank=4, alpha=8.0)
    q, k, v = inputs(layer, dtype=torch.float32)
    assert torch.equal(layer(q, k, v)[0], base(q, k, v)[0])  # B = 0: exactly the base
    assert layer.scale == 2.0
    assert LoRAMultiheadAttention(base, rank=4, alpha=8.0, use_rslora=True).scale == 4.0
    assert {k: tuple(v.shape) for k, v in layer.adapter_state_dict().items()} == {
        **{f"lora_A.{p}": (4, 12) for p in ("q", "k", "v", "out")},
        **{f"lora_B.{p}": (12, 4) for p in ("q", "k", "v", "out")},
    }


@pytest.mark.parametrize("projections", [("q", "v"), ("out",), ("q", "k", "v", "out")])
@pytest.mark.parametrize("layout", ["packed", "kdim_vdim"])
def test_merge_equals_unmerged_and_unmerge_is_bit_exact(projections, layout):
    kd = {"kdim": 7, "vdim": 10} if layout == "kdim_vdim" else {}
    layer = make_mha(projections=projections, dtype=torch.float32, **kd)  # merging sums in fp32
    before = {k: v.clone() for k, v in layer.base_layer.state_dict().items()}
    q, k, v = inputs(layer, dtype=torch.float32)
    unmerged = layer(q, k, v)[0]
    layer.merge()
    assert layer.merged
    close(layer(q, k, v)[0], unmerged, rtol=1e-5)
    changed = {k for k, v in layer.base_layer.state_dict().items() if not torch.equal(v, before[k])}
    expected = {"out_proj.weight"} if "out" in projections else set()
    if {"q", "k", "v"} & set(projections):
        expected |= {"in_proj_weight"} if layout == "packed" else {f"{p}_proj_weight" for p in projections if p != "out"}
    assert changed == expected
    layer.unmerge()
    assert all(torch.equal(v, before[k]) for k, v in layer.base_layer.state_dict().items())
    assert torch.equal(layer(q, k, v)[0], unmerged)
    layer.merge(keep_original=False)  # no kept copy: subtracting the update is exact up to rounding
    layer.unmerge()
    for key, value in layer.base_layer.state_dict().items():
        close(value, before[key], rtol=1e-5)


def test_reading_an_adapted_weight_from_the_layer_says_where_it_is():
    layer = make_mha()
    with pytest.raises(AttributeError, match="in_proj_weight.*effective_weights"):
        layer.in_proj_weight  # noqa: B018
    assert layer.batch_first is True and layer.num_heads == 3 and layer._qkv_same_embed_dim


def test_rank_larger_than_a_projection_is_refused_naming_it():
    model = nn.Sequential()
    model.add_module("attn", nn.MultiheadAttention(12, 3, kdim=2, vdim=12))
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"rank 3 .* 'k' projection of 'attn'"):
        apply_adapter(model, LoRA(rank=3, target_modules=["attn"]))
    assert isinstance(model.attn, nn.MultiheadAttention) and model.state_dict().keys() == state.keys()


def test_dropout_is_not_applied_and_says_so():
    model = nn.Sequential()
    model.add_module("attn", nn.MultiheadAttention(12, 3))
    with pytest.warns(UserWarning, match=r"dropout=0.1 is not applied in 'attn'"):
        apply_adapter(model, LoRA(rank=2, dropout=0.1, target_modules=["attn"]))


# --------------------------------------------------------------------------------------------
# Targeting
# --------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(12, 3, batch_first=True)
        self.mlp = nn.Linear(12, 12)

    def forward(self, x):
        return self.mlp(self.attn(x, x, x, need_weights=False)[0])


def test_targets_route_to_the_attention_module():
    # out_proj by name: only out, on out_proj itself (its parent gets the effective weight)
    model = Block()
    apply_adapter(model, LoRA(rank=2, target_modules=["out_proj"]))
    assert isinstance(model.attn, nn.MultiheadAttention) and isinstance(model.attn.out_proj, LoRAOutProjection)
    # the attention module by name, or out_proj picked by "all-linear": q, k, v and out
    for targets in (["attn"], ["attn", "out_proj"], "all-linear", None):
        model = Block()
        report = apply_adapter(model, LoRA(rank=2, target_modules=targets))
        assert isinstance(model.attn, LoRAMultiheadAttention) and model.attn.projections == ("q", "k", "v", "out")
        assert "projections=q,k,v,out" in str(report) and "attn.out_proj" not in str(report)
        assert isinstance(model.attn.base_layer.out_proj, nn.Linear) and not isinstance(model.attn.base_layer.out_proj, LoRALinear)


def test_out_proj_only_matches_reference_and_trains():
    model = Block().double()
    x = torch.randn(2, 4, 12, dtype=torch.float64)
    apply_adapter(model, LoRA(rank=2, alpha=4.0, target_modules=["out_proj"]))
    out_proj = model.attn.out_proj
    randomize_b(model)
    a, b = out_proj.lora_A.weight, out_proj.lora_B.weight
    plain = copy.deepcopy(model.attn)
    plain.out_proj = nn.Linear(12, 12).double()
    with torch.no_grad():
        plain.out_proj.weight.copy_(out_proj.base_layer.weight + out_proj.scale * b @ a)
        plain.out_proj.bias.copy_(out_proj.base_layer.bias)
    y = model.attn(x, x, x)[0]
    close(y, plain(x, x, x)[0], rtol=1e-10)
    y.sum().backward()
    assert a.grad is not None and b.grad.abs().sum() > 0
    assert out_proj.base_layer.weight.grad is None


def test_trainable_module_inside_an_adapted_attention_is_refused():
    model = Block()
    with pytest.raises(ValueError, match=r"trainable_modules \['attn.out_proj'\] lie inside 'attn'"):
        apply_adapter(model, LoRA(rank=2, target_modules=["attn"]), trainable_modules=["attn.out_proj"])
    assert isinstance(model.attn, nn.MultiheadAttention)


class ReadsWeight(nn.Module):
    """A parent that uses its child's weight instead of calling the child."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.other = nn.Linear(8, 8)

    def forward(self, x):
        return self.other(F.linear(x, 2 * self.proj.weight, self.proj.bias))


class CallsChild(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        # mentions self.proj.weight only in a comment and a string: "self.proj.weight"
        return self.proj(x) * self.proj.in_features


def test_parent_reading_a_childs_weight_gets_loras_effective_weight():
    torch.manual_seed(0)
    model = nn.Sequential(ReadsWeight())
    reference = copy.deepcopy(model)
    apply_adapter(model, LoRA(rank=2, alpha=4.0, target_modules="all-linear"))
    proj = model[0].proj
    assert type(proj) is LoRAEffectiveWeightLinear and type(model[0].other) is LoRALinear
    with torch.no_grad():
        for layer in (proj, model[0].other):
            layer.lora_B.weight.normal_()
    x = torch.randn(3, 8)
    out = model(x)
    # the parent's own F.linear(x, 2 * proj.weight, proj.bias) sees W0 + s B A: the adapter acts
    with torch.no_grad():
        w = reference[0].proj.weight + 2.0 * proj.lora_B.weight @ proj.lora_A.weight
        other = model[0].other
        hidden = F.linear(x, 2 * w, reference[0].proj.bias)
        expected = F.linear(hidden, reference[0].other.weight + 2.0 * other.lora_B.weight @ other.lora_A.weight, reference[0].other.bias)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    out.sum().backward()
    assert proj.lora_A.weight.grad.abs().sum() > 0 and proj.lora_B.weight.grad.abs().sum() > 0
    assert proj.base_layer.weight.grad is None  # the base stays frozen


def test_parent_reading_a_childs_weight_is_refused_for_dora_and_model_untouched():
    from lightning_peft.adapters.dora import DoRA, DoRALinear

    model = nn.Sequential(ReadsWeight())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        apply_adapter(model, DoRA(rank=2, target_modules="all-linear"))
    message = str(info.value)
    for part in ("'0.proj'", "parent '0'", "ReadsWeight", "self.proj.bias, self.proj.weight", "exclude_modules=['0.proj']"):
        assert part in message
    assert type(model[0].proj) is nn.Linear and type(model[0].other) is nn.Linear
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert getattr(model, "_lightning_peft_record", None) is None
    # what the message suggests works: the child that is called is adapted
    apply_adapter(model, DoRA(rank=2, target_modules="all-linear", exclude_modules=["proj"]))
    assert isinstance(model[0].other, DoRALinear)
    model(torch.randn(3, 8)).sum().backward()


class EncoderAndReader(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = encoder()
        self.readers = nn.ModuleList([ReadsWeight(), ReadsWeight()])

    def forward(self, x):
        return self.readers[1](self.readers[0](self.encoder(x)[..., :8]))


def test_refusal_names_every_reader_and_leaves_fused_paths_alone():
    from lightning_peft.adapters.dora import DoRA

    model = EncoderAndReader()
    nested = model.encoder.use_nested_tensor
    with pytest.raises(ValueError, match=r"'readers.0.proj'.*1 more: \['readers.1.proj'\].*exclude_modules=\['proj'\]"):
        apply_adapter(model, DoRA(rank=2, target_modules=["linear1", "linear2", "proj"]))
    assert model.encoder.use_nested_tensor == nested
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert not any(isinstance(m, (LoRALinear, LoRAMultiheadAttention)) for m in model.modules())


def test_parent_that_calls_its_child_passes():
    model = CallsChild()
    apply_adapter(model, LoRA(rank=2, target_modules=["proj"]))
    assert isinstance(model.proj, LoRALinear)
    # a parent whose source cannot be read (defined at run time) is not refused either
    namespace: dict = {}
    exec(
        "import torch.nn as nn\nclass Dyn(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.proj = nn.Linear(4, 4)\n    def forward(self, x):\n        return self.proj(x)\n",
        namespace,
    )  # noqa: S102
    dyn = namespace["Dyn"]()
    apply_adapter(dyn, LoRA(rank=2, target_modules=["proj"]))
    assert isinstance(dyn.proj, LoRALinear)


# --------------------------------------------------------------------------------------------
# Transformer models built from nn.MultiheadAttention
# --------------------------------------------------------------------------------------------
def encoder(batch_first=True):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "enable_nested_tensor is True, but ..." for batch_first=False
        return nn.TransformerEncoder(layer, 2)


def with_effective_weights(model, reference_base):
    """A copy of ``reference_base`` holding ``model``'s merged weights: the explicit reference."""
    merge_adapter(model)
    merged = {k.replace("base_layer.", ""): v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    unmerge_adapter(model)
    plain = copy.deepcopy(reference_base)
    plain.load_state_dict(merged)
    return plain


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_all_linear_trains_only_adapters(batch_first):
    model = encoder(batch_first)
    base = copy.deepcopy(model)
    x = torch.randn((3, 5, 16) if batch_first else (5, 3, 16))
    apply_adapter(model, LoRA(rank=2, alpha=4.0))  # "all-linear"
    assert all(isinstance(l.self_attn, LoRAMultiheadAttention) for l in model.layers)
    assert all(isinstance(l.linear1, LoRALinear) and isinstance(l.linear2, LoRALinear) for l in model.layers)
    assert model.use_nested_tensor is False
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)  # B = 0
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model(x).pow(2).mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {n for n in dict(model.named_parameters()) if "lora_" in n}
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in grads if "lora_B" in n)
    opt.step()
    assert all(torch.equal(v, frozen[k]) for k, v in model.state_dict().items() if k in frozen)
    assert not torch.allclose(model(x), base(x))  # the step changed the adapted model


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")  # the plain reference's own fast path
@pytest.mark.parametrize("padding_mask", [False, True])
@pytest.mark.parametrize("targets", [None, ["out_proj"], ["linear1"]], ids=["all-linear", "out_proj", "linear1"])
def test_transformer_encoder_eval_equals_explicit_reference(padding_mask, targets):
    """Eval under no_grad is where torch's fused encoder paths (which read the weights
    directly) would run: the adapted model must give the explicit reference's outputs."""
    model = encoder()
    base = copy.deepcopy(model)
    apply_adapter(model, LoRA(rank=2, alpha=4.0, target_modules=targets))
    randomize_b(model)
    plain = with_effective_weights(model, base).eval()
    model.eval()
    x = torch.randn(3, 5, 16)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, -2:] = True
    kwargs = {"src_key_padding_mask": mask} if padding_mask else {}
    with torch.no_grad():
        ours, ref, unadapted = model(x, **kwargs), plain(x, **kwargs), base.eval()(x, **kwargs)
    keep = ~mask.unsqueeze(-1).expand_as(ours) if padding_mask else torch.ones_like(ours, dtype=torch.bool)
    close(ours[keep], ref[keep], rtol=1e-4)
    assert (ours[keep] - unadapted[keep]).abs().max() > 1e-2  # not the base's outputs


def test_nn_transformer_all_linear():
    torch.manual_seed(0)
    model = nn.Transformer(16, 2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32, dropout=0.0, batch_first=True)
    base = copy.deepcopy(model)
    src, tgt = torch.randn(2, 5, 16), torch.randn(2, 4, 16)
    apply_adapter(model, LoRA(rank=2, alpha=4.0))
    attn = [n for n, m in model.named_modules() if isinstance(m, LoRAMultiheadAttention)]
    assert attn == ["encoder.layers.0.self_attn", "decoder.layers.0.self_attn", "decoder.layers.0.multihead_attn"]
    torch.testing.assert_close(model(src, tgt), base(src, tgt), rtol=0, atol=0)
    randomize_b(model)
    plain = with_effective_weights(model, base)
    mask = nn.Transformer.generate_square_subsequent_mask(4)
    close(model(src, tgt, tgt_mask=mask), plain(src, tgt, tgt_mask=mask), rtol=1e-4)
    model(src, tgt, tgt_mask=mask).sum().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == {n for n, p in model.named_parameters() if "lora_" in n}
    model.eval(), plain.eval()
    with torch.no_grad():
        close(model(src, tgt), plain(src, tgt), rtol=1e-4)


def tiny_vit():
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5
    )


def test_torchvision_vit_all_linear_merge_and_round_trip(tmp_path):
    model = tiny_vit()
    images = torch.randn(2, 3, 32, 32)
    apply_adapter(model, LoRA(rank=2, alpha=4.0), trainable_modules=["heads"])
    attn = [n for n, m in model.named_modules() if isinstance(m, LoRAMultiheadAttention)]
    assert attn == [f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(2)]
    assert type(model.heads.head) is nn.Linear  # the output head trains fully, no adapter
    randomize_b(model)
    with torch.no_grad():
        model.heads.head.weight.mul_(1.5)  # a trained head, saved with the adapter
    model(images).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
    model.eval()
    with torch.no_grad():
        unmerged = model(images)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        merge_adapter(model)
        close(model(images), unmerged, rtol=1e-4)
        unmerge_adapter(model)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    save_adapter(model, tmp_path / "vit")
    fresh = tiny_vit().eval()
    load_adapter(fresh, tmp_path / "vit")
    with torch.no_grad():
        close(fresh(images), unmerged, rtol=1e-6)
    assert {k: v for k, v in fresh.state_dict().items()}.keys() == before.keys()


@pytest.mark.parametrize("targets", [None, ["out_proj"]], ids=["all-linear", "out_proj-only"])
def test_encoder_save_load_round_trip_onto_a_fresh_base(tmp_path, targets):
    model = encoder()
    apply_adapter(model, LoRA(rank=2, alpha=4.0, target_modules=targets))
    randomize_b(model)
    x = torch.randn(3, 5, 16)
    expected = model(x)
    save_adapter(model, tmp_path / "enc")
    fresh = encoder()
    load_adapter(fresh, tmp_path / "enc")
    kinds = {n: type(m).__name__ for n, m in fresh.named_modules() if "lora" in type(m).__name__.lower()}
    assert kinds == {n: type(m).__name__ for n, m in model.named_modules() if "lora" in type(m).__name__.lower()}
    close(fresh(x), expected, rtol=1e-6)
    fresh.eval(), model.eval()
    with torch.no_grad():
        close(fresh(x), model(x), rtol=1e-6)
