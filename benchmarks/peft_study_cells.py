"""One cell of the five-regime study: a (backbone, regime, checkpointing, seed) training run.

A cell adapts a base pretrained on digits 0-4 (``pretrain``) to digits 5-9 with Lightning:
``ImageClassifier`` + ``DigitsDataModule`` + ``AdapterCallback`` (the regime's spec, the new
head trained fully) + ``AdaptiveCheckpointCallback`` (``mode="none"``/``"all"``/``"adaptive"``;
the "none" cells run it too, so every cell's activation peak comes from the same meter) +
``EfficiencyCallback`` (time, energy, peak memory, accuracy, parameters, MACs, NetScore family).
The linear probe freezes the whole backbone (eval mode: no batch-norm statistics move) and
trains the head only.

``run_cell`` is what ``benchmarks/peft_study.py`` calls for every cell and what
``tests/test_peft_study.py`` runs for two steps with an injected ``ConstantPowerSource``.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft_study_models import BACKBONES, Backbone, register_timm_models
from torch import nn

MIB = 1024**2
REGIMES = ("full", "lora", "adalora", "qlora", "bitfit", "probe")
CHECKPOINTING = ("none", "static", "adaptive")
#: AdamW learning rates per regime (the vit_digits configs' values; the probe as LoRA)
LR = {"full": 1e-3, "lora": 1e-2, "adalora": 1e-2, "qlora": 1e-2, "bitfit": 3e-2, "probe": 1e-2}
RANK = 4  # LoRA/QLoRA rank (AdaLoRA: init 6 -> target 4): ~5-10 % of the base, as r=8-16 at ViT-S scale


@dataclass(frozen=True)
class Cell:
    """What one training run is. ``activation_budget_bytes`` is the adaptive cells' budget in the
    memory source's units (the saved-activation meter on CPU, the allocator on CUDA)."""

    backbone: str
    regime: str
    checkpointing: str
    seed: int
    epochs: int = 6
    batch_size: int = 32
    max_steps: int = -1
    activation_budget_bytes: int | None = None
    device: str = "cpu"

    @property
    def key(self) -> str:
        return f"{self.backbone}/{self.regime}/{self.checkpointing}"


def quiet() -> None:
    """Silence Lightning's and transformers' per-run banners (the study runs ~100 fits)."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_peft", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch implementation.*")


def adapter_spec(regime: str, backbone: Backbone, total_steps: int = 100) -> Any:
    """The adapter spec of ``regime`` (``None`` for the probe). AdaLoRA's warm-ups are 10 % of
    ``total_steps`` each (full rank first, the final ranks held at the end)."""
    from lightning_peft import AdaLoRA, BitFit, FullFineTune, LoRA, QLoRA

    targets = backbone.lora_targets
    if regime == "full":
        return FullFineTune()
    if regime == "lora":
        return LoRA(rank=RANK, alpha=2 * RANK, target_modules=targets)
    if regime == "adalora":
        warm = total_steps // 10
        return AdaLoRA(init_rank=RANK + 2, target_rank=RANK, alpha=2 * RANK, target_modules=targets, init_warmup=warm, final_warmup=warm)
    if regime == "qlora":
        # NF4 storage, double quantization; fp32 compute (bf16 matmuls are slow on this CPU)
        return QLoRA(rank=RANK, alpha=2 * RANK, target_modules=targets, quant_type="nf4", compute_dtype="float32")
    if regime == "bitfit":
        return BitFit(target_modules=None)
    if regime == "probe":
        return None
    raise ValueError(f"unknown regime {regime!r}; expected one of {REGIMES}")


def _probe_callback() -> Any:
    from lightning.pytorch.callbacks import Callback

    class LinearProbe(Callback):
        """Frozen backbone (eval mode) + trainable head: the training-free baseline in our form."""

        def setup(self, trainer, pl_module, stage: str) -> None:
            for name, p in pl_module.model.named_parameters():
                p.requires_grad_(name.startswith("head."))

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            pl_module.model.eval()
            pl_module.model.head.train()

    return LinearProbe()


def _efficiency_callback(energy: Any, tdp_watts: float | None, out_dir: Path) -> Any:
    from lightning_peft.callbacks.efficiency import EfficiencyCallback
    from lightning_peft.metrics import EnergySource

    if isinstance(energy, EnergySource):
        return EfficiencyCallback(energy_source=energy, output_dir=str(out_dir), verbose=False)
    return EfficiencyCallback(energy=energy, tdp_watts=tdp_watts, output_dir=str(out_dir), verbose=False)


def build_trainer(cell: Cell, callbacks: list[Any], root: Path) -> Any:
    import lightning as L

    return L.Trainer(
        accelerator="gpu" if cell.device.startswith("cuda") else "cpu",
        devices=1,
        max_epochs=cell.epochs,
        max_steps=cell.max_steps,
        precision="32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,  # accuracy is measured once, on the test split, after training
        num_sanity_val_steps=0,
        default_root_dir=str(root),
        callbacks=callbacks,
    )


def make_module(cell: Cell, base_path: Path | None) -> Any:
    from lightning_peft.modules.image import ImageClassifier

    register_timm_models()
    b = BACKBONES[cell.backbone]
    return ImageClassifier(
        model_name=b.model_name,
        num_classes=5,
        model_kwargs=dict(b.model_kwargs),
        base_checkpoint=str(base_path) if base_path is not None else None,
        lr=LR[cell.regime],
        weight_decay=0.0,
        warmup_steps=10,
        schedule="cosine",
    )


def make_data(cell: Cell, classes: list[int]) -> Any:
    from lightning_peft.datamodules import DigitsDataModule

    return DigitsDataModule(image_size=BACKBONES[cell.backbone].image_size, classes=classes, batch_size=cell.batch_size, seed=cell.seed)


def checkpoint_callback(cell: Cell) -> Any:
    from lightning_peft import AdaptiveCheckpointCallback

    b = BACKBONES[cell.backbone]
    if cell.checkpointing == "adaptive":
        if cell.activation_budget_bytes is None or cell.activation_budget_bytes <= 0:
            raise ValueError(f"{cell.key}: the adaptive cell needs a positive activation budget, got {cell.activation_budget_bytes}")
        return AdaptiveCheckpointCallback(
            budget=int(cell.activation_budget_bytes), mode="adaptive", blocks=b.blocks, log_every_n_steps=0, verbose=False
        )
    mode = {"none": "none", "static": "all"}[cell.checkpointing]
    return AdaptiveCheckpointCallback(mode=mode, blocks=b.blocks, log_every_n_steps=0, verbose=False)


def run_cell(cell: Cell, base_path: Path | None, energy: Any, work_dir: Path, tdp_watts: float | None = None) -> dict[str, Any]:
    """Train and test one cell; returns its measurements (JSON-ready).

    ``energy`` is an ``EfficiencyCallback`` energy kind (``"auto"``: NVML on CUDA, RAPL on CPU,
    else a labelled TDP estimate when ``tdp_watts`` is given, else unavailable) or an
    ``EnergySource`` instance (tests inject ``ConstantPowerSource``)."""
    import lightning as L

    quiet()
    L.seed_everything(cell.seed, verbose=False)
    run_dir = work_dir / cell.key.replace("/", "_") / f"seed{cell.seed}"
    module = make_module(cell, base_path)
    data = make_data(cell, [5, 6, 7, 8, 9])
    ckpt = checkpoint_callback(cell)
    eff = _efficiency_callback(energy, tdp_watts, run_dir)
    data.setup("fit")
    steps = math.ceil(len(data.train_set) / cell.batch_size) * cell.epochs
    spec = adapter_spec(cell.regime, BACKBONES[cell.backbone], min(steps, cell.max_steps) if cell.max_steps > 0 else steps)
    if spec is None:
        adapter_cb = _probe_callback()
    else:
        from lightning_peft import AdapterCallback

        adapter_cb = AdapterCallback(adapter=spec, trainable_modules=["head"])
    trainer = build_trainer(cell, [adapter_cb, ckpt, eff], run_dir)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=data)
    fit_wall = time.perf_counter() - t0
    test = trainer.test(module, datamodule=data, verbose=False)[0]
    return summarize_cell(cell, module, ckpt, eff, fit_wall, test)


def summarize_cell(cell: Cell, module: nn.Module, ckpt: Any, eff: Any, fit_wall: float, test: dict[str, float]) -> dict[str, Any]:
    """The cell's record: the efficiency callback's results plus the checkpointing history."""
    hist = ckpt.history
    steady = hist[1:] or hist  # the adaptive cells' first step profiles (all blocks checkpointed)
    record: dict[str, Any] = {"cell": asdict(cell), "key": cell.key}
    record.update(dict(eff.results))
    record.update(
        test_acc=float(test["test_acc"]),
        fit_wall_seconds=fit_wall,
        train_steps=len(hist),
        train_step_seconds=sum(h["step_time_s"] for h in hist),
        activation_peak_bytes=max((h["measured_peak_bytes"] for h in hist), default=0.0),
        checkpointed_blocks_final=list(hist[-1]["checkpointed"]) if hist else [],
        # per batch shape (the last batch of an epoch is smaller and gets its own plan)
        checkpointed_blocks_by_shape={str(h["bucket"]): list(h["checkpointed"]) for h in hist},
        recompute_fraction_mean=sum(h["recompute_fraction"] for h in steady) / max(len(steady), 1),
        activation_budget_bytes=ckpt.budget_bytes,
        ckpt_counters=dict(ckpt.counters),
        **budget_trace(hist, ckpt.budget_bytes),
    )
    return record


def budget_trace(hist: list[dict[str, Any]], budget: int | None) -> dict[str, Any]:
    """How the activation peak tracked the budget: steps over it, the peak over the second half
    of training (after any tightening), and the largest predicted peak of a planned step."""
    late = hist[len(hist) // 2 :] or hist
    planned = [h["predicted_peak_bytes"] for h in hist if h.get("predicted_peak_bytes")]
    return {
        "steps_over_budget": sum(1 for h in hist if budget and h["measured_peak_bytes"] > budget),
        "activation_peak_late_bytes": max((h["measured_peak_bytes"] for h in late), default=0.0),
        "predicted_peak_max_bytes": max(planned, default=None),
        "over_budget_steps_first": [h["step"] for h in hist if budget and h["measured_peak_bytes"] > budget][:5],
    }


def pretrain(backbone: str, out: Path, epochs: int, device: str, max_steps: int = -1) -> dict[str, Any]:
    """Train ``backbone`` from scratch on digits 0-4 (every weight trains) and save its timm
    state dict to ``out``: the 'pretrained' base every cell adapts (no vision weights ship
    offline). Returns its test accuracy and time."""
    import lightning as L

    from lightning_peft.modules.image import ImageClassifier

    quiet()
    register_timm_models()
    L.seed_everything(0, verbose=False)
    b = BACKBONES[backbone]
    kwargs = dict(model_kwargs=dict(b.model_kwargs), lr=3e-3, weight_decay=0.05, warmup_steps=20, schedule="cosine")
    module = ImageClassifier(model_name=b.model_name, num_classes=5, **kwargs)
    cell = Cell(backbone, "full", "none", 0, epochs=epochs, batch_size=64, max_steps=max_steps, device=device)
    data = make_data(cell, [0, 1, 2, 3, 4])
    trainer = build_trainer(cell, [], out.parent)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - t0
    acc = trainer.test(module, datamodule=data, verbose=False)[0]["test_acc"]
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in module.model.state_dict().items()}, out)
    return {"backbone": backbone, "task": "digits 0-4", "epochs": epochs, "test_acc": float(acc), "seconds": seconds}
