"""Damaged, partial and foreign adapter files: each is refused with an error that names the file
(and the tensor or field), and the model it was loaded into is left exactly as it was."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lightning_peft import BitFit, LoRA, apply_adapter, load_adapter, save_adapter
from lightning_peft.adapters.base import AdapterLayer
from lightning_peft.io import EXTRA_NAME, WEIGHTS_NAME

P = "base_model.model."


class Net(nn.Module):
    """``q``, ``v`` (adapted) and a ``head`` (trained fully)."""

    def __init__(self, width: int = 8, with_v: bool = True, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.q = nn.Linear(width, width)
        if with_v:
            self.v = nn.Linear(width, width)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.q(x)
        return self.head(h + self.v(h) if hasattr(self, "v") else h)


def export(tmp_path: Path, spec=None, trainable=("head",)) -> Path:
    model = Net()
    apply_adapter(model, spec or LoRA(rank=2, target_modules=["q", "v"]), trainable_modules=list(trainable))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    return save_adapter(model, tmp_path / "export")


def read(weights: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(weights), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def edit_tensors(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        tensors, metadata = read(directory / WEIGHTS_NAME)
        edit(tensors)
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata=metadata)

    return apply


def edit_meta(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        tensors, metadata = read(directory / WEIGHTS_NAME)
        meta = json.loads(metadata["lightning_peft"])
        edit(meta)
        metadata["lightning_peft"] = json.dumps(meta)  # NaN stays NaN (json allows it)
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata=metadata)

    return apply


def raw_meta(text: str | None) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        tensors, metadata = read(directory / WEIGHTS_NAME)
        if text is None:
            del metadata["lightning_peft"]
        else:
            metadata["lightning_peft"] = text
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata=metadata)

    return apply


def file_bytes(edit: Callable[[bytes], bytes], name: str = WEIGHTS_NAME) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        (directory / name).write_bytes(edit((directory / name).read_bytes()))

    return apply


def set_path(keys: tuple, value) -> Callable[[dict], None]:
    def edit(meta: dict) -> None:
        node = meta
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value

    return edit


def delete_path(keys: tuple) -> Callable[[dict], None]:
    def edit(meta: dict) -> None:
        node = meta
        for k in keys[:-1]:
            node = node[k]
        del node[keys[-1]]

    return edit


def strip_fingerprints(meta: dict) -> None:
    for entry in meta["targets"].values():
        entry.pop("fingerprint", None)


def nan_at(key: str, value: float = math.nan) -> Callable[[dict], None]:
    def edit(tensors: dict) -> None:
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = value

    return edit


def extra_head_file(directory: Path) -> None:
    save_file({"head.weight": torch.zeros(3, 8)}, str(directory / EXTRA_NAME))


# (id, damage, error type, pattern the message must match, what the message must name)
CASES = [
    (
        "lora_B removed from one layer",
        edit_tensors(lambda t: t.pop(P + "v.lora_B.weight")),
        ValueError,
        "missing tensors",
        P + "v.lora_B.weight",
    ),
    (
        "every lora_B removed",
        edit_tensors(lambda t: [t.pop(k) for k in list(t) if "lora_B" in k]),
        ValueError,
        "missing tensors",
        P + "q.lora_B.weight",
    ),
    ("lora_A removed", edit_tensors(lambda t: t.pop(P + "q.lora_A.weight")), ValueError, "missing tensors", P + "q.lora_A.weight"),
    (
        "wrong-shape tensor",
        edit_tensors(lambda t: t.__setitem__(P + "q.lora_A.weight", t[P + "q.lora_A.weight"].T.contiguous())),
        ValueError,
        r"saved shape \(8, 2\) != model \(2, 8\)",
        "q.lora_A.weight",
    ),
    (
        "unknown tensor inside a layer",
        edit_tensors(lambda t: t.__setitem__(P + "q.lora_C.weight", torch.zeros(2))),
        ValueError,
        "unknown tensor",
        P + "q.lora_C.weight",
    ),
    (
        "tensor of a module the model lacks",
        edit_tensors(lambda t: t.__setitem__(P + "decoder.weight", torch.zeros(2))),
        ValueError,
        "no counterpart",
        "decoder.weight",
    ),
    (
        "tensor outside the key prefix",
        edit_tensors(lambda t: t.__setitem__("q.weight", torch.zeros(8, 8))),
        ValueError,
        "not under",
        "q.weight",
    ),
    ("NaN in an adapter tensor", edit_tensors(nan_at(P + "v.lora_B.weight")), ValueError, "non-finite", "v.lora_B.weight"),
    ("inf in a trained head", edit_tensors(nan_at(P + "head.weight", math.inf)), ValueError, "non-finite", "head.weight"),
    (
        "integer adapter tensor",
        edit_tensors(lambda t: t.__setitem__(P + "q.lora_A.weight", torch.ones(2, 8, dtype=torch.int32))),
        ValueError,
        "dtype torch.int32",
        "q.lora_A.weight",
    ),
    ("trained head tensor removed", edit_tensors(lambda t: t.pop(P + "head.bias")), ValueError, "missing trained tensors", "head.bias"),
    ("fingerprints removed", edit_meta(strip_fingerprints), ValueError, "records no base fingerprint.*strict_base=False", "'q'"),
    (
        "one fingerprint altered",
        edit_meta(lambda m: m["targets"]["q"].__setitem__("fingerprint", "0" * 16)),
        ValueError,
        "base weights differ.*strict_base=False",
        "'q'",
    ),
    ("combined fingerprint altered", edit_meta(set_path(("base_fingerprint",), "f" * 16)), ValueError, "do not combine", "fingerprint"),
    ("truncated safetensors", file_bytes(lambda b: b[: len(b) // 2]), ValueError, "is damaged or not a safetensors file", WEIGHTS_NAME),
    ("garbage bytes", file_bytes(lambda b: b"\x93" * 64), ValueError, "is damaged or not a safetensors file", WEIGHTS_NAME),
    ("empty file", file_bytes(lambda b: b""), ValueError, "is damaged or not a safetensors file", WEIGHTS_NAME),
    ("malformed JSON metadata", raw_meta('{"format_version": 1, "specs": ['), ValueError, "not valid JSON", WEIGHTS_NAME),
    ("metadata is a list", raw_meta("[1, 2]"), ValueError, "is damaged: its metadata is a list", WEIGHTS_NAME),
    ("metadata lacks targets", edit_meta(delete_path(("targets",))), ValueError, "lacks 'targets'", WEIGHTS_NAME),
    ("metadata lacks specs", edit_meta(delete_path(("specs",))), ValueError, "lacks 'specs'", WEIGHTS_NAME),
    ("targets is a list", edit_meta(set_path(("targets",), ["q"])), ValueError, "'targets' must be an object", WEIGHTS_NAME),
    ("spec index out of range", edit_meta(set_path(("targets", "q", "spec"), 7)), ValueError, "names spec 7", "'q'"),
    (
        "kind does not match its spec",
        edit_meta(set_path(("targets", "q", "kind"), "bitfit")),
        ValueError,
        "has kind 'bitfit' but its spec 0 is a 'lora'",
        "'q'",
    ),
    ("invalid shape entry", edit_meta(set_path(("targets", "v", "shape"), [0, -1])), ValueError, r"has shape \[0, -1\]", "'v'"),
    (
        "unknown spec class",
        edit_meta(set_path(("specs", 0, "class_path"), "lightning_peft.adapters.lora.NotLoRA")),
        ValueError,
        "unknown adapter class",
        "NotLoRA",
    ),
    (
        "unknown init argument",
        edit_meta(set_path(("specs", 0, "init_args", "ranks"), 3)),
        ValueError,
        r"no init argument\(s\) \['ranks'\]",
        "LoRA",
    ),
    (
        "init argument of the wrong type",
        edit_meta(set_path(("specs", 0, "init_args", "rank"), "2")),
        ValueError,
        r"init_args\['rank'\] = '2' does not fit",
        "rank",
    ),
    (
        "init argument out of range",
        edit_meta(set_path(("specs", 0, "init_args", "rank"), 0)),
        ValueError,
        "init_args are refused: rank must be an int >= 1",
        "rank",
    ),
    (
        "NaN init argument",
        edit_meta(set_path(("specs", 0, "init_args", "alpha"), math.nan)),
        ValueError,
        r"init_args\['alpha'\] = nan does not fit",
        "alpha",
    ),
    ("init_args not a dict", edit_meta(set_path(("specs", 0, "init_args"), [2])), ValueError, "init_args of .* must be a dict", "LoRA"),
    ("unsupported format version", edit_meta(set_path(("format_version",), 99)), ValueError, "has format 99", WEIGHTS_NAME),
    ("not written by lightning-peft", raw_meta(None), ValueError, "not written by lightning-peft", WEIGHTS_NAME),
    (
        "record prefix names a missing module",
        edit_meta(set_path(("record_prefix",), "encoder")),
        ValueError,
        "applied to 'encoder', which this model lacks",
        "encoder",
    ),
    (
        "trainable_modules not names",
        edit_meta(set_path(("trainable_modules",), [3])),
        ValueError,
        "'trainable_modules' must be module names",
        WEIGHTS_NAME,
    ),
    (
        "truncated extra tensors file",
        lambda d: (extra_head_file(d), file_bytes(lambda b: b[:20], EXTRA_NAME)(d)),
        ValueError,
        "is damaged or not a safetensors file",
        EXTRA_NAME,
    ),
    (
        "extra tensors with a wrong shape",
        lambda d: save_file({"head.weight": torch.zeros(4, 8)}, str(d / EXTRA_NAME)),
        ValueError,
        r"saved shape \(4, 8\) != model \(3, 8\)",
        "head.weight",
    ),
]


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, bool], list[str]]:
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        [type(m).__name__ for m in model.modules()],
    )


def assert_unchanged(model: nn.Module, before) -> None:
    state, grads, types = before
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], v) and now[k].dtype == v.dtype for k, v in state.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert [type(m).__name__ for m in model.modules()] == types


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_damaged_file_is_refused_by_name_and_the_model_is_unchanged(tmp_path, case):
    _, damage, error_type, pattern, named = case
    directory = export(tmp_path)
    damage(directory)
    model = Net()
    before = snapshot(model)
    with pytest.raises(error_type, match=pattern) as error:
        load_adapter(model, directory)
    message = str(error.value)
    assert str(directory) in message, message
    assert named in message, message
    assert_unchanged(model, before)
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())


@pytest.mark.parametrize("case", CASES[:11], ids=[c[0] for c in CASES[:11]])
def test_damaged_file_leaves_an_already_adapted_model_unchanged(tmp_path, case):
    _, damage, error_type, pattern, named = case
    directory = export(tmp_path)
    damage(directory)
    model = Net()
    apply_adapter(model, LoRA(rank=2, target_modules=["q", "v"]), trainable_modules=["head"])
    before = snapshot(model)
    with pytest.raises(error_type, match=pattern):
        load_adapter(model, directory)
    assert_unchanged(model, before)


def test_missing_fingerprints_load_with_strict_base_false(tmp_path):
    directory = export(tmp_path)
    edit_meta(strip_fingerprints)(directory)
    loaded = load_adapter(Net(), directory, strict_base=False)
    assert isinstance(loaded.q, AdapterLayer) and isinstance(loaded.v, AdapterLayer)


def test_q_and_v_export_into_a_q_only_model_names_the_missing_module(tmp_path):
    directory = export(tmp_path)
    model = Net(with_v=False)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'v': no such module") as error:
        load_adapter(model, directory)
    assert "strict_base" not in str(error.value)  # it would not help
    assert_unchanged(model, before)


def test_other_base_suggests_strict_base_false_only_when_it_would_load(tmp_path):
    directory = export(tmp_path)
    other = Net(seed=7)
    with pytest.raises(ValueError, match="strict_base=False"):
        load_adapter(other, directory)
    edit_tensors(lambda t: t.pop(P + "q.lora_B.weight"))(directory)
    with pytest.raises(ValueError, match="missing tensors") as error:
        load_adapter(other, directory)
    assert "strict_base" not in str(error.value)  # it would still fail: the file is damaged
    before = snapshot(other)
    with pytest.raises(ValueError, match="missing tensors"):
        load_adapter(other, directory, strict_base=False)
    assert_unchanged(other, before)


def test_values_that_overflow_the_model_dtype_are_refused(tmp_path):
    directory = export(tmp_path)
    edit_tensors(lambda t: t.__setitem__(P + "q.lora_A.weight", torch.full((2, 8), 1e6)))(directory)
    model = Net().half()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"non-finite .*after casting.*q\.lora_A\.weight"):
        load_adapter(model, directory, strict_base=False)
    assert_unchanged(model, before)


def test_bitfit_export_without_its_biases_is_refused(tmp_path):
    directory = export(tmp_path, spec=BitFit(target_modules=["q", "v"]), trainable=())
    edit_tensors(lambda t: t.pop(P + "v.bias"))(directory)
    model = Net()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"missing trained tensors \['v.bias'\]"):
        load_adapter(model, directory)
    assert_unchanged(model, before)


def test_missing_export_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter export directory"):
        load_adapter(Net(), tmp_path / "nowhere")


def test_load_leaves_the_random_streams_alone(tmp_path):
    """Validating on throwaway layers must not advance the caller's RNG (their init is random)."""
    directory = export(tmp_path)
    model = Net()
    torch.manual_seed(11)
    load_adapter(model, directory)
    after_load = torch.rand(3)
    plain = Net()
    torch.manual_seed(11)
    apply_adapter(plain, LoRA(rank=2, target_modules=["q", "v"]), trainable_modules=["head"])  # what the load itself draws
    assert torch.equal(torch.rand(3), after_load)


@pytest.mark.parametrize("adapted", [False, True], ids=["fresh model", "already adapted"])
def test_a_failure_after_validation_rolls_everything_back(tmp_path, monkeypatch, adapted):
    """Belt and braces: should copying fail half-way, injected layers, requires_grad flags and
    already-copied tensors are all put back."""
    import lightning_peft.io as io

    directory = export(tmp_path)
    real = io.plan_load

    def broken(*args, **kwargs):
        plan = real(*args, **kwargs)
        plan.state.pop("head.weight")
        plan.state["head.weight"] = torch.zeros(5, 5)  # copied last, after every other tensor
        return plan

    monkeypatch.setattr(io, "plan_load", broken)
    model = Net()
    if adapted:
        apply_adapter(model, LoRA(rank=2, target_modules=["q", "v"]), trainable_modules=["head"])
    before = snapshot(model)
    with pytest.raises(RuntimeError):
        load_adapter(model, directory)
    assert_unchanged(model, before)
    if not adapted:
        from lightning_peft.targeting import adapter_record

        assert not any(isinstance(m, AdapterLayer) for m in model.modules()) and adapter_record(model) is None
        monkeypatch.setattr(io, "plan_load", real)
        load_adapter(model, directory)  # and a later load works: nothing was left half-applied
