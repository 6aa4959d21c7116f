"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024), on LoRA's pieces.

For a frozen ``W0 [d_out, d_in]`` (bias ``b``), DoRA learns LoRA's ``A [r, d_in]``, ``B [d_out, r]``
and a magnitude vector ``m [d_out]``; the adapted weight is the LoRA weight with each output row
rescaled to length ``m_j``::

    W' = m * (W0 + s B A) / n,       n = ||W0 + s B A||_row  (norm over d_in, per output channel)
    y  = (m / n) * (x W0^T + s x A^T B^T) + b                 (the magnitude scales the weight part only)

``m`` starts at ``||W0||_row`` and ``B`` at zero, so the adapted model starts equal to the base.
``n`` is treated as a constant in backward (DoRA sec. 4.3; Hugging Face peft does the same), so
``m``, ``A`` and ``B`` get the gradients of ``y`` with ``n`` fixed.

Cost. ``W0 + s B A`` is never formed: ``||W0||^2_row`` is cached (recomputed only when the base
weight changes) and ``n`` comes from ``W0 A^T [d_out, r]`` and ``A A^T [r, r]``
(``kernels.dora.adapted_row_norms``); ``1 / n`` is cached until ``A``, ``B`` or ``W0`` change.
The matmuls are LoRA's fused node; a second node applies
``m / n`` and keeps the layer's output (usually saved by the next op anyway) instead of
``y_pre``, so activation memory stays near LoRA's (``kernels.dora``).

Dropout (training, ``dropout > 0``) follows peft exactly, with ``xd = dropout(x)``::

    y = x W0^T + b + (m / n - 1) * (xd W0^T) + (m / n) * s xd A^T B^T

which needs a second base matmul: that path runs on plain autograd ops (correct, not fused).

Hugging Face peft loads the export (``use_dora=True``, tensors ``lora_A.weight``,
``lora_B.weight``, ``lora_magnitude_vector``) with the same outputs. ``QDoRA`` is DoRA over a
bitsandbytes-quantized base (as ``QLoRA`` is LoRA over one); ``DoRA`` itself also adapts an
already-quantized layer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.adapters.kernels.dora import adapted_row_norms, dora_magnitude, norm_dtype
from lightning_peft.adapters.lora import LoRA, LoRALinear, dequantized_weight, lora_forward
from lightning_peft.adapters.quantized import QLoRA

__all__ = ["DoRA", "DoRALinear", "QDoRA"]


def check_nonzero_rows(name: str, weight: torch.Tensor) -> torch.Tensor:
    """``||W0||^2`` per output row; raises when a row is zero (DoRA's ``m / n`` is then ``0 / 0``)."""
    dense = weight.detach()
    squares = dense.to(norm_dtype(dense.dtype)).square().sum(1)
    zero = torch.nonzero(squares == 0).flatten()
    if zero.numel():
        rows = zero[:5].tolist()
        raise ValueError(
            f"DoRA cannot adapt {name!r}: {zero.numel()} of its {dense.shape[0]} weight rows are all zero (rows {rows}...), "
            "where the magnitude / norm decomposition is 0/0. Exclude it (exclude_modules) or use LoRA for it."
        )
    return squares


class DoRALinear(LoRALinear):
    """A ``LoRALinear`` (``base_layer``, ``lora_A.weight [r, d_in]``, ``lora_B.weight [d_out, r]``)
    plus ``lora_magnitude_vector [d_out]`` (peft's name, so exported keys need no renaming).

    ``base_layer`` is an ``nn.Linear`` (fused path) or a linear-like layer such as a bitsandbytes
    4-bit one (its output minus its bias is rescaled; ``W0`` is dequantized for the norms).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        recompute_input: bool = True,
        spec: DoRA | QDoRA | None = None,
    ) -> None:
        spec = spec if spec is not None else DoRA(rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init=init)
        super().__init__(base_layer, rank, alpha, dropout, use_rslora, init, recompute_input, spec=spec)
        squares = check_nonzero_rows(type(base_layer).__name__, dequantized_weight(base_layer))
        self.lora_magnitude_vector = nn.Parameter(squares.sqrt().to(self.lora_A.weight.dtype))
        self._merge_factor: torch.Tensor | None = None
        self._weight_sq: tuple[tuple[int, int, torch.dtype], torch.Tensor] | None = None
        self._inverse_norm: tuple[tuple[Any, ...], torch.Tensor] | None = None

    # --- the norm ----------------------------------------------------------------------------
    def _dense_weight(self) -> torch.Tensor:
        if self._fused:
            return self.base_layer.weight.detach()
        weight = self.base_layer.weight
        if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
            # bitsandbytes repacks a 4-bit weight for its CPU inference kernel (eval without grad);
            # undo it as bitsandbytes does before saving, so that it dequantizes correctly
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
        return dequantized_weight(self.base_layer)

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """``||W0 + s B A||_row [d_out]`` (fp32; fp64 for fp64 weights), detached."""
        weight = self._dense_weight()
        stored = self.base_layer.weight
        key = (stored.data_ptr(), stored._version, stored.dtype)  # a changed base weight (load, merge) invalidates
        if self._weight_sq is None or self._weight_sq[0] != key:
            self._weight_sq = (key, weight.to(norm_dtype(weight.dtype)).square().sum(1))
        return adapted_row_norms(weight, self._weight_sq[1], self.lora_A.weight, self.lora_B.weight, self.scale)

    def inverse_norm(self) -> torch.Tensor:
        """``1 / ||W0 + s B A||_row``, cached until ``A``, ``B`` or the base weight change (an
        optimizer step, a load): forwards between two steps (gradient accumulation, validation,
        a checkpoint's recomputation) compute it once."""
        a, b, stored = self.lora_A.weight, self.lora_B.weight, self.base_layer.weight
        key = (a._version, b._version, stored._version, a.data_ptr(), b.data_ptr(), stored.data_ptr(), a.dtype, self.scale)
        if self._inverse_norm is None or self._inverse_norm[0] != key:
            self._inverse_norm = (key, self.weight_norm().reciprocal_())
        return self._inverse_norm[1]

    # --- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return (self._merged_module or self.base_layer)(x)
        if self.training and self.dropout > 0.0:
            return self._forward_with_dropout(x)
        base = self.base_layer
        inv_norm = self.inverse_norm()
        if self._fused:
            y_pre = lora_forward(x, base.weight, None, self.lora_A.weight, self.lora_B.weight, self.scale, 0.0, self.recompute_input)
        else:
            if not torch.is_grad_enabled() and x.device.type == "cpu":
                # a dense matmul on the dequantized weight: exact, and bitsandbytes' CPU inference
                # kernel (bf16, limited widths, repacks the weight) is not needed
                base_out = F.linear(x, self._dense_weight().to(x.dtype))
            else:
                base_out = base(x)
                if base.bias is not None:
                    base_out = base_out - base.bias.to(base_out.dtype)
            delta = lora_forward(x, None, None, self.lora_A.weight, self.lora_B.weight, self.scale, 0.0, self.recompute_input)
            y_pre = base_out + delta.to(base_out.dtype)
        return dora_magnitude(y_pre, self.lora_magnitude_vector, inv_norm, base.bias)

    def _forward_with_dropout(self, x: torch.Tensor) -> torch.Tensor:
        """peft's training forward with dropout (see the module docstring), on plain ops."""
        base = self.base_layer
        base_out = base(x)
        xd = F.dropout(x, self.dropout, training=True)
        if self._fused:
            base_dropped = F.linear(xd, base.weight)
        else:
            base_dropped = base(xd)
            if base.bias is not None:
                base_dropped = base_dropped - base.bias.to(base_dropped.dtype)
        factor = (self.lora_magnitude_vector * self.inverse_norm()).to(base_out.dtype)
        a, b = self.lora_A.weight.to(xd.dtype), self.lora_B.weight.to(xd.dtype)
        update = F.linear(F.linear(xd, a), b) * self.scale
        return base_out + (factor - 1) * base_dropped.to(base_out.dtype) + factor * update.to(base_out.dtype)

    # --- merging -----------------------------------------------------------------------------
    @torch.no_grad()
    def merged_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(m / n * (W0 + s B A) [d_out, d_in], m / n [d_out])`` in fp32 (fp64 for fp64 weights)."""
        weight = self._dense_weight()
        dtype = norm_dtype(weight.dtype)
        factor = self.lora_magnitude_vector.to(dtype) / self.weight_norm()
        return factor.unsqueeze(1) * (weight.to(dtype) + self.delta_weight().to(weight.device, dtype)), factor

    @torch.no_grad()
    def merge(self, keep_original: bool = True) -> None:
        """Replace the base weight by ``m / n (W0 + s B A)``. With ``keep_original`` the exact base
        weight is kept in host memory so that ``unmerge`` restores it bit for bit; without, unmerge
        inverts the merge (``W'' n / m - s B A``, exact up to rounding)."""
        if self.merged:
            return
        merged, factor = self.merged_weight()
        if self._fused:
            weight = self.base_layer.weight
            self._original_weight = weight.detach().to("cpu", copy=True) if keep_original else None
            self._merge_factor = None if keep_original else factor
            weight.copy_(merged.to(weight.dtype))
        else:  # quantized base: merge into a dense copy, leave the quantized weights untouched
            base = self.base_layer
            dense_dtype = dequantized_weight(base).dtype
            module = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None, device=merged.device, dtype=dense_dtype)
            module.weight.copy_(merged.to(dense_dtype))
            if base.bias is not None:
                module.bias.copy_(base.bias)
            self._merged_module = module.requires_grad_(False)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if self._fused:
            weight = self.base_layer.weight
            if self._original_weight is not None:
                weight.copy_(self._original_weight.to(weight.device))
            else:
                dtype = self._merge_factor.dtype
                restored = weight.to(dtype) / self._merge_factor.unsqueeze(1) - self.delta_weight().to(weight.device, dtype)
                weight.copy_(restored.to(weight.dtype))
        self._original_weight = self._merged_module = self._merge_factor = None
        self.merged = False

    # --- peft ----------------------------------------------------------------------------------
    def peft_config_entry(self, name: str, use_rslora: bool = False) -> dict[str, Any] | None:
        entry = super().peft_config_entry(name, use_rslora)
        return None if entry is None else {**entry, "use_dora": True}

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"


class DoRA(LoRA):
    """Weight-decomposed LoRA of linear layers (``W' = m (W0 + s B A) / ||W0 + s B A||_row``).

    Takes exactly ``LoRA``'s arguments (rank, alpha, targets, dropout, rsLoRA, init,
    rank_pattern / alpha_pattern, recompute_input) and adds the trainable magnitude ``m [d_out]``
    per adapted layer. Adapts ``nn.Linear`` layers, bitsandbytes-quantized ones included (not
    ``nn.MultiheadAttention``, whose projections are not called as modules).
    """

    kind = "dora"

    def supports(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def check(self, name: str, module: nn.Module) -> None:
        super().check(name, module)
        check_nonzero_rows(name, dequantized_weight(module))

    def wrap(self, name: str, module: nn.Module) -> nn.Module:
        self.check(name, module)
        return DoRALinear(module, **self.layer_kwargs(name))


class QDoRA(QLoRA):
    """DoRA over a bitsandbytes-quantized frozen base: ``QLoRA``'s arguments and quantization,
    ``DoRALinear`` layers (``W0`` dequantized on the fly for the matmul and the norms)."""

    kind = "qdora"

    def check(self, name: str, module: nn.Module) -> None:
        super().check(name, module)
        check_nonzero_rows(name, module.weight)

    def wrap(self, name: str, module: nn.Module) -> nn.Module:
        self.check(name, module)
        # without grad on the CPU it runs a dense matmul (see forward): no width limits
        return DoRALinear(self.quantize(module), **self.layer_kwargs(name))
