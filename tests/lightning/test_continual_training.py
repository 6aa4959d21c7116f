"""ContinualAdapterCallback: a task sequence in one fit (optimizers rebuilt per task, the L0
gradient on the gate), the accuracy matrix consistent with the library's entries, the JSON, runs
cut short, a crashed run resumed from its checkpoint, bad input and resumes that do not fit the
library refused before anything is written, and the digits config from the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft import AdapterCallback, ContinualAdapterCallback, LiteLoRA, LoRA
from lightning_peft.adapters.litelora import litelora_gates
from lightning_peft.datamodules import ContinualDataModule

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
QUIET = ".*(val_dataloader|LeafSpec|does not have many workers|num_workers|GPU available|TPU available|HPU available|log_every_n_steps).*"


class Classifier(pl.LightningModule):
    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.num_classes = num_classes
        self.model = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, num_classes))
        self.optimizer_builds = 0

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def predict_step(self, batch, batch_idx):
        return self(batch[0]).argmax(-1)

    def configure_optimizers(self):
        self.optimizer_builds += 1
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=0.05)


class Task(pl.LightningDataModule):
    """Two Gaussian blobs along direction ``seed`` (labels 0/1, or ``labels`` given)."""

    def __init__(self, seed: int, n: int = 64, num_classes: int | None = None, label_offset: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        direction = torch.randn(6, generator=g)
        y = torch.arange(n) % 2
        x = torch.randn(n, 6, generator=g) + 2.0 * (2 * y[:, None] - 1) * direction
        self.data = TensorDataset(x, y + label_offset)
        if num_classes is not None:
            self.num_classes = num_classes

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))

    def val_dataloader(self):
        return DataLoader(self.data, batch_size=32)

    test_dataloader = val_dataloader


def trainer(tmp_path, callbacks, **kw) -> pl.Trainer:
    kw.setdefault("max_epochs", 1)
    return pl.Trainer(
        default_root_dir=tmp_path, callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, **kw,
    )  # fmt: skip


def spec(**kw) -> LiteLoRA:
    return LiteLoRA(rank=2, alpha=4.0, target_modules=["0", "2"], **{"l0_weight": 0.01, **kw})


@pytest.mark.filterwarnings(f"ignore:{QUIET}")
def test_a_sequence_trains_into_the_library_and_the_matrix_matches_its_entries(tmp_path):
    callback = ContinualAdapterCallback(spec(), library_dir="lib")
    module = Classifier()
    data = ContinualDataModule([Task(1), Task(2), Task(3)], epochs_per_task=2, task_names=["a", "b", "c"])
    trainer(tmp_path, [callback]).fit(module, datamodule=data)
    assert module.optimizer_builds == 3  # one optimizer per task's parameters
    assert [d.task for d in callback.decisions] == ["a", "b", "c"] and callback.decisions[0].recruited
    assert [len(row) for row in callback.accuracy] == [1, 2, 3]
    library = callback.library
    assert {"a", "b", "c", "a_adapter"} <= set(library.names)
    # row t of the matrix is what each task's library entry scores now (entries never change)
    for j, name in enumerate(["a", "b", "c"]):
        library.activate(name)
        x, y = data.tasks[j].data.tensors
        with torch.no_grad():
            assert (module(x).argmax(-1) == y).float().mean().item() == pytest.approx(callback.accuracy[-1][j])
        library.deactivate()
    assert min(callback.accuracy[-1]) > 0.8  # separable blobs: every task learnt
    results = json.loads((tmp_path / "continual.json").read_text())
    assert results["tasks"] == ["a", "b", "c"] and results["accuracy"] == callback.accuracy
    assert results["metrics"]["average_accuracy"] == pytest.approx(sum(callback.accuracy[-1]) / 3)
    assert results["adapters_kept"] + results["adapters_avoided"] == 3
    assert results["bytes_added"] == sum(d["bytes"] for d in results["decisions"])
    for d in results["decisions"]:
        assert set(d) >= {"recruited", "gate", "coefficients", "bytes"}
    assert results["decisions"][1]["bank"] == ["a_adapter"]
    assert results["principal_angles"] is None or results["principal_angles"]["summary"]["pairs"] >= 1
    assert not any("LiteLoRA" in type(m).__name__ for m in module.modules())  # the plain base is left


class Watch(pl.Callback):
    """The (global) gate's log_alpha after the last training batch."""

    log_alpha: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        gates = litelora_gates(pl_module.model)
        if gates:
            self.log_alpha = float(next(iter(gates.values())).log_alpha.detach())


@pytest.mark.filterwarnings(f"ignore:{QUIET}")
def test_the_l0_gradient_reaches_the_gate_once_per_step(tmp_path):
    """Two seeded runs that differ only in l0_weight: the penalty's gradient pushes the second
    task's gate (log_alpha) shut."""
    logs = {}
    for weight in (0.0, 1.0):
        callback = ContinualAdapterCallback(spec(l0_weight=weight, log_alpha_init=0.0), library_dir=f"lib{weight}")
        watch = Watch()

        data = ContinualDataModule([Task(1), Task(2)], epochs_per_task=1)
        trainer(tmp_path / str(weight), [callback, watch], limit_train_batches=2).fit(Classifier(), datamodule=data)
        logs[weight] = watch.log_alpha
    assert logs[1.0] < logs[0.0] - 0.01  # the penalty pushed the gate shut


@pytest.mark.filterwarnings(f"ignore:{QUIET}")
def test_gate_lr_gives_the_gates_their_own_group_and_a_strong_penalty_reuses(tmp_path):
    callback = ContinualAdapterCallback(spec(l0_weight=1.0, log_alpha_init=0.0), gate_lr=0.5)

    class Groups(pl.Callback):
        def __init__(self):
            self.groups = []

        def on_train_epoch_end(self, trainer, pl_module):
            gates = {id(g.log_alpha) for g in litelora_gates(pl_module.model).values()}
            self.groups.append([(g["lr"], {id(p) for p in g["params"]} & gates) for g in trainer.optimizers[0].param_groups])

    groups = Groups()
    data = ContinualDataModule([Task(1), Task(2)], epochs_per_task=2)
    trainer(tmp_path, [callback, groups], limit_train_batches=4).fit(Classifier(), datamodule=data)
    last = groups.groups[-1]  # the second task: its gate alone in the last group, at gate_lr
    assert last[-1][0] == 0.5 and len(last[-1][1]) == 1 and all(not ids for _, ids in last[:-1])
    first, second = callback.decisions
    assert first.recruited and not second.recruited and second.gate < 0.1 and second.adapter is None
    assert callback.results["adapters_avoided"] == 1 and set(callback.library.names) == {"task0", "task0_adapter", "task1"}


@pytest.mark.filterwarnings(f"ignore:{QUIET}")
def test_a_run_cut_short_ends_the_task_in_progress(tmp_path):
    callback = ContinualAdapterCallback(spec())
    data = ContinualDataModule([Task(1), Task(2), Task(3)], epochs_per_task=2)
    trainer(tmp_path, [callback], max_steps=3).fit(Classifier(), datamodule=data)
    assert [d.task for d in callback.decisions] == ["task0"] and callback.accuracy and len(callback.accuracy) == 1
    assert json.loads((tmp_path / "continual.json").read_text())["tasks"] == ["task0"]


@pytest.mark.filterwarnings(f"ignore:{QUIET}")
@pytest.mark.parametrize(
    "case, error, match",
    [
        ("labels", ValueError, r"need more outputs than the model's head has \(2\)"),
        ("declared", ValueError, r"'task1': 3"),
        ("bank", ValueError, r"bank names entries \['missing'\] but there is no library"),
        ("datamodule", TypeError, "needs a ContinualDataModule"),
        ("adapter_callback", ValueError, "remove AdapterCallback"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(tmp_path, case, error, match):
    tasks = [Task(1), Task(2, label_offset=1 if case == "labels" else 0, num_classes=3 if case == "declared" else None)]
    data = ContinualDataModule(tasks) if case != "datamodule" else tasks[0]
    callbacks = [ContinualAdapterCallback(spec(), bank=["missing"] if case == "bank" else None)]
    if case == "adapter_callback":
        callbacks.append(AdapterCallback(LoRA(rank=2)))
    module = Classifier()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(error, match=match):
        trainer(tmp_path, callbacks).fit(module, datamodule=data)
    assert not (tmp_path / "continual.json").exists() and not (tmp_path / "library").exists()
    assert not any("LiteLoRA" in type(m).__name__ for m in module.modules())
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_datamodule_and_callback_arguments_are_checked():
    with pytest.raises(ValueError, match="tasks is empty"):
        ContinualDataModule([])
    with pytest.raises(ValueError, match="one name per task"):
        ContinualDataModule([Task(1)], task_names=["a", "b"])
    with pytest.raises(ValueError, match="distinct"):
        ContinualDataModule([Task(1), Task(2)], task_names=["a", "a"])
    with pytest.raises(TypeError, match="LightningDataModules"):
        ContinualDataModule([object()])
    with pytest.raises(TypeError, match="LiteLoRA spec"):
        ContinualAdapterCallback(LoRA())
    with pytest.raises(ValueError, match="eval_split"):
        ContinualAdapterCallback(spec(), eval_split="train")
    with pytest.raises(ValueError, match="gate_lr"):
        ContinualAdapterCallback(spec(), gate_lr=0.0)
    with pytest.raises(ValueError, match="file name"):
        ContinualAdapterCallback(spec(), results_file="../x.json")


@pytest.mark.filterwarnings(f"ignore:{QUIET}")
def test_digits_config_runs_two_tasks_from_the_cli(tmp_path, monkeypatch):
    from lightning_peft.cli import cli_main
    from lightning_peft.library import AdapterLibrary

    monkeypatch.setattr("sys.argv", ["lightning-peft"])
    monkeypatch.chdir(tmp_path)
    fast = ["--trainer.max_steps=4", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]
    fast.append("--data.init_args.epochs_per_task=1")  # 2 steps per task: two tasks, one switch
    quiet = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    cli = cli_main(["fit", "--config", str(CONFIGS / "continual_digits.yaml"), *fast, *quiet])
    assert cli.trainer.global_step == 4
    log_dir = Path(cli.trainer.log_dir)
    assert log_dir.resolve().is_relative_to(tmp_path.resolve())
    results = json.loads((log_dir / "continual.json").read_text())
    assert results["tasks"] == ["digits_0_1", "digits_2_3"] and [len(r) for r in results["accuracy"]] == [1, 2]
    assert results["decisions"][0]["recruited"] and results["decisions"][1]["bank"] == ["digits_0_1_adapter"]
    library = AdapterLibrary(log_dir / "library")  # on disk, readable without the base
    assert {"digits_0_1", "digits_2_3", "digits_0_1_adapter"} <= set(library.names)
    assert cli.test_results is None  # the callback evaluates every task itself; the datamodule has no test split


class Crash(pl.Callback):
    """Stops the process's fit at the start of ``epoch`` as a crash would: no ``on_train_end``."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


def checkpointed(tmp_path, callbacks, **kw) -> pl.Trainer:
    from lightning.pytorch.callbacks import ModelCheckpoint

    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True, filename="{epoch}")
    return pl.Trainer(
        default_root_dir=tmp_path, callbacks=[*callbacks, saver], logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, max_epochs=1, **kw,
    )  # fmt: skip


def crashed_run(tmp_path, epoch: int = 3) -> tuple[ContinualDataModule, Path]:
    """Three tasks x 2 epochs into ``tmp_path/lib``, crashed at the start of ``epoch``; the data and
    the library's directory."""
    data = ContinualDataModule([Task(1), Task(2), Task(3)], epochs_per_task=2, task_names=["a", "b", "c"])
    library = tmp_path / "lib"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run = checkpointed(tmp_path, [ContinualAdapterCallback(spec(), library_dir=str(library)), Crash(epoch)])
        run.fit(Classifier(), datamodule=data)
    return data, library


@pytest.mark.filterwarnings(f"ignore:{QUIET}")
@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # the resumed run checkpoints elsewhere
def test_a_crashed_sequence_resumes_from_its_checkpoint(tmp_path):
    from lightning_peft.library import AdapterLibrary

    data, library = crashed_run(tmp_path)  # task a done, task b one epoch in (epochs 0-2 checkpointed)
    assert set(AdapterLibrary(library).names) == {"a", "a_adapter"}
    entry = {p.name: p.read_bytes() for p in (library).rglob("*") if p.is_file() and "a_adapter" in str(p)}
    saved = torch.load(tmp_path / "ckpt" / "epoch=2.ckpt", weights_only=True)
    callback = ContinualAdapterCallback(spec(), library_dir=str(library))
    module = Classifier()
    resumed = checkpointed(tmp_path / "resumed", [callback])
    resumed.fit(module, datamodule=data, ckpt_path=tmp_path / "ckpt" / "epoch=2.ckpt")
    assert resumed.current_epoch == 6 and [d.task for d in callback.decisions] == ["a", "b", "c"]
    assert callback.decisions[1].bank == ["a_adapter"]  # task b began again with the bank it had
    assert callback.decisions[0].to_dict() == saved["callbacks"][callback.state_key]["decisions"][0]  # a kept, not retrained
    assert [len(row) for row in callback.accuracy] == [1, 2, 3] and min(callback.accuracy[-1]) > 0.8
    assert {p.name: p.read_bytes() for p in library.rglob("*") if p.is_file() and "a_adapter" in str(p)} == entry
    assert {"a", "b", "c", "a_adapter"} <= set(callback.library.names)
    assert json.loads((tmp_path / "resumed" / "continual.json").read_text())["tasks"] == ["a", "b", "c"]
    assert not any("LiteLoRA" in type(m).__name__ for m in module.modules())
    assert "on_load_checkpoint" not in module.__dict__ and "configure_optimizers" not in module.__dict__  # hooks handed back


@pytest.mark.filterwarnings(f"ignore:{QUIET}")
@pytest.mark.parametrize(
    "case, match",
    [
        ("no_resume", r"already has entries \['a', 'a_adapter'\].*or resume the run that wrote them"),
        ("other_tasks", r"task sequence \['a', 'b', 'c'\], this run's is \['a', 'b', 'x'\]"),
        ("other_library", r"entries \['a', 'a_adapter'\] are not in the library"),
        ("unfinished_entry", r"has entries \['b'\] of tasks the checkpoint has not finished"),
    ],
)
def test_a_resume_that_does_not_fit_the_library_is_refused_before_anything_changes(tmp_path, case, match):
    from lightning_peft.library import AdapterLibrary

    data, library = crashed_run(tmp_path)
    names = ["a", "b", "x"] if case == "other_tasks" else ["a", "b", "c"]
    data = ContinualDataModule(data.tasks, epochs_per_task=2, task_names=names)
    if case == "unfinished_entry":  # as a run cut short in task b would have left it
        AdapterLibrary(library, base=Classifier().model).add_combination("b", {"a_adapter": 1.0})
    before = sorted(p.relative_to(library) for p in library.rglob("*"))
    target = tmp_path / "elsewhere" if case == "other_library" else library
    module = Classifier()
    weights = {k: v.clone() for k, v in module.state_dict().items()}
    ckpt = None if case == "no_resume" else tmp_path / "ckpt" / "epoch=2.ckpt"
    with pytest.raises(ValueError, match=match):
        run = checkpointed(tmp_path / "again", [ContinualAdapterCallback(spec(), library_dir=str(target))])
        run.fit(module, datamodule=data, ckpt_path=ckpt)
    assert sorted(p.relative_to(library) for p in library.rglob("*")) == before  # the library is untouched
    assert not (tmp_path / "again" / "continual.json").exists()
    assert not any("LiteLoRA" in type(m).__name__ for m in module.modules())  # the plain base is back, as it was
    assert "on_load_checkpoint" not in module.__dict__ and "configure_optimizers" not in module.__dict__
    assert all(torch.equal(v, weights[k]) for k, v in module.state_dict().items()) and module.state_dict().keys() == weights.keys()
