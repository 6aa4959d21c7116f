"""AdapterLibrary on three kinds of model (a transformers encoder, a timm ViT, a PPO policy):
activate equals the adapted model, combinations are exact, mixed batches equal each sample run
alone, switching adapters of one layout does not recompile, and bad input is refused before
anything is written."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_peft import AdapterLibrary, LoRA, apply_adapter, save_adapter
from lightning_peft.adapters.lora import LoRALinear


def randomised(base: nn.Module, spec: LoRA, seed: int, trainable: list[str] | None = None) -> nn.Module:
    """A copy of ``base`` with ``spec`` applied and every trainable tensor drawn at random (B != 0)."""
    model = copy.deepcopy(base)
    apply_adapter(model, spec, trainable_modules=trainable, check_gradients=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


def bert_base() -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, max_position_embeddings=16
    )
    return BertModel(config).eval()


def vit_base() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=8, in_chans=3, num_classes=3, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0).eval()


def ppo_base() -> nn.Module:
    from lightning_peft.rl.ppo import PPO

    torch.manual_seed(0)
    return PPO("CartPole-v1", hidden_sizes=(32, 32), normalize_observations=False).eval()


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(b.detach().abs().max())))


# ------------------------------------------------------------------ transformers encoder
BERT_TARGETS = ["query", "value"]


@pytest.fixture(scope="module")
def bert() -> dict:
    base = bert_base()
    return {
        "base": base,
        "a": randomised(base, LoRA(rank=2, target_modules=BERT_TARGETS), 1),
        "b": randomised(base, LoRA(rank=4, alpha=8.0, use_rslora=True, target_modules=BERT_TARGETS), 2),
        "ids": torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(3)),
    }


def test_bert_activate_equals_the_adapted_model_and_deactivate_restores_the_base(bert: dict, tmp_path: Path) -> None:
    base = copy.deepcopy(bert["base"])
    plain = base(bert["ids"]).last_hidden_state
    save_adapter(bert["b"], tmp_path / "b_export")
    lib = AdapterLibrary(tmp_path / "lib", base)
    lib.add("a", bert["a"])  # a live adapted model
    lib.add("b", tmp_path / "b_export")  # an export directory
    assert lib.names == ["a", "b"] and len(lib) == 2 and "a" in lib and lib.model is base
    for name in ["a", "b", "a"]:
        assert lib.activate(name) is base and lib.active == name
        assert close(base(bert["ids"]).last_hidden_state, bert[name](bert["ids"]).last_hidden_state)
    lib.deactivate()
    assert lib.active is None and not any(isinstance(m, LoRALinear) for m in base.modules())
    assert torch.equal(base(bert["ids"]).last_hidden_state, plain)
    # a reopened library (the index on disk) serves the same adapters
    again = AdapterLibrary(tmp_path / "lib", base)
    assert again.names == ["a", "b"]
    assert close(again.activate("b")(bert["ids"]).last_hidden_state, bert["b"](bert["ids"]).last_hidden_state)


def test_bert_switching_one_layout_copies_in_place_and_keeps_the_modules(bert: dict, tmp_path: Path) -> None:
    lib = AdapterLibrary(tmp_path, copy.deepcopy(bert["base"]))
    lib.add("a", bert["a"])
    lib.add("a2", randomised(bert["base"], LoRA(rank=2, target_modules=BERT_TARGETS), 5))
    model = lib.activate("a")
    layers = {n: (m, m.lora_A.weight) for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert len(layers) == 4
    lib.activate("a2")
    after = {n: (m, m.lora_A.weight) for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert all(after[n][0] is layers[n][0] and after[n][1] is layers[n][1] for n in layers)  # no re-injection


def test_bert_lora_factors_and_exact_combinations(bert: dict, tmp_path: Path) -> None:
    base = copy.deepcopy(bert["base"])
    lib = AdapterLibrary(tmp_path, base)
    lib.add("a", bert["a"])
    lib.add("b", bert["b"])
    fa, fb = lib.lora_factors("a"), lib.lora_factors("b")
    name = "encoder.layer.0.attention.self.query"
    layer_b = bert["b"].get_submodule(name)
    a, b, s = fb[name]
    assert a.shape == (4, 32) and b.shape == (32, 4) and s == pytest.approx(layer_b.scale)
    assert torch.equal(a, layer_b.lora_A.weight) and torch.equal(b, layer_b.lora_B.weight)
    weights = {"a": 0.7, "b": {name: -1.5}}  # b only on one module: elsewhere it weighs 0
    entry = lib.add_combination("mix", weights)
    assert entry["ranks"][name] == 6 and entry["tensor_bytes"] < 100  # coefficients only
    mix = lib.lora_factors("mix")
    for module in fa:
        want = 0.7 * fa[module][2] * fa[module][1] @ fa[module][0]
        if module == name:
            want = want - 1.5 * s * b @ a
        got = mix[module][2] * mix[module][1] @ mix[module][0]
        assert close(got, want)
    out = lib.activate("mix")(bert["ids"]).last_hidden_state
    # the same deltas merged into a copy of the base by hand
    ref = copy.deepcopy(bert["base"])
    with torch.no_grad():
        for module, (ma, mb, ms) in mix.items():
            ref.get_submodule(module).weight += ms * mb @ ma
    assert close(out, ref(bert["ids"]).last_hidden_state)
    assert close(lib.combine(weights)(bert["ids"]).last_hidden_state, out) and lib.active is None
    report = lib.report()
    assert report["entries"]["a"]["ratio"] > 1 and report["num_entries"] == 3 and "x smaller" in lib.format_report()


def test_bert_mixed_batch_equals_each_sample_alone(bert: dict, tmp_path: Path) -> None:
    lib = AdapterLibrary(tmp_path, copy.deepcopy(bert["base"]))
    lib.add("a", bert["a"])
    lib.add("b", bert["b"])  # another rank: stacks are zero-padded
    lib.add_combination("mix", {"a": 0.5, "b": 0.5})
    ids = torch.randint(0, 50, (5, 7), generator=torch.Generator().manual_seed(4))
    names = ["a", None, "b", "mix", "a"]
    lib.activate("b")
    with lib.per_sample(names) as model:
        mixed = model(ids).last_hidden_state
    assert lib.active == "b"  # restored on exit
    assert not any("mixed_lora" in m.__dict__ for m in lib.model.modules())
    for i, name in enumerate(names):
        alone = (lib.activate(name) if name else lib.deactivate())(ids[i : i + 1]).last_hidden_state
        assert close(mixed[i : i + 1], alone), name
    with pytest.raises(ValueError, match="batch size 2"), lib.per_sample(names):
        lib.model(ids[:2])


# ------------------------------------------------------------------ timm ViT, under torch.compile
VIT_TARGETS = ["qkv", "fc1"]


def test_vit_mixed_batch_and_switching_does_not_recompile(tmp_path: Path) -> None:
    from torch._dynamo.testing import CompileCounter

    base = vit_base()
    a = randomised(base, LoRA(rank=2, target_modules=VIT_TARGETS), 1)
    b = randomised(base, LoRA(rank=2, target_modules=VIT_TARGETS), 2)
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    lib = AdapterLibrary(tmp_path, base)
    lib.add("a", a)
    lib.add("b", b)
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(lib.activate("a"), backend=counter)
    with torch.no_grad():
        out_a = compiled(images)
        lib.activate("b")
        out_b = compiled(images)
        lib.activate("a")
        out_a2 = compiled(images)
    assert counter.frame_count == 1  # same layout: tensors copied in place, no recompilation
    assert close(out_a, a(images)) and close(out_b, b(images)) and torch.equal(out_a, out_a2)
    torch._dynamo.reset()
    names = ["b", None, "a"]
    with torch.no_grad(), lib.per_sample(names) as model:
        mixed = model(images)  # ViT blocks see [N, tokens, d]: the batch is dim 0
    lib.deactivate()
    assert close(mixed[0], b(images[:1])[0])
    assert close(mixed[1], base(images[1:2])[0]) and close(mixed[2], a(images[2:3])[0])


# ------------------------------------------------------------------ PPO policy
def test_ppo_policy_in_a_generic_library_with_a_trained_head(tmp_path: Path) -> None:
    from torch._dynamo.testing import CompileCounter

    base = ppo_base()
    spec = LoRA(rank=1, target_modules=["policy.0", "policy.2"])
    first, second = randomised(base, spec, 1, trainable=["policy.4"]), randomised(base, spec, 2, trainable=["policy.4"])
    obs = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    plain_head = base.policy[4].weight.detach().clone()
    lib = AdapterLibrary(tmp_path, base)
    assert lib.add("first", first)["lora"] is False  # it also stores the trained head
    lib.add("second", second)
    torch._dynamo.reset()
    counter = CompileCounter()
    policy = torch.compile(lib.activate("first").policy, backend=counter)
    with torch.no_grad():
        assert close(policy(obs), first.policy(obs))
        lib.activate("second")
        assert close(policy(obs), second.policy(obs))
    assert counter.frame_count == 1
    torch._dynamo.reset()
    lib.deactivate()
    assert torch.equal(base.policy[4].weight, plain_head)  # the head the entry changed is the base's again
    with pytest.raises(ValueError, match=r"not a plain LoRA adapter: .*outside its LoRA layers \(\['policy.4.bias'"):
        lib.add_combination("mix", {"first": 1.0, "second": 1.0})


# ------------------------------------------------------------------ bad input
@pytest.fixture()
def small(tmp_path: Path) -> dict:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    plain = copy.deepcopy(base)
    lib = AdapterLibrary(tmp_path / "lib", base)
    lib.add("a", randomised(base, LoRA(rank=2, target_modules=["0", "2"]), 1))
    lib.add("only0", randomised(base, LoRA(rank=2, target_modules=["0"]), 2))
    lib.add_combination("c", {"a": 1.0})
    lib.activate("a")
    return {"lib": lib, "base": base, "plain": plain, "root": tmp_path / "lib", "tmp": tmp_path}


def refused(small: dict, action, match: str) -> None:
    """``action`` raises ``match`` and leaves the library's files and the live model as they were."""
    files, state, active = snapshot(small["root"]), state_of(small["lib"].model), small["lib"].active
    with pytest.raises((ValueError, TypeError, FileNotFoundError), match=match):
        action()
    assert snapshot(small["root"]) == files and same_state(state_of(small["lib"].model), state) and small["lib"].active == active


def test_an_adapter_for_another_base_is_refused_naming_both(small: dict) -> None:
    other = copy.deepcopy(small["plain"])
    with torch.no_grad():
        other[0].weight.add_(1.0)
    foreign = randomised(other, LoRA(rank=2, target_modules=["0"]), 3)
    refused(small, lambda: small["lib"].add("x", foreign), r"made for another base .* frozen modules \['0'\]")
    save_adapter(foreign, small["tmp"] / "foreign")
    refused(small, lambda: small["lib"].add("x", small["tmp"] / "foreign"), "base weights differ")
    with pytest.raises(ValueError) as error:
        small["lib"].add("x", small["tmp"] / "foreign")
    assert "strict_base" not in str(error.value)  # load_adapter's way round is no option of the library's
    with pytest.raises(ValueError, match=f"fingerprint {small['lib'].base_fingerprint}.* has fingerprint"):
        AdapterLibrary(small["root"], other)


def test_an_existing_name_needs_overwrite(small: dict) -> None:
    again = randomised(small["plain"], LoRA(rank=2, target_modules=["0", "2"]), 9)
    refused(small, lambda: small["lib"].add("only0", again), "already in the library.*overwrite=True")
    refused(small, lambda: small["lib"].add_combination("a", {"only0": 1.0}), "already in the library")
    refused(small, lambda: small["lib"].add("a", again, overwrite=True), r"cannot overwrite 'a': combination entries \['c'\]")
    small["lib"].add("only0", again, overwrite=True)  # allowed: no combination uses it
    assert small["lib"].report()["entries"]["only0"]["ranks"] == {"0": 2, "2": 2}


def test_combining_different_targets_or_kinds_is_refused_saying_which(small: dict) -> None:
    refused(
        small,
        lambda: small["lib"].add_combination("x", {"a": 1.0, "only0": 1.0}),
        r"'a' and 'only0' adapt different modules \(only 'a': \['2'\]",
    )
    refused(small, lambda: small["lib"].add_combination("x", {"c": 1.0}), "'c' is a combination entry")
    refused(small, lambda: small["lib"].add_combination("x", {"a": {"1": 1.0}}), r"name modules it does not adapt: \['1'\]")
    refused(small, lambda: small["lib"].add_combination("x", {"a": float("nan")}), "finite number")


def test_an_unknown_name_lists_the_known_ones(small: dict) -> None:
    known = r"\['a', 'c', 'only0'\]"
    for action in (
        lambda: small["lib"].activate("nope"),
        lambda: small["lib"].remove("nope"),
        lambda: small["lib"].lora_factors("nope"),
        lambda: small["lib"].add_combination("x", {"nope": 1.0}),
        lambda: small["lib"].per_sample(["a", "nope"]).__enter__(),
    ):
        refused(small, action, f"entry 'nope' is not in the library; it holds {known}")


def test_shapes_that_do_not_fit_are_refused(small: dict) -> None:
    wider = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))
    save_adapter(randomised(wider, LoRA(rank=2, target_modules=["0"]), 4), small["tmp"] / "wider")
    refused(small, lambda: small["lib"].add("w", small["tmp"] / "wider"), r"'0': shape \[out=8, in=6\] != saved \[10, 6\]")
    refused(small, lambda: small["lib"].add("w", randomised(wider, LoRA(rank=2, target_modules=["0"]), 4)), "made for another base")


@pytest.mark.parametrize("names", [["only0", None, "only2", "a", "c"], ["only0", "only2", None, "only2"]])
def test_a_mixed_batch_of_adapters_with_different_targets_equals_each_sample_alone(small: dict, names: list) -> None:
    lib = small["lib"]
    lib.add("only2", randomised(small["plain"], LoRA(rank=3, target_modules=["2"]), 5))
    x = torch.randn(len(names), 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), lib.per_sample(names) as model:  # second case: no one entry adapts both modules
        mixed = model(x)
    assert lib.active == "a" and not any("mixed_lora" in m.__dict__ for m in lib.model.modules())  # restored on exit
    for i, name in enumerate(names):
        with torch.no_grad():
            alone = (lib.activate(name) if name else lib.deactivate())(x[i : i + 1])
        assert close(mixed[i : i + 1], alone), name


def test_removing_an_entry_a_combination_uses_is_refused(small: dict) -> None:
    refused(small, lambda: small["lib"].remove("a"), r"cannot remove 'a': combination entries \['c'\] use it")
    small["lib"].remove("c")
    small["lib"].remove("a")  # the active one: the live model is the plain base again
    assert small["lib"].names == ["only0"] and small["lib"].active is None
    assert not any(isinstance(m, LoRALinear) for m in small["base"].modules())
    index = json.loads((small["root"] / "index.json").read_text())
    assert sorted(index["entries"]) == ["only0"] and len(list((small["root"] / "adapters").iterdir())) == 1


def test_a_crafted_index_is_refused_on_open(small: dict) -> None:
    index_path = small["root"] / "index.json"
    index = json.loads(index_path.read_text())
    index["entries"]["a"]["file"] = "../../outside"
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="points outside the library"):
        AdapterLibrary(small["root"])
    index_path.write_text("{not json")
    with pytest.raises(ValueError, match="index .* is damaged"):
        AdapterLibrary(small["root"])
