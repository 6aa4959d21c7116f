"""Adapter training on several "nodes" of one machine, and resuming on another world size
(CPU, gloo, loopback): ``python multinode_adapter.py OUT TAG NUM_NODES DEVICES JOB[,JOB...]``.

It is launched by torchrun (``--nnodes 2 --nproc_per_node 1``), by hand with Lightning's own
variables (``NODE_RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), or once with
``DEVICES=4`` (Lightning's launcher re-runs it for the other ranks). Every run uses the same
global batch of 8 samples per step at any world size (each rank takes ``8 / world`` of them,
see ``loader``), 16 samples, 2 steps per epoch, 2 epochs. Jobs (results in ``OUT/TAG/``):

``train``
    DDP and ``AdapterFSDP2Strategy`` (``single``: one plain process instead): LoRA + trained head
    with ``AdaptiveCheckpointCallback``; a checkpoint per epoch; per step the rank's loss, the
    loss of a fixed probe batch, a digest of the trainable tensors; rank 0 keeps the trainable
    tensors after step 2 and step 4 (``{strategy}_trainable.pt``).
``experts``
    DDP and FSDP2: EPnG (``ExpertImportanceCallback``) on ExpertLoRA experts and AdaLoRA on the
    attention's ``q_proj`` of a tiny OLMoE: their decisions, ranks and a weight digest.
``adalora`` / ``adalora_resume:SRC``
    DDP and FSDP2: AdaLoRA alone on the tiny OLMoE's ``q_proj``, 2 epochs of 3 steps with a
    checkpoint per epoch; then a fresh model resumed from ``SRC``'s epoch-0 checkpoint (same world
    size): the rank masks and the final trainable tensors of both.
``resume:SRC``
    DDP and FSDP2 (at world size 1: a plain process for the DDP checkpoint): resume ``SRC``'s
    end-of-epoch-0 checkpoint; the trainable tensors and the gathered optimizer state right
    after loading, the losses of steps 3 and 4, the final trainable tensors.
``corrupt_save``
    FSDP2: a gather that keeps only rank 0's shards (accelerate #4206); DDP: replicas out of
    sync. Both saves must fail on every rank and write nothing.
``corrupt_load:FILE``
    FSDP2 and plain: resuming ``FILE`` (prepared by the test) must fail before loading.

Each rank writes ``OUT/TAG/rank{global rank}.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning.pytorch as pl  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from adapter_models import Classifier, count_checkpoint_writes, full, lora_callback, make_dataset, probe_input  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_peft.shard_record import tensor_digest  # noqa: E402

OUT, TAG = Path(sys.argv[1]), sys.argv[2]
NUM_NODES, DEVICES = int(sys.argv[3]), int(sys.argv[4])
JOBS = sys.argv[5].split(",")
WORLD = NUM_NODES * DEVICES
GLOBAL_BATCH, SAMPLES = 8, 16
HERE = OUT / TAG
WRITES = count_checkpoint_writes()


def loader() -> DataLoader:
    """Lightning gives every training rank a ``DistributedSampler(shuffle=True, seed=0)``: rank
    ``r`` takes ``perm[r::W]``, so step ``k``'s global batch is ``perm[8k : 8k + 8]`` at every
    world size ``W``. One process gets that sampler explicitly (Lightning adds none there)."""
    from torch.utils.data.distributed import DistributedSampler

    dataset = make_dataset(SAMPLES)
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0) if WORLD == 1 else None
    return DataLoader(dataset, batch_size=GLOBAL_BATCH // WORLD, sampler=sampler)


def strategy_for(name: str) -> Any:
    from lightning_peft import AdapterFSDP2Strategy

    if name == "fsdp2":
        return AdapterFSDP2Strategy(process_group_backend="gloo")
    return "ddp" if WORLD > 1 else "auto"


def make_trainer(strategy: str, callbacks: list, **kwargs: Any) -> pl.Trainer:
    single = strategy == "single"
    return pl.Trainer(
        accelerator="cpu",
        devices=1 if single else DEVICES,
        num_nodes=1 if single else NUM_NODES,
        strategy="auto" if single else strategy_for(strategy),
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=HERE,
        **kwargs,
    )


def trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full copies of the trainable parameters (all-gathers FSDP2 shards: every rank calls it)."""
    return {n: full(p) for n, p in module.named_parameters() if p.requires_grad}


def state_digest(state: dict[str, torch.Tensor]) -> str:
    return tensor_digest(torch.cat([state[n].reshape(-1).double() for n in sorted(state)]))


class Recorder(Callback):
    """Per step: the probe batch's loss and a digest of the trainable tensors; the trainable
    tensors at chosen steps; right after a resume, the loaded tensors and optimizer state."""

    def __init__(self, keep_steps: tuple[int, ...] = ()) -> None:
        x = probe_input()
        self.probe = (x, torch.arange(x.shape[0]) % 4)
        self.probe_losses: list[float] = []
        self.digests: list[str] = []
        self.kept: dict[int, dict[str, torch.Tensor]] = {}
        self.keep_steps = keep_steps
        self.at_start: dict[str, torch.Tensor] = {}
        self.optimizer_at_start: dict[str, Any] = {}

    def on_train_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        # gathering the optimizer state before the first step is what a checkpoint at step 0
        # does; under FSDP2 it must not touch the optimizer (the losses are compared with DDP's)
        self.at_start = trainable(pl_module)
        optimizer = trainer.optimizers[0]
        state = trainer.strategy.optimizer_state(optimizer)  # gathered (collective under FSDP2); may alias the live state
        self.optimizer_at_start = {
            "state": {i: {k: torch.as_tensor(v).clone() for k, v in s.items()} for i, s in state.get("state", {}).items()}
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        with torch.no_grad():
            self.probe_losses.append(F.cross_entropy(pl_module(self.probe[0]), self.probe[1]).item())
        state = trainable(pl_module)
        self.digests.append(state_digest(state))
        if trainer.global_step in self.keep_steps:
            self.kept[trainer.global_step] = state


def adaptive_checkpointing() -> Any:
    from lightning_peft import AdaptiveCheckpointCallback

    # budget in saved-activation bytes (CPU meter), scaled with the rank's batch: between the
    # all-checkpointed floor and the plain peak, so the plan checkpoints some blocks; every rank
    # must take the same decisions
    budget = ACTIVATION_BUDGET_PER_SAMPLE * GLOBAL_BATCH // WORLD
    return AdaptiveCheckpointCallback(budget=budget, memory_source="saved_tensors", verbose=False, log_every_n_steps=0)


ACTIVATION_BUDGET_PER_SAMPLE = int(os.environ.get("LP_TEST_ACTIVATION_BUDGET", "7500"))


def job_train(report: dict, strategies: list[str]) -> None:
    for name in strategies:
        torch.manual_seed(0)
        model = Classifier()
        recorder = Recorder(keep_steps=(2, 4))
        adaptive = adaptive_checkpointing()
        WRITES.clear()
        ckpt = ModelCheckpoint(dirpath=HERE / name, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
        trainer = make_trainer(name, [lora_callback(), adaptive, recorder, ckpt], max_epochs=2)
        trainer.fit(model, loader())
        report[f"train_{name}"] = {
            "world_size": trainer.world_size,
            "global_rank": trainer.global_rank,
            "node_rank": trainer.node_rank,
            "losses": model.losses,
            "probe_losses": recorder.probe_losses,
            "digests": recorder.digests,
            "writes": sorted(WRITES),
            "adaptive_modes": [h["modes"] for h in adaptive.history],
            "adaptive_budget": adaptive.budget_bytes,
            "trainable_names": sorted(recorder.at_start),
        }
        if trainer.global_rank == 0:
            torch.save(recorder.kept, HERE / f"{name}_trainable.pt")


def job_experts(report: dict) -> None:
    from epng_ddp import loader as token_loader
    from epng_ddp import make_module

    from lightning_peft import AdaLoRA, AdapterCallback, ExpertImportanceCallback, ExpertLoRA
    from lightning_peft.adapters.adalora import adalora_layers
    from lightning_peft.adapters.experts import expert_layers

    for name in ("ddp", "fsdp2"):
        module = make_module()
        epng = ExpertImportanceCallback(prune_fraction=0.25, grow_fraction=0.25, warmup_steps=2, interval=2, heatmap=False)
        adalora = AdaLoRA(init_rank=4, target_rank=2, target_modules=["q_proj"], total_steps=6, interval=1, init_warmup=1, final_warmup=1)
        adapter = AdapterCallback([ExpertLoRA(rank=2, max_rank=4), adalora])
        trainer = make_trainer(name, [adapter, epng], max_steps=6, enable_checkpointing=False)
        trainer.fit(module, train_dataloaders=token_loader(n=8 * 6, batch_size=8 // WORLD))
        trainer.save_checkpoint(HERE / f"experts_{name}.ckpt")  # AdaLoRA's statistics gathered whole (collective)
        state = trainable(module)
        report[f"experts_{name}"] = {
            "epng_history": epng.history,
            "importance": [t.tolist() for t in epng.importance],
            "expert_ranks": [layer.ranks for layer in expert_layers(module).values()],
            "adalora_masks": {n: layer.rank_mask.int().flatten().tolist() for n, layer in adalora_layers(module).items()},
            "digest": state_digest(state),
        }


ADALORA_STEPS_PER_EPOCH = 3


def adalora_run(name: str, ckpt_path: Path | None, checkpoints: Path | None) -> dict[str, Any]:
    """AdaLoRA on ``q_proj`` for 2 epochs (``ADALORA_STEPS_PER_EPOCH`` steps each, pruning from
    step 2 on), resumed from ``ckpt_path`` when given; rank 0 keeps the final trainable tensors."""
    from epng_ddp import loader as token_loader
    from epng_ddp import make_module

    from lightning_peft import AdaLoRA, AdapterCallback
    from lightning_peft.adapters.adalora import adalora_layers

    module = make_module()
    adalora = AdaLoRA(init_rank=4, target_rank=2, target_modules=["q_proj"], total_steps=6, interval=1, init_warmup=1, final_warmup=1)
    callbacks: list = [AdapterCallback(adalora)]
    if checkpoints is not None:
        callbacks.append(ModelCheckpoint(dirpath=checkpoints, filename="{epoch}", save_top_k=-1, every_n_epochs=1))
    trainer = make_trainer(name, callbacks, max_epochs=2, enable_checkpointing=checkpoints is not None)
    batch = 8 // WORLD
    trainer.fit(module, train_dataloaders=token_loader(n=8 * ADALORA_STEPS_PER_EPOCH, batch_size=batch), ckpt_path=ckpt_path)
    return {
        "global_step": trainer.global_step,
        "global_rank": trainer.global_rank,
        "masks": {n: layer.rank_mask.int().flatten().tolist() for n, layer in adalora_layers(module).items()},
        "state": trainable(module),
    }


def job_adalora(report: dict, source: str | None) -> None:
    for name in ("ddp", "fsdp2"):
        if source is None:
            run = adalora_run(name, None, HERE / f"adalora_{name}")
            key, file = f"adalora_{name}", HERE / f"adalora_{name}_final.pt"
        else:
            run = adalora_run(name, OUT / source / f"adalora_{name}" / "epoch=0.ckpt", None)
            key, file = f"adalora_resume_{source}_{name}", HERE / f"adalora_resumed_{source}_{name}.pt"
        state = run.pop("state")
        if run["global_rank"] == 0:
            torch.save(state, file)
        report[key] = {**run, "digest": state_digest(state)}


def optimizer_differences(now: dict[str, Any], then: dict[str, Any]) -> list[str]:
    """Where two ``torch.optim``-style state dicts differ (state tensors compared exactly)."""
    differences = [f"param {i}: missing" for i in then["state"] if i not in now["state"]]
    for i, state in then["state"].items():
        for key, value in state.items():
            other = now["state"].get(i, {}).get(key)
            if other is None or not torch.equal(torch.as_tensor(other), torch.as_tensor(value)):
                differences.append(f"param {i}: {key}")
    return differences


def job_resume(report: dict, source: str) -> None:
    for name in ("ddp", "fsdp2"):
        path = OUT / source / name / "epoch=0.ckpt"
        torch.manual_seed(0)
        model = Classifier()
        recorder = Recorder(keep_steps=(4,))
        run = name if (name == "fsdp2" or WORLD > 1) else "single"
        trainer = make_trainer(run, [lora_callback(), recorder], max_epochs=2, enable_checkpointing=False)
        trainer.fit(model, loader(), ckpt_path=str(path))
        result: dict[str, Any] = {"losses": model.losses, "global_step": trainer.global_step, "probe_losses": recorder.probe_losses}
        if trainer.global_rank == 0:
            saved = torch.load(path, weights_only=True)
            result["loaded_equal_file"] = sorted(recorder.at_start) == sorted(saved["state_dict"]) and all(
                torch.equal(recorder.at_start[k], saved["state_dict"][k]) for k in recorder.at_start
            )
            now, then = recorder.optimizer_at_start, saved["optimizer_states"][0]
            result["optimizer_differences"] = optimizer_differences(now, then)
            result["optimizer_tensors"] = sum(len(v) for v in then["state"].values())
            torch.save(recorder.kept[4], HERE / f"resumed_{source}_{name}.pt")
        report[f"resume_{source}_{name}"] = result


def job_corrupt_save(report: dict) -> None:
    import lightning_peft.strategies as strategies

    # FSDP2: the gather keeps only rank 0's rows, the others' come back as zeros
    torch.manual_seed(0)
    model = Classifier()
    trainer = make_trainer("fsdp2", [lora_callback()], max_steps=1, enable_checkpointing=False)
    trainer.fit(model, loader())
    gather = strategies._full

    def rank0_only(tensor: torch.Tensor) -> torch.Tensor:
        whole = gather(tensor)
        if hasattr(tensor, "to_local") and whole.dim() and whole.shape[0] > 1:
            whole[-(-whole.shape[0] // WORLD) :] = 0  # every row past rank 0's shard (FSDP2 shards dim 0 in chunks)
        return whole

    strategies._full = rank0_only
    bad = HERE / "rank0_only.ckpt"
    try:
        trainer.save_checkpoint(bad)
        report["fsdp2_partial_save"] = "saved"
    except RuntimeError as error:
        report["fsdp2_partial_save"] = str(error)
    finally:
        strategies._full = gather
    report["fsdp2_partial_save_exists"] = bad.exists()

    # DDP: one rank's replica drifts (unsynchronised adapters, transformers #48873)
    torch.manual_seed(0)
    model = Classifier()
    trainer = make_trainer("ddp", [lora_callback()], max_steps=1, enable_checkpointing=False)
    trainer.fit(model, loader())
    if trainer.global_rank == WORLD - 1:
        with torch.no_grad():
            model.model.head.weight.add_(1.0)
    bad = HERE / "diverged.ckpt"
    try:
        trainer.save_checkpoint(bad)
        report["ddp_diverged_save"] = "saved"
    except RuntimeError as error:
        report["ddp_diverged_save"] = str(error)
    report["ddp_diverged_save_exists"] = bad.exists()


def job_corrupt_load(report: dict, file: str) -> None:
    for name in ("fsdp2", "single"):
        torch.manual_seed(0)
        model = Classifier()
        trainer = make_trainer(name, [lora_callback()], max_epochs=2, enable_checkpointing=False)
        try:
            trainer.fit(model, loader(), ckpt_path=str(OUT / file))
            report[f"corrupt_load_{name}"] = "resumed"
        except ValueError as error:
            report[f"corrupt_load_{name}"] = str(error)
        report[f"corrupt_load_{name}_steps"] = trainer.global_step


def main() -> None:
    HERE.mkdir(parents=True, exist_ok=True)
    report: dict = {"env": {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "MASTER_ADDR")}}
    for job in JOBS:
        kind, _, argument = job.partition(":")
        if kind == "train":
            job_train(report, ["single"] if argument == "single" else ["ddp", "fsdp2"])
        elif kind == "experts":
            job_experts(report)
        elif kind in ("adalora", "adalora_resume"):
            job_adalora(report, argument or None)
        elif kind == "resume":
            job_resume(report, argument)
        elif kind == "corrupt_save":
            job_corrupt_save(report)
        elif kind == "corrupt_load":
            job_corrupt_load(report, argument)
        else:
            raise SystemExit(f"unknown job {job!r}")
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    (HERE / f"rank{rank}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
    from ddp_exit import finish_distributed

    finish_distributed()
