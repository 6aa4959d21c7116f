"""Find adapter layers that do not train: every adapter parameter's gradient is ``None`` or
exactly zero over the first few backward passes (pure torch, no Lightning import).

A layer is judged by all its adapter parameters together: plain LoRA starts with ``B = 0``, so
``dL/dA = (dL/dh) B^T ... = 0`` at the first step while ``dL/dB`` is not; such a layer is
fine. A layer is *silent* when, over the whole window, no adapter parameter of it ever had a
non-zero gradient: it is not used in forward, its output is multiplied by zero, it is detached
(``.detach()``, ``torch.no_grad``, ``.data``), or reentrant activation checkpointing cut it off.

Three entry points:

* :func:`check_adapter_gradients` -- call after a ``backward``: the names of silent layers now;
* :class:`GradientCheck` -- installed by ``apply_adapter(check_gradients=True)``: hooks that
  record, over the first ``steps`` backward passes, whether each adapter gradient was non-zero
  (on the device, no host sync per hook), then warn once naming the silent layers and remove
  themselves, so nothing runs afterwards;
* :func:`gradient_flags` -- the per-layer flags from ``.grad`` (local shards of sharded
  tensors), which ``AdapterCallback`` accumulates and reduces across ranks itself.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_peft.adapters.base import AdapterLayer

__all__ = ["GradientCheck", "check_adapter_gradients", "gradient_flags", "silent_layers_message"]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a ``DTensor`` (FSDP2), the tensor itself otherwise."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _nonzero(grad: torch.Tensor) -> torch.Tensor:
    """0-dim bool tensor on ``grad``'s device: does ``grad`` hold a non-zero (or NaN) entry?
    No host sync."""
    grad = _local(grad)
    if grad.is_sparse:
        grad = grad.coalesce().values()
    return grad.ne(0).any()


def _adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, AdapterLayer)]


def _inactive(layer: AdapterLayer) -> bool:
    """A layer with no active trainable slot (AdaLoRA pruned it to rank 0): nothing to check."""
    return layer.num_trainable() == 0


def gradient_flags(model: nn.Module, device: torch.device | str | None = None) -> tuple[list[str], torch.Tensor]:
    """``(names, flags)``: the adapter layers of ``model`` and, per layer, whether any of its
    adapter parameters holds a non-zero gradient in ``.grad`` right now (``flags``: bool
    ``[num_layers]`` on ``device``, default the first gradient's device). Sharded gradients
    count their local shard: reduce the flags across ranks (max) for the global answer. A layer
    with no active slot (rank pruned to 0) is flagged ``True``: it does not train by design."""
    names: list[str] = []
    per_layer: list[torch.Tensor | bool | None] = []
    for name, layer in _adapter_layers(model):
        names.append(name)
        if _inactive(layer):  # nothing to train by design: counts as fine
            per_layer.append(True)
            continue
        flag: torch.Tensor | None = None
        for p in layer.adapter_parameters():
            if p.grad is not None:
                nz = _nonzero(p.grad)
                flag = nz if flag is None else flag | nz.to(flag.device)
        per_layer.append(flag)
    if device is None:
        device = next((f.device for f in per_layer if isinstance(f, torch.Tensor)), torch.device("cpu"))
    flags = torch.zeros(len(names), dtype=torch.bool, device=device)
    for i, flag in enumerate(per_layer):
        if flag is True:
            flags[i] = True
        elif isinstance(flag, torch.Tensor):
            flags[i] = flag.to(device)  # a device-side copy, no host sync
    return names, flags


def check_adapter_gradients(model: nn.Module) -> list[str]:
    """Names of the adapter layers of ``model`` whose adapter parameters all have a ``None``
    or all-zero ``.grad`` now. Call it after ``loss.backward()`` (one host sync)."""
    names, flags = gradient_flags(model)
    return [n for n, ok in zip(names, flags.tolist()) if not ok]


def silent_layers_message(silent: Sequence[str], total: int, window: str) -> str:
    """The warning for ``silent`` adapter layers (first 8 named, then a count)."""
    shown = list(silent[:8])
    more = f" and {len(silent) - 8} more" if len(silent) > 8 else ""
    return (
        f"lightning-peft: {len(silent)} of {total} adapter layers received NO gradient (None or all zeros) {window} "
        f"and will not train: {shown}{more}. Likely causes: the layer is not used in forward; its output is "
        "multiplied by zero or detached (.detach(), torch.no_grad(), .data); reentrant activation checkpointing "
        "with a frozen input (use use_reentrant=False); the loss does not depend on it. Fix the forward, or drop "
        "these modules from target_modules."
    )


#: the unfinished check of each model (weak: a model that is gone takes its entry with it)
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, GradientCheck] = weakref.WeakKeyDictionary()


class GradientCheck:
    """Hooks on every trainable parameter of ``model`` for its first ``steps`` backward passes;
    then one ``UserWarning`` naming the adapter layers that only got ``None``/zero gradients,
    and every hook is removed.

    Per hook: ``flag_i |= any(grad_i != 0)`` as a device tensor (no host sync). Backward passes
    are counted per autograd graph task: the first hook of a new task queues an end-of-backward
    callback. Non-adapter trainable parameters (a head in ``trainable_modules``) are hooked too,
    so a backward that reaches no adapter at all still counts.

    The hooks live on the parameters only (``register_post_accumulate_grad_hook``), which
    ``copy.deepcopy`` and pickling drop and ``torch.compile``/DDP leave alone. ``fully_shard``
    (FSDP2) replaces the parameters, so the check never concludes there: use
    :func:`check_adapter_gradients` or ``AdapterCallback`` (which reduces across ranks). The
    check holds no reference to the parameters or the model; a new check on the same model
    replaces an unfinished one.
    """

    def __init__(self, model: nn.Module, steps: int = 3) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int (backward passes to watch), got {steps!r}")
        self.steps = steps
        self.backward_passes = 0
        self.done = False
        self.silent: list[str] | None = None  # set when the check concludes
        self._names: list[str] = []
        self._layers: list[weakref.ref[AdapterLayer]] = []  # weak: the check keeps no module alive
        self._flags: list[list[torch.Tensor | None]] = []  # [layer][parameter]
        self._handles: list[Any] = []
        self._task: int | None = None
        adapter_ids: set[int] = set()
        for index, (name, layer) in enumerate(_adapter_layers(model)):
            params = [p for p in layer.adapter_parameters() if p.requires_grad]
            self._names.append(name)
            self._layers.append(weakref.ref(layer))
            self._flags.append([None] * len(params))
            for slot, p in enumerate(params):
                adapter_ids.add(id(p))
                self._handles.append(p.register_post_accumulate_grad_hook(self._adapter_hook(index, slot)))
        for p in model.parameters():
            if p.requires_grad and id(p) not in adapter_ids:
                self._handles.append(p.register_post_accumulate_grad_hook(self._count_hook))
        previous = _ACTIVE.get(model)
        if previous is not None:
            previous.remove()  # adapters applied again (e.g. a library switching adapters): one check per model
        if self._names:
            _ACTIVE[model] = self
        else:
            self.remove()

    # hooks ---------------------------------------------------------------------------------
    def _adapter_hook(self, index: int, slot: int) -> Any:
        def hook(param: torch.Tensor) -> None:
            self._count_hook(param)
            if param.grad is not None:
                nz = _nonzero(param.grad)
                prev = self._flags[index][slot]
                self._flags[index][slot] = nz if prev is None else prev | nz

        return hook

    def _count_hook(self, param: torch.Tensor) -> None:
        if self.done:
            return
        # the first hook of a backward pass queues the end-of-pass callback; a pass that failed
        # midway never runs it, but the next pass has another graph-task id
        task = torch._C._current_graph_task_id() if hasattr(torch._C, "_current_graph_task_id") else 0
        if self._task is None or task != self._task:
            self._task = task
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self) -> None:
        if self.done:
            return
        self._task = None
        self.backward_passes += 1
        if self.backward_passes >= self.steps:
            self.conclude()

    # result --------------------------------------------------------------------------------
    def conclude(self) -> list[str]:
        """Judge now (one host sync), warn if any layer is silent, remove the hooks."""
        if self.silent is None:
            self.silent = [
                name
                for name, ref, flags in zip(self._names, self._layers, self._flags)
                if not any(bool(f) for f in flags if f is not None) and not ((layer := ref()) is not None and _inactive(layer))
            ]
            if self.silent:
                window = f"in the first {self.backward_passes} backward pass{'es' if self.backward_passes != 1 else ''}"
                warnings.warn(silent_layers_message(self.silent, len(self._names), window), UserWarning, stacklevel=2)
        self.remove()
        return self.silent

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        self.done = True
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._flags = [[None] * len(f) for f in self._flags]  # drop device tensors
