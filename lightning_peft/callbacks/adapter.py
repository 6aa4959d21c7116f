"""AdapterCallback: add adapters to an unchanged Lightning project with one callback.

At ``setup`` (before the strategy wraps the model and before optimizers are built) it injects
the adapter, freezes the base and prints the trainable-parameter table. Checkpoints then hold
only what trains (plus optimizer/loop/callback state) and are written atomically; resuming with
``trainer.fit(ckpt_path=...)`` checks that the checkpoint fits the adapter. Over the first
optimizer steps it warns loudly about adapter layers whose gradients stay None or zero, and at
the first save about saved hyperparameters that pickle whole modules. At the end of
``fit`` it can export the adapter (peft-compatible files) and merge it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_peft.adapters.base import AdapterLayer, AdapterSpec
from lightning_peft.gradient_check import gradient_flags, silent_layers_message
from lightning_peft.hyperparameters import heavy_hyperparameters
from lightning_peft.io import adapter_layers, atomic_write_file, merge_adapter, save_adapter, state_mismatch, unmerge_adapter
from lightning_peft.safe_load import load_checkpoint_tensors
from lightning_peft.shard_record import RECORD_KEY, build_record, check_shard_record, gather_shards, local_shards, shard_problems
from lightning_peft.state_swap import tensors_swapped_in
from lightning_peft.targeting import (
    AdapterReport,
    adapter_record,
    apply_adapter,
    combine_fingerprints,
    refresh_trained_buffers,
    trainable_state_keys,
)
from lightning_peft.trained_buffers import NormStats
from lightning_peft.validation import (
    InvalidArgumentTypeError,
    check_bool,
    check_choice,
    check_int,
    check_name_pattern,
    check_str,
    check_str_list,
)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to a temporary file in the same directory, fsyncs, then renames over the target,
    so a crash mid-save never leaves a truncated checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        atomic_write_file(path, lambda f: torch.save(checkpoint, f))


class _CheckedLoadHook:
    """Stands in for ``pl_module.on_load_checkpoint``: the callback's checks, then the class's
    own hook. A class, not a closure, so the module stays picklable."""

    def __init__(self, callback: AdapterCallback, pl_module: pl.LightningModule) -> None:
        self.callback, self.pl_module = callback, pl_module

    def __call__(self, checkpoint: dict[str, Any]) -> None:
        self.callback._check_checkpoint(self.pl_module, checkpoint)
        type(self.pl_module).on_load_checkpoint(self.pl_module, checkpoint)


class AdapterCallback(Callback):
    """Inject ``adapter`` into the LightningModule and keep checkpoints adapter-only.

    Args:
        adapter: one adapter spec (``LoRA``, ``QLoRA``, ``BitFit``, ``FullFineTune``, ...) or a
            list of specs for different modules.
        trainable_modules: module-name patterns that train fully (e.g. a new head).
        export_dir: where ``fit`` writes the adapter export at its end; relative paths are
            under ``trainer.log_dir`` (or ``default_root_dir``). ``None``: no export.
        export_weights: ``"best"``: the export holds the trained tensors of the best checkpoint
            (when a ``ModelCheckpoint`` saved one), i.e. the model that
            ``trainer.test(ckpt_path="best")`` evaluates; they are read from the checkpoint file
            without unpickling anything and never written into the live model, which keeps its
            last step's weights as plain Lightning leaves it. ``"last"``: export the final
            weights. Nothing is read when ``export_dir`` is ``None``.
        norm_stats: ``"train"``: BatchNorm-like layers update their running statistics as
            usual, and checkpoints and the export keep them (with every other buffer seen to
            change in training); ``"freeze"``: they always normalise with the base's statistics
            and never update them.
        merge_on_fit_end: merge the adapter into the (last-step) base weights after the export.
        check_gradients: over the first ``gradient_check_steps`` optimizer steps, warn once
            about adapter layers whose gradients were all ``None`` or exactly zero (not
            connected to the loss, multiplied by zero, detached), flags reduced across ranks;
            and, at the first step, about adapter parameters in no optimizer.
        gradient_check_steps: how many optimizer steps that check watches (a layer with a
            non-zero gradient in any of them is fine: LoRA's ``A`` gets zero at step 1).
        adapter_only_checkpoints: drop frozen tensors from checkpoints.
        atomic_checkpoints: write checkpoints via a temporary file and a rename.
    """

    def __init__(
        self,
        adapter: AdapterSpec | list[AdapterSpec],
        trainable_modules: list[str] | None = None,
        export_dir: str | None = None,
        export_weights: Literal["best", "last"] = "best",
        norm_stats: NormStats = "train",
        merge_on_fit_end: bool = False,
        check_gradients: bool = True,
        gradient_check_steps: int = 3,
        adapter_only_checkpoints: bool = True,
        atomic_checkpoints: bool = True,
    ) -> None:
        specs = adapter if isinstance(adapter, (list, tuple)) else [adapter]
        if not specs or not all(isinstance(s, AdapterSpec) for s in specs):
            raise InvalidArgumentTypeError(
                "adapter", f"adapter must be an AdapterSpec (LoRA, QLoRA, BitFit, ...) or a non-empty list of them, got {adapter!r}"
            )
        self.adapter = list(specs)
        trainable = check_str_list("trainable_modules", trainable_modules, allow_none=True, allow_empty=True)
        for entry in trainable or []:
            check_name_pattern("trainable_modules", entry)
        check_str("export_dir", export_dir, allow_none=True)
        check_choice("export_weights", export_weights, ("best", "last"))
        for flag, value in (
            ("merge_on_fit_end", merge_on_fit_end),
            ("check_gradients", check_gradients),
            ("adapter_only_checkpoints", adapter_only_checkpoints),
            ("atomic_checkpoints", atomic_checkpoints),
        ):
            check_bool(flag, value)
        self.trainable_modules = list(trainable or [])
        self.export_dir = export_dir
        self.export_weights = export_weights
        check_choice("norm_stats", norm_stats, ("train", "freeze"))
        self.norm_stats = norm_stats
        self.merge_on_fit_end = merge_on_fit_end
        self.check_gradients = check_gradients
        check_int("gradient_check_steps", gradient_check_steps, low=1)
        self.gradient_check_steps = gradient_check_steps
        self.adapter_only_checkpoints = adapter_only_checkpoints
        self.atomic_checkpoints = atomic_checkpoints
        self.report: AdapterReport | None = None
        self.export_path: Path | None = None
        self._gradients_checked = False
        self._gradient_steps = 0
        self._gradient_flags: torch.Tensor | None = None  # per adapter layer: any non-zero gradient so far
        self._hparams_checked = False
        self._base_fingerprint: str | None = None
        self._module: pl.LightningModule | None = None  # the module this callback adapts (set at setup)

    # --- injection ---------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.atomic_checkpoints and type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if self.adapter_only_checkpoints:
            pl_module.strict_loading = False  # checkpoints lack frozen tensors; on_load_checkpoint checks the rest
        self._module = pl_module
        self._check_before_loading(pl_module)
        self._add_spec_callbacks(trainer, pl_module, stage)
        if adapter_record(pl_module) is not None:
            self._base_fingerprint = self._fingerprint(pl_module)
            return  # already injected (a second fit/validate/test on the same module)
        if not any(True for _ in pl_module.parameters()):
            # the model is built in configure_model: inject right after it
            configure_model = pl_module.configure_model

            def configure_then_inject() -> None:
                configure_model()
                self._inject(pl_module)

            pl_module.configure_model = configure_then_inject  # type: ignore[method-assign]
            return
        self._inject(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.merge_on_fit_end:  # refuse before training what would fail after it
            refused = {name: reason for name, layer in adapter_layers(pl_module).items() if (reason := layer.merge_refusal())}
            if refused:
                name, reason = next(iter(refused.items()))
                raise ValueError(
                    f"AdapterCallback(merge_on_fit_end=True) cannot merge {len(refused)} adapter layer(s) (e.g. {name!r}): "
                    f"{reason}. Set merge_on_fit_end=False."
                )

    def _add_spec_callbacks(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Add the callbacks a spec needs to train correctly (``spec.training_callbacks``: class
        paths, e.g. AdaLoRA's per-step rank allocation) unless the user already added one.
        They go before any checkpoint callback so that checkpoints see their latest state."""
        from lightning.pytorch.callbacks import Checkpoint

        for spec in self.adapter:
            for class_path in spec.training_callbacks:  # class paths: adapters never import Lightning
                module_name, _, class_name = class_path.rpartition(".")
                cls = getattr(importlib.import_module(module_name), class_name)
                if any(isinstance(c, cls) for c in trainer.callbacks):
                    continue
                callback = cls()
                position = next((i for i, c in enumerate(trainer.callbacks) if isinstance(c, Checkpoint)), len(trainer.callbacks))
                trainer.callbacks.insert(position, callback)
                callback.setup(trainer, pl_module, stage)
                rank_zero_info(f"lightning-peft: added {class_name} for {type(spec).__name__}")

    def _inject(self, pl_module: pl.LightningModule) -> None:
        self.report = apply_adapter(pl_module, self.adapter, self.trainable_modules, norm_stats=self.norm_stats, check_gradients=False)
        self._base_fingerprint = self._fingerprint(pl_module)
        rank_zero_info(f"lightning-peft: adapters injected\n{self.report}")

    @staticmethod
    def _fingerprint(pl_module: pl.LightningModule) -> str | None:
        """One hash of the base weights under every adapter layer (computed at injection)."""
        per_layer = {
            n: m.base_fingerprint for n, m in pl_module.named_modules() if isinstance(m, AdapterLayer) and m.base_fingerprint is not None
        }
        return combine_fingerprints(per_layer) if per_layer else None

    def _check_before_loading(self, pl_module: pl.LightningModule) -> None:
        """Check a resumed checkpoint *before* Lightning loads its tensors (whose own error would
        be a bare size mismatch): wrap the module's ``on_load_checkpoint``, which Lightning calls
        right before ``load_state_dict``."""
        pl_module.on_load_checkpoint = _CheckedLoadHook(self, pl_module)  # type: ignore[method-assign]

    def _check_checkpoint(self, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """The checkpoint's callback state matches this adapter and it holds every trainable
        tensor in the model's shape. Runs from the module's ``on_load_checkpoint``, i.e. before
        any tensor is loaded and before Lightning restores callback state."""
        check_shard_record(checkpoint, "checkpoint")  # every rank's shard is in it (before anything changes)
        if any(isinstance(m, AdapterLayer) and m.merged for m in pl_module.modules()):
            unmerge_adapter(pl_module)  # checkpoints hold unmerged tensors (e.g. testing "best" after merge_on_fit_end)
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is not None:
            self.load_state_dict(state)
        saved = checkpoint.get("state_dict", {})
        current = pl_module.state_dict(keep_vars=True)
        keys = set(trainable_state_keys(pl_module))
        missing = sorted(keys - set(saved))
        wrong = [
            f"{k}: checkpoint {tuple(saved[k].shape)} != model {tuple(current[k].shape)}"
            for k in sorted(keys & set(saved))
            if tuple(saved[k].shape) != tuple(current[k].shape)
        ]
        if missing or wrong:
            raise ValueError(
                "checkpoint does not fit this adapter: it was written with a different adapter configuration "
                f"({len(missing)} trainable tensors missing {missing[:4]}; {len(wrong)} of another shape {wrong[:3]}). "
                "Resume with the configuration it was trained with."
            )

    # --- loud failures -----------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        if not self.check_gradients or self._gradients_checked:
            return
        if self._gradient_steps == 0:
            self._warn_not_optimized(trainer, pl_module)
        # accumulate on the device (no host sync per step); judged once, at the window's end
        _, flags = gradient_flags(pl_module, device=trainer.strategy.root_device)
        previous = self._gradient_flags
        self._gradient_flags = flags if previous is None or previous.shape != flags.shape else previous | flags
        self._gradient_steps += 1
        if self._gradient_steps >= self.gradient_check_steps:
            self._conclude_gradient_check(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.check_gradients and not self._gradients_checked and self._gradient_steps > 0:
            self._conclude_gradient_check(trainer, pl_module)  # a run shorter than the window

    def _conclude_gradient_check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Warn once about adapter layers with only ``None``/zero gradients in the steps seen.
        Every rank calls this at the same step; the flags are reduced (max) so ranks agree
        (a sharded gradient's non-zero entries may live on another rank)."""
        self._gradients_checked = True
        names = [n for n, m in pl_module.named_modules() if isinstance(m, AdapterLayer)]
        flags = self._gradient_flags
        self._gradient_flags = None
        if flags is None or not names:
            return
        reduced = trainer.strategy.reduce(flags.to(torch.float32), reduce_op="max")
        silent = [n for n, ok in zip(names, reduced.tolist()) if not ok]
        if silent:
            steps = self._gradient_steps
            window = f"in the first {steps} optimizer step{'s' if steps != 1 else ''}"
            rank_zero_warn(silent_layers_message(silent, len(names), window), category=UserWarning)

    def _warn_not_optimized(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        in_optimizer = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        not_optimized = [
            name
            for name, module in pl_module.named_modules()
            if isinstance(module, AdapterLayer) and any(id(p) not in in_optimizer for p in module.adapter_parameters())
        ]
        if not_optimized:
            rank_zero_warn(
                f"lightning-peft: adapter parameters of {not_optimized[:8]} are not in any optimizer: build the optimizer "
                "from `p for p in self.parameters() if p.requires_grad` inside configure_optimizers.",
                category=UserWarning,
            )

    # --- checkpoints -------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._warn_heavy_hyperparameters(checkpoint)
        self._keep_changed_buffers(pl_module, checkpoint)
        if self.adapter_only_checkpoints and "state_dict" in checkpoint:
            keep = set(trainable_state_keys(pl_module))
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        self._record_shards(trainer, pl_module, checkpoint)

    def _record_shards(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Every rank digests its part of each saved tensor and of its optimizer state (a FSDP2
        shard, a DDP replica); rank 0 checks the gathered tensors about to be written against
        them, and the record goes into the checkpoint for the check at load
        (``lightning_peft.shard_record``). Collective: Lightning dumps checkpoints on every rank.
        Raises on every rank, before anything is written, if a part is missing or differs."""
        if "state_dict" not in checkpoint:
            return
        live_state = pl_module.state_dict(keep_vars=True)
        live = {("state_dict", k): live_state[k] for k in sorted(checkpoint["state_dict"]) if isinstance(live_state.get(k), torch.Tensor)}
        for i, optimizer in enumerate(trainer.optimizers if "optimizer_states" in checkpoint else []):
            optimizer = getattr(optimizer, "_optimizer", optimizer)
            params = [p for group in optimizer.param_groups for p in group["params"]]  # the saved state's indices
            for j, param in enumerate(params):
                for key, value in optimizer.state.get(param, {}).items():
                    if isinstance(value, torch.Tensor):
                        live[(f"optimizer_states.{i}", f"{j}.{key}")] = value
        record, problems = build_record(gather_shards(local_shards(live)))
        if trainer.is_global_zero:  # the rank that writes holds the gathered tensors
            problems += shard_problems(checkpoint, record)
        problems = trainer.strategy.broadcast(problems)
        if problems:
            raise RuntimeError(
                f"lightning-peft: the checkpoint being saved does not hold every rank's part of its tensors ({len(problems)} "
                f"problem(s), e.g. {'; '.join(problems[:3])}); it was not written. The strategy's gather lost or changed some "
                "rank's shards (or the ranks' replicas diverged): report this with the strategy and world size."
            )
        checkpoint[RECORD_KEY] = record

    def _keep_changed_buffers(self, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Persistent buffers that changed since injection (beyond the running statistics kept
        from the start) join what checkpoints and the export keep, from this save on."""
        added = refresh_trained_buffers(pl_module)
        if not added:
            return
        rank_zero_info(f"lightning-peft: buffers changed in training and are now kept in checkpoints and the export: {added[:8]}")
        live = pl_module.state_dict(keep_vars=True)
        state = checkpoint.setdefault("state_dict", {})
        for key in added:  # a strategy that builds an adapter-only state dict itself has not got them yet
            state.setdefault(key, live[key].detach().cpu())
        if self.state_key in checkpoint.get("callbacks", {}):  # Lightning read our state before this hook
            checkpoint["callbacks"][self.state_key] = self.state_dict()

    def _warn_heavy_hyperparameters(self, checkpoint: dict[str, Any]) -> None:
        """Once, at the first save: name the saved hyperparameters that pickle a module (the
        frozen base comes back into every checkpoint) or a large object, with their sizes."""
        if self._hparams_checked:
            return
        self._hparams_checked = True
        heavy = heavy_hyperparameters(checkpoint.get("hyper_parameters"))
        heavy += [
            dataclasses.replace(h, name=f"datamodule.{h.name}")
            for h in heavy_hyperparameters(checkpoint.get("datamodule_hyper_parameters"))
        ]
        if not heavy:
            return
        names = [h.name.removeprefix("datamodule.") for h in heavy]
        rank_zero_warn(
            f"lightning-peft: every checkpoint also holds the saved hyperparameters {', '.join(h.describe() for h in heavy)}: "
            f"they are pickled whole into {'each adapter-only' if self.adapter_only_checkpoints else 'each'} checkpoint "
            "(a module brings its frozen weights back) and make the file need torch.load(weights_only=False). "
            f"Fix: self.save_hyperparameters(ignore={names!r}) in the module's (or datamodule's) __init__.",
            category=UserWarning,
        )

    def state_dict(self) -> dict[str, Any]:
        found = adapter_record(self._module) if self._module is not None else None
        return {
            "adapter": [s.to_config() for s in self.adapter],
            "trainable_modules": self.trainable_modules,
            "norm_stats": self.norm_stats,
            "base_fingerprint": self._base_fingerprint,
            "trained_buffers": ([f"{found[0]}.{b}" if found[0] else b for b in found[1].trained_buffers] if found is not None else []),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ours = self.state_dict()
        if state_dict.get("adapter") != ours["adapter"] or state_dict.get("trainable_modules") != ours["trainable_modules"]:
            raise ValueError(
                f"checkpoint was trained with adapter {state_dict.get('adapter')} / trainable_modules "
                f"{state_dict.get('trainable_modules')}, but this run uses {ours['adapter']} / {ours['trainable_modules']}"
            )
        if state_dict.get("norm_stats", "train") != ours["norm_stats"]:
            raise ValueError(
                f"checkpoint was trained with norm_stats={state_dict.get('norm_stats', 'train')!r}, this run uses "
                f"{ours['norm_stats']!r}: resume with the setting it was trained with"
            )
        theirs = state_dict.get("base_fingerprint")
        if theirs is not None and ours["base_fingerprint"] is not None and theirs != ours["base_fingerprint"]:
            raise ValueError(
                f"checkpoint was trained on a different base model (base fingerprint {theirs}, this model's "
                f"{ours['base_fingerprint']}): load the base weights it was trained on before resuming"
            )
        found = adapter_record(self._module) if self._module is not None else None
        if found is not None:  # buffers the earlier run saw change are kept from the start
            prefix = f"{found[0]}." if found[0] else ""
            record = found[1]
            record.trained_buffers += [
                b.removeprefix(prefix)
                for b in state_dict.get("trained_buffers", [])
                if b.startswith(prefix) and b.removeprefix(prefix) not in record.trained_buffers
            ]

    # --- end of fit --------------------------------------------------------------------------
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.export_dir is not None:
            self._export(trainer, pl_module)
        if self.merge_on_fit_end:
            merge_adapter(pl_module)

    def _export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the export; with ``export_weights="best"`` its trained tensors are the best
        checkpoint's, swapped in only while the file is written (the live model keeps its own)."""
        export = Path(self.export_dir)  # type: ignore[arg-type]
        if not export.is_absolute():
            export = Path(trainer.log_dir or trainer.default_root_dir) / export
        self.export_path = export
        refresh_trained_buffers(pl_module)
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") if self.export_weights == "best" else ""
        tensors = best_checkpoint_tensors(best, pl_module) if best and trainer.is_global_zero else {}
        # a sharding strategy (AdapterFSDP2Strategy) gathers the trainable tensors on every
        # rank first (a collective), so rank 0 can write full tensors
        gather = getattr(trainer.strategy, "gathered_trainable_parameters", None)
        with gather(pl_module) if callable(gather) else contextlib.nullcontext():
            if trainer.is_global_zero:
                with tensors_swapped_in(pl_module, tensors):
                    save_adapter(pl_module, export)
                size = sum(f.stat().st_size for f in export.iterdir())
                source = f"the best checkpoint {best}" if tensors else "the final weights"
                rank_zero_info(f"lightning-peft: adapter of {source} exported to {export} ({size / 2**20:.2f} MiB)")
        trainer.strategy.barrier("lightning_peft_export")


def best_checkpoint_tensors(path: str, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
    """The trained tensors (``trainable_state_keys``) of the checkpoint at ``path``, read
    without running code from the file (``safe_load``); ``{}`` when there is no such file."""
    if not Path(path).is_file():
        return {}
    saved = load_checkpoint_tensors(path).get("state_dict", {})
    keys = trainable_state_keys(pl_module)
    params = dict(pl_module.named_parameters())
    # a buffer first seen changing after that save is not in it: the export uses its live value
    late_buffers = [k for k in keys if k not in saved and k not in params]
    details = state_mismatch(pl_module.state_dict(keep_vars=True), saved, [k for k in keys if k not in late_buffers])
    if details:
        raise ValueError(
            f"the best checkpoint {path!r} does not hold this model's trained tensors ({details}); export with "
            "export_weights='last', or point ModelCheckpoint at checkpoints of this run"
        )
    if late_buffers:
        rank_zero_warn(f"lightning-peft: the best checkpoint predates kept buffers {late_buffers[:4]}; the export uses their final values")
    return {k: saved[k] for k in keys if k in saved}
