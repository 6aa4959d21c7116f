"""ExpertLoRA: LoRA on the routed experts of mixture-of-experts blocks, one rank per expert.

For every expert ``e`` of an MoE block and every adapted expert projection ``p`` with frozen
weight ``W_{p,e} [d_out, d_in]`` the adapter learns ``A_{p,e} [r_e, d_in]`` and
``B_{p,e} [d_out, r_e]``; a token routed to ``e`` sees ``W_{p,e} + s B_{p,e} A_{p,e}``, with a
fixed ``s = alpha / rank`` (``alpha / sqrt(rank)`` with ``use_rslora``), ``rank`` being the
initial rank. ``s`` does not depend on the current ``r_e``, so growing a rank does not rescale
what an expert has learnt.

Static shapes. Each block stores ``lora_A[p] [E, R, d_in]`` and ``lora_B[p] [E, d_out, R]`` at a
fixed maximum rank ``R = max_rank`` plus a boolean ``rank_mask [E, R]`` buffer; ``r_e`` is the
number of active slots of expert ``e`` (``0``: pruned). The forward multiplies the factors by
the mask, so inactive slots add nothing and get exactly zero gradient. Shapes never change,
so DDP, FSDP2, ``torch.compile`` and the optimizer are unaffected by rank changes
(``lightning_peft.adapters.rank_ops``). The trainable-parameter count reported is the
effective one, ``sum_e r_e * sum_p (d_in_p + d_out_p)``, not the storage.

Two layouts:

* **Fused 3-D experts** (transformers 5.x OLMoE, Qwen2-MoE, Mixtral, ...): ``gate_up_proj
  [E, 2I, H]`` and ``down_proj [E, H, I]`` (or transposed, ``is_transposed``), called as
  ``experts(hidden [N, H], top_k_index [N, K], top_k_weights [N, K])``. ``FusedExpertsLoRA``
  replaces the experts' forward: the ``N*K`` (token, expert) pairs are sorted by expert and every
  projection runs as grouped matmuls over the routed tokens only -- base, ``u = x A_e^T`` and
  ``u B_e^T`` -- in one autograd node (``_ExpertLoRAFunction``) that saves the un-gathered input
  (``N`` rows, not ``N*K``) and ``u``. No per-expert dense ``B_e A_e`` is ever formed (peft's
  ``target_parameters`` builds ``W + s B A`` for all experts every step).
* **Experts as modules** (an ``nn.ModuleList`` of experts built from ``nn.Linear``):
  ``ModuleListExpertsLoRA`` keeps the list (the block still indexes ``experts[i]``) and adds
  each expert's update with a forward hook on its linears, i.e. again only on the tokens the
  block routes to that expert.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.adapters.base import (
    AdapterLayer,
    AdapterSpec,
    add_to_weight,
    check_positive,
    restore_weight,
)
from lightning_peft.adapters.lora import _input_recipe, _replay, lora_forward
from lightning_peft.adapters.rank_ops import (
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
from lightning_peft.validation import (
    InvalidArgumentError,
    check_bool,
    check_choice,
    check_str_list,
)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """autocast's dtype when autocast is on, else the activation's."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


# --------------------------------------------------------------------------------------------
# Grouped matmuls over expert-sorted rows
# --------------------------------------------------------------------------------------------
_GMM_FAILED: set[tuple[str, str, torch.dtype]] = set()


def _gmm_usable(kind: str, x: torch.Tensor) -> bool:
    if not hasattr(F, "grouped_mm") or (kind, x.device.type, x.dtype) in _GMM_FAILED:
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False  # under torch.compile grouped_mm traces in bf16 only: use the opaque loop op
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16  # the CUDA kernels take bf16 only
    return x.device.type == "cpu"


# The fallbacks loop over experts with one host sync (offs.tolist()). As custom ops they are
# opaque to torch.compile (no graph break, no data-dependent guards); our autograd Function
# calls them with gradients off, so they need no autograd formula of their own.
@torch.library.custom_op("lightning_peft::grouped_mm_loop", mutates_args=())
def _grouped_mm_loop(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    out = x.new_zeros(x.shape[0], w.shape[-1])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(x[start:end], w[e], out=out[start:end])
        start = end
    return out


@_grouped_mm_loop.register_fake
def _(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[-1])


@torch.library.custom_op("lightning_peft::grouped_outer_loop", mutates_args=())
def _grouped_outer_loop(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    out = a.new_zeros(offs.shape[0], a.shape[1], b.shape[1])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(a[start:end].t(), b[start:end], out=out[e])
        start = end
    return out


@_grouped_outer_loop.register_fake
def _(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return a.new_empty(offs.shape[0], a.shape[1], b.shape[1])


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``out[rows of e] = x[rows of e] @ w[e]`` for ``x [S, k]`` sorted by expert, ``w [E, k, n]``
    and ``offs [E]`` (int32 cumulative row counts, ``offs[-1] == S``) -> ``[S, n]``."""
    if _gmm_usable("mm", x):
        if torch.compiler.is_compiling():
            return F.grouped_mm(x, w, offs=offs)
        try:
            return F.grouped_mm(x, w, offs=offs)
        except RuntimeError:  # shape/alignment the kernel does not take: use the loop from now on
            _GMM_FAILED.add(("mm", x.device.type, x.dtype))
    return _grouped_mm_loop(x, w, offs)


def grouped_outer(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``out[e] = a[rows of e]^T @ b[rows of e]`` for ``a [S, m]``, ``b [S, n]`` -> ``[E, m, n]``
    (the per-expert weight gradient)."""
    if _gmm_usable("outer", a):
        if torch.compiler.is_compiling():
            return F.grouped_mm(a.t(), b, offs=offs)
        try:
            return F.grouped_mm(a.t(), b, offs=offs)
        except RuntimeError:
            _GMM_FAILED.add(("outer", a.device.type, a.dtype))
    return _grouped_outer_loop(a, b, offs)


class _ExpertLoRAFunction(torch.autograd.Function):
    """One expert projection over expert-sorted rows, base and LoRA update in one node::

        xg  = x[gather]                        [S, d_in]    (x itself when gather is None)
        out = xg W_e^T + s (xg A_e^T) B_e^T    [S, d_out]   per expert e, rows of e only

    ``w_io [E, d_in, d_out]`` (a view of the frozen weight), ``a [E, R, d_in]``,
    ``b [E, d_out, R]`` (already rank-masked). Saved for backward: ``x`` (or nothing new when it
    can be recomputed from its producer's saved tensors), ``gather``, ``u = xg A^T [S, R]`` and
    the small factors.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        gather: torch.Tensor | None,
        offs: torch.Tensor,
        w_io: torch.Tensor,
        a: torch.Tensor | None,
        b: torch.Tensor | None,
        scale: float,
        recompute_input: bool,
    ) -> torch.Tensor:
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(dtype)
            xg = xc[gather] if gather is not None else xc
            w = w_io.to(dtype)
            out = grouped_mm(xg, w, offs)
            u = None
            if a is not None and b is not None:
                ac, bc = a.to(dtype), b.to(dtype)
                u = grouped_mm(xg, ac.transpose(1, 2), offs)  # [S, R]
                out.add_(grouped_mm(u, bc.transpose(1, 2), offs), alpha=scale)
            else:
                ac = bc = None
        needs_x_later = (a is not None and a.requires_grad) or w_io.requires_grad
        # (dynamo cannot trace grad_fn inspection: compiled graphs save x, their own memory planning applies)
        recipe = _input_recipe(x) if recompute_input and needs_x_later and not torch.compiler.is_compiling() else None
        if not needs_x_later:
            ctx.recipe, inputs = None, ()
        elif recipe is None:
            ctx.recipe, inputs = None, (x,)
        else:
            ctx.recipe, inputs = (recipe[0], recipe[2]), recipe[1]
        ctx.has_x = needs_x_later
        ctx.has_gather, ctx.has_lora = gather is not None, u is not None
        ctx.scale, ctx.dtype, ctx.x_dtype, ctx.x_shape = scale, dtype, x.dtype, x.shape
        ctx.param_dtypes = (None if a is None else a.dtype, None if b is None else b.dtype, w_io.dtype)
        tensors = [offs, w_io]
        if gather is not None:
            tensors.append(gather)
        if u is not None:
            tensors += [u, ac, bc]
        ctx.save_for_backward(*tensors, *inputs)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        saved = list(ctx.saved_tensors)
        offs, w_io = saved.pop(0), saved.pop(0)
        gather = saved.pop(0) if ctx.has_gather else None
        u = a = b = None
        if ctx.has_lora:
            u, a, b = saved.pop(0), saved.pop(0), saved.pop(0)
        x = None
        if ctx.has_x:
            x = saved[0] if ctx.recipe is None else _replay(ctx.recipe[0], tuple(saved), ctx.recipe[1])
        need_x, _, _, need_w, need_a, need_b = ctx.needs_input_grad[:6]
        dtype, scale = ctx.dtype, ctx.scale
        grad_x = grad_w = grad_a = grad_b = None
        with torch.autocast(grad_out.device.type, enabled=False):
            dy = grad_out.to(dtype).contiguous()
            g = None
            if u is not None:
                g = grouped_mm(dy, b, offs).mul_(scale)  # [S, R]
            if need_x:
                dxg = grouped_mm(dy, w_io.to(dtype).transpose(1, 2), offs)
                if g is not None:
                    dxg.add_(grouped_mm(g, a, offs))
                if gather is not None:
                    grad_x = torch.zeros(ctx.x_shape, dtype=dtype, device=dy.device).index_add_(0, gather, dxg)
                else:
                    grad_x = dxg
                grad_x = grad_x.to(ctx.x_dtype)
            if need_a or need_b or need_w:
                xg = None
                if x is not None:
                    xc = x.to(dtype)
                    xg = xc[gather] if gather is not None else xc
                if need_a and g is not None:
                    grad_a = grouped_outer(g, xg, offs).to(ctx.param_dtypes[0])
                if need_b and u is not None:
                    grad_b = grouped_outer(dy, u, offs).mul_(scale).to(ctx.param_dtypes[1])
                if need_w:
                    grad_w = grouped_outer(xg, dy, offs).to(ctx.param_dtypes[2])
        return grad_x, None, None, grad_w, grad_a, grad_b, None, None


def expert_linear(
    x: torch.Tensor,
    gather: torch.Tensor | None,
    offs: torch.Tensor,
    w_io: torch.Tensor,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    scale: float,
    recompute_input: bool = True,
) -> torch.Tensor:
    """Functional form of ``_ExpertLoRAFunction``."""
    return _ExpertLoRAFunction.apply(x, gather, offs, w_io, a, b, scale, recompute_input)


def sort_by_expert(top_k_index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(perm, expert_ids_sorted, offs)`` for the flattened ``(token, k)`` pairs: row ``i`` of
    the sorted order is pair ``perm[i]`` (token ``perm[i] // K``)."""
    ids = top_k_index.reshape(-1)
    sorted_ids, perm = torch.sort(ids, stable=True)
    # histc, not bincount: no device sync (bincount sizes its output from the data); CPU histc
    # takes floats only, CUDA integers (as transformers' grouped_mm path)
    values = sorted_ids.float() if ids.device.type in ("cpu", "mps") else sorted_ids.int()
    counts = torch.histc(values, bins=num_experts, min=0, max=num_experts - 1)
    return perm, sorted_ids, torch.cumsum(counts, 0).to(torch.int32)


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------
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
        self.spec = spec if spec is not None else ExpertLoRA(rank=rank, alpha=alpha, max_rank=max_rank, use_rslora=use_rslora, init=init)  # type: ignore[arg-type]
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
    def grow_expert(
        self, expert: int, n: int, generator: torch.Generator, optimizers: Sequence[torch.optim.Optimizer] = ()
    ) -> list[int]:
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


class FusedExpertsLoRA(ExpertsLoRALayer):
    """ExpertLoRA on a fused experts module (3-D ``gate_up_proj``/``up_proj`` and ``down_proj``),
    called as ``(hidden [N, H], top_k_index [N, K], top_k_weights [N, K]) -> [N, H]``.
    ``projections=None`` adapts every projection."""

    def __init__(self, base_layer: nn.Module, projections: Sequence[str] | None, rank: int, alpha: float, max_rank: int,
                 use_rslora: bool = False, init: str = "kaiming", recompute_input: bool = True, spec: AdapterSpec | None = None) -> None:
        layout = fused_layout(base_layer)
        if layout is None:
            raise TypeError(f"{type(base_layer).__name__} is not a fused experts module")
        self.layout = layout
        shapes = {p: s for p, s in layout["shapes"].items() if projections is None or p in projections}
        weight = getattr(base_layer, layout["up"])
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        super().__init__(base_layer, layout["num_experts"], shapes, rank, alpha, max_rank, use_rslora, init, recompute_input, spec, weight.device, dtype)

    def _w_io(self, name: str) -> torch.Tensor:
        weight = getattr(self.base_layer, name)
        return weight if self.layout["transposed"] else weight.transpose(1, 2)

    def _project(self, name: str, x: torch.Tensor, gather: torch.Tensor | None, offs: torch.Tensor, sorted_ids: torch.Tensor) -> torch.Tensor:
        a = b = None
        if name in self.shapes:
            a, b = self.factors(name)
        out = expert_linear(x, gather, offs, self._w_io(name), a, b, self.scale, self.recompute_input)
        if self.layout["bias"]:
            out = out + getattr(self.base_layer, f"{name}_bias")[sorted_ids].to(out.dtype)
        return out

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self.merged:
            return base(hidden_states, top_k_index, top_k_weights)
        num_tokens, k = top_k_index.shape[0], top_k_index.shape[-1]
        perm, sorted_ids, offs = sort_by_expert(top_k_index, self.num_experts)
        token = perm // k
        h = self._project(self.layout["up"], hidden_states, token, offs, sorted_ids)
        if self.layout["gate"]:
            apply_gate = getattr(base, "_apply_gate", None)
            if apply_gate is not None:
                h = apply_gate(h)
            else:
                gate, up = h.chunk(2, dim=-1)
                h = base.act_fn(gate) * up
        else:
            h = base.act_fn(h)
        y = self._project("down_proj", h, None, offs, sorted_ids)
        if self.layout["post_norm"]:
            y = base.post_expert_norm(y)
        y = y * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        # deterministic reduction over the K choices of each token (as transformers' grouped_mm path)
        return y[inverse].view(num_tokens, k, -1).sum(dim=1).to(hidden_states.dtype)

    def _weights(self) -> dict[str, list[tuple[torch.Tensor, bool]]]:
        return {p: [(getattr(self.base_layer, p), self.layout["transposed"])] for p in self.shapes}

    # peft: one ParamWrapper per adapted parameter, nested in parameter registration order
    # (the last one is outermost); lora_A [r*E, d_in] expert-major, lora_B [d_out, r*E] rank-major.
    def _peft_prefixes(self) -> dict[str, str]:
        order = [n for n, _ in self.base_layer.named_parameters(recurse=False) if n in self.shapes]
        return {p: "base_layer." * (len(order) - 1 - i) for i, p in enumerate(order)}

    def peft_config_entry(self, name: str, use_rslora: bool = False) -> dict[str, Any] | None:
        r_pad = max(1, max(self.ranks))
        keys = [f"{name}.{p}" for p in self._peft_prefixes()]
        return {
            "target_parameters": keys,
            "rank_pattern": {k: r_pad for k in keys},
            "alpha_pattern": {k: self._peft_alpha(r_pad, use_rslora) for k in keys},
        }

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for proj, prefix in self._peft_prefixes().items():
            ca, cb, r_pad = self._compact(proj)
            out[f"{prefix}lora_A.weight"] = ca.reshape(self.num_experts * r_pad, -1)
            out[f"{prefix}lora_B.weight"] = cb.permute(1, 2, 0).reshape(cb.shape[1], r_pad * self.num_experts)
        return out

    def from_peft_state_dict(self, tensors: dict[str, torch.Tensor], entry: dict[str, Any]) -> dict[str, torch.Tensor]:
        ranks = entry["ranks"]
        out = {"rank_mask": self._mask_from(ranks)}
        for proj, prefix in self._peft_prefixes().items():
            a, b = tensors[f"{prefix}lora_A.weight"], tensors[f"{prefix}lora_B.weight"]
            r_pad = a.shape[0] // self.num_experts
            ca = a.reshape(self.num_experts, r_pad, -1)
            cb = b.reshape(b.shape[0], r_pad, self.num_experts).permute(2, 0, 1)
            out.update(self._expand(proj, ca, cb, ranks))
        return out


class _ExpertHook:
    """Forward hook on expert ``e``'s linear ``proj``: adds ``s x A_e^T B_e^T`` to its output.
    Holds its layer strongly so that ``copy.deepcopy`` of the model re-targets it correctly."""

    def __init__(self, owner: ModuleListExpertsLoRA, proj: str, expert: int) -> None:
        self.owner, self.proj, self.expert = owner, proj, expert

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        owner = self.owner
        if owner.merged or self.proj not in owner.shapes:
            return None
        e = self.expert
        mask = owner.rank_mask[e : e + 1]  # [1, R]
        a = masked(owner.lora_A[self.proj][e], mask, None, 0)  # [R, d_in]
        b = masked(owner.lora_B[self.proj][e], mask, None, 1)  # [d_out, R]
        delta = lora_forward(args[0], None, None, a, b, owner.scale, 0.0, owner.recompute_input)
        return output + delta.to(output.dtype)


class ModuleListExpertsLoRA(ExpertsLoRALayer):
    """ExpertLoRA on an ``nn.ModuleList`` of experts made of ``nn.Linear`` layers. The list stays
    in place as ``base_layer`` (indexing, ``len`` and iteration pass through), so the MoE block's
    own routing code runs unchanged and each update sees only the tokens routed to its expert."""

    def __init__(self, base_layer: nn.ModuleList, projections: Sequence[str] | None, rank: int, alpha: float, max_rank: int,
                 use_rslora: bool = False, init: str = "kaiming", recompute_input: bool = True, spec: AdapterSpec | None = None) -> None:
        linears = expert_linears(base_layer)
        if linears is None:
            raise TypeError("not a list of identically shaped experts with nn.Linear layers")
        self.paths = _chosen_paths(linears, projections)
        first = base_layer[0]
        shapes = _linear_shapes(first, self.paths)
        weight = first.get_submodule(next(iter(self.paths.values()))).weight
        super().__init__(base_layer, len(base_layer), shapes, rank, alpha, max_rank, use_rslora, init, recompute_input, spec, weight.device, weight.dtype)
        self._handles = [
            expert.get_submodule(path).register_forward_hook(_ExpertHook(self, key, e))
            for e, expert in enumerate(base_layer)
            for key, path in self.paths.items()
        ]

    def __getitem__(self, index: int) -> nn.Module:
        return self.base_layer[index]

    def __len__(self) -> int:
        return len(self.base_layer)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.base_layer)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("an nn.ModuleList of experts is indexed, not called (index the experts as before)")

    def _weights(self) -> dict[str, list[tuple[torch.Tensor, bool]]]:
        return {k: [(expert.get_submodule(self.paths[k]).weight, False) for expert in self.base_layer] for k in self.shapes}

    # peft: plain LoRA on each expert's linears (pruned experts are left out), keys relative to the list
    def _peft_key(self, e: int, key: str) -> str:
        path = self.paths[key]
        return f"{e}.{path}" if path else str(e)

    def peft_config_entry(self, name: str, use_rslora: bool = False) -> dict[str, Any] | None:
        targets = {f"{name}.{self._peft_key(e, k)}": r for e, r in enumerate(self.ranks) if r > 0 for k in self.shapes}
        return {
            "target_modules": list(targets),
            "rank_pattern": targets,
            "alpha_pattern": {t: self._peft_alpha(r, use_rslora) for t, r in targets.items()},
        }

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for key in self.shapes:
            ca, cb, _ = self._compact(key)
            for e, r in enumerate(self.ranks):
                if r > 0:
                    out[f"{self._peft_key(e, key)}.lora_A.weight"] = ca[e, :r].contiguous()
                    out[f"{self._peft_key(e, key)}.lora_B.weight"] = cb[e][:, :r].contiguous()
        return out

    def from_peft_state_dict(self, tensors: dict[str, torch.Tensor], entry: dict[str, Any]) -> dict[str, torch.Tensor]:
        ranks = entry["ranks"]
        out = {"rank_mask": self._mask_from(ranks)}
        r_max = max(1, max(ranks))
        for key in self.shapes:
            d_out, d_in = self.shapes[key]
            ca = torch.zeros(self.num_experts, r_max, d_in)
            cb = torch.zeros(self.num_experts, d_out, r_max)
            for e, r in enumerate(ranks):
                if r > 0:
                    ca[e, :r] = tensors[f"{self._peft_key(e, key)}.lora_A.weight"]
                    cb[e, :, :r] = tensors[f"{self._peft_key(e, key)}.lora_B.weight"]
            out.update(self._expand(key, ca, cb, ranks))
        return out


# --------------------------------------------------------------------------------------------
# Layout detection
# --------------------------------------------------------------------------------------------
def fused_layout(module: nn.Module) -> dict[str, Any] | None:
    """Describe a fused experts module, or ``None`` if ``module`` is not one.

    Recognised: a module with ``num_experts`` and 3-D parameters ``gate_up_proj`` (or
    ``up_proj`` when ``has_gate`` is false) and ``down_proj``, stored ``[E, d_out, d_in]`` or,
    with ``is_transposed``, ``[E, d_in, d_out]`` (transformers' ``use_experts_implementation``
    attributes: ``has_gate``, ``has_bias``, ``is_transposed``, ``has_post_expert_norm``)."""
    if isinstance(module, AdapterLayer):
        return None
    params = {n: p for n, p in module.named_parameters(recurse=False) if p.ndim == 3}
    num_experts = getattr(module, "num_experts", None)
    if not isinstance(num_experts, int) or not params:
        return None
    gate = bool(getattr(module, "has_gate", "gate_up_proj" in params))
    up = "gate_up_proj" if gate else "up_proj"
    if up not in params or "down_proj" not in params:
        return None
    transposed = bool(getattr(module, "is_transposed", False))
    shapes = {}
    for name in (up, "down_proj"):
        p = params[name]
        if p.shape[0] != num_experts:
            return None
        shapes[name] = (p.shape[2], p.shape[1]) if transposed else (p.shape[1], p.shape[2])  # (d_out, d_in)
    if gate and getattr(module, "is_concatenated", True) is False and not hasattr(module, "_apply_gate"):
        return None  # interleaved gate/up without a gate function: we cannot split it
    return {
        "num_experts": num_experts,
        "up": up,
        "gate": gate,
        "transposed": transposed,
        "bias": bool(getattr(module, "has_bias", False)),
        "post_norm": bool(getattr(module, "has_post_expert_norm", False)),
        "shapes": shapes,
        "expert_parallel": bool(getattr(module, "_is_expert_parallel", False)),
    }


def expert_linears(module: nn.Module) -> dict[str, str] | None:
    """For an ``nn.ModuleList`` of >= 2 identically structured experts containing ``nn.Linear``
    layers: ``{parameter key: path of the linear inside an expert}`` (``""`` when each expert
    is itself a linear), else ``None``."""
    if not isinstance(module, nn.ModuleList) or len(module) < 2:
        return None

    def signature(expert: nn.Module) -> list[tuple[str, int, int]]:
        return [(n, m.in_features, m.out_features) for n, m in expert.named_modules() if type(m) is nn.Linear]

    first = signature(module[0])
    if not first or any(signature(m) != first for m in module):
        return None
    return {(n.replace(".", "_") or "linear"): n for n, _, _ in first}


def _chosen_paths(linears: dict[str, str], projections: Sequence[str] | None) -> dict[str, str]:
    """The ``expert_linears`` entries that ``projections`` names by key or by path (all for ``None``)."""
    return {k: path for k, path in linears.items() if projections is None or k in projections or path in projections}


def _linear_shapes(expert: nn.Module, paths: dict[str, str]) -> dict[str, tuple[int, int]]:
    """``{key: (d_out, d_in)}`` of the linears at ``paths`` inside ``expert``."""
    linears = {k: expert.get_submodule(path) for k, path in paths.items()}
    return {k: (lin.out_features, lin.in_features) for k, lin in linears.items()}


# --------------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------------
class ExpertLoRA(AdapterSpec):
    """LoRA on every routed expert of MoE blocks, with a rank per expert.

    Combine with ``LoRA`` on attention in one call: ``apply_adapter(model, [ExpertLoRA(...),
    LoRA(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])])``. Ranks change during
    training with ``ExpertImportanceCallback`` (EPnG prune-and-grow) or ``layer.set_ranks``.

    Args:
        rank: initial rank ``r0`` of every expert.
        alpha: scaling numerator; the update is scaled by the fixed ``alpha / rank``.
        max_rank: storage rank ``R >= rank``: the largest rank an expert can grow to. Default
            ``rank`` (no growth); EPnG needs headroom, e.g. ``2 * rank``. Compute and optimizer
            state scale with ``R``; the trainable count reported is the effective one.
        target_modules: the experts containers (default ``["experts"]``: every module whose
            name ends in ``experts``). Fused 3-D experts modules and ``nn.ModuleList``\\ s of
            experts built from ``nn.Linear`` are supported.
        exclude_modules: names never adapted.
        module_path: only inject below this submodule.
        projections: which expert matrices to adapt: fused names (``"gate_up_proj"``,
            ``"up_proj"``, ``"down_proj"``) or linear names inside an expert (``"w1"``,
            ``"gate_proj"``...). Default: all of them.
        use_rslora: scale by ``alpha / sqrt(rank)``.
        init: ``"kaiming"`` or ``"gaussian"`` for ``A``; ``B`` starts at zero.
        recompute_input: recompute projection inputs in backward from their producer's saved
            tensors instead of saving them.
    """

    kind = "expert_lora"

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 16.0,
        max_rank: int | None = None,
        target_modules: str | list[str] | None = None,
        exclude_modules: list[str] | None = None,
        module_path: str | None = None,
        projections: list[str] | None = None,
        use_rslora: bool = False,
        init: Literal["kaiming", "gaussian"] = "kaiming",
        recompute_input: bool = True,
    ) -> None:
        super().__init__(target_modules, exclude_modules, module_path)
        check_positive("rank", rank, int)
        check_positive("alpha", alpha, float)
        if max_rank is not None:
            check_positive("max_rank", max_rank, int)
            if max_rank < rank:
                raise InvalidArgumentError(
                    "max_rank", f"max_rank={max_rank} is below rank={rank}; use max_rank >= rank (e.g. 2 * rank for EPnG)"
                )
        check_choice("init", init, ("kaiming", "gaussian"))
        if projections is not None and isinstance(projections, (list, tuple)) and len(projections) == 0:
            raise InvalidArgumentError("projections", "projections must not be an empty list: name at least one expert matrix, or use None for all of them")
        check_str_list("projections", projections, allow_none=True)
        check_bool("use_rslora", use_rslora)
        check_bool("recompute_input", recompute_input)
        self.rank, self.alpha, self.max_rank = rank, float(alpha), max_rank
        self.projections = None if projections is None else list(projections)
        self.use_rslora, self.init, self.recompute_input = use_rslora, init, recompute_input

    def default_targets(self) -> list[str]:
        return ["experts"]

    def supports(self, module: nn.Module) -> bool:
        return fused_layout(module) is not None or expert_linears(module) is not None

    def check(self, name: str, module: nn.Module) -> None:
        layout = fused_layout(module)
        if layout is not None:
            if layout["expert_parallel"]:
                raise ValueError(f"{name!r} runs with expert parallelism, which ExpertLoRA does not support")
            available = list(layout["shapes"])
            chosen = [s for p, s in layout["shapes"].items() if self.projections is None or p in self.projections]
        else:
            linears = expert_linears(module)
            if linears is None:
                raise TypeError(
                    f"ExpertLoRA cannot adapt {name!r} ({type(module).__name__}): expected a fused experts module "
                    "(3-D gate_up_proj/up_proj and down_proj, num_experts) or an nn.ModuleList of identical experts "
                    "built from nn.Linear"
                )
            available = list(linears) + [p for p in linears.values() if p]
            chosen = list(_linear_shapes(module[0], _chosen_paths(linears, self.projections)).values())
        unknown = [p for p in self.projections or [] if p not in available]
        if unknown:
            raise ValueError(f"projections {unknown} are not expert matrices of {name!r}; available: {available}")
        if not chosen:
            raise ValueError(f"none of projections={self.projections} is adapted in {name!r}; available: {available}")
        limit = min(min(d_out, d_in) for d_out, d_in in chosen)
        max_rank = self.max_rank or self.rank
        if max_rank > limit:
            raise ValueError(
                f"max_rank {max_rank} (rank {self.rank}) is larger than the expert matrices of {name!r} allow "
                f"(min(d_in, d_out) = {limit}); use max_rank <= {limit}"
            )

    def wrap(self, name: str, module: nn.Module) -> nn.Module:
        self.check(name, module)
        layer = FusedExpertsLoRA if fused_layout(module) is not None else ModuleListExpertsLoRA
        max_rank = self.max_rank or self.rank
        return layer(module, self.projections, self.rank, self.alpha, max_rank, self.use_rslora, self.init, self.recompute_input, spec=self)  # type: ignore[arg-type]


def expert_layers(model: nn.Module) -> dict[str, ExpertsLoRALayer]:
    """Every ExpertLoRA layer of ``model`` by name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ExpertsLoRALayer)}


# --------------------------------------------------------------------------------------------
# EPnG: router discovery and prune/grow planning (pure torch; ExpertImportanceCallback wires it)
# --------------------------------------------------------------------------------------------
def find_router(model: nn.Module, layer_name: str, router_names: Sequence[str] = ("gate", "router")) -> tuple[str, nn.Module]:
    """The router of the MoE block that holds the experts at ``layer_name``: a sibling module
    named one of ``router_names`` (transformers: ``mlp.gate``)."""
    parent_name = layer_name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    for candidate in router_names:
        router = getattr(parent, candidate, None)
        if isinstance(router, nn.Module) and not isinstance(router, ExpertsLoRALayer):
            return (f"{parent_name}.{candidate}" if parent_name else candidate), router
    siblings = [n for n, _ in parent.named_children()]
    raise ValueError(
        f"no router found next to {layer_name!r}: looked for {list(router_names)} in {parent_name or type(model).__name__!r}, "
        f"which has {siblings}. Pass router_names=[...] naming the module that computes the routing logits."
    )


def router_logits(output: Any, num_experts: int, name: str) -> torch.Tensor:
    """The ``[tokens, E]`` logits from a router's output: a tensor, or a tuple whose first
    element is the logits (transformers 5.x: ``(logits, scores, indices)``)."""
    logits = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(logits, torch.Tensor) or logits.shape[-1] != num_experts:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise RuntimeError(
            f"router {name!r} returned {shape}, not logits over {num_experts} experts: pass router_names=[...] naming "
            "the module whose output (or first output) is [tokens, num_experts]"
        )
    return logits.reshape(-1, num_experts)


def plan_prune_grow(
    importance: Sequence[torch.Tensor],
    ranks: Sequence[Sequence[int]],
    costs: Sequence[int],
    limits: Sequence[int],
    budget: int,
    prune_fraction: float,
    grow_fraction: float,
    min_active: Sequence[int],
) -> list[list[int]]:
    """New ranks for one prune-and-grow cycle over the experts of the given layers.

    Among active experts (``r > 0``), the lowest-importance ``prune_fraction`` are pruned (rank
    0; never below ``min_active[l]`` active experts in layer ``l``) and the top ``grow_fraction``
    grow. Pruning stops once the growing experts could not absorb more freed parameters; the
    freed budget (``budget`` minus what the remaining ranks use) is split into equal rank
    increments over the growing experts, capped at ``limits[l]``, and what is left goes one
    rank at a time in importance order. The result never uses more than ``budget`` parameters
    (``cost[l]`` per rank of an expert of layer ``l``). Ties are broken by (layer, expert), so
    every process computes the same plan from the same importance."""
    new = [list(r) for r in ranks]
    units = [(l, e) for l, r in enumerate(new) for e in range(len(r))]
    imp = {(l, e): float(importance[l][e]) for l, e in units}
    active = [u for u in units if new[u[0]][u[1]] > 0]
    if not active:
        return new

    def count(fraction: float) -> int:
        return 0 if fraction <= 0 else max(1, int(fraction * len(active))) if len(active) > 1 else 0

    by_importance = sorted(active, key=lambda u: (imp[u], u))
    grow = [u for u in reversed(by_importance) if new[u[0]][u[1]] < limits[u[0]]][: count(grow_fraction)]
    capacity = sum((limits[l] - new[l][e]) * costs[l] for l, e in grow)
    used = sum(new[l][e] * costs[l] for l, e in units)
    slack = max(0, budget - used)
    active_per_layer = [sum(1 for r in layer if r > 0) for layer in new]
    freed = 0
    n_prune = count(prune_fraction)
    pruned = 0
    for l, e in by_importance:
        if pruned >= n_prune or freed + slack >= capacity:
            break
        if (l, e) in grow or active_per_layer[l] - 1 < min_active[l]:
            continue
        freed += new[l][e] * costs[l]
        new[l][e] = 0
        active_per_layer[l] -= 1
        pruned += 1
    available = budget - sum(new[l][e] * costs[l] for l, e in units)
    if grow and available > 0:
        step = available // sum(costs[l] for l, _ in grow)
        for l, e in grow:
            add = min(step, limits[l] - new[l][e])
            new[l][e] += add
            available -= add * costs[l]
        progress = True
        while progress:
            progress = False
            for l, e in grow:
                if new[l][e] < limits[l] and costs[l] <= available:
                    new[l][e] += 1
                    available -= costs[l]
                    progress = True
    return new
