"""Selection misalignment: how much one LoRA step moves the gates' selection weights (pure torch).

In a self-gated FFN ``phi(z) = z s(z)`` (SwiGLU: ``s = sigma``), a gate-LoRA step changes
``z`` and with it the selection weights ``s(z) [tokens, d_ff]`` that decide which channels pass.
``selection_shift`` takes one optimizer step from the model's current adapter weights on one
batch, once as plain LoRA and once under NA-LoRA's control (mask and step scaling from this
batch's gate statistics, or from a trained ``NALoRAController`` state), and reports per gate
layer::

    mean_shift  = mean_{tokens, j} |s(z'_j) - s(z_j)|
    max_shift   = max  |s(z'_j) - s(z_j)|
    flip_share  = share of (token, channel) pairs whose s crosses 1/2 (a channel switched on/off)
    step_norm   = ||B_g' - B_g||_F, the gate update's size

plus the batch loss before and after each step (what the step bought). The model is restored
exactly afterwards (trainable tensors, training mode, no hooks left).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from lightning_peft.adapters.nalora import nalora_gates, selection_weight
from lightning_peft.adapters.nalora_control import NALoRAController
from lightning_peft.validation import check_float

Mode = Literal["lora", "nalora"]


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """``model(**batch).loss`` for a dict batch (transformers), else ``model(batch)`` if it is a
    scalar tensor."""
    out = model(**batch) if isinstance(batch, Mapping) else model(batch)
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    if loss is None and isinstance(out, torch.Tensor) and out.ndim == 0:
        loss = out
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"selection_shift: {type(model).__name__} returned {type(out).__name__} without a loss; pass loss_fn=(model, batch) -> loss"
        )
    return loss


@torch.no_grad()
def _selection(
    model: nn.Module, batch: Any, gates: dict[str, tuple[nn.Module, str]], loss_fn: Callable
) -> tuple[float, dict[str, torch.Tensor]]:
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str, activation: str):  # noqa: ANN202
        return lambda module, args, out: seen.__setitem__(
            name, selection_weight(out.detach().float(), activation).reshape(-1, out.shape[-1])
        )

    handles = [layer.register_forward_hook(hook(n, act)) for n, (layer, act) in gates.items()]
    try:
        loss = float(loss_fn(model, batch))
    finally:
        for h in handles:
            h.remove()
    return loss, seen


def _shift(before: torch.Tensor, after: torch.Tensor, step: torch.Tensor) -> dict[str, float]:
    delta = (after - before).abs()
    crossed = (after > 0.5) != (before > 0.5)
    return {
        "mean_shift": float(delta.mean()),
        "max_shift": float(delta.max()),
        "flip_share": float(crossed.float().mean()),
        "step_norm": float(step.norm()),
    }


def _step(model: nn.Module, batch: Any, mode: str, lr: float, loss_fn: Callable, state: dict[str, Any] | None) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    controller = NALoRAController(model) if mode == "nalora" else None
    try:
        model.train()
        loss_fn(model, batch).backward()
        if controller is not None:
            if state is not None:
                controller.load_state_dict(state)
                controller.last_step = 0  # the loaded masks apply; this batch's statistics are not folded in
            else:
                controller.update_statistics(0)
                controller.refresh()
            controller.before_step(0, optimizer)
        optimizer.step()
        if controller is not None:
            controller.after_step(optimizer)
    finally:
        if controller is not None:
            controller.close()
        optimizer.zero_grad(set_to_none=True)


def selection_shift(
    model: nn.Module,
    batch: Any,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    lr: float = 1e-3,
    modes: tuple[Mode, ...] = ("lora", "nalora"),
    controller_state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Per gate layer, the selection-weight shift of one Adam step (``lr``) on ``batch``, for
    each of ``modes`` from the same starting weights (see module docstring).

    ``model`` must hold NA-LoRA gate layers (``apply_adapter(model, NALoRA(...))``); the
    ``"lora"`` mode is the same step without NA-LoRA's control. ``controller_state``: a
    ``NALoRAController.state_dict()`` (e.g. ``NALoRACallback.controller``'s after training)
    whose masks and groups the ``"nalora"`` step uses; default: computed from ``batch``.

    Returns ``{"loss": {"before": x, mode: x}, "layers": {gate name: {mode: {"mean_shift",
    "max_shift", "flip_share", "step_norm"}}}}``.
    """
    check_float("lr", lr, low=0.0, low_open=True)
    if not modes or any(m not in ("lora", "nalora") for m in modes):
        raise ValueError(f"modes must be a non-empty tuple of 'lora'/'nalora', got {modes!r}")
    found = nalora_gates(model)
    if not found:
        raise ValueError(
            f"selection_shift: {type(model).__name__} has no NA-LoRA gate layers; apply_adapter(model, NALoRA(...)) first "
            "(the 'lora' mode is the same step without NA-LoRA's control)"
        )
    loss_fn = loss_fn or default_loss
    gates = {ffn.gate: (layer, ffn.activation) for ffn, layer in found}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in trainable.items()}
    was_training = model.training
    result: dict[str, Any] = {"loss": {}, "layers": {n: {} for n in gates}}
    try:
        model.eval()
        result["loss"]["before"], before = _selection(model, batch, gates, loss_fn)
        for mode in modes:
            with torch.no_grad():
                for n, p in trainable.items():
                    p.copy_(start[n])
            _step(model, batch, mode, lr, loss_fn, controller_state)
            model.eval()
            result["loss"][mode], after = _selection(model, batch, gates, loss_fn)
            for name, (layer, _) in gates.items():
                b_name = next(n for n, p in trainable.items() if p is layer.lora_B.weight)
                result["layers"][name][mode] = _shift(before[name], after[name], layer.lora_B.weight.detach() - start[b_name])
    finally:
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(start[n])
                p.grad = None
        model.train(was_training)
    return result
