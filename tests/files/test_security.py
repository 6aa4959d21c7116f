"""Crafted files: no load path runs code from a file, and paths read from files stay inside
their root. Every test builds a file the way an attacker would and proves that nothing ran
(a marker file the payload would create does not exist)."""

from __future__ import annotations

import functools
import io
import os
import pickle
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_peft.safe_load import Unloaded, load_checkpoint_tensors, tensor_state_dict


# ---------------------------------------------------------------------------------------------
# payloads
# ---------------------------------------------------------------------------------------------
def touch(marker: Path) -> str:
    return f"touch {marker}"


class OsSystem:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (touch(self.marker),)


class SubprocessShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return functools.partial(subprocess.run, shell=True), (touch(self.marker),)


class BuiltinEval:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return eval, (f"__import__('os').system({touch(self.marker)!r})",)


class BuiltinExec:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"import os; os.system({touch(self.marker)!r})",)


class SetStateHook:
    """An object whose ``__setstate__`` would run the payload when BUILD restores it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return SetStateHook, (self.marker,), {"marker": str(self.marker)}

    def __setstate__(self, state):
        os.system(f"touch {state['marker']}")


PAYLOADS = {
    "os.system": OsSystem,
    "subprocess.run(shell=True)": SubprocessShell,
    "builtins.eval": BuiltinEval,
    "builtins.exec": BuiltinExec,
    "__setstate__": SetStateHook,
}


def tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Linear(3, 2).state_dict()


def crafted_checkpoint(path: Path, payload: object) -> dict[str, torch.Tensor]:
    """A Lightning-shaped checkpoint with ``payload`` nested in its hyper_parameters."""
    state = tiny_state()
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in state.items()},
            "epoch": 0,
            "hyper_parameters": {"net": nn.Linear(1, 1), "nested": {"deep": [payload]}},
        },
        path,
    )
    return state


def archive_with_pickle(path: Path, data: bytes) -> None:
    """A torch.save zip archive whose data.pkl is replaced by ``data`` (hand-written opcodes)."""
    buffer = io.BytesIO()
    torch.save({}, buffer)
    buffer.seek(0)
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, data if info.filename.endswith("data.pkl") else src.read(info.filename))


# ---------------------------------------------------------------------------------------------
# safe_load.load_checkpoint_tensors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_crafted_checkpoint_runs_nothing_and_keeps_its_tensors(tmp_path, payload):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.ckpt"
    state = crafted_checkpoint(path, PAYLOADS[payload](marker))
    loaded = load_checkpoint_tensors(path)
    assert not marker.exists()
    assert isinstance(loaded["hyper_parameters"]["nested"]["deep"][0], Unloaded)
    assert isinstance(loaded["hyper_parameters"]["net"], Unloaded)
    for key, value in state.items():
        assert torch.equal(loaded["state_dict"][f"model.{key}"], value)


def test_the_crafted_file_is_live_under_plain_unpickling(tmp_path):
    """Control: the same file does run its payload under torch.load(weights_only=False), so
    the tests above would fail if load_checkpoint_tensors unpickled it."""
    marker = tmp_path / "ran"
    crafted_checkpoint(tmp_path / "evil.ckpt", OsSystem(marker))
    torch.load(tmp_path / "evil.ckpt", weights_only=False)
    assert marker.exists()


def test_hand_written_opcodes_reach_no_callable(tmp_path):
    marker = tmp_path / "ran"
    cmd = touch(marker).encode()
    # protocol 0 GLOBAL + REDUCE, INST, and a BUILD that first plants `__setstate__` on an
    # allowed object (an OrderedDict) and then triggers it
    programs = [
        b"cos\nsystem\n(S'" + cmd + b"'\ntR.",
        b"(S'" + cmd + b"'\nios\nsystem\n.",
        b"\x80\x02ccollections\nOrderedDict\n)R}X\x0c\x00\x00\x00__setstate__cos\nsystem\nsbX"
        + len(cmd).to_bytes(4, "little")
        + cmd
        + b"b.",
        b"\x80\x02cbuiltins\ngetattr\ncos\nsystem\nX\x08\x00\x00\x00__call__\x86R(S'" + cmd + b"'\ntR.",
    ]
    for i, program in enumerate(programs):
        path = tmp_path / f"p{i}.pt"
        archive_with_pickle(path, program)
        try:  # a top-level placeholder is refused as "not a dict": either way nothing runs
            load_checkpoint_tensors(path)
        except ValueError as error:
            assert str(path) in str(error)
        assert not marker.exists(), f"program {i} ran its payload"


def test_extension_codes_go_through_the_allowlist(tmp_path):
    import copyreg

    marker = tmp_path / "ran"
    copyreg.add_extension("os", "system", 0x7FF0)
    try:
        cmd = touch(marker).encode()
        archive_with_pickle(tmp_path / "ext.pt", b"\x80\x02}X\x01\x00\x00\x00a\x83\xf0\x7f(S'" + cmd + b"'\ntRs.")
        loaded = load_checkpoint_tensors(tmp_path / "ext.pt")
    finally:
        copyreg.remove_extension("os", "system", 0x7FF0)
    assert not marker.exists() and isinstance(loaded["a"], Unloaded)


class HookedTensor:
    """Pickles as a tensor whose rebuild carries a backward hook (torch.save never writes one)."""

    def __reduce__(self):
        import collections
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TypedStorage is deprecated, still what torch.save writes
            storage = torch.ones(2).storage()
        return torch._utils._rebuild_tensor_v2, (storage, 0, (2,), (1,), True, collections.OrderedDict({0: os.system}))


def test_backward_hooks_in_a_file_are_dropped(tmp_path):
    torch.save({"w": HookedTensor()}, tmp_path / "hooks.pt")
    assert torch.load(tmp_path / "hooks.pt", weights_only=False)["w"]._backward_hooks  # control: the file has one
    loaded = load_checkpoint_tensors(tmp_path / "hooks.pt")
    assert torch.equal(loaded["w"], torch.ones(2)) and not loaded["w"]._backward_hooks


def test_real_lightning_checkpoint_with_pickled_module_and_partial(tmp_path):
    import lightning as L

    class HydraStyle(L.LightningModule):
        def __init__(self, net: nn.Module, optimizer: functools.partial) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = net

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).square().mean()

        def configure_optimizers(self):
            return self.hparams.optimizer(self.parameters())

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).to(torch.bfloat16)
    net[1].float()
    module = HydraStyle(net, functools.partial(torch.optim.SGD, lr=0.1))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4, dtype=torch.bfloat16)), batch_size=4)
    trainer = L.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "run.ckpt", weights_only=True)  # why this loader exists
    loaded = load_checkpoint_tensors(tmp_path / "run.ckpt")
    state = tensor_state_dict(loaded, tmp_path / "run.ckpt")
    original = module.state_dict()
    assert state.keys() == original.keys()
    for key, value in original.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
    assert isinstance(loaded["hyper_parameters"]["net"], Unloaded)
    assert "functools.partial" in repr(loaded["hyper_parameters"]["optimizer"])
    assert loaded["global_step"] == 2


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "torchscript", "not a dict", "no data.pkl"])
def test_damaged_checkpoint_is_a_clear_error_naming_the_file(tmp_path, damage):
    path = tmp_path / f"{damage.replace(' ', '_')}.ckpt"
    torch.save({"state_dict": tiny_state()}, path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(256))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "torchscript":
        torch.jit.script(nn.Linear(2, 2)).save(str(path))
    elif damage == "not a dict":
        torch.save([torch.ones(1)], path)
    else:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("x/version", "3")
    with pytest.raises(ValueError, match="damaged|TorchScript|holds a list") as error:
        load_checkpoint_tensors(path)
    assert str(path) in str(error.value)


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_checkpoint_tensors(tmp_path / "nope.ckpt")


def test_tensor_state_dict_names_non_tensor_entries(tmp_path):
    with pytest.raises(ValueError, match=r"non-tensor values under \['net'\]"):
        tensor_state_dict({"state_dict": {"w": torch.ones(1), "net": Unloaded()}}, "x.ckpt")


# ---------------------------------------------------------------------------------------------
# adapter files name their specs only through the registry
# ---------------------------------------------------------------------------------------------
class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.q(x))


def rewrite_metadata(weights: Path, edit) -> None:
    """Rewrite the lightning_peft metadata of ``weights`` with ``edit(meta)``."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(weights), "pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(metadata["lightning_peft"])
    edit(meta)
    metadata["lightning_peft"] = json.dumps(meta)
    save_file(tensors, str(weights), metadata=metadata)


def crafted_class_paths(marker: Path) -> dict[str, dict]:
    return {
        "os.system": {"class_path": "os.system", "init_args": {"command": touch(marker)}},
        "subprocess.run": {"class_path": "subprocess.run", "init_args": {"args": touch(marker), "shell": True}},
        "builtins.open": {"class_path": "builtins.open", "init_args": {"file": str(marker), "mode": "w"}},
        "builtins.exec (short name)": {"class_path": "exec", "init_args": {}},
        "a library function": {"class_path": "lightning_peft.io.save_adapter", "init_args": {"model": None, "path": str(marker)}},
        "a torch module": {"class_path": "torch.nn.Linear", "init_args": {"in_features": 1, "out_features": 1}},
    }


CRAFTED = ["os.system", "subprocess.run", "builtins.open", "builtins.exec (short name)", "a library function", "a torch module"]


def test_the_crafted_class_path_is_a_live_payload(tmp_path):
    """Control: resolved the way files used to be (import + call), it runs."""
    import importlib

    marker = tmp_path / "ran"
    config = crafted_class_paths(marker)["subprocess.run"]
    module, _, name = config["class_path"].rpartition(".")
    getattr(importlib.import_module(module), name)(**config["init_args"])
    assert marker.exists()


@pytest.mark.parametrize("crafted", CRAFTED)
def test_load_adapter_with_a_crafted_class_path_runs_nothing(tmp_path, crafted):
    from lightning_peft import LoRA, apply_adapter, load_adapter, save_adapter
    from lightning_peft.adapters.base import AdapterLayer

    marker = tmp_path / "ran"
    model = Tiny()
    apply_adapter(model, LoRA(rank=2, target_modules=["q"]))
    save_adapter(model, tmp_path / "export")
    rewrite_metadata(
        tmp_path / "export" / "adapter_model.safetensors", lambda m: m["specs"].__setitem__(0, crafted_class_paths(marker)[crafted])
    )
    fresh = Tiny()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=r"unknown adapter class .*register_adapter") as error:
        load_adapter(fresh, tmp_path / "export")
    assert "adapter_model.safetensors" in str(error.value) and "lightning_peft.adapters.lora.LoRA" in str(error.value)
    assert not marker.exists()
    assert not any(isinstance(m, AdapterLayer) for m in fresh.modules())
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


def test_a_registered_custom_spec_loads_and_an_unregistered_one_is_refused(tmp_path):
    from lightning_peft import LoRA, apply_adapter, load_adapter, register_adapter, save_adapter
    from lightning_peft.adapters import registry

    class ScaledLoRA(LoRA):
        kind = "scaled_lora_test"

    x = torch.randn(3, 6)
    model = Tiny()
    apply_adapter(model, ScaledLoRA(rank=2, target_modules=["q"]))
    with torch.no_grad():
        model.q.lora_B.weight.normal_()
    save_adapter(model, tmp_path / "export")
    with pytest.raises(ValueError, match="ScaledLoRA.*register_adapter"):
        load_adapter(Tiny(), tmp_path / "export")
    try:
        assert register_adapter(ScaledLoRA) is ScaledLoRA
        fresh = load_adapter(Tiny(), tmp_path / "export")
        assert type(fresh.q.spec) is ScaledLoRA
        torch.testing.assert_close(fresh(x), model(x))
        with pytest.raises(ValueError, match="already registered"):
            register_adapter(type("ScaledLoRA", (LoRA,), {"kind": "scaled_lora_test"}))
        with pytest.raises(ValueError, match="belongs to the built-in"):
            register_adapter(type("LoRA", (LoRA,), {"__module__": "mine"}))
        with pytest.raises(TypeError, match="AdapterSpec subclass"):
            register_adapter(nn.Linear)
    finally:
        for name in [n for n, c in registry._USER.items() if c is ScaledLoRA]:
            del registry._USER[name]


# ---------------------------------------------------------------------------------------------
# PolicyLibrary: specs through the registry, files inside the root
# ---------------------------------------------------------------------------------------------
@pytest.fixture()
def library(tmp_path):
    from lightning_peft import LoRA, PolicyLibrary, apply_adapter
    from lightning_peft.modules.ppo import PPO

    torch.manual_seed(0)
    base = PPO("CartPole-v1", normalize_observations=False)
    base_file = base.save_policy(tmp_path / "base.safetensors")
    lib = PolicyLibrary(tmp_path / "lib", base=base_file)
    adapted = PPO("CartPole-v1", base_checkpoint=base_file, normalize_observations=False)
    apply_adapter(adapted, LoRA(rank=2, target_modules=["policy.0", "value.0"]))
    lib.add("CartPole-v1/long-pole", adapted)
    return lib


def rewrite_task_layout(path: Path, edit) -> None:
    """Rewrite the ``lightning_peft`` metadata of the task export at ``path`` with ``edit(meta)``."""
    rewrite_metadata(path / "adapter_model.safetensors", edit)


@pytest.mark.parametrize("crafted", CRAFTED[:3])
def test_policy_library_activate_with_a_crafted_class_path_runs_nothing(tmp_path, library, crafted):
    from lightning_peft import PolicyLibrary
    from lightning_peft.adapters.base import AdapterLayer

    marker = tmp_path / "ran"
    task = "CartPole-v1/long-pole"
    file = library.root / library.index["tasks"][task]["file"]
    rewrite_task_layout(file, lambda layout: layout["specs"].__setitem__(0, crafted_class_paths(marker)[crafted]))
    reopened = PolicyLibrary(library.root)
    with pytest.raises(ValueError, match="unknown adapter class") as error:
        reopened.activate(task)
    assert str(file) in str(error.value)
    assert not marker.exists()
    assert not any(isinstance(m, AdapterLayer) for m in reopened.model.modules()) and reopened.active is None


@pytest.mark.parametrize("entry", ["../outside.safetensors", "ABSOLUTE", "adapters/../../outside.safetensors", "SYMLINK"])
def test_policy_library_refuses_files_outside_its_root(tmp_path, library, entry):
    import json

    from lightning_peft import PolicyLibrary

    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"not yours")
    if entry == "ABSOLUTE":
        entry = str(outside)
    elif entry == "SYMLINK":
        (library.root / "adapters" / "link.safetensors").symlink_to(outside)
        entry = "adapters/link.safetensors"
    index_path = library.root / "index.json"
    index = json.loads(index_path.read_text())
    index["tasks"]["CartPole-v1/long-pole"]["file"] = entry
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="outside the library") as error:
        PolicyLibrary(library.root)
    assert entry in str(error.value) and str(index_path) in str(error.value) and "CartPole-v1/long-pole" in str(error.value)
    assert outside.read_bytes() == b"not yours"


def test_policy_library_damaged_index_is_named(tmp_path, library):
    from lightning_peft import PolicyLibrary

    index_path = library.root / "index.json"
    index_path.write_text(index_path.read_text()[:40])
    with pytest.raises(ValueError, match="index .* is damaged") as error:
        PolicyLibrary(library.root)
    assert str(index_path) in str(error.value)


# ---------------------------------------------------------------------------------------------
# base checkpoints: read without unpickling
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("payload", ["os.system", "subprocess.run(shell=True)", "__setstate__"])
def test_load_base_state_dict_with_a_crafted_checkpoint_runs_nothing(tmp_path, payload):
    from lightning_peft.modules import load_base_state_dict

    marker = tmp_path / "ran"
    state = crafted_checkpoint(tmp_path / "base.ckpt", PAYLOADS[payload](marker))
    loaded = load_base_state_dict(str(tmp_path / "base.ckpt"))
    assert not marker.exists()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())


def _crafted_ppo_checkpoint(path: Path, marker: Path) -> dict[str, torch.Tensor]:
    from lightning_peft.modules.ppo import PPO

    torch.manual_seed(3)
    state = PPO("CartPole-v1", normalize_observations=False).state_dict()
    torch.save(
        {
            "state_dict": state,
            "hyper_parameters": {"task": "CartPole-v1", "normalize_observations": False, "activation": "tanh", "evil": OsSystem(marker)},
        },
        path,
    )
    return state


def test_ppo_base_checkpoint_reader_with_a_crafted_checkpoint_runs_nothing(tmp_path):
    from lightning_peft.modules.ppo import _read_policy_state

    marker = tmp_path / "ran"
    state = _crafted_ppo_checkpoint(tmp_path / "policy.ckpt", marker)
    loaded, task, hp = _read_policy_state(str(tmp_path / "policy.ckpt"))
    assert not marker.exists() and task == "CartPole-v1" and isinstance(hp["evil"], Unloaded)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_ppo_constructed_from_a_crafted_base_checkpoint_runs_nothing(tmp_path):
    from lightning_peft.modules.ppo import PPO

    marker = tmp_path / "ran"
    state = _crafted_ppo_checkpoint(tmp_path / "policy.ckpt", marker)
    policy = PPO("CartPole-v1", base_checkpoint=str(tmp_path / "policy.ckpt"), normalize_observations=False)
    assert not marker.exists()
    assert all(torch.equal(policy.state_dict()[k], v) for k, v in state.items())


def test_fsdp2_strategy_resume_never_unpickles_unless_asked(tmp_path):
    from lightning_peft import AdapterFSDP2Strategy

    marker = tmp_path / "ran"
    crafted_checkpoint(tmp_path / "resume.ckpt", OsSystem(marker))
    strategy = AdapterFSDP2Strategy()
    for weights_only in (None, True):
        with pytest.raises(pickle.UnpicklingError, match=r"weights_only=False.*--weights_only false") as error:
            strategy.load_checkpoint(tmp_path / "resume.ckpt", weights_only=weights_only)
        assert "resume.ckpt" in str(error.value)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# the best-weights export after fit reads a checkpoint that carries a payload
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("payload", ["os.system", "__setstate__"])
def test_best_export_after_fit_reads_a_crafted_checkpoint_without_running_it(tmp_path, payload):
    import sys

    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    from adapter_models import Classifier, lora_callback, make_loader

    marker = tmp_path / "ran"

    class CarriesPayload(Classifier):
        def on_save_checkpoint(self, checkpoint):
            checkpoint.setdefault("hyper_parameters", {})["evil"] = PAYLOADS[payload](marker)

    torch.manual_seed(0)
    model = CarriesPayload()
    callback = lora_callback(export_dir="adapter")  # export_weights="best"
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[callback, ModelCheckpoint(dirpath=tmp_path / "ckpt")],
    )
    trainer.fit(model, make_loader(n=16, batch_size=8))
    best = trainer.checkpoint_callback.best_model_path
    assert best and not marker.exists()
    assert (callback.export_path / "adapter_model.safetensors").is_file()
    with pytest.raises(pickle.UnpicklingError):  # the file really carries an object weights_only refuses
        torch.load(best, weights_only=True)
