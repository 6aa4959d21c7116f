"""The part both ExpertLoRA layouts share: per-projection factors at a fixed storage rank, the
``rank_mask``, rank changes (prune, grow, ``set_ranks``), merging, and peft-layout helpers."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from lightning_peft.adapters.base import AdapterLayer, AdapterSpec, add_to_weight, restore_weight
from lightning_peft.allocation.rank_ops import (
    drop_slots,
    effective_parameters,
    free_slots,
    full_tensor,
    masked,
    orthogonal_rows,
    slot_generator,
    write_rows,
    zero_slots,
)


def _default_spec(**init_args: Any) -> AdapterSpec:
    # spec.py builds the layers: import it where a layer built without a spec needs it
    from lightning_peft.adapters.experts.spec import ExpertLoRA

    return ExpertLoRA(**init_args)


class ExpertsLoRALayer(AdapterLayer):
    """Common part of both layouts: per-projection factors ``lora_A[p] [E, R, d_in]``,
    ``lora_B[p] [E, d_out, R]`` and the ``rank_mask [E, R]`` buffer."""

    def __init__(
        self,
        base_layer: nn.Module,
        num_experts: int,
        shapes: dict[str, tuple[int, int]],  # projection -> (d_out, d_in)
        rank: int,
        alpha: float,
        max_rank: int,
        use_rslora: bool,
        init: str,
        recompute_input: bool,
        spec: AdapterSpec | None,
        device: torch.device | None,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.num_experts = num_experts
        self.shapes = dict(shapes)
        self.rank, self.alpha, self.max_rank, self.use_rslora = rank, float(alpha), max_rank, use_rslora
        self.init, self.recompute_input = init, recompute_input
        self.scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.spec = spec if spec is not None else _default_spec(rank=rank, alpha=alpha, max_rank=max_rank, use_rslora=use_rslora, init=init)  # type: ignore[arg-type]
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for proj, (d_out, d_in) in self.shapes.items():
            a = torch.zeros(num_experts, max_rank, d_in, device=device, dtype=dtype)
            for e in range(num_experts):
                if init == "gaussian":
                    nn.init.normal_(a[e, :rank], std=1.0 / rank)
                else:
                    nn.init.kaiming_uniform_(a[e, :rank], a=math.sqrt(5))
            self.lora_A[proj] = nn.Parameter(a)
            self.lora_B[proj] = nn.Parameter(torch.zeros(num_experts, d_out, max_rank, device=device, dtype=dtype))
        mask = torch.zeros(num_experts, max_rank, dtype=torch.bool, device=device)
        mask[:, :rank] = True
        self.register_buffer("rank_mask", mask)
        self._original: dict[str, torch.Tensor] = {}

    # --- rank bookkeeping ---------------------------------------------------------------------
    @property
    def ranks(self) -> list[int]:
        """``r_e`` for every expert (0 = pruned)."""
        return self.rank_mask.sum(1).tolist()

    def slot_cost(self) -> int:
        return sum(d_in + d_out for d_out, d_in in self.shapes.values())

    def rank_limit(self) -> int:
        """Largest rank an expert can grow to (storage, and ``r <= d_in`` for orthogonal rows)."""
        return min(self.max_rank, *(min(d_in, d_out) for d_out, d_in in self.shapes.values()))

    def rank_parameters(self) -> list[tuple[nn.Parameter, int | None, int]]:
        out: list[tuple[nn.Parameter, int | None, int]] = []
        for proj in self.shapes:
            out += [(self.lora_A[proj], 0, 1), (self.lora_B[proj], 0, 2)]
        return out

    def num_trainable(self) -> int:
        return effective_parameters(self)

    def factors(self, proj: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank-masked ``(A [E, R, d_in], B [E, d_out, R])`` of one projection."""
        return masked(self.lora_A[proj], self.rank_mask, 0, 1), masked(self.lora_B[proj], self.rank_mask, 0, 2)

    def delta_weight(self, proj: str) -> torch.Tensor:
        """``s B_e A_e`` for every expert in fp32, ``[E, d_out, d_in]`` (merging only)."""
        a, b = self.factors(proj)
        return self.scale * torch.bmm(b.detach().float(), a.detach().float())

    @torch.no_grad()
    def prune_expert(self, expert: int, optimizers: Sequence[torch.optim.Optimizer] = ()) -> int:
        """Set ``r_e = 0``: zero the expert's factors and their optimizer state. Returns the
        number of slots freed."""
        slots = torch.zeros_like(self.rank_mask)
        slots[expert] = self.rank_mask[expert]
        drop_slots(self, slots, optimizers)
        return int(slots.sum())

    @torch.no_grad()
    def grow_expert(self, expert: int, n: int, generator: torch.Generator, optimizers: Sequence[torch.optim.Optimizer] = ()) -> list[int]:
        """Add ``n`` rank slots to ``expert``: new ``A`` rows orthogonal to its active rows (and
        to each other), new ``B`` columns zero -- so the layer's output is unchanged -- and fresh
        (zero) optimizer state for them. Returns the new slot indices."""
        active = self.rank_mask[expert]
        slots = free_slots(active.cpu(), n)
        if len(slots) < n or int(active.sum()) + n > self.rank_limit():
            raise ValueError(f"expert {expert} cannot grow by {n}: rank {int(active.sum())}, limit {self.rank_limit()}")
        if not slots:
            return []
        new = torch.zeros_like(self.rank_mask)
        new[expert, slots] = True
        zero_slots(self, new, optimizers)  # B columns and optimizer moments of the new slots
        for proj in self.shapes:
            a = self.lora_A[proj]
            existing = full_tensor(a)[expert][active]  # all-gathered under FSDP2 (every process grows alike)
            rows = orthogonal_rows(existing, len(slots), generator, self._fresh_row_norm(proj, existing))
            write_rows(a, expert, 1, slots, rows)
        self.rank_mask[expert, slots] = True
        return slots

    def _fresh_row_norm(self, proj: str, existing: torch.Tensor) -> float:
        if len(existing):
            return float(existing.float().norm(dim=1).mean())
        d_in = self.shapes[proj][1]
        # norm of a row drawn as at initialisation (Kaiming-uniform: 1/sqrt(3); gaussian: sqrt(d_in)/rank)
        return math.sqrt(d_in) / self.rank if self.init == "gaussian" else 1.0 / math.sqrt(3.0)

    @torch.no_grad()
    def set_ranks(self, ranks: Sequence[int], seed: int = 0, optimizers: Sequence[torch.optim.Optimizer] = ()) -> None:
        """Set every expert's rank: lowering one drops its last active slots, raising one grows
        it (orthogonal ``A`` rows, zero ``B`` columns)."""
        if len(ranks) != self.num_experts:
            raise ValueError(f"expected {self.num_experts} ranks, got {len(ranks)}")
        for e, r in enumerate(ranks):
            if not 0 <= r <= self.rank_limit():
                raise ValueError(f"rank {r} of expert {e} is outside [0, {self.rank_limit()}]")
            active = self.rank_mask[e].nonzero().flatten().tolist()
            if r < len(active):
                slots = torch.zeros_like(self.rank_mask)
                slots[e, active[r:]] = True
                drop_slots(self, slots, optimizers)
            elif r > len(active):
                self.grow_expert(e, r - len(active), slot_generator(seed, e, r), optimizers)

    # --- merge --------------------------------------------------------------------------------
    def _weights(self) -> dict[str, list[tuple[torch.Tensor, bool]]]:
        """For every projection, the base weight tensors ``(tensor, transposed)`` it updates:
        one ``[E, ...]`` tensor (fused) or one ``[d_out, d_in]`` tensor per expert."""
        raise NotImplementedError

    def _weight_deltas(self) -> Iterator[tuple[str, int, torch.Tensor, torch.Tensor]]:
        """``(projection, index, base weight, s B_e A_e laid out like that weight)`` for every
        base weight tensor ``_weights`` lists."""
        for proj, targets in self._weights().items():
            delta = self.delta_weight(proj)  # [E, d_out, d_in]
            for i, (weight, transposed) in enumerate(targets):
                d = delta if len(targets) == 1 else delta[i]
                yield proj, i, weight, (d.transpose(-2, -1) if transposed else d)

    @torch.no_grad()
    def merge(self, keep_original: bool = True) -> None:
        """Fold ``s B_e A_e`` into every expert's weight, for every expert with ``r_e > 0``.

        Warns when rounding to the weight dtype swallows most of an update (e.g. tiny updates
        on bf16 weights) rather than silently dropping expert deltas."""
        if self.merged:
            return
        lost: list[tuple[str, torch.dtype]] = []
        for proj, i, weight, d in self._weight_deltas():
            before = weight.detach().float().clone()
            original = add_to_weight(weight, d, keep_original)
            if original is not None:
                self._original[f"{proj}.{i}"] = original
            norm = float(d.norm())
            if norm > 0 and float((weight.float() - before).norm()) < 0.5 * norm:
                lost.append((f"{proj}[{i}]", weight.dtype))
        self.merged = True
        if lost:
            warnings.warn(
                f"merging expert LoRA into {[n for n, _ in lost[:4]]}: more than half of the update's norm was lost to "
                f"rounding in the weight dtype ({lost[0][1]}). Merge into float32 weights, or keep the adapter unmerged.",
                stacklevel=2,
            )

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        for proj, i, weight, d in self._weight_deltas():
            restore_weight(weight, self._original.pop(f"{proj}.{i}", None), lambda d=d: d)
        self.merged = False

    # --- files ----------------------------------------------------------------------------------
    def peft_metadata(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "max_rank": self.max_rank,
            "experts": self.num_experts,
            "projections": list(self.shapes),
            "ranks": self.ranks,
        }

    def _compact(self, proj: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Active slots moved to the front and zero-padded to ``r_pad = max_e r_e`` (>= 1):
        ``(A [E, r_pad, d_in], B [E, d_out, r_pad], r_pad)``."""
        a, b = self.lora_A[proj].detach(), self.lora_B[proj].detach()
        r_pad = max(1, max(self.ranks))
        ca = a.new_zeros(self.num_experts, r_pad, a.shape[2])
        cb = b.new_zeros(self.num_experts, b.shape[1], r_pad)
        for e in range(self.num_experts):
            idx = self.rank_mask[e].nonzero().flatten()
            ca[e, : len(idx)] = a[e, idx]
            cb[e, :, : len(idx)] = b[e][:, idx]
        return ca, cb, r_pad

    def _expand(self, proj: str, ca: torch.Tensor, cb: torch.Tensor, ranks: Sequence[int]) -> dict[str, torch.Tensor]:
        a = torch.zeros_like(self.lora_A[proj], device="cpu")
        b = torch.zeros_like(self.lora_B[proj], device="cpu")
        for e, r in enumerate(ranks):
            a[e, :r] = ca[e, :r]
            b[e, :, :r] = cb[e][:, :r]
        return {f"lora_A.{proj}": a, f"lora_B.{proj}": b}

    def _mask_from(self, ranks: Sequence[int]) -> torch.Tensor:
        if len(ranks) != self.num_experts or any(not 0 <= r <= self.max_rank for r in ranks):
            raise ValueError(f"saved expert ranks {list(ranks)} do not fit {self.num_experts} experts of max_rank {self.max_rank}")
        mask = torch.zeros(self.num_experts, self.max_rank, dtype=torch.bool)
        for e, r in enumerate(ranks):
            mask[e, :r] = True
        return mask

    def _peft_alpha(self, r_pad: int, use_rslora: bool) -> float:
        # peft scales by alpha / r (alpha / sqrt(r)); choose alpha so that it equals our fixed s
        return self.scale * (math.sqrt(r_pad) if use_rslora else r_pad)

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, projections={list(self.shapes)}, rank={self.rank}, max_rank={self.max_rank}, "
            f"alpha={self.alpha}, scale={self.scale:.4g}"
        )


def expert_layers(model: nn.Module) -> dict[str, ExpertsLoRALayer]:
    """Every ExpertLoRA layer of ``model`` by name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ExpertsLoRALayer)}
