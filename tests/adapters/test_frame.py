"""FRAME: the layer against dense references (the FrFT formula, MoE-LoRA, LoRA), gradients,
the grouped balance loss, files, merging, optimizer groups, and bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_peft import FRAME, LoRA, apply_adapter, load_adapter, merge_adapter, save_adapter
from lightning_peft.adapters.frame import FRAMELinear, frame_layers, frame_parameter_groups
from lightning_peft.adapters.kernels.frft import fractional_lowrank_factors, frft
from lightning_peft.adapters.kernels.routing import grouped_balance_loss, top_k_gates
from lightning_peft.adapters.lora import LoRALinear
from lightning_peft.adapters.registry import spec_from_config
from lightning_peft.io import adapter_layers
from tests.scripts.adapter_models import TinyTransformer, probe_input

F64 = torch.float64


def _layer(d_in=12, d_out=10, seed=0, dtype=torch.float32, randomize=True, **kwargs) -> FRAMELinear:
    torch.manual_seed(seed)
    layer = FRAME(**kwargs).wrap("lin", nn.Linear(d_in, d_out).to(dtype))
    if randomize:
        with torch.no_grad():
            layer.lora_B.normal_()
            layer.router.weight.normal_()
    return layer


def _reference(layer: FRAMELinear, x: torch.Tensor) -> torch.Tensor:
    """The issue's formula token by token: W0 x + b + s sum_{e in TopK} g_e Re{F_{-a}(B A F_a x)}."""
    base = layer.base_layer
    out = []
    for t in x.reshape(-1, layer.in_features):
        probs = torch.softmax(layer.router.weight @ t, dim=-1)
        y = base.weight @ t + base.bias
        for e in probs.topk(layer.top_k).indices.tolist():
            a = layer.orders[e]
            inner = layer.lora_B[e].to(torch.complex128) @ (layer.lora_A[e].to(torch.complex128) @ frft(t, a))
            y = y + layer.scale * probs[e] * frft(inner, -a).real
        out.append(y)
    return torch.stack(out).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize(("d_in", "d_out", "top_k"), [(12, 10, 2), (9, 9, 1), (8, 13, 3)])
def test_layer_equals_the_fractional_fourier_formula(d_in, d_out, top_k):
    layer = _layer(d_in, d_out, dtype=F64, num_experts=3, top_k=top_k, rank=2, order_init=[0.0, 0.45, 1.0])
    x = torch.randn(2, 4, d_in, dtype=F64)
    assert torch.allclose(layer(x), _reference(layer, x), atol=1e-10)


def test_starts_equal_to_the_base():
    layer = _layer(randomize=False)
    x = torch.randn(3, 12)
    assert torch.equal(layer(x), layer.base_layer(x))


def _moe_lora(layer: FRAMELinear, x: torch.Tensor) -> torch.Tensor:
    """An MoE-LoRA written independently: per token, the top-k experts' s g_e B_e A_e x."""
    tokens = x.reshape(-1, layer.in_features)
    probs = torch.softmax(tokens @ layer.router.weight.T, dim=-1)
    gate, index = probs.topk(layer.top_k, dim=-1)
    y = layer.base_layer(tokens)
    for slot in range(layer.top_k):
        a, b = layer.lora_A[index[:, slot]], layer.lora_B[index[:, slot]]  # [T, r, d_in], [T, d_out, r]
        y = y + layer.scale * gate[:, slot, None] * (b @ (a @ tokens[..., None])).squeeze(-1)
    return y.reshape(*x.shape[:-1], -1)


def test_orders_at_zero_are_moe_lora():
    fixed = _layer(num_experts=4, top_k=2, order_init=0.0, train_orders=False)
    assert fixed.spatial and not isinstance(fixed.orders, nn.Parameter)
    x = torch.randn(3, 5, 12)
    assert torch.allclose(fixed(x), _moe_lora(fixed, x), rtol=1e-5, atol=1e-5)
    learned = _layer(num_experts=4, top_k=2, order_init=0.0)  # same seed: same tensors, transforms on
    assert not learned.spatial
    assert torch.allclose(learned(x), fixed(x), rtol=1e-5, atol=1e-5)


def test_one_expert_at_order_zero_is_lora_outputs_and_gradients():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    lora = LoRALinear(nn.Linear(12, 10), rank=3, alpha=6.0)
    lora.base_layer.load_state_dict(base.state_dict())
    for train_orders in (False, True):
        frame = FRAME(rank=3, alpha=6.0, num_experts=1, top_k=1, order_init=0.0, train_orders=train_orders).wrap("l", base)
        with torch.no_grad():
            lora.lora_B.weight.normal_()
            frame.lora_A.copy_(lora.lora_A.weight[None])
            frame.lora_B.copy_(lora.lora_B.weight[None])
        x = torch.randn(4, 7, 12)
        y_lora, y_frame = lora(x), frame(x)
        assert torch.allclose(y_frame, y_lora, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(y_lora)
        ga = torch.autograd.grad((y_lora * g).sum(), [lora.lora_A.weight, lora.lora_B.weight])
        gf = torch.autograd.grad((y_frame * g).sum(), [frame.lora_A, frame.lora_B])
        for expected, got in zip(ga, gf):
            assert torch.allclose(got[0], expected, rtol=1e-4, atol=1e-4 * expected.abs().max())


def test_gradients_reach_experts_router_and_orders():
    layer = _layer(num_experts=4, top_k=2, order_init=[0.0, 0.5, 1.0, 0.25])
    layer(torch.randn(6, 12)).pow(2).sum().backward()
    for p in (layer.lora_A, layer.lora_B, layer.router.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # the update is even in the order: exactly stationary at a = 0, not at integer a = 1
    grad = layer.orders.grad
    assert grad[0].abs() < 1e-4 * grad[1:].abs().max()
    assert (grad[1:].abs() > 0).all()


def test_order_gradient_matches_finite_differences():
    layer = _layer(dtype=F64, num_experts=2, top_k=2, order_init=[0.3, 1.0])
    x = torch.randn(5, 12, dtype=F64)
    layer.eval()  # no balance loss, no projection: a plain function of the orders
    assert torch.autograd.gradcheck(lambda o: _with_orders(layer, o, x), (layer.orders.detach().clone().requires_grad_(),))


def _with_orders(layer: FRAMELinear, orders: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    saved = layer.orders
    del layer.orders
    layer.orders = orders  # a plain tensor attribute for the duration of the call
    try:
        return layer(x)
    finally:
        del layer.orders
        layer.orders = saved


def test_balance_loss_reaches_the_router_without_the_users_loss():
    layer = _layer(randomize=False, num_experts=4, top_k=1, balance_coef=0.5, balance_groups=2)
    with torch.no_grad():
        layer.router.weight.normal_()
    x = torch.randn(32, 12)
    layer(x).sum().backward()  # B = 0: the user's loss alone gives the router no gradient
    got = layer.router.weight.grad.clone()
    probs, gates = top_k_gates(x @ layer.router.weight.T, 1)
    aux, _ = grouped_balance_loss(probs, gates, layer.spec.group_membership(layer.orders), 1)
    expected = torch.autograd.grad(0.5 * aux, layer.router.weight)[0]
    assert expected.abs().sum() > 0
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)
    layer.router.weight.grad = None
    layer.balance_grad_scale = 0.25  # what FRAMECallback sets under accumulate_grad_batches=4
    layer(x).sum().backward()
    assert torch.allclose(layer.router.weight.grad, 0.25 * expected, rtol=1e-5, atol=1e-7)
    layer.balance_grad_scale = 1.0
    off = _layer(randomize=False, num_experts=4, top_k=1, balance_coef=0.0)  # switched off: no gradient
    off.load_state_dict(layer.state_dict())
    off(x).sum().backward()
    assert off.router.weight.grad.abs().sum() == 0 and off.last_balance_loss is not None  # still measured for logging
    layer.router.weight.grad = None
    layer.eval()  # evaluation: no balance loss, no load statistics
    layer(x).sum().backward()
    assert layer.router.weight.grad.abs().sum() == 0


def test_grouped_balance_loss_values():
    membership = torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 1]])
    uniform = torch.full((8, 4), 0.25)
    gates = torch.zeros(8, 4).scatter(-1, torch.tensor([0, 1, 2, 3] * 2)[:, None], 0.25)
    aux, load = grouped_balance_loss(uniform, gates, membership, 1)
    assert torch.allclose(aux, torch.tensor(1.0)) and torch.allclose(load, torch.full((4,), 0.25))
    # all tokens of group 1 on expert 0: that group's term is 2 * 1 * 0.5 = 1 with uniform probs, 2 with all mass there
    skewed = torch.tensor([[1.0, 0, 0.5, 0.5]]).expand(8, 4)
    gates = torch.zeros(8, 4).scatter(-1, torch.tensor([0, 0, 2, 3] * 2)[:, None], 1.0)
    aux, _ = grouped_balance_loss(skewed, gates, membership, 1)
    assert torch.allclose(aux, torch.tensor((2.0 + 1.0) / 2))
    assert grouped_balance_loss(uniform, gates, torch.eye(4), 1)[0] == 0  # singleton groups: nothing to balance


def test_orders_are_projected_into_the_range():
    layer = _layer(num_experts=2, top_k=1)
    with torch.no_grad():
        layer.orders.copy_(torch.tensor([-0.3, 1.7]))
    layer(torch.randn(2, 12))
    assert layer.orders.tolist() == [0.0, 1.0]


def test_spread_and_groups():
    spec = FRAME(num_experts=4, balance_groups=2)
    assert spec.initial_orders() == [0.125, 0.375, 0.625, 0.875]
    assert spec.group_membership().tolist() == [[1, 1, 0, 0], [0, 0, 1, 1]]
    # groups follow the orders as they learn; the top edge belongs to the last bin
    assert spec.group_membership(torch.tensor([0.6, 0.1, 1.0, 0.49])).tolist() == [[0, 1, 0, 1], [1, 0, 1, 0]]
    assert FRAME(num_experts=3, top_k=1, order_range=(0.0, 2.0)).initial_orders() == pytest.approx([1 / 3, 1.0, 5 / 3])


def test_config_round_trip():
    spec = FRAME(rank=2, num_experts=3, top_k=1, order_init=[0.0, 0.5, 1.0], order_range=[0.0, 1.0], order_lr=1e-3)
    assert spec.order_range == (0.0, 1.0)
    config = spec.to_config()
    assert config["class_path"] == "lightning_peft.adapters.frame.FRAME"
    import json

    assert spec_from_config(json.loads(json.dumps(config))) == spec
    assert spec_from_config({"class_path": "frame", "init_args": {}}) == FRAME()


def test_apply_with_lora_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = TinyTransformer()
    specs = [FRAME(rank=2, num_experts=3, top_k=2, target_modules=["fc1", "fc2"]), LoRA(rank=2, target_modules=["q", "v"])]
    report = apply_adapter(model, specs, trainable_modules=["head"])
    assert {type(m).__name__ for m in adapter_layers(model).values()} == {"FRAMELinear", "LoRALinear"}
    assert "frame" in str(report)
    with torch.no_grad():
        for layer in frame_layers(model).values():
            layer.lora_B.normal_()
            layer.orders.uniform_(0, 1)
    x = probe_input()
    model.eval()
    expected = model(x)
    save_adapter(model, tmp_path / "a")
    torch.manual_seed(0)
    fresh = TinyTransformer()
    load_adapter(fresh, tmp_path / "a")
    fresh.eval()
    assert torch.equal(fresh(x), expected)
    for name, layer in frame_layers(fresh).items():
        source = model.get_submodule(name)
        assert torch.equal(layer.orders, source.orders) and torch.equal(layer.router.weight, source.router.weight)
        assert layer.rank == 2 and layer.num_experts == 3


def test_fixed_orders_round_trip(tmp_path):
    torch.manual_seed(0)
    model = TinyTransformer()
    apply_adapter(model, FRAME(rank=2, train_orders=False, order_init=1.0, target_modules=["fc1"]))
    layer = next(iter(frame_layers(model).values()))
    assert not layer.orders.requires_grad and "orders" in layer.adapter_state_dict()
    save_adapter(model, tmp_path / "a")
    torch.manual_seed(0)
    fresh = TinyTransformer()
    load_adapter(fresh, tmp_path / "a")
    assert next(iter(frame_layers(fresh).values())).orders.tolist() == [1.0] * 4


def test_wrap_refuses_a_module_that_is_not_linear():
    with pytest.raises(TypeError, match="FRAME cannot adapt 'x': it is a LayerNorm, not an nn.Linear"):
        FRAME().wrap("x", nn.LayerNorm(4))


def test_merge_is_refused_and_nothing_is_merged():
    torch.manual_seed(0)
    model = TinyTransformer()
    apply_adapter(model, [LoRA(rank=2, target_modules=["q"]), FRAME(rank=2, target_modules=["fc1"])])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="token-routed mixture has no single merged weight"):
        merge_adapter(model)
    assert not any(layer.merged for layer in adapter_layers(model).values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="cannot be merged"):
        next(iter(frame_layers(model).values())).merge()


def test_parameter_groups():
    torch.manual_seed(0)
    model = TinyTransformer()
    apply_adapter(model, [FRAME(rank=2, target_modules=["fc1"], order_lr=0.05), FRAME(rank=2, target_modules=["fc2"])])
    groups = frame_parameter_groups(model, lr=1e-3, weight_decay=0.1)
    assert [g["lr"] for g in groups] == [1e-3, 1e-3, 0.05]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0, 0.0]
    orders = {id(m.orders) for m in frame_layers(model).values()}
    assert {id(p) for g in groups[1:] for p in g["params"]} == orders
    assert not orders & {id(p) for p in groups[0]["params"]}
    torch.optim.AdamW(groups)  # every trainable parameter exactly once


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m).__name__ for m in model.modules()]


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: FRAME(num_experts=0), ValueError, "num_experts"),
        (lambda: FRAME(num_experts=2, top_k=3), ValueError, "top_k .3. must be <= num_experts .2."),
        (lambda: FRAME(top_k=0), ValueError, "top_k"),
        (lambda: FRAME(order_init=1.5), ValueError, "order_init.*order_range"),
        (lambda: FRAME(order_init=[0.1, 0.2]), ValueError, "one order per expert"),
        (lambda: FRAME(order_init="linspace"), ValueError, "spread"),
        (lambda: FRAME(order_range=(1.0, 0.0)), ValueError, "low < high"),
        (lambda: FRAME(order_range=(0.0, 3.0)), ValueError, "order_range"),
        (lambda: FRAME(order_range=0.5), TypeError, "pair"),
        (lambda: FRAME(order_lr=0.0), ValueError, "order_lr"),
        (lambda: FRAME(balance_coef=-1.0), ValueError, "balance_coef"),
        (lambda: FRAME(balance_groups=0), ValueError, "balance_groups"),
        (lambda: FRAME(train_orders="yes"), TypeError, "train_orders"),
        (lambda: FRAME(alpha=float("nan")), ValueError, "alpha.*nan"),
        (lambda: FRAME(order_init=[0.1, 0.2, float("nan"), 0.3]), ValueError, "order_init.*nan.*entry 2"),
        (lambda: FRAME(order_range=(float("nan"), 1.0)), ValueError, "order_range.*nan"),
        (lambda: FRAME(order_lr=float("nan")), ValueError, "order_lr.*nan"),
        (lambda: FRAME(balance_coef=float("nan")), ValueError, "balance_coef.*nan"),
        (lambda: FRAME(rank=2.0), TypeError, "rank"),
    ],
)
def test_constructor_refuses(build, error, match):
    with pytest.raises(error, match=match):
        build()


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        (FRAME(rank=17, target_modules=["q"]), ValueError, "rank 17 is larger"),
        (FRAME(target_modules=["ln1"]), ValueError, "LayerNorm.*FRAME cannot adapt"),
    ],
)
def test_apply_refuses_and_leaves_the_model_untouched(spec, error, match):
    torch.manual_seed(0)
    model = TinyTransformer()
    state, names = _snapshot(model)
    with pytest.raises(error, match=match):
        apply_adapter(model, [LoRA(rank=2, target_modules=["v"]), spec])
    after, after_names = _snapshot(model)
    assert names == after_names and all(torch.equal(state[k], after[k]) for k in state)
    assert all(p.requires_grad for p in model.parameters())


def test_gated_mixture_gradients_and_top_k_equivalence():
    from lightning_peft.adapters.kernels.mixture import gated_mixture

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, 6, dtype=F64, generator=gen, requires_grad=True)
    a = torch.randn(3 * 4, 6, dtype=F64, generator=gen, requires_grad=True)
    b = torch.randn(5, 3 * 4, dtype=F64, generator=gen, requires_grad=True)
    gates = torch.rand(7, 3, dtype=F64, generator=gen).requires_grad_()
    assert torch.autograd.gradcheck(gated_mixture, (x, a, b, gates))
    sparse = gates.detach() * (torch.arange(3) != 1)  # expert 1 unused: exactly the other two's sum
    expected = sum(sparse[:, e, None] * (x @ a[4 * e : 4 * e + 4].T @ b[:, 4 * e : 4 * e + 4].T) for e in (0, 2))
    assert torch.allclose(gated_mixture(x, a, b, sparse), expected, atol=1e-12)


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = TinyTransformer()
        apply_adapter(model, FRAME(rank=2, balance_coef=0.1, target_modules=["fc1", "q"]), check_gradients=False)
        with torch.no_grad():
            for layer in frame_layers(model).values():
                layer.lora_B.normal_()
        model.activation_checkpointing = checkpointing
        model.train()
        model(probe_input()).pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        assert torch.allclose(grads[1][name], grad, rtol=1e-4, atol=1e-6), name


def test_bfloat16_autocast_runs_and_keeps_float32_parameters():
    torch.manual_seed(0)
    layer = _layer(num_experts=3, top_k=2)
    x = torch.randn(4, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0 for p in (layer.lora_A, layer.lora_B, layer.orders))
    y = y.detach().float()
    assert torch.allclose(y, layer.eval()(x).detach(), rtol=0.05, atol=0.05 * float(y.abs().max()))


def test_no_grad_calls_reuse_the_factors_until_a_tensor_changes():
    layer = _layer(num_experts=2, top_k=1).eval()
    x = torch.randn(3, 12)
    with torch.no_grad():
        first = layer(x)
        cached = layer._no_grad_factors[1]
        assert torch.equal(layer(x), first) and layer._no_grad_factors[1] is cached
        layer.orders.add_(0.1)  # an optimizer step, a load: the version changes
        second = layer(x)
    assert layer._no_grad_factors[1] is not cached and not torch.allclose(second, first)
    assert torch.allclose(second, layer(x), atol=1e-6)  # with grad: recomputed, same values
    assert layer._no_grad_factors is None


@pytest.mark.parametrize("producer", ["layer_norm", "gelu"])
def test_recomputed_input_gives_the_same_gradients_and_keeps_less(producer):
    from lightning_peft.memory.meters import SavedTensorMeter

    results = []
    for recompute in (True, False):
        layer = _layer(d_in=12, d_out=10, num_experts=3, top_k=2, recompute_input=recompute)
        layer.base_layer.requires_grad_(False)  # frozen, as apply_adapter leaves it (else its weight's grad keeps x)
        norm = nn.LayerNorm(12)
        h = torch.randn(64, 12, generator=torch.Generator().manual_seed(0), requires_grad=True)
        with SavedTensorMeter(nn.ModuleList([layer, norm])) as meter:
            x = norm(h) if producer == "layer_norm" else torch.nn.functional.gelu(h)
            y = layer(x)
        y.pow(2).sum().backward()
        grads = [p.grad.clone() for p in (layer.lora_A, layer.lora_B, layer.router.weight, layer.orders)] + [h.grad.clone()]
        results.append((meter.bytes, grads))
    (kept, grads), (saved, reference) = results
    assert kept <= saved - 64 * 12 * 4  # the [64, 12] input is not kept
    for got, expected in zip(grads, reference):
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_a_learned_order_finds_the_domain_of_a_target_update():
    """The target is a rank-2 update in the order-0.8 domain (full rank in the spatial one): one
    expert starting at 0.7 learns a = 0.8 and fits it; an expert fixed at 0 cannot. (From 0.3
    it stalls in another local minimum: the loss oscillates in a with period ~4/d.)"""
    torch.manual_seed(0)
    d, r = 16, 2
    a_t, b_t = fractional_lowrank_factors(torch.randn(1, r, d) / d**0.5, torch.randn(1, d, r), torch.tensor([0.8]))
    x = torch.randn(256, d)
    y = x @ (b_t[0] @ a_t[0]).T
    losses = {}
    for init, train in ((0.7, True), (0.0, False)):
        torch.manual_seed(1)
        base = nn.Linear(d, d, bias=False).requires_grad_(False)
        nn.init.zeros_(base.weight)
        layer = FRAME(rank=r, num_experts=1, top_k=1, alpha=r, order_init=init, train_orders=train, balance_coef=0.0).wrap("l", base)
        optimizer = torch.optim.Adam(frame_parameter_groups(layer, lr=0.02))
        for _ in range(400):
            loss = (layer(x) - y).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        losses[train] = float(loss.detach())
        if train:
            assert abs(float(layer.orders.detach()[0]) - 0.8) < 1e-3
    assert losses[True] < 1e-4 * float(y.pow(2).mean()) and losses[False] > 0.1 * float(y.pow(2).mean())
