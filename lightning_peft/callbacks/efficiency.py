"""EfficiencyCallback: time, energy, peak memory, MACs and the NetScore family of a run.

Phases measured:

* training (``on_train_start`` .. ``on_train_end``, validation epochs inside it included):
  wall time, energy and average power, peak memory;
* inference (a ``test``, ``predict`` or stand-alone ``validate`` run, ``on_<stage>_start`` ..
  ``on_<stage>_end``): total time over the set, energy and average power, peak memory, samples.

At the end of each phase it reads the accuracy (``trainer.callback_metrics[accuracy_key]``),
counts parameters (total and trainable) and the MACs of one sample's forward
(``metrics.count_macs`` on the first sample of the first batch, or on the module's
``example_input_array``), and computes the NetScore family with ``metrics.summarize``: NS-E,
NS-M and NS# use the inference phase (the paper's ``t``, ``P``, ``r``). It prints a table,
logs the numbers through the trainer's loggers (``efficiency/<key>``; figures from an
estimated power or memory get an ``_estimated`` suffix), writes ``efficiency.json`` (atomic)
into ``output_dir`` (default: the trainer's ``log_dir``), and keeps the flat dict in
``callback.results``. Missing inputs give ``None`` with the reason in ``results["notes"]``.

Energy comes from ``metrics.select_energy_source(energy, device, tdp_watts)`` or an injected
``energy_source``; memory from ``metrics.memory_probe_for(device)`` (CUDA allocator peak, or the
labelled CPU estimate) or an injected ``memory_probe``. Under DDP every rank measures; time and
memory are rank 0's, device-scope energy (NVML, TDP, constant) is summed over ranks, host-scope
energy (RAPL) is rank 0's reading, and only rank 0 prints, logs and writes.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_peft.io import atomic_write_file
from lightning_peft.memory.meters import tensor_leaves
from lightning_peft.metrics.energy import ENERGY_KINDS, EnergyKind, EnergyReading, EnergySource, select_energy_source
from lightning_peft.metrics.macs import count_macs
from lightning_peft.metrics.memory import CpuMemoryProbe, MemoryProbe, memory_probe_for
from lightning_peft.metrics.summary import PhaseMeasure, format_table, summarize
from lightning_peft.validation import InvalidArgumentTypeError, check_bool, check_choice, check_float, check_str

InferenceStage = Literal["test", "predict", "validate"]
ENERGY_KEYS = ("fit_energy_joules", "fit_avg_watts", "infer_energy_joules", "infer_avg_watts", "ns_e", "ns_sharp")
MAX_SHAPES = 8  # distinct inference batch shapes whose memory is measured (text: lengths vary)
MEMORY_KEYS = ("fit_peak_memory_mib", "infer_peak_memory_mib", "ns_m", "ns_sharp")


class EfficiencyCallback(Callback):
    """Measures a run's efficiency (see the module doc).

    Args:
        energy: which energy reader: ``"auto"`` (NVML on CUDA, RAPL on CPU, else the TDP
            estimate when ``tdp_watts`` is given, else unavailable), ``"nvml"``, ``"rapl"``,
            ``"tdp"`` (an estimate from ``tdp_watts``) or ``"none"``.
        tdp_watts: the device's stated power for a labelled estimate.
        energy_source: an ``EnergySource`` to use instead (tests, plain Python).
        accuracy_key: the logged metric that is the accuracy (our modules log ``test_acc``).
        accuracy_unit: ``"fraction"`` (torchmetrics' 0..1, multiplied by 100) or ``"percent"``.
        output_dir: where ``efficiency.json`` goes (``None``: the trainer's ``log_dir``).
        filename: the JSON file's name.
        measure_memory: measure peak memory (on CPU the saved-tensor meter runs on the first
            training step of each batch shape, and inference memory is measured by one extra
            forward per batch shape after the timed loop).
        memory_every_step: on CPU, meter every training step (models whose activation bytes
            depend on the data, e.g. MoE routing), at a small cost in measured time.
        memory_probe: a ``MemoryProbe`` to use instead of the device's (tests).
        inference_stages: which evaluation runs count as the inference phase.
        verbose: print the table at the end of each phase (rank 0).
    """

    def __init__(
        self,
        energy: EnergyKind = "auto",
        tdp_watts: float | None = None,
        energy_source: EnergySource | None = None,
        accuracy_key: str = "test_acc",
        accuracy_unit: Literal["fraction", "percent"] = "fraction",
        output_dir: str | None = None,
        filename: str = "efficiency.json",
        measure_memory: bool = True,
        memory_every_step: bool = False,
        memory_probe: MemoryProbe | None = None,
        inference_stages: list[InferenceStage] | None = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        check_choice("energy", energy, ENERGY_KINDS)
        check_float("tdp_watts", tdp_watts, low=0.0, low_open=True, allow_none=True)
        if energy == "tdp" and tdp_watts is None:
            raise ValueError("energy='tdp' needs tdp_watts (the device's stated power in W), e.g. tdp_watts: 65")
        for name, value, kind in (("energy_source", energy_source, EnergySource), ("memory_probe", memory_probe, MemoryProbe)):
            if value is not None and not isinstance(value, kind):
                raise InvalidArgumentTypeError(name, f"{name} must be a {kind.__name__} or None, got {type(value).__name__}")
        check_str("accuracy_key", accuracy_key)
        check_choice("accuracy_unit", accuracy_unit, ("fraction", "percent"))
        check_str("output_dir", output_dir, allow_none=True)
        check_str("filename", filename)
        if Path(filename).name != filename:
            raise ValueError(f"filename must be a plain file name (no directories), got {filename!r}; use output_dir for the folder")
        check_bool("measure_memory", measure_memory)
        check_bool("memory_every_step", memory_every_step)
        self.memory_every_step = memory_every_step
        stages = list(inference_stages) if inference_stages is not None else ["test", "predict", "validate"]
        for stage in stages:
            check_choice("inference_stages", stage, ("test", "predict", "validate"))
        check_bool("verbose", verbose)
        self.energy, self.tdp_watts, self.accuracy_key, self.accuracy_unit = energy, tdp_watts, accuracy_key, accuracy_unit
        self.output_dir, self.filename, self.measure_memory, self.verbose = output_dir, filename, measure_memory, verbose
        self.inference_stages = stages
        self._given_source, self._given_probe = energy_source, memory_probe
        self._source: EnergySource | None = energy_source
        self._probe: MemoryProbe | None = None
        self._stage: str | None = None
        self._samples = 0
        self._example: Any = None
        self._forward_inputs: dict[tuple, Any] = {}
        self._fit: PhaseMeasure | None = None
        self._infer: PhaseMeasure | None = None
        self._accuracy: float | None = None
        self._macs: float | None = None
        self._notes: list[str] = []
        self.results: dict[str, Any] = {}

    # -- phases ----------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # fail at setup, before training, if an explicit reader cannot read; the module is not
        # on its device yet at setup, the strategy's root device says where it will run
        if self._source is None:
            self._source = select_energy_source(self.energy, trainer.strategy.root_device, self.tdp_watts)

    def _begin(self, stage: str, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._source is None:
            self._source = select_energy_source(self.energy, trainer.strategy.root_device, self.tdp_watts)
        self._stage, self._samples, self._forward_inputs = stage, 0, {}
        self._probe = None
        if self.measure_memory:
            self._probe = self._given_probe
            if self._probe is None:
                device = trainer.strategy.root_device
                self._probe = CpuMemoryProbe(self.memory_every_step) if device.type != "cuda" else memory_probe_for(device)
            self._probe.begin_phase(pl_module, training=stage == "fit")
        _synchronize(pl_module.device)
        self._source.start()

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stage, self._stage = self._stage, None
        if stage is None or self._source is None:
            return
        _synchronize(pl_module.device)
        reading = self._reduce_energy(trainer, self._source.stop())
        memory = None
        if self._probe is not None:
            optimizers = trainer.optimizers if stage == "fit" else ()
            memory = self._probe.end_phase(pl_module, optimizers, list(self._forward_inputs.values()))
        self._forward_inputs = {}
        phase = PhaseMeasure(reading, memory, stage, self._samples)
        if stage == "fit":
            self._fit = phase
        else:
            self._infer = phase
        self._read_accuracy(trainer)
        self._count_macs(pl_module)
        self._report(trainer, pl_module)

    def _in_phase(self, stage: str) -> bool:
        return self._stage == stage

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._begin("fit", trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer, pl_module)

    def _inference_start(self, stage: str, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if stage in self.inference_stages and not trainer.sanity_checking:
            self._begin(stage, trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._inference_start("test", trainer, pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._inference_start("predict", trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":  # validation inside fit belongs to the training phase
            self._inference_start("validate", trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._in_phase("test"):
            self._finish(trainer, pl_module)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._in_phase("predict"):
            self._finish(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._in_phase("validate"):
            self._finish(trainer, pl_module)

    # -- steps -----------------------------------------------------------------------------
    def _step_start(self, stage: str, pl_module: pl.LightningModule, batch: Any) -> None:
        if not self._in_phase(stage):
            return
        leaves = tensor_leaves(batch)
        self._samples += int(leaves[0].shape[0]) if leaves and leaves[0].dim() > 0 else 1
        key = tuple(tuple(t.shape) for t in leaves)
        if self._example is None:
            self._example = _example_input(pl_module, batch)
        if stage != "fit" and key not in self._forward_inputs and len(self._forward_inputs) < MAX_SHAPES:
            self._forward_inputs[key] = _model_input(pl_module, batch)  # for the memory forward after the loop
        if self._probe is not None:
            self._probe.begin_step(pl_module, key)

    def _step_end(self, stage: str) -> None:
        if not self._in_phase(stage):
            return
        if self._probe is not None:
            self._probe.end_step()
        if self._source is not None:
            self._source.poll()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_start("fit", pl_module, batch)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._in_phase("fit") and self._probe is not None:
            self._probe.after_backward()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._step_end("fit")

    def on_test_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step_start("test", pl_module, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step_end("test")

    def on_predict_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step_start("predict", pl_module, batch)

    def on_predict_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step_end("predict")

    def on_validation_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step_start("validate", pl_module, batch)

    def on_validation_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step_end("validate")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # leave no saved-tensor hooks, dispatch modes or sampler threads behind
        if self._probe is not None:
            self._probe.end_step()
        if self._source is not None and self._source.running:
            self._source.stop()
        self._stage = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._source is not None and self._source is not self._given_source and not self._source.running:
            self._source.close()
            self._source = None  # a later phase selects (and opens) a fresh one

    # -- figures ---------------------------------------------------------------------------
    def _reduce_energy(self, trainer: pl.Trainer, reading: EnergyReading) -> EnergyReading:
        """Sum device-scope energy over data-parallel ranks (all ranks call this together)."""
        if trainer.world_size <= 1 or self._source is None or self._source.scope != "device":
            return reading
        flags = torch.tensor(
            [reading.joules or 0.0, 1.0 if reading.joules is None else 0.0], dtype=torch.float64, device=trainer.strategy.root_device
        )
        total, missing = trainer.strategy.reduce(flags, reduce_op="sum").tolist()
        if missing:
            return replace(reading, joules=None, watts=None, note=f"{int(missing)} rank(s) had no energy reading")
        note = f"{reading.note}; summed over {trainer.world_size} ranks"
        return replace(reading, joules=total, watts=total / reading.seconds if reading.seconds > 0 else None, note=note)

    def _read_accuracy(self, trainer: pl.Trainer) -> None:
        value = trainer.callback_metrics.get(self.accuracy_key)
        if value is None:
            return
        accuracy = float(value) * (100.0 if self.accuracy_unit == "fraction" else 1.0)
        if not 0.0 < accuracy <= 100.0:
            self._notes.append(f"{self.accuracy_key} = {float(value)!r} gives accuracy {accuracy!r}%, outside (0, 100]: not used")
            return
        self._accuracy = accuracy

    def _count_macs(self, pl_module: pl.LightningModule) -> None:
        if self._macs is not None or self._example is None:
            return
        samples = _leading_dim(self._example)
        try:
            self._macs = count_macs(pl_module, self._example) / samples
        except Exception as error:  # noqa: BLE001 - a model the counter cannot run: say so, go on
            self._notes.append(f"MACs not counted: {type(error).__name__}: {error}")

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total, trainable = _parameter_counts(pl_module)
        results = summarize(self._fit, self._infer, self._accuracy, total, trainable, self._macs, self._notes)
        results.update(
            device=str(pl_module.device),
            world_size=trainer.world_size,
            torch_threads=torch.get_num_threads(),
            measured_on="rank 0 (time, memory); device-scope energy summed over ranks" if trainer.world_size > 1 else "single process",
        )
        self.results = results
        if not trainer.is_global_zero:
            return
        directory = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
        atomic_write_file(directory / self.filename, lambda f: f.write(json.dumps(results, indent=2, default=str).encode()))
        metrics = _loggable(results)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if self.verbose:
            print(format_table(results))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _leading_dim(example: Any) -> int:
    leaves = tensor_leaves(example)
    return max(int(leaves[0].shape[0]), 1) if leaves and leaves[0].dim() > 0 else 1


def _model_input(pl_module: pl.LightningModule, batch: Any) -> Any:
    """What ``pl_module(...)`` takes from a batch: ``batch[0]`` of a tuple/list, the forward's
    keyword arguments of a dict, the tensor itself."""
    if isinstance(batch, tuple | list):
        batch = batch[0]
    if isinstance(batch, Mapping):
        accepted = inspect.signature(pl_module.forward).parameters
        batch = {k: v for k, v in batch.items() if k in accepted}
    return batch


def _example_input(pl_module: pl.LightningModule, batch: Any) -> Any:
    """The input for counting MACs: ``example_input_array`` if the module sets it, else the
    first sample of the batch's model input."""
    given = pl_module.example_input_array
    if given is not None:
        return _to_device(given, pl_module.device)
    return _first_sample(_model_input(pl_module, batch))


def _first_sample(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj[:1].detach() if obj.dim() > 0 else obj
    if isinstance(obj, Mapping):
        return {k: _first_sample(v) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(_first_sample(v) for v in obj)
    return obj


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _numel(parameter: torch.Tensor) -> int:
    # bitsandbytes 4-bit weights pack two values per byte; their quant_state keeps the true shape
    state = getattr(parameter, "quant_state", None)
    shape = getattr(state, "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else parameter.numel()


def _parameter_counts(module: torch.nn.Module) -> tuple[int, int]:
    params = list(module.parameters())
    return sum(_numel(p) for p in params), sum(_numel(p) for p in params if p.requires_grad)


def _loggable(results: dict[str, Any]) -> dict[str, float]:
    """Numeric results under ``efficiency/``; energy- or memory-derived figures from an
    estimate get an ``_estimated`` suffix, so no logged number hides that it is one."""
    out = {}
    for key, value in results.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        estimated = (key in ENERGY_KEYS and results.get("energy_estimated")) or (key in MEMORY_KEYS and results.get("memory_estimated"))
        out[f"efficiency/{key}{'_estimated' if estimated else ''}"] = float(value)
    return out
