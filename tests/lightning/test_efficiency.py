"""EfficiencyCallback in a real Trainer (CPU): phases, results, JSON, logs, labels, the CUDA
path with faked NVML and allocator, DDP energy reduction, bad arguments, and the study config."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft import EfficiencyCallback
from lightning_peft.memory.meters import current_meter
from lightning_peft.metrics import ConstantPowerSource, TdpEstimateSource, ns_e, ns_m, ns_sharp
from lightning_peft.metrics.memory import MIB, CudaMemoryProbe
from lightning_peft.metrics.nvml import NvmlEnergySource
from lightning_peft.metrics.summary import RESULT_KEYS

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from fake_devices import FakeCuda, FakeNvml, StepClock  # noqa: E402
from two_ranks import run_two_ranks  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
IN, OUT = 6, 3


class Tiny(pl.LightningModule):
    """``x [B, 6] -> logits [B, 3]``; logs ``test_acc`` (a fraction) like our modules."""

    def __init__(self, fail_at_step: int | None = None) -> None:
        super().__init__()
        self.net = nn.Linear(IN, OUT)
        self.fail_at_step = fail_at_step
        self.correct = self.seen = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if self.fail_at_step is not None and self.global_step == self.fail_at_step:
            raise RuntimeError("boom")
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def test_step(self, batch, batch_idx):
        x, y = batch
        acc = (self(x).argmax(-1) == y).float().mean()
        self.log("test_acc", acc, on_epoch=True, batch_size=len(y))

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean(), on_epoch=True, batch_size=len(y))

    def predict_step(self, batch, batch_idx):
        return self(batch[0]).argmax(-1)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.1)


def loader(n: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, IN, generator=g)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)


def trainer(tmp_path: Path, callback: EfficiencyCallback, **kwargs) -> pl.Trainer:
    pl.seed_everything(0)
    return pl.Trainer(
        default_root_dir=tmp_path,
        logger=CSVLogger(tmp_path, name="logs"),
        callbacks=[callback],
        max_steps=3,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        **kwargs,
    )


def test_fit_then_test(tmp_path, capsys):
    callback = EfficiencyCallback(energy_source=ConstantPowerSource(50.0, clock=StepClock(2.0)))
    t = trainer(tmp_path, callback)
    model = Tiny()
    t.fit(model, loader())
    fit_only = dict(callback.results)
    assert fit_only["fit_seconds"] == 2.0 and fit_only["fit_energy_joules"] == 100.0 and fit_only["fit_avg_watts"] == 50.0
    assert fit_only["infer_seconds"] is None and fit_only["ns_e"] is None and "no inference phase measured" in fit_only["notes"]
    (test,) = t.test(model, loader())
    r = callback.results
    assert set(RESULT_KEYS) <= set(r)
    assert r["accuracy"] == pytest.approx(100 * test["test_acc"])
    assert r["infer_seconds"] == 2.0 and r["infer_energy_joules"] == 100.0 and r["infer_avg_watts"] == 50.0
    assert r["infer_samples"] == 32 and r["fit_samples"] == 24 and r["infer_stage"] == "test"
    assert r["params"] == IN * OUT + OUT and r["trainable_params"] == IN * OUT + OUT
    assert r["macs_per_sample"] == IN * OUT
    assert r["energy_source"] == "constant" and not r["energy_estimated"]
    assert r["peak_memory_source"] == "cpu-estimate" and r["memory_estimated"]
    fit_parts = r["fit_memory_breakdown_bytes"]
    assert fit_parts["parameters"] == 4 * (IN * OUT + OUT) == fit_parts["gradients"] and fit_parts["activations"] > 0
    assert fit_parts["optimizer_state"] >= 2 * fit_parts["parameters"]  # Adam's two moments
    assert r["fit_peak_memory_mib"] == pytest.approx(sum(fit_parts.values()) / MIB)
    infer_parts = r["infer_memory_breakdown_bytes"]  # one forward of an 8-sample batch, after the timed loop
    assert infer_parts["activations"] >= 4 * 8 * OUT and "gradients" not in infer_parts
    assert r["ns_e"] == pytest.approx(ns_e(r["accuracy"], 2.0, 50.0))
    assert r["ns_m"] == pytest.approx(ns_m(r["accuracy"], r["infer_peak_memory_mib"]))
    assert r["ns_sharp"] == pytest.approx(ns_sharp(r["accuracy"], r["infer_peak_memory_mib"], 2.0, 50.0))
    # the JSON under the run directory holds the same numbers
    saved = json.loads((Path(t.log_dir) / "efficiency.json").read_text())
    assert saved["ns_sharp"] == pytest.approx(r["ns_sharp"]) and saved["notes"] == r["notes"]
    # the logger got them; memory figures from the CPU estimate say so in their names
    t.logger.save()
    header = (Path(t.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "efficiency/ns_e" in header and "efficiency/ns_m_estimated" in header and "efficiency/ns_m" not in header
    out = capsys.readouterr().out
    assert "NS-M (estimate)" in out and "energy source" in out
    assert current_meter() is None


def test_estimated_energy_labelled_in_logs_and_table(tmp_path, capsys):
    callback = EfficiencyCallback(energy_source=TdpEstimateSource(65.0, clock=StepClock()), measure_memory=False)
    t = trainer(tmp_path, callback)
    model = Tiny()
    t.fit(model, loader())
    t.test(model, loader())
    r = callback.results
    assert r["energy_estimated"] and r["energy_source"] == "tdp-estimate" and r["infer_avg_watts"] == 65.0
    assert r["infer_peak_memory_mib"] is None and r["ns_m"] is None and r["ns_e"] is not None
    t.logger.save()
    header = (Path(t.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "efficiency/ns_e_estimated" in header and "efficiency/fit_energy_joules_estimated" in header
    assert "efficiency/ns_e" not in header
    assert "NS-E (estimate)" in capsys.readouterr().out


def test_predict_phase_and_output_dir(tmp_path):
    callback = EfficiencyCallback(energy="none", output_dir=str(tmp_path / "eff"), filename="cell.json", verbose=False)
    t = trainer(tmp_path, callback)
    t.predict(Tiny(), loader(16))
    r = callback.results
    assert r["infer_stage"] == "predict" and r["infer_samples"] == 16 and r["infer_energy_joules"] is None
    assert r["energy_source"] == "unavailable" and r["accuracy"] is None and r["netscore"] is None
    assert any("energy measurement switched off" in n for n in r["notes"])
    assert json.loads((tmp_path / "eff" / "cell.json").read_text())["infer_stage"] == "predict"


def test_validation_inside_fit_is_training_standalone_is_inference(tmp_path):
    callback = EfficiencyCallback(energy_source=ConstantPowerSource(5.0, clock=StepClock()), accuracy_key="val_acc", verbose=False)
    t = trainer(tmp_path, callback, val_check_interval=2)
    model = Tiny()
    t.fit(model, loader(), loader(16))
    assert callback.results["infer_stage"] is None and callback.results["fit_seconds"] == 1.0
    t.validate(model, loader(16))
    r = callback.results
    assert r["infer_stage"] == "validate" and r["infer_samples"] == 16
    assert r["accuracy"] == pytest.approx(100 * t.callback_metrics["val_acc"].item())


def test_example_input_from_a_dict_batch():
    from lightning_peft.callbacks.efficiency import _example_input

    class Text(pl.LightningModule):
        def forward(self, input_ids, attention_mask=None):
            return input_ids

    batch = {"input_ids": torch.ones(4, 7, dtype=torch.long), "attention_mask": torch.ones(4, 7), "labels": torch.zeros(4)}
    example = _example_input(Text(), batch)
    assert set(example) == {"input_ids", "attention_mask"} and example["input_ids"].shape == (1, 7)
    module = Tiny()
    module.example_input_array = torch.zeros(2, IN)
    assert _example_input(module, (torch.ones(8, IN), torch.zeros(8))).shape == (2, IN)


def test_cuda_path_with_fake_nvml_and_allocator(tmp_path):
    nvml = FakeNvml(energy_mj=[0, 0, 30_000, 30_000, 36_000])  # probe, fit start/stop, test start/stop
    source = NvmlEnergySource("cuda:0", nvml=nvml, clock=StepClock(3.0))
    cuda = FakeCuda(peak_bytes=512 * MIB)
    callback = EfficiencyCallback(energy_source=source, memory_probe=CudaMemoryProbe("cuda:0", cuda=cuda), verbose=False)
    t = trainer(tmp_path, callback)
    model = Tiny()
    t.fit(model, loader())
    t.test(model, loader())
    r = callback.results
    assert r["energy_source"] == "nvml-counter" and not r["energy_estimated"]
    assert r["fit_energy_joules"] == pytest.approx(30.0) and r["fit_avg_watts"] == pytest.approx(10.0)
    assert r["infer_energy_joules"] == pytest.approx(6.0) and r["infer_avg_watts"] == pytest.approx(2.0)
    assert r["peak_memory_source"] == "cuda-allocator" and not r["memory_estimated"]
    assert r["fit_peak_memory_mib"] == r["infer_peak_memory_mib"] == 512.0 and len(cuda.resets) == 2
    assert r["ns_sharp"] == pytest.approx(ns_sharp(r["accuracy"], 512.0, 3.0, 2.0))
    assert nvml.shutdowns == 0  # an injected source is the caller's to close


def test_exception_leaves_nothing_running(tmp_path):
    source = ConstantPowerSource(10.0)
    callback = EfficiencyCallback(energy_source=source, verbose=False)
    t = trainer(tmp_path, callback)
    with pytest.raises(RuntimeError, match="boom"):
        t.fit(Tiny(fail_at_step=1), loader())
    assert current_meter() is None and not source.running


def test_explicit_reader_that_cannot_read_fails_before_training(tmp_path):
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = trainer(tmp_path, EfficiencyCallback(energy="nvml"))
    with pytest.raises(RuntimeError, match="energy='nvml' cannot read on cpu"):
        t.fit(model, loader())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_source_chosen_for_the_strategy_device(monkeypatch):
    """At setup the module is still on the CPU; the reader must be the one of the run's device."""
    from lightning_peft.metrics import nvml

    monkeypatch.setattr(nvml, "nvml_unavailable_reason", lambda device, nvml=None: f"fake: no NVML for {device}")
    callback = EfficiencyCallback()
    fake = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda:0")))
    callback.setup(fake, Tiny(), "fit")
    assert "NVML: fake: no NVML for cuda:0" in callback._source.reason


@pytest.mark.slow
def test_ddp_two_processes(tmp_path):
    """2 CPU ranks (gloo): energy summed over ranks, every rank has results, only rank 0 writes."""
    run_two_ranks("ddp_efficiency.py", tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["world_size"] == 2 and r["fit_seconds"] == 1.0
        assert r["fit_energy_joules"] == pytest.approx(20.0) and r["fit_avg_watts"] == pytest.approx(20.0)
        assert r["infer_energy_joules"] == pytest.approx(20.0) and r["ns_e"] == pytest.approx(ns_e(r["accuracy"], 1.0, 20.0))
    assert ranks[0]["accuracy"] == ranks[1]["accuracy"]  # synced over ranks
    assert (tmp_path / "eff0" / "efficiency.json").is_file() and not (tmp_path / "eff1").exists()


def test_ddp_energy_summed_over_ranks():
    """Device-scope energy adds up over ranks; host-scope (RAPL) is one machine's reading."""
    from lightning_peft.metrics.energy import EnergyReading

    callback = EfficiencyCallback(energy_source=ConstantPowerSource(10.0))
    strategy = SimpleNamespace(root_device=torch.device("cpu"), reduce=lambda t, reduce_op: t * 2)
    fake = SimpleNamespace(world_size=2, strategy=strategy)
    reading = EnergyReading(4.0, 40.0, 10.0, "constant", False, "constant power 10 W")
    summed = callback._reduce_energy(fake, reading)
    assert summed.joules == 80.0 and summed.watts == 20.0 and "summed over 2 ranks" in summed.note
    missing = callback._reduce_energy(fake, EnergyReading(4.0, None, None, "constant", False))
    assert missing.joules is None and "rank(s) had no energy reading" in missing.note
    callback._source.scope = "host"
    assert callback._reduce_energy(fake, reading) is reading


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"energy": "gpu"}, ValueError, "energy must be one of"),
        ({"energy": "tdp"}, ValueError, "energy='tdp' needs tdp_watts"),
        ({"tdp_watts": -3}, ValueError, "tdp_watts must be"),
        ({"accuracy_unit": "ratio"}, ValueError, "accuracy_unit must be one of"),
        ({"filename": "a/b.json"}, ValueError, "plain file name"),
        ({"energy_source": "constant"}, TypeError, "energy_source must be a EnergySource"),
        ({"memory_probe": 3}, TypeError, "memory_probe must be a MemoryProbe"),
        ({"inference_stages": ["train"]}, ValueError, "inference_stages must be one of"),
        ({"measure_memory": "yes"}, TypeError, "measure_memory must be True or False"),
    ],
)
def test_bad_arguments_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        EfficiencyCallback(**kwargs)


def test_accuracy_outside_range_is_noted_not_used(tmp_path):
    callback = EfficiencyCallback(energy="none", accuracy_unit="percent", verbose=False)  # test_acc is a fraction
    t = trainer(tmp_path, callback)
    model = Tiny()
    with torch.no_grad():  # a model that gets everything wrong: accuracy 0
        model.net.weight.zero_()
        model.net.bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
    t.test(model, loader())
    r = callback.results
    assert r["accuracy"] is None and any("outside (0, 100]" in n for n in r["notes"])


def test_study_config_runs_a_few_steps(tmp_path, monkeypatch, capsys):
    from lightning_peft.cli import cli_main

    monkeypatch.setattr("sys.argv", ["lightning-peft"])
    monkeypatch.chdir(tmp_path)
    fast = ["--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=2"]
    fast += ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    cli = cli_main(["fit", "--config", str(CONFIGS / "vit_digits_efficiency.yaml"), *fast])
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, EfficiencyCallback)]
    saved = json.loads((Path(cli.trainer.log_dir) / "efficiency.json").read_text())
    assert Path(cli.trainer.log_dir).resolve().is_relative_to(tmp_path.resolve())
    assert set(RESULT_KEYS) <= set(saved) and saved["infer_stage"] == "test" and saved["fit_samples"] == 2 * 64
    assert saved["accuracy"] == pytest.approx(100 * cli.test_results[0]["test_acc"])
    assert saved["netscore"] is not None and saved["macs_per_sample"] > 0 and saved["ns_m"] is not None
    assert 0 < saved["trainable_params"] < saved["params"]  # LoRA: only the adapter and the head train
    if saved["energy_source"] == "unavailable":  # this machine: no RAPL, no GPU
        assert saved["fit_energy_joules"] is None and saved["ns_e"] is None and saved["ns_sharp"] is None
    assert callback.results["ns_m"] == pytest.approx(saved["ns_m"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("test_acc: ")
