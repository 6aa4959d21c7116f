"""Adapter-aware strategies.

``strategy="ddp"`` needs nothing from this module: with ``AdapterCallback`` the base is frozen
before DDP wraps the model, so DDP registers gradient hooks only for the adapter parameters and
``find_unused_parameters`` stays off (see ``docs/strategies.md``).

``AdapterFSDP2Strategy`` is Lightning's ``ModelParallelStrategy`` (FSDP2, ``fully_shard``) made
adapter-aware:

* it shards the model itself when ``configure_model`` did not: one FSDP unit per repeated block
  (``lightning_peft.memory.find_blocks``: timm ``blocks``, transformers ``layers``/``layer``/``h``,
  or ``block_paths``), then the LightningModule's submodules, over
  ``device_mesh["data_parallel"]``;
* it keeps frozen and trainable parameters apart: trainable parameters are fp32 master weights
  (``trainable_dtype``), frozen ones may be stored in a lower dtype (``frozen_dtype``), quantized
  (bitsandbytes) weights are not sharded at all (frozen, replicated), and the optimizer holds
  only trainable parameters;
* its checkpoints are adapter-only regular files: every trainable tensor gathered to a full
  tensor (``DTensor.full_tensor()``) plus the optimizer state gathered with
  ``get_optimizer_state_dict(full_state_dict=True, cpu_offload=True)`` and keyed like a plain
  ``torch.optim`` state dict, written once by rank 0 through an atomic ``CheckpointIO``. Such a
  file loads into a single-process model (``load_state_dict(ckpt["state_dict"], strict=False)``)
  and resumes with this strategy (``trainer.fit(ckpt_path=...)``).
"""

from __future__ import annotations

import pickle
from collections.abc import Generator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.init import _materialize_distributed_module
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.precision import HalfPrecision
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from torch.optim import Optimizer

from lightning_peft.adapters.dtypes import DTYPES as _DTYPES
from lightning_peft.adapters.rank_ops import full_tensor
from lightning_peft.callbacks.adapter import AtomicCheckpointIO
from lightning_peft.io import state_mismatch
from lightning_peft.shard_record import check_shard_record
from lightning_peft.state_swap import tensors_swapped_in
from lightning_peft.targeting import trainable_state_keys
from lightning_peft.validation import (
    check_bool,
    check_choice,
    check_int,
    check_str,
    check_str_list,
)

_DType = Literal["float32", "bfloat16", "float16"]
#: containers without a forward of their own: never an FSDP unit (their hooks would never run)
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)
#: wrapper segments that torch.distributed.checkpoint drops from parameter names
_WRAPPER_SEGMENTS = {"_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module"}


def _is_dtensor(tensor: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A full, CPU, detached copy of ``tensor``; a ``DTensor`` is all-gathered (collective:
    every rank must call this for the same tensors in the same order)."""
    return full_tensor(tensor).detach().to("cpu", copy=True)


def _is_quantized(param: torch.Tensor) -> bool:
    """bitsandbytes 4-bit / 8-bit weights: their packing and quantization state cannot be
    split along dim 0 by FSDP, so they stay whole (frozen, replicated) on every rank."""
    return getattr(param, "quant_state", None) is not None or type(param).__name__ in ("Params4bit", "Int8Params")


def _clean_fqn(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


class AdapterFSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (``fully_shard``) for adapter training: frozen and trainable parameters apart,
    adapter-only checkpoints that load anywhere.

    Use it with ``AdapterCallback`` (which injects the adapter before this strategy shards)::

        Trainer(accelerator="gpu", devices=8, strategy=AdapterFSDP2Strategy(param_dtype="bfloat16"),
                callbacks=[AdapterCallback(LoRA(rank=16))])

    Args:
        data_parallel_size: size of the ``"data_parallel"`` mesh dimension FSDP shards over;
            ``"auto"``: world size / ``tensor_parallel_size``.
        tensor_parallel_size: size of the ``"tensor_parallel"`` mesh dimension (only used by a
            ``configure_model`` that applies tensor parallelism itself).
        block_paths: dotted paths of the block lists to shard one block per FSDP unit
            (``["model.layers"]``); ``None``: found automatically (timm ``blocks``,
            transformers ``layers``/``layer``/``h``, the largest repeated module list).
        param_dtype: dtype parameters are all-gathered in and compute runs in (FSDP2
            ``MixedPrecisionPolicy``); ``None``: their stored dtype.
        reduce_dtype: dtype gradients are reduce-scattered in; ``None``: ``param_dtype``'s.
        frozen_dtype: dtype the frozen floating-point parameters are stored in (e.g.
            ``"bfloat16"`` halves the base's memory); ``None``: unchanged. Combine with
            ``param_dtype`` of the same dtype so every layer computes in one dtype.
        trainable_dtype: dtype of the trainable parameters (the optimizer's master weights);
            ``None``: unchanged.
        reshard_after_forward: free each block's gathered parameters after its forward
            (re-gathered in backward; less memory, more communication).
        adapter_only_checkpoints: checkpoints hold only the trainable tensors (plus optimizer,
            loop and callback state); ``False``: the whole model, gathered on rank 0.
        process_group_backend: ``"nccl"``, ``"gloo"`` ...; ``None``: the device's default.
        timeout: collective timeout.

    Sharding happens only if the LightningModule did not shard itself in ``configure_model``.
    Every FSDP unit gathers its parameters in its own ``forward``: the units are the blocks,
    the LightningModule's submodules (``self.model``, ``self.head``, ...) and, if it owns
    parameters directly, the LightningModule (then call it via ``self(x)``). A submodule whose
    parameters are used without calling its ``forward`` must be listed in ``block_paths`` at a
    level whose forward runs, or the model sharded in ``configure_model``.
    """

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: int = 1,
        block_paths: list[str] | None = None,
        param_dtype: _DType | None = None,
        reduce_dtype: _DType | None = None,
        frozen_dtype: _DType | None = None,
        trainable_dtype: _DType | None = "float32",
        reshard_after_forward: bool = True,
        adapter_only_checkpoints: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        if data_parallel_size != "auto":
            check_int("data_parallel_size", data_parallel_size, low=1)
        check_int("tensor_parallel_size", tensor_parallel_size, low=1)
        for name, value in (
            ("param_dtype", param_dtype),
            ("reduce_dtype", reduce_dtype),
            ("frozen_dtype", frozen_dtype),
            ("trainable_dtype", trainable_dtype),
        ):
            check_choice(name, value, sorted(_DTYPES), allow_none=True)
        check_str_list("block_paths", block_paths, allow_none=True)
        check_bool("reshard_after_forward", reshard_after_forward)
        check_bool("adapter_only_checkpoints", adapter_only_checkpoints)
        check_str("process_group_backend", process_group_backend, allow_none=True)
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=False,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.block_paths = list(block_paths) if block_paths is not None else None
        self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype
        self.frozen_dtype, self.trainable_dtype = frozen_dtype, trainable_dtype
        self.reshard_after_forward = reshard_after_forward
        self.adapter_only_checkpoints = adapter_only_checkpoints
        self._checkpoint_io = AtomicCheckpointIO()
        #: what ``setup`` did: ``"self"`` (configure_model sharded) or the FSDP unit names
        self.sharded_units: list[str] = []
        self.unsharded_parameters: list[str] = []

    # --- environment -------------------------------------------------------------------------
    def setup_environment(self) -> None:
        # Lightning's "auto" means data_parallel = nodes, tensor_parallel = devices per node;
        # adapters want plain FSDP: shard over every process.
        if self._data_parallel_size == "auto":
            world = self.num_nodes * self.num_processes
            if world % self._tensor_parallel_size:
                raise ValueError(f"tensor_parallel_size={self._tensor_parallel_size} does not divide the world size {world}")
            self._data_parallel_size = world // self._tensor_parallel_size
        super().setup_environment()

    # --- model setup -------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        if isinstance(self.precision_plugin, HalfPrecision):
            raise ValueError(
                f"{type(self).__name__} does not take precision={trainer.precision!r}: it would cast the adapter's fp32 "
                "master weights too. Use precision='32-true' or 'bf16-mixed' and the strategy's dtypes, e.g. "
                "AdapterFSDP2Strategy(frozen_dtype='bfloat16', param_dtype='bfloat16', reduce_dtype='float32')."
            )
        if any(isinstance(m, FullyShardedDataParallel) for m in self.model.modules()):
            raise TypeError(
                "Found modules wrapped in FSDP1 `FullyShardedDataParallel`; "
                f"{type(self).__name__} uses FSDP2 (`torch.distributed.fsdp.fully_shard`). Remove the FSDP1 wrapping."
            )
        module = self.lightning_module
        assert module is not None
        if self._is_sharded(module):
            self.sharded_units = ["self"]
            if self.frozen_dtype or self.param_dtype:
                rank_zero_warn(
                    f"{type(self).__name__}: configure_model sharded the model itself, so frozen_dtype/param_dtype are "
                    "not applied; pass them to your own fully_shard calls."
                )
        else:
            self._set_dtypes(module)
            self._shard(module)
        _materialize_distributed_module(self.model, self.root_device)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    @staticmethod
    def _is_sharded(module: nn.Module) -> bool:
        from torch.distributed.fsdp import FSDPModule

        return any(isinstance(m, FSDPModule) for m in module.modules()) or any(_is_dtensor(p) for p in module.parameters())

    def _set_dtypes(self, module: nn.Module) -> None:
        """Trainable floating-point parameters to ``trainable_dtype``, frozen ones to
        ``frozen_dtype`` (in place: the ``Parameter`` objects stay the same)."""
        with torch.no_grad():
            for param in module.parameters():
                if not param.is_floating_point() or _is_quantized(param):
                    continue
                wanted = self.trainable_dtype if param.requires_grad else self.frozen_dtype
                if wanted is not None and param.dtype != _DTYPES[wanted]:
                    param.data = param.data.to(_DTYPES[wanted])

    def _mp_policy(self) -> Any:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        param = _DTYPES[self.param_dtype] if self.param_dtype else None
        reduce = _DTYPES[self.reduce_dtype] if self.reduce_dtype else None
        return MixedPrecisionPolicy(param_dtype=param, reduce_dtype=reduce)

    def _blocks(self, module: nn.Module) -> list[tuple[str, nn.Module]]:
        from lightning_peft.memory import BlockDiscoveryError, find_blocks

        try:
            containers = find_blocks(module, self.block_paths)
        except BlockDiscoveryError as err:
            if self.block_paths is not None:
                raise
            rank_zero_warn(
                f"{type(self).__name__}: {err} Sharding only at the level of the LightningModule's submodules: each "
                "of them is gathered whole in forward. Pass block_paths=[...] to shard block by block."
            )
            return []
        return [(f"{path}.{i}", block) for path, container in containers for i, block in enumerate(container)]

    def _shard(self, module: pl.LightningModule) -> None:
        """Apply ``fully_shard`` per block, then per submodule of the LightningModule, over
        ``device_mesh["data_parallel"]``; quantized weights are left whole (ignored)."""
        from torch.distributed.fsdp import FSDPModule, fully_shard

        mesh = self.device_mesh["data_parallel"]
        policy = self._mp_policy()
        ignored = {p for p in module.parameters() if _is_quantized(p)}
        trainable_dtypes = {p.dtype for p in module.parameters() if p.requires_grad}
        if len(trainable_dtypes) > 1:
            raise ValueError(
                f"trainable parameters have several dtypes {sorted(map(str, trainable_dtypes))}; FSDP2 needs one. "
                "Set trainable_dtype (e.g. 'float32')."
            )

        def shard(name: str, sub: nn.Module, reshard: bool | None) -> None:
            fully_shard(sub, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy, ignored_params=ignored or None)
            self.sharded_units.append(name)

        for name, block in self._blocks(module):
            if any(True for p in block.parameters() if p not in ignored):
                shard(name, block, self.reshard_after_forward)

        def visit(prefix: str, parent: nn.Module) -> None:
            for name, child in parent.named_children():
                full = f"{prefix}{name}"
                if isinstance(child, FSDPModule):
                    continue
                own = [p for p in child.parameters() if not _is_dtensor(p) and p not in ignored]
                if not own:
                    continue
                if isinstance(child, _CONTAINERS):
                    visit(full + ".", child)
                else:
                    shard(full, child, None)  # None: FSDP2 keeps a root's parameters gathered until backward

        visit("", module)
        left = [n for n, p in module.named_parameters() if not _is_dtensor(p) and p not in ignored]
        if left:
            # parameters owned by the LightningModule itself (or by a container): it becomes the
            # outermost unit, gathered when `self(...)` runs
            shard("<LightningModule>", module, None)
        self.unsharded_parameters = [n for n, p in module.named_parameters() if p in ignored]
        rank_zero_info(
            f"lightning-peft: FSDP2 over {mesh.size()} processes, {len(self.sharded_units)} units "
            f"({', '.join(self.sharded_units[:6])}{' ...' if len(self.sharded_units) > 6 else ''})"
            + (f"; {len(self.unsharded_parameters)} quantized weights kept whole" if self.unsharded_parameters else "")
        )

    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        super().setup_optimizers(trainer)
        # frozen parameters never get a gradient: drop them so optimizer state and
        # checkpoints hold trainable tensors only (groups stay, so schedulers still match)
        total = 0
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if p.requires_grad]
                total += len(group["params"])
        if self.optimizers and total == 0:
            raise ValueError(
                "the optimizers hold no parameter with requires_grad=True: build them in configure_optimizers from "
                "`p for p in self.parameters() if p.requires_grad`, after the adapter is injected (AdapterCallback)."
            )

    # --- state dicts -------------------------------------------------------------------------
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Full (gathered) CPU tensors of what trains, on every rank (collective)."""
        module = self.lightning_module
        assert module is not None
        state = module.state_dict(keep_vars=True)
        keys = trainable_state_keys(module) if self.adapter_only_checkpoints else list(state)
        return {k: _full(state[k]) for k in keys}

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """The optimizer state gathered to full CPU tensors, keyed by parameter index like a
        plain ``torch.optim`` state dict (so a single-process optimizer can load it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        assert self.model is not None
        if not optimizer.state:
            # before the first step there is nothing to gather, and get_optimizer_state_dict would
            # initialise the state by stepping with zero gradients: Adam's step counter would then
            # start at 1 and change every later update (bias correction)
            groups = [
                {**{k: v for k, v in g.items() if k != "params"}, "params": [], "param_names": fqns}
                for g, fqns in zip(optimizer.param_groups, self._optimizer_fqns(optimizer))
            ]
            start = 0
            for group in groups:
                group["params"] = list(range(start, start + len(group["param_names"])))
                start += len(group["param_names"])
            return {"state": {}, "param_groups": groups}
        full = get_optimizer_state_dict(self.model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if "param_groups" not in full:  # with cpu_offload only rank 0 receives the gathered state
            return {}
        index: dict[str, int] = {}
        groups = []
        for group in full["param_groups"]:
            ids = []
            for fqn in group["params"]:
                index.setdefault(fqn, len(index))
                ids.append(index[fqn])
            groups.append({**group, "params": ids, "param_names": list(group["params"])})
        return {"state": {index[fqn]: value for fqn, value in full["state"].items()}, "param_groups": groups}

    def _optimizer_fqns(self, optimizer: Optimizer) -> list[list[str]]:
        assert self.model is not None
        names = {id(p): _clean_fqn(n) for n, p in self.model.named_parameters()}
        return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]

    def _load_optimizer_state(self, optimizer: Optimizer, saved: Mapping[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        current = self._optimizer_fqns(optimizer)
        if [len(g) for g in current] != [len(g["params"]) for g in saved["param_groups"]]:
            raise ValueError(
                f"the checkpoint's optimizer has {[len(g['params']) for g in saved['param_groups']]} parameters per group, "
                f"this one {[len(g) for g in current]}: it was written with a different adapter or optimizer configuration"
            )
        names = {i: fqn for g_saved, g_now in zip(saved["param_groups"], current) for i, fqn in zip(g_saved["params"], g_now)}
        for g_saved, g_now in zip(saved["param_groups"], current):
            if "param_names" in g_saved and list(g_saved["param_names"]) != g_now:
                raise ValueError(
                    f"the checkpoint's optimizer trains {g_saved['param_names'][:4]}..., this one {g_now[:4]}...: it was "
                    "written with a different adapter configuration"
                )
        groups = [
            {**{k: v for k, v in g.items() if k not in ("params", "param_names")}, "params": fqns}
            for g, fqns in zip(saved["param_groups"], current)
        ]
        state = {"state": {names[int(i)]: v for i, v in saved["state"].items()}, "param_groups": groups}
        assert self.model is not None
        set_optimizer_state_dict(self.model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))

    def _load_module_state(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        module = self.lightning_module
        assert module is not None
        details = state_mismatch(module.state_dict(keep_vars=True), state_dict, trainable_state_keys(module))
        if details:
            raise ValueError(
                f"checkpoint does not fit this model ({details}): it was written with a different adapter configuration "
                "or base. Resume with the configuration it was trained with."
            )
        set_model_state_dict(module, dict(state_dict), options=StateDictOptions(full_state_dict=True, strict=False))

    # --- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        """Rank 0 writes one regular (atomic) file; the tensors were gathered on every rank."""
        path = Path(self.broadcast(str(filepath)))
        if path.is_dir():
            raise IsADirectoryError(f"checkpoint path {str(path)!r} is a directory (a distributed checkpoint?); choose a file path")
        if self.is_global_zero:
            self.checkpoint_io.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Read a checkpoint to resume from. ``weights_only`` is what the user passed to
        ``trainer.fit(..., weights_only=)`` (the CLI's ``--weights_only``): ``None`` (default)
        and ``True`` read tensors and plain data only (torch's safe loader); only an explicit
        ``False`` unpickles arbitrary objects, which runs code from the file."""
        path = Path(self.broadcast(str(checkpoint_path)))
        if path.is_dir():  # a sharded checkpoint written by ModelParallelStrategy
            return super().load_checkpoint(path, weights_only=weights_only)
        try:
            # never pick the unsafe loader ourselves: None becomes True, not torch's env-dependent default
            checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only is not False)
        except pickle.UnpicklingError as error:
            raise pickle.UnpicklingError(
                f"checkpoint {str(path)!r} pickles objects besides tensors (e.g. an nn.Module or functools.partial in "
                "hyper_parameters), which the safe loader does not unpickle. If you trust this file, resume with "
                "trainer.fit(..., ckpt_path=..., weights_only=False) (CLI: --weights_only false); that runs code "
                f"from the file. ({error})"
            ) from error
        # the file holds every rank's shard of every tensor (when it was written with a shard
        # record), checked before anything is copied: a partial save would silently reset the rest
        check_shard_record(checkpoint, f"checkpoint {str(path)!r}")
        self._load_module_state(checkpoint["state_dict"])
        if self.lightning_module is not None and self.lightning_module.trainer.state.fn == TrainerFn.FITTING:
            saved = checkpoint.get("optimizer_states", [])
            if len(saved) != len(self.optimizers):
                raise ValueError(f"checkpoint holds {len(saved)} optimizer states, this run has {len(self.optimizers)} optimizers")
            for optimizer, state in zip(self.optimizers, saved):
                self._load_optimizer_state(optimizer, state)
        return checkpoint

    # --- export ------------------------------------------------------------------------------
    @contextmanager
    def gathered_trainable_parameters(self, module: nn.Module) -> Generator[None, None, None]:
        """Inside the context every trainable parameter (and adapter buffer) of ``module`` is a
        full, unsharded tensor on every rank, so ``save_adapter`` can read it. Collective:
        enter it on every rank. The sharded parameters are put back on exit."""
        full = {n: p.full_tensor() for n, p in module.named_parameters() if p.requires_grad and _is_dtensor(p)}
        with tensors_swapped_in(module, full):
            yield
