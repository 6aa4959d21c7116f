"""Retrying a training step that ran out of memory (the one place we patch Lightning's loop).

Why a patch: Lightning has no retry hook, and an out-of-memory error can happen in forward *or*
in backward (recomputation transients), so the retry must cover both, and must not run the
optimizer twice.

* Automatic optimization: every step's work is a ``Closure`` object (``training_step`` +
  ``zero_grad`` + ``backward``) built by the loop's private ``_make_closure``
  (``trainer.fit_loop.epoch_loop.automatic_optimization._make_closure(kwargs, optimizer,
  batch_idx)``, pinned ``lightning<2.7``); the optimizer calls it (``optimizer_step``) or the loop
  calls it directly (gradient accumulation). We wrap ``_make_closure`` on the loop *instance* so
  each closure's ``closure`` body runs in a retry loop. A failed attempt never reached
  ``optimizer.step`` (the closure runs *before* the update), so a retry is exactly the step that
  should have happened: the partial graph is freed, the trainable parameters' ``.grad`` are
  restored to what they were before the attempt (a copy is kept only when gradients are being
  accumulated, i.e. the closure has no ``_zero_grad_fn``: a closure that zeroes them before its
  backward needs none), the plan is tightened and the closure runs again on the same batch.
* Manual optimization: the LightningModule's ``training_step`` (which calls
  ``manual_backward`` itself) is wrapped the same way. Keep ``optimizer.step()`` after the last
  ``manual_backward`` so that an out-of-memory retry never repeats an update.

If ``_make_closure`` is missing the strategy's ``training_step`` is wrapped instead (forward-only
retries) with a warning. ``tests/memory/test_adaptive_checkpoint.py::test_lightning_patch_points`` fails
loudly when a Lightning upgrade moves what this relies on. Logged values (``self.log``) of a
failed attempt may be recorded again by the retry. Under DDP a retry after a failure *inside
backward* cannot be matched by the other ranks' gradient all-reduce; keep ``headroom`` so that
the budget, not the device, is the limit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.memory import is_oom_error
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

__all__ = ["is_oom", "install_oom_retry", "retrying"]

#: ``recover(snapshot, message)``: restore ``.grad`` from the snapshot, tighten the plan, restart
#: measuring; raises to give up.
Recover = Callable[[list, str], None]


def is_oom(err: BaseException) -> bool:
    """An out-of-memory error: ``torch.OutOfMemoryError`` (CUDA, or simulated) or one Lightning
    recognises (CUDA/cuDNN/CPU allocator messages, ``is_oom_error``)."""
    return isinstance(err, torch.OutOfMemoryError) or is_oom_error(err)


def retrying(
    fn: Callable[..., Any],
    pl_module: pl.LightningModule,
    recover: Recover,
    max_retries: Callable[[], int],
    keep_grads: bool = True,
) -> Callable[..., Any]:
    """``fn`` retried (at most ``max_retries()`` times) after an out-of-memory error; ``keep_grads``:
    restore the trainable parameters' ``.grad`` to their values before the attempt (a copy taken
    at every call)."""

    def run(*args: Any, **kwargs: Any) -> Any:
        snapshot = (
            [(p, None if p.grad is None else p.grad.detach().clone()) for p in pl_module.parameters() if p.requires_grad]
            if keep_grads
            else []
        )
        attempt = 0
        while True:
            message = None
            try:
                return fn(*args, **kwargs)
            except BaseException as err:  # noqa: BLE001 - re-raised unless it is an OOM we can handle
                if not is_oom(err) or attempt >= max_retries():
                    raise
                message = f"{type(err).__name__}: {err}"
            # the exception and its frames (holding the partial graph) are gone here
            attempt += 1
            recover(snapshot, message or "")

    return run


def install_oom_retry(
    trainer: pl.Trainer, pl_module: pl.LightningModule, recover: Recover, max_retries: Callable[[], int]
) -> list[Callable[[], None]]:
    """Make the training step retry after an out-of-memory error (see the module docstring).

    Returns the undo functions (call them in reverse order at teardown).
    """

    def wrap(fn: Callable[..., Any], keep_grads: bool = True) -> Callable[..., Any]:
        return retrying(fn, pl_module, recover, max_retries, keep_grads=keep_grads)

    if not pl_module.automatic_optimization:
        original_ts = pl_module.training_step
        pl_module.training_step = wrap(original_ts)
        return [lambda: pl_module.__dict__.pop("training_step", None)]
    loop = trainer.fit_loop.epoch_loop.automatic_optimization
    original = getattr(loop, "_make_closure", None)
    if original is not None:

        def make_closure(*args: Any, **kwargs: Any) -> Any:
            closure = original(*args, **kwargs)
            # a closure with a zero_grad clears the gradients before its backward anyway
            accumulating = getattr(closure, "_zero_grad_fn", None) is None
            closure.closure = wrap(closure.closure, keep_grads=accumulating)
            return closure

        loop._make_closure = make_closure
        return [lambda: loop.__dict__.pop("_make_closure", None)]
    rank_zero_warn(
        "AdaptiveCheckpointCallback: this Lightning version has no closure factory to wrap; "
        "out-of-memory retries cover only the forward pass (strategy.training_step)."
    )
    strategy = trainer.strategy
    # forward only: an attempt never touches the gradients
    strategy.training_step = wrap(strategy.training_step, keep_grads=False)
    return [lambda: strategy.__dict__.pop("training_step", None)]
