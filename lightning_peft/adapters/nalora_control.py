"""NA-LoRA's training-time control over the gate LoRA layers of a model (pure torch).

Per gate layer (``B_g = lora_B.weight [d_ff, r]``, one row per gate channel ``j``):

1. **Statistics, read from the forward.** A forward hook on the gate layer sees its output
   ``z [..., d_ff]`` (base + LoRA) in every training forward (no extra pass) and accumulates,
   per channel, ``sum_tokens |phi'(z_j)|``, the token counts of the homogeneity bins
   (near-linear ``|k - 1| <= linear_tol``, saturated ``k < saturated_below``, else responsive)
   and the token count. Tokens are weighted by the batch's ``attention_mask`` when one is set
   with ``set_token_mask`` and matches ``z``'s leading shape (padding does not count); otherwise
   every position counts.
2. **Per optimizer step** (``before_step``): the sums are all-reduced over DDP ranks (one
   collective), then ``d_j = sum / tokens`` and the bin shares update EMAs
   ``T_j <- beta T_j + (1 - beta) d_j`` (the first step initialises them). Every rank holds the
   same values; at each refresh rank 0's EMAs, masks and groups are broadcast as well, so they
   are bit-identical even under a non-deterministic reduction.
3. **Refresh** (steps ``warmup_steps + n * refresh_every``): the mask keeps the top
   ``ceil(keep_fraction * d_ff)`` channels by ``T_j`` (ties: lower index); each channel's group
   is its most frequent bin; step scaling runs in the layer only if the gate is smooth and at
   least two groups each hold ``min_group_fraction`` of the channels (it warns once per layer
   when it switches itself off, naming why).
4. **Masked** means: a masked row of ``B_g`` does not change over the step at all, and neither
   does its optimizer state. Its gradient is zeroed before the step (so clipping and the
   optimizer see zero), its value and every per-element optimizer-state tensor of ``B_g``'s
   shape (Adam's ``exp_avg``/``exp_avg_sq``, SGD's momentum) are saved, and restored after
   ``optimizer.step()``: AdamW's decoupled weight decay and stale momentum do not move it. The
   row resumes from the state it had when it was masked (scalar state such as Adam's ``step``
   is shared by the tensor and keeps counting).
5. **Step scaling** is a delta rescale after the step: ``B_j <- B_j^old + f_j (B_j^new - B_j^old)``
   with ``f_j`` the factor of channel ``j``'s group, which scales the actual step under any
   optimizer (Adam's update is invariant to gradient scaling). Rows with ``f_j == 1`` are left
   bit-exact; before the first refresh nothing is changed (NA-LoRA equals LoRA).

A plain loop::

    controller = NALoRAController(model)
    loss.backward()
    controller.before_step(step, optimizer)
    optimizer.step()
    controller.after_step(optimizer)
    optimizer.zero_grad()
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_peft.adapters.nalora import SMOOTH_GATES, NALoRA, nalora_gates, selection_and_excess

GROUPS = ("near_linear", "responsive", "saturated")


@dataclass
class GateState:
    """Statistics and decisions of one gate layer (``d = d_ff`` channels)."""

    name: str
    layer: nn.Module
    spec: NALoRA
    activation: str
    sums: torch.Tensor  # [3, d]: sum |phi'|, near-linear count, saturated count (this step)
    tokens: torch.Tensor  # [1]
    importance: torch.Tensor  # [d] EMA of mean |phi'|
    shares: torch.Tensor  # [3, d] EMA of the bin shares (near-linear, responsive, saturated)
    mask: torch.Tensor  # [d] bool, rows that update
    groups: torch.Tensor  # [d] long, index into GROUPS
    scaling: bool = False
    initialised: bool = False
    saved: dict[str, Any] = field(default_factory=dict)
    seen: bool = False  # a training forward reached the layer this step (a Python flag: no device sync)
    changes: bool = False  # some row's step is masked or scaled (decided at refresh: no per-step sync)
    row_factors: torch.Tensor | None = None  # [d, 1] step factor per row, 0 where masked

    @property
    def weight(self) -> nn.Parameter:
        return self.layer.lora_B.weight

    def factors(self) -> torch.Tensor:
        """Per-row step factor ``[d]``: 0 for masked rows, the group's factor where scaling runs."""
        f = torch.ones(self.mask.shape, device=self.mask.device)
        if self.scaling:
            f = torch.tensor(self.spec.group_scales(), device=self.mask.device)[self.groups]
        return f * self.mask

    def decide_factors(self) -> None:
        """Cache the per-row factors and whether they change anything (one sync per refresh)."""
        f = self.factors()
        self.changes = not bool((f == 1).all())
        self.row_factors = f[:, None]


class NALoRAController:
    """Drives every NA-LoRA gate layer of ``model`` (see module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self.gates: dict[str, GateState] = {}
        for ffn, layer in nalora_gates(model):
            d = layer.lora_B.weight.shape[0]
            dev = layer.lora_B.weight.device
            self.gates[ffn.gate] = GateState(
                ffn.gate,
                layer,
                layer.spec,  # type: ignore[arg-type]
                ffn.activation,
                sums=torch.zeros(3, d, device=dev),
                tokens=torch.zeros(1, device=dev),
                importance=torch.zeros(d, device=dev),
                shares=torch.zeros(3, d, device=dev),
                mask=torch.ones(d, dtype=torch.bool, device=dev),
                groups=torch.zeros(d, dtype=torch.long, device=dev),
            )
        self.token_mask: torch.Tensor | None = None
        self.last_step = -1
        self.warned: set[str] = set()
        self.used_token_mask = False
        self._hooks = [g.layer.register_forward_hook(self._hook(g)) for g in self.gates.values()]
        for g in self.gates.values():
            if g.activation not in SMOOTH_GATES and g.spec.step_scaling:
                self._warn(
                    f"{g.name}:act",
                    f"NA-LoRA step scaling is off for {g.name!r}: its gate is {g.activation}, whose homogeneity is constant (k == 1)",
                )

    @property
    def active(self) -> bool:
        return bool(self.gates)

    def describe(self) -> str:
        if not self.gates:
            return "inactive: no NA-LoRA gate projection of a gated FFN (SwiGLU/GeGLU) among the adapted modules, so training is plain LoRA"
        acts = sorted({g.activation for g in self.gates.values()})
        spec = next(iter(self.gates.values())).spec
        return (
            f"{len(self.gates)} gate layers ({', '.join(acts)}); mask keeps {spec.keep_fraction:g} of the channels"
            f"{'' if spec.temporal_mask else ' (off)'}, step scaling {'on' if spec.step_scaling else 'off'}; first refresh at "
            f"step {spec.warmup_steps}, then every {spec.refresh_every}"
        )

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def set_token_mask(self, mask: torch.Tensor | None) -> None:
        """``[B, T]`` weights of the next forward's tokens (an ``attention_mask``), or ``None``."""
        self.token_mask = mask

    # --- statistics ---------------------------------------------------------------------
    def _hook(self, g: GateState):  # noqa: ANN202 - a forward hook
        spec = g.spec

        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            if not (module.training and torch.is_grad_enabled()) or not isinstance(output, torch.Tensor):
                return
            g.seen = True
            with torch.no_grad():
                z = output.detach().reshape(-1, output.shape[-1]).float()
                s, excess = selection_and_excess(z, g.activation)  # excess = k - 1 (a fresh tensor)
                slope = (excess + 1.0).mul_(s).abs_()  # |phi'| = |s k|
                saturated = excess < spec.saturated_below - 1.0
                linear = excess.abs_() <= spec.linear_tol
                w = self._weights(output)
                if w is None:
                    g.sums[0] += slope.sum(0)
                    g.sums[1] += linear.sum(0)
                    g.sums[2] += saturated.sum(0)
                    g.tokens += z.shape[0]
                else:
                    g.sums[0] += w @ slope
                    g.sums[1] += w @ linear.float()
                    g.sums[2] += w @ saturated.float()
                    g.tokens += w.sum()

        return hook

    def _weights(self, output: torch.Tensor) -> torch.Tensor | None:
        mask = self.token_mask
        if mask is None or tuple(mask.shape) != tuple(output.shape[:-1]):
            return None
        self.used_token_mask = True
        return mask.reshape(-1).to(device=output.device, dtype=torch.float32)

    def _reduce(self) -> None:
        """All-reduce this step's sums over ranks (one collective)."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        flat = torch.cat([torch.cat([g.sums.flatten(), g.tokens]) for g in self.gates.values()])
        dist.all_reduce(flat)
        offset = 0
        for g in self.gates.values():
            n = g.sums.numel()
            g.sums.copy_(flat[offset : offset + n].view_as(g.sums))
            g.tokens.copy_(flat[offset + n : offset + n + 1])
            offset += n + 1

    def _broadcast(self) -> None:
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        for g in self.gates.values():
            for t in (g.importance, g.shares, g.mask, g.groups):
                dist.broadcast(t, src=0)

    @torch.no_grad()
    def update_statistics(self, step: int) -> None:
        """Fold this step's sums into the EMAs (once per step) and refresh when due."""
        if step == self.last_step or not self.gates:
            return
        self.last_step = step
        self._reduce()
        for g in self.gates.values():
            if not g.seen:
                self._warn(
                    f"{g.name}:nostats", f"NA-LoRA got no gate statistics for {g.name!r} in step {step}: no training forward reached it"
                )
                continue
            g.seen = False
            tokens = g.tokens.clamp_min(1e-12)  # all-padding batches: zero statistics, not NaN
            d = g.sums[0] / tokens
            lin, sat = g.sums[1] / tokens, g.sums[2] / tokens
            shares = torch.stack([lin, (1.0 - lin - sat).clamp_min(0.0), sat])
            beta = g.spec.importance_decay if g.initialised else 0.0
            g.importance.mul_(beta).add_(d, alpha=1.0 - beta)
            g.shares.mul_(beta).add_(shares, alpha=1.0 - beta)
            g.initialised = True
            g.sums.zero_()
            g.tokens.zero_()
        self.token_mask = None
        spec = next(iter(self.gates.values())).spec
        if step >= spec.warmup_steps and (step - spec.warmup_steps) % spec.refresh_every == 0:
            self.refresh()

    def refresh(self) -> None:
        """Recompute masks and groups from the EMAs (then broadcast from rank 0)."""
        for g in self.gates.values():
            if not g.initialised:
                continue
            d = g.mask.numel()
            if g.spec.temporal_mask:
                keep = min(d, max(1, math.ceil(g.spec.keep_fraction * d - 1e-9)))
                order = torch.argsort(g.importance, descending=True, stable=True)
                g.mask.zero_()
                g.mask[order[:keep]] = True
            g.groups.copy_(torch.argmax(g.shares, dim=0))
        self._broadcast()
        for g in self.gates.values():
            self._decide_scaling(g)

    def _decide_scaling(self, g: GateState) -> None:
        self._decide(g)
        g.decide_factors()

    def _decide(self, g: GateState) -> None:
        if not g.spec.step_scaling or g.activation not in SMOOTH_GATES or not g.initialised:
            g.scaling = False
            return
        counts = torch.bincount(g.groups, minlength=3).float() / g.groups.numel()
        populated = [GROUPS[i] for i in range(3) if counts[i] >= g.spec.min_group_fraction]
        was, g.scaling = g.scaling, len(populated) >= 2
        if not g.scaling and (was or f"{g.name}:bins" not in self.warned):
            shares = ", ".join(f"{GROUPS[i]} {float(counts[i]):.0%}" for i in range(3))
            self.warned.discard(f"{g.name}:bins")
            self._warn(
                f"{g.name}:bins",
                f"NA-LoRA step scaling switched off for {g.name!r}: its channels do not form a meaningful homogeneity "
                f"partition ({shares}; need >= 2 groups with >= {g.spec.min_group_fraction:.0%} each). The mask still applies.",
            )

    def _warn(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(message, stacklevel=3)

    # --- the step -----------------------------------------------------------------------
    @staticmethod
    def _owned(optimizer: torch.optim.Optimizer) -> set[int]:
        return {id(p) for group in optimizer.param_groups for p in group["params"]}

    @torch.no_grad()
    def before_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """After backward (and before clipping): statistics, then zero masked rows' gradients and
        save what ``after_step`` restores or rescales."""
        self.update_statistics(step)
        owned = self._owned(optimizer)
        for g in self.gates.values():
            g.saved = {}
            w = g.weight
            if id(w) not in owned:
                continue
            if not g.changes:
                continue
            masked = ~g.mask[:, None]
            if w.grad is not None:
                w.grad.masked_fill_(masked, 0)
            state = optimizer.state.get(w, {})
            # whole-tensor copies ([d_ff, r], small) and torch.where below: no data-dependent
            # indexing, so no device sync per step
            kept = {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor) and v.shape == w.shape}
            g.saved = {"old": w.detach().clone(), "masked": masked, "state": kept}

    @torch.no_grad()
    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """After ``optimizer.step()``: rescale each row's step, restore masked rows and state."""
        owned = self._owned(optimizer)
        for g in self.gates.values():
            saved, w = g.saved, g.weight
            if not saved or id(w) not in owned:
                continue
            g.saved = {}
            old, masked, f = saved["old"], saved["masked"], g.row_factors.to(w.dtype)
            w.copy_(torch.where(masked, old, torch.where(f == 1, w, old + f * (w - old))))
            state = optimizer.state.get(w, {})
            for k, v in state.items():
                if not (isinstance(v, torch.Tensor) and v.shape == w.shape):
                    continue
                if k in saved["state"]:
                    v.copy_(torch.where(masked, saved["state"][k], v))
                else:  # state created by this step (the first): masked rows keep the fresh state, zero
                    v.masked_fill_(masked, 0)

    # --- reporting and checkpoints ------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        if not self.gates:
            return {}
        kept = sum(int(g.mask.sum()) for g in self.gates.values()) / sum(g.mask.numel() for g in self.gates.values())
        out = {"nalora/kept_fraction": kept, "nalora/scaling_layers": float(sum(g.scaling for g in self.gates.values()))}
        groups = torch.cat([g.groups for g in self.gates.values()])
        for i, name in enumerate(GROUPS):
            out[f"nalora/{name}_fraction"] = float((groups == i).float().mean())
        return out

    def state_dict(self) -> dict[str, Any]:
        layers = {
            n: {
                "importance": g.importance.cpu(),
                "shares": g.shares.cpu(),
                "mask": g.mask.cpu(),
                "groups": g.groups.cpu(),
                "scaling": g.scaling,
                "initialised": g.initialised,
            }
            for n, g in self.gates.items()
        }
        return {"layers": layers, "last_step": self.last_step, "warned": sorted(self.warned)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = sorted(set(self.gates) - set(state["layers"]))
        if missing:
            raise ValueError(f"NA-LoRA state has no statistics for gate layers {missing[:4]}: the checkpoint is from another model")
        for n, g in self.gates.items():
            s = state["layers"][n]
            for key in ("importance", "shares", "mask", "groups"):
                getattr(g, key).copy_(s[key])
            g.scaling, g.initialised = bool(s["scaling"]), bool(s["initialised"])
            g.decide_factors()
        self.last_step = int(state["last_step"])
        self.warned = set(state["warned"])
