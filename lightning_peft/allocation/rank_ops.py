"""Rank-change machinery shared by ExpertLoRA (EPnG prune/grow) and AdaLoRA (pruning).

Shapes never change. A rank-adaptive layer stores its adapter at a fixed maximum rank ``R``
and keeps a boolean ``rank_mask [G, R]`` buffer: ``G`` groups (the experts of an MoE block, or
one group for a dense AdaLoRA layer), ``R`` rank slots per group. Slot ``(g, k)`` is active
when ``rank_mask[g, k]``; the forward multiplies the adapter factors by the mask, so inactive
slots contribute nothing and receive exactly zero gradient. Because parameter shapes are
static, DDP buckets, FSDP2 shards, ``torch.compile`` graphs and optimizer state stay valid
through every rank change: pruning or growing is a handful of in-place writes.

A layer exposes its slot-indexed tensors through ``rank_parameters()``: ``(param, group_dim,
rank_dim)`` triples saying which dimension of ``param`` indexes the group (``None`` when
``G == 1``) and which the rank slot. The helpers below use them to

* zero parameters *and* optimizer state (Adam's ``exp_avg``/``exp_avg_sq``, SGD momentum, ...)
  of chosen slots (``zero_slots``), and switch them off as well (``drop_slots``),
* count the effective trainable parameters, ``sum_g r_g * cost_g`` (``effective_parameters``),
* draw new factor rows orthogonal to the active ones (``orthogonal_rows``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class RankAdaptive(Protocol):
    """What ``rank_ops`` needs from a layer whose per-group rank can change."""

    rank_mask: torch.Tensor  # [G, R] bool

    def rank_parameters(self) -> list[tuple[nn.Parameter, int | None, int]]: ...

    def slot_cost(self) -> int:
        """Trainable parameters one active rank slot costs (e.g. ``d_in + d_out``)."""
        ...


def effective_parameters(layer: RankAdaptive) -> int:
    """Trainable parameters the active slots hold: ``(number of active slots) * slot_cost``."""
    return int(layer.rank_mask.sum().item()) * layer.slot_cost()


# --------------------------------------------------------------------------------------------
# Masks broadcast onto slot-indexed tensors
# --------------------------------------------------------------------------------------------
def _broadcast(mask: torch.Tensor, param: torch.Tensor, group_dim: int | None, rank_dim: int) -> torch.Tensor:
    """``mask [G, R]`` reshaped so that it broadcasts against ``param``."""
    shape = [1] * param.ndim
    if group_dim is None:
        if mask.shape[0] != 1:
            raise ValueError(f"a tensor without a group dimension needs a [1, R] mask, got {tuple(mask.shape)}")
        shape[rank_dim] = mask.shape[1]
        return mask.reshape(shape)
    shape[group_dim], shape[rank_dim] = mask.shape
    return (mask if group_dim < rank_dim else mask.t()).reshape(shape)


def masked(param: torch.Tensor, mask: torch.Tensor, group_dim: int | None, rank_dim: int) -> torch.Tensor:
    """``param`` with inactive slots zeroed (differentiable: their gradient is exactly 0)."""
    return param * _broadcast(mask, param, group_dim, rank_dim).to(param.dtype)


def _local(tensor: torch.Tensor, full_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The local shard of a DTensor (FSDP2) and the matching slice of a full-shape mask."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return tensor, full_mask
    if not isinstance(tensor, DTensor):
        return tensor, full_mask
    from torch.distributed.tensor import distribute_tensor

    sharded = distribute_tensor(full_mask.to(tensor.device), tensor.device_mesh, tensor.placements)
    return tensor.to_local(), sharded.to_local()


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor (FSDP2 shard) is all-gathered -- a collective, so every
    process must call it for the same tensors in the same order -- anything else is returned."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return tensor
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def write_rows(param: torch.Tensor, group: int, rank_dim: int, slots: list[int], values: torch.Tensor) -> None:
    """``param[group]`` at ``slots`` along ``rank_dim`` (counted in ``param``) := ``values``
    (shaped like ``param[group]`` indexed at ``slots``). A DTensor sharded on dim 0 (FSDP2)
    writes into its local shard when it holds ``group``; every process calls this."""
    try:
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:  # pragma: no cover
        DTensor = None  # type: ignore[assignment,misc]  # noqa: N806
    target, index = param, group
    if DTensor is not None and isinstance(param, DTensor):
        local_shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        if any(o != 0 for o in offset[1:]) or any(l != g for l, g in zip(local_shape[1:], param.shape[1:])):
            raise NotImplementedError("rank changes support DTensors sharded on the expert dimension (dim 0) only")
        index = group - offset[0]
        if not 0 <= index < local_shape[0]:
            return
        target = param.to_local()
    row = target[index]
    idx = torch.tensor(slots, device=row.device)
    row.index_copy_(rank_dim - 1, idx, values.to(row.device, row.dtype))


@torch.no_grad()
def zero_slots(
    layer: RankAdaptive,
    slots: torch.Tensor,
    optimizers: Iterable[torch.optim.Optimizer] = (),
    parameters: bool = True,
) -> None:
    """Zero the slots ``slots [G, R]`` (bool) of every slot-indexed parameter of ``layer`` and
    of every optimizer-state tensor of the same shape (moments, momentum buffers).

    Zeroed optimizer state means a freed slot keeps no stale momentum that would move it after
    it was pruned, and a newly grown slot starts from fresh moments. The optimizer itself
    (its parameter list, param groups and LR schedulers) is untouched."""
    states = [opt.state for opt in optimizers]
    for param, group_dim, rank_dim in layer.rank_parameters():
        full = _broadcast(slots.to(param.device), param, group_dim, rank_dim).expand(param.shape)
        targets: list[torch.Tensor] = [param.data] if parameters else []
        for state in states:
            for value in state.get(param, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    targets.append(value)
        for target in targets:
            local, local_mask = _local(target, full)
            local.masked_fill_(local_mask, 0)


@torch.no_grad()
def drop_slots(layer: RankAdaptive, slots: torch.Tensor, optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
    """Deactivate the slots ``slots [G, R]`` (bool): zero them and their optimizer state
    (``zero_slots``) and clear them in ``rank_mask``."""
    zero_slots(layer, slots, optimizers)
    layer.rank_mask.masked_fill_(slots.to(layer.rank_mask.device), False)


# --------------------------------------------------------------------------------------------
# Orthogonal growth
# --------------------------------------------------------------------------------------------
def orthogonal_rows(existing: torch.Tensor, n: int, generator: torch.Generator, row_norm: float | None = None) -> torch.Tensor:
    """``n`` new rows ``[n, d]`` orthogonal to the rows of ``existing [k, d]`` and to each
    other (requires ``k + n <= d``), each of norm ``row_norm`` (default: the mean norm of the
    existing rows, or ``1/sqrt(3)`` -- the expected norm of a Kaiming-uniform row -- if there are
    none). Computed in float64 on the CPU from ``generator``, so every process that passes an
    equally seeded generator gets bit-identical rows."""
    existing = existing.detach().to("cpu", torch.float64)
    k, d = existing.shape
    if k + n > d:
        raise ValueError(f"cannot add {n} rows orthogonal to {k} existing ones in dimension {d} (needs k + n <= d)")
    if row_norm is None:
        norms = existing.norm(dim=1)
        norms = norms[norms > 0]
        row_norm = float(norms.mean()) if len(norms) else 1.0 / math.sqrt(3.0)
    new = torch.randn(n, d, generator=generator, dtype=torch.float64)
    nonzero = existing[existing.norm(dim=1) > 0]
    if len(nonzero):
        basis, _ = torch.linalg.qr(nonzero.t())  # [d, k'] orthonormal columns spanning the rows
        for _ in range(2):  # "twice is enough" (Kahan): project out the existing span
            new = new - (new @ basis) @ basis.t()
    q, r = torch.linalg.qr(new.t())  # orthonormalise the new rows among themselves
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))  # deterministic signs
    if len(nonzero):
        q = q - basis @ (basis.t() @ q)  # remove rounding leakage from the QR
        q = q / q.norm(dim=0, keepdim=True)
    return (q.t() * row_norm).contiguous()


def slot_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and integer ``keys`` (step, layer, expert, ...):
    identical on every process, different for every slot."""
    value = seed & 0xFFFFFFFF
    for key in keys:
        value = (value * 1_000_003 + int(key) + 0x9E3779B9) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


def free_slots(mask_row: torch.Tensor, n: int) -> list[int]:
    """The first ``n`` inactive slot indices of one group."""
    return (~mask_row).nonzero().flatten().tolist()[:n]


def check_budget(layers: Sequence[RankAdaptive], budget: int) -> int:
    used = sum(effective_parameters(layer) for layer in layers)
    if used > budget:
        raise RuntimeError(f"rank allocation uses {used:,} trainable parameters, above the budget of {budget:,}")
    return used
