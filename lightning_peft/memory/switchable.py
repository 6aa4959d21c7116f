"""Switchable per-block activation checkpointing (pure torch).

:func:`wrap_blocks` installs a :class:`SwitchableBlock` as the *instance* ``forward`` of every
repeated block (the module tree, parameter names and state-dict keys do not change, so adapter
files and checkpoints are unaffected). This is the one place the package replaces a module's
``forward``: patching the instance (not the class) keeps other instances and ``copy.deepcopy``
working, and an instance forward installed before us is kept and called (``previous``).
A shared :class:`BlockSchedule` says, per block, how its activations are kept for backward:

``"none"``        plain forward: the block's saved activations stay in memory;
``"checkpoint"``  ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: only the block
                  inputs are kept and the forward is recomputed inside backward;
``"selective"``   selective checkpointing: outputs of matmul/attention/conv ops are kept, cheap
                  element-wise/normalization ops are recomputed (CUDA allocator sources only);
``"offload"``     (CUDA) saved tensors are copied to pinned host memory on a side stream during
                  forward and prefetched back one block ahead during backward.

Non-reentrant checkpointing gives gradients to parameters inside a block whether or not its
inputs require grad (frozen base + LoRA), is called once per parameter per backward (DDP without
``find_unused_parameters``) and composes with FSDP2 (the block's forward hooks, where FSDP2
unshards, run outside the checkpoint; its pre-backward hook unshards before recomputation).

When ``schedule.profiling`` is set, each block's forward is first run once more (RNG state
forked, output discarded) under a :class:`~lightning_peft.memory.SavedTensorMeter` and an op
profiler, giving a :class:`~lightning_peft.memory.profiles.BlockProfile`: activation bytes ``a``
(bytes saved for backward, split into the input bytes ``c`` and the rest ``e``), forward FLOPs
and time, and the bytes/time of the "expensive" ops that selective checkpointing would keep.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from lightning_peft.memory.meters import SavedTensorMeter, current_meter, tensor_leaves
from lightning_peft.memory.offload import Offloader
from lightning_peft.memory.ops import OpProfiler, selective_policy
from lightning_peft.memory.profiles import MODES, BlockProfile

__all__ = ["BlockSchedule", "SwitchableBlock", "wrap_blocks", "unwrap_blocks"]


class _RecomputeObserver:
    """Entered around a block's recomputation: counts it and measures its transient."""

    def __init__(self, schedule: BlockSchedule, index: int, meter: SavedTensorMeter | None, inner: Any = None):
        self.schedule = schedule
        self.index = index
        self.tracker = meter.recompute_context() if meter is not None else None
        self.inner = inner
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> _RecomputeObserver:
        self._stack = contextlib.ExitStack()
        if self.inner is not None:
            self._stack.enter_context(self.inner)
        if self.tracker is not None:
            self._stack.enter_context(self.tracker)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stack is not None
        self._stack.__exit__(*exc)
        self.schedule.recomputed[self.index] += 1
        if self.tracker is not None:
            peak = self.tracker.peak_delta
            prev = self.schedule.observed_transient[self.index]
            self.schedule.observed_transient[self.index] = max(prev, peak)


@dataclass
class BlockSchedule:
    """Shared, mutable state of the wrapped blocks: the plan and the profiling switch.

    ``modes[i]`` is read by block ``i`` at each forward call, so assigning a new plan between
    steps takes effect at the next step without touching the model.
    """

    num_blocks: int
    modes: list[str] = field(default_factory=list)
    profiling: bool = False
    use_reentrant: bool = False
    active: bool = True
    # filled while profiling
    profiles: list[BlockProfile | None] = field(default_factory=list)
    pre_bytes: int = 0
    last_exit_live: int = 0
    # per step observations
    recomputed: list[int] = field(default_factory=list)
    observed_transient: list[int] = field(default_factory=list)
    forward_calls: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.modes:
            self.modes = ["none"] * self.num_blocks
        self._offloader = Offloader()
        self._profilers: list[OpProfiler | None] = []
        self.begin_step(profiling=False)

    def set_modes(self, modes: Sequence[str]) -> None:
        if len(modes) != self.num_blocks:
            raise ValueError(f"plan has {len(modes)} entries for {self.num_blocks} blocks")
        for m in modes:
            if m not in MODES:
                raise ValueError(f"unknown mode {m!r}; expected one of {MODES}")
        self.modes = list(modes)

    def begin_step(self, profiling: bool) -> None:
        """Reset per-step state; with ``profiling`` every block is profiled in this step."""
        self.profiling = profiling
        n = self.num_blocks
        self.profiles = [None] * n
        self._profilers = [None] * n
        self.pre_bytes = 0
        self.last_exit_live = 0
        self.recomputed = [0] * n
        self.observed_transient = [0] * n
        self.forward_calls = [0] * n
        self._offloader.reset()

    def finish_profiles(self) -> list[BlockProfile] | None:
        """The profiles collected in this step (``None`` if some block did not run)."""
        for prof, op in zip(self.profiles, self._profilers):
            if prof is not None and op is not None:
                op.finalize()
                prof.time = op.total_time
                prof.sel_time = op.cheap_time
                prof.flops = op.flops
                prof.sel_bytes = op.sel_bytes
        for i, prof in enumerate(self.profiles):
            if prof is not None:
                prof.recompute_peak = max(prof.recompute_peak, self.observed_transient[i])
        self._profilers = [None] * self.num_blocks
        if any(p is None for p in self.profiles):
            return None
        return list(self.profiles)  # type: ignore[arg-type]

    # called by SwitchableBlock ---------------------------------------------------------------
    def _profile(self, index: int, module: nn.Module, fwd: Callable, args: tuple, kwargs: dict) -> None:
        inputs = list(tensor_leaves((args, kwargs)))
        device = inputs[0].device if inputs else torch.device("cpu")
        input_keys: dict[int, int] = {}
        for t in inputs:
            if isinstance(t, nn.Parameter):
                continue
            try:
                st = t.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            input_keys[st.data_ptr()] = st.nbytes()
        fork_devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork_devices, device_type=device.type if device.type == "cuda" else "cuda"):
            meter = SavedTensorMeter(module, detach=True)  # the graph is discarded: no cycles
            profiler = OpProfiler(device)
            with meter, profiler:
                out = fwd(*args, **kwargs)
            # input storages the block itself saves (still alive: the graph is held by `out`)
            saved_inputs = sum(nb for key, nb in input_keys.items() if key in meter._counts)
            del out
        profile = BlockProfile(
            act_bytes=meter.bytes,
            input_bytes=sum(input_keys.values()),
            extra_bytes=max(meter.bytes - saved_inputs, 0),
        )
        self.profiles[index] = profile
        self._profilers[index] = profiler

    def _context_fn(self, index: int, mode: str) -> Callable[[], tuple[Any, Any]]:
        meter = current_meter()

        def fn() -> tuple[Any, Any]:
            if mode == "selective":
                fwd_ctx, rec_ctx = create_selective_checkpoint_contexts(selective_policy, allow_cache_entry_mutation=True)
                return fwd_ctx, _RecomputeObserver(self, index, None, rec_ctx)
            return contextlib.nullcontext(), _RecomputeObserver(self, index, meter)

        return fn


class SwitchableBlock:
    """Installed as a block's instance ``forward``; runs it according to ``schedule.modes``.

    Not an ``nn.Module`` (so parameter names are unchanged). ``copy.deepcopy`` of the model
    copies it along with its block.
    """

    def __init__(self, module: nn.Module, index: int, schedule: BlockSchedule, previous: Callable | None) -> None:
        self.module = module
        self.index = index
        self.schedule = schedule
        self.previous = previous  # an instance forward that was there before us, if any

    def _forward(self) -> Callable:
        if self.previous is not None:
            return self.previous
        return type(self.module).forward.__get__(self.module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fwd = self._forward()
        s = self.schedule
        if not s.active or not torch.is_grad_enabled():
            return fwd(*args, **kwargs)
        i = self.index
        s.forward_calls[i] += 1
        meter = current_meter()
        if i == 0 and meter is not None:
            s.pre_bytes = meter.live_bytes
        if s.profiling:
            s._profile(i, self.module, fwd, args, kwargs)
        mode = s.modes[i]
        if mode == "none":
            out = fwd(*args, **kwargs)
        elif mode in ("checkpoint", "selective"):
            if s.use_reentrant:
                if kwargs:
                    raise ValueError(
                        f"reentrant checkpointing cannot pass keyword arguments ({sorted(kwargs)}) to block {i}; use use_reentrant=False"
                    )
                out = checkpoint(fwd, *args, use_reentrant=True)
            else:
                out = checkpoint(fwd, *args, use_reentrant=False, context_fn=s._context_fn(i, mode), **kwargs)
        elif mode == "offload":
            if not any(t.is_cuda for t in tensor_leaves((args, kwargs))):
                out = fwd(*args, **kwargs)  # offloading is a CUDA feature: plain forward elsewhere
            else:
                with s._offloader.hooks(i):
                    out = fwd(*args, **kwargs)
        else:
            raise ValueError(f"unknown mode {mode!r} for block {i}")
        if i == s.num_blocks - 1 and meter is not None:
            s.last_exit_live = meter.live_bytes
        return out


def wrap_blocks(blocks: Sequence[nn.Module], schedule: BlockSchedule | None = None) -> BlockSchedule:
    """Make each block switchable (in place); returns the shared schedule (all ``"none"``)."""
    blocks = list(blocks)
    if schedule is None:
        schedule = BlockSchedule(len(blocks))
    for i, block in enumerate(blocks):
        current = block.__dict__.get("forward")
        if isinstance(current, SwitchableBlock):
            raise ValueError(
                f"block {i} ({type(block).__name__}) is already wrapped for adaptive checkpointing; "
                "use one AdaptiveCheckpointCallback per model"
            )
        block.forward = SwitchableBlock(block, i, schedule, current)  # type: ignore[method-assign]
    return schedule


def unwrap_blocks(blocks: Iterable[nn.Module]) -> None:
    """Undo :func:`wrap_blocks`."""
    for block in blocks:
        current = block.__dict__.get("forward")
        if isinstance(current, SwitchableBlock):
            if current.previous is not None:
                block.forward = current.previous  # type: ignore[method-assign]
            else:
                del block.__dict__["forward"]
