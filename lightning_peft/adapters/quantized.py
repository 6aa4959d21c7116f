"""QLoRA: LoRA on a base quantized by bitsandbytes (4-bit NF4/FP4, or 8-bit).

The frozen ``W0`` is stored quantized (``q(W0)``) and dequantized on the fly in forward;
the trainable update is ordinary LoRA in ``compute_dtype``::

    y = x dequant(q(W0))^T + b + s * dropout(x) A^T B^T
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from lightning_peft.adapters.dtypes import DTYPES
from lightning_peft.adapters.lora import LoRA, LoRALinear
from lightning_peft.validation import check_bool, check_choice


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("QLoRA needs bitsandbytes: pip install 'lightning-peft[quant]'") from err
    return bitsandbytes


class QLoRA(LoRA):
    """LoRA over a bitsandbytes-quantized frozen base.

    Args (beyond ``LoRA``'s):
        quant_type: ``"nf4"`` (4-bit NormalFloat, QLoRA's default), ``"fp4"``, or ``"int8"``
            (LLM.int8 row-wise 8-bit).
        compute_dtype: dtype the 4-bit weight is dequantized to for the matmul.
        double_quant: also quantize the 4-bit block scales (saves ~0.4 bit/parameter).
        quant_storage: dtype the packed 4-bit data is stored in. With FSDP2 it must equal the
            dtype of the model's other parameters, or sharding mixes dtypes.
    """

    kind = "qlora"

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 16.0,
        target_modules: str | list[str] | None = None,
        exclude_modules: list[str] | None = None,
        module_path: str | None = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: Literal["kaiming", "gaussian"] = "kaiming",
        rank_pattern: dict[str, int] | None = None,
        alpha_pattern: dict[str, float] | None = None,
        recompute_input: bool = True,
        quant_type: Literal["nf4", "fp4", "int8"] = "nf4",
        compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16",
        double_quant: bool = True,
        quant_storage: Literal["uint8", "float32", "bfloat16", "float16"] = "uint8",
    ) -> None:
        # by keyword: a reordered LoRA signature must not silently misassign them
        super().__init__(
            rank=rank,
            alpha=alpha,
            target_modules=target_modules,
            exclude_modules=exclude_modules,
            module_path=module_path,
            dropout=dropout,
            use_rslora=use_rslora,
            init=init,
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            recompute_input=recompute_input,
        )
        check_choice("quant_type", quant_type, ("nf4", "fp4", "int8"))
        check_choice("compute_dtype", compute_dtype, tuple(DTYPES))
        check_bool("double_quant", double_quant)
        check_choice("quant_storage", quant_storage, ("uint8", *DTYPES))
        self.quant_type, self.compute_dtype, self.double_quant, self.quant_storage = quant_type, compute_dtype, double_quant, quant_storage

    def supports(self, module: nn.Module) -> bool:
        # exactly nn.Linear: an already-quantized (bitsandbytes) layer is an nn.Linear subclass
        return type(module) is nn.Linear

    def check(self, name: str, module: nn.Module) -> None:
        if not self.supports(module):
            what = type(module).__name__
            hint = " It is already quantized: use LoRA on it instead." if isinstance(module, nn.Linear) else ""
            raise TypeError(f"QLoRA cannot quantize {name!r} ({what}): only plain nn.Linear layers can be quantized.{hint}")
        super().check(name, module)

    def quantize(self, module: nn.Linear) -> nn.Module:
        """A bitsandbytes copy of ``module`` (the original is left untouched)."""
        bnb = _bitsandbytes()
        weight = module.weight.detach()
        device = weight.device
        has_bias = module.bias is not None
        if self.quant_type == "int8":
            layer = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=has_bias, has_fp16_weights=False, threshold=6.0)
            layer.weight = bnb.nn.Int8Params(weight.to("cpu", torch.float16, copy=True), requires_grad=False, has_fp16_weights=False)
        else:
            storage = torch.uint8 if self.quant_storage == "uint8" else DTYPES[self.quant_storage]
            layer = bnb.nn.Linear4bit(
                module.in_features,
                module.out_features,
                bias=has_bias,
                compute_dtype=DTYPES[self.compute_dtype],
                compress_statistics=self.double_quant,
                quant_type=self.quant_type,
                quant_storage=storage,
            )
            layer.weight = bnb.nn.Params4bit(
                weight.to("cpu", copy=True),
                requires_grad=False,
                quant_type=self.quant_type,
                compress_statistics=self.double_quant,
                quant_storage=storage,
            )
        if has_bias:
            layer.bias = nn.Parameter(module.bias.detach().to("cpu", copy=True), requires_grad=False)
        return layer.to(device)  # bitsandbytes quantizes on the move to a device

    def wrap(self, name: str, module: nn.Module) -> nn.Module:
        self.check(name, module)
        layer = LoRALinear(self.quantize(module), **self.layer_kwargs(name))
        # bitsandbytes' CPU 4-bit inference kernel (taken under no_grad, e.g. in validation) only
        # handles in_features % 64 == 0 and out_features % 32 == 0 and fails with a bare assertion
        # otherwise: such layers run a dequantized matmul there instead
        layer.dequantize_without_grad = self.quant_type != "int8" and (module.in_features % 64 != 0 or module.out_features % 32 != 0)
        return layer
