"""Activation memory of the fused LoRA node, measured exactly with ``SavedTensorMeter``.

On a small timm ViT block and a small Llama decoder layer (CPU, deterministic):

* ours saves strictly fewer activation bytes than a plain two-matmul LoRA
  (``base(x) + B(A(x)) * s``);
* ours saves the frozen base's bytes plus the rank-``r`` projections ``u = x A^T`` (one
  ``[tokens, r]`` tensor per adapted layer, which backward needs for ``dB``) plus at most the
  listed extra tensors, whose bytes are computed from shapes here. The list names what the node
  may still keep today; an implementation that recomputes more of them still passes.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from lightning_peft import LoRA, apply_adapter
from lightning_peft.memory import SavedTensorMeter

RANK, ALPHA = 4, 8.0
VIT_TARGETS = ["qkv", "proj", "fc1", "fc2"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class PlainLoRALinear(nn.Module):
    """The textbook LoRA: two extra ``nn.Linear`` and an add, autograd saves what it saves."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, dtype=base.weight.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scale


def plain_lora(model: nn.Module, targets: list[str]) -> nn.Module:
    model.requires_grad_(False)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            model.set_submodule(name, PlainLoRALinear(module, RANK, ALPHA))
    return model


@dataclass
class Case:
    frozen: int
    plain: int
    ours: int
    tokens: int
    n_targets: int


def measure(make_model, make_input, targets: list[str], autocast: bool) -> Case:
    """Saved-activation bytes of one forward for the frozen base, plain LoRA and ours.

    The block input requires grad in every variant, so the frozen base runs a full backward too.
    """
    torch.manual_seed(0)
    base = make_model().train()  # no dropout is configured anywhere
    frozen = copy.deepcopy(base).requires_grad_(False)
    plain = plain_lora(copy.deepcopy(base), targets)
    ours = copy.deepcopy(base)
    apply_adapter(ours, LoRA(rank=RANK, alpha=ALPHA, target_modules=targets))
    n_targets = sum(isinstance(m, PlainLoRALinear) for m in plain.modules())

    results = {}
    for name, model in (("frozen", frozen), ("plain", plain), ("ours", ours)):
        x = make_input()
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx, SavedTensorMeter(model) as meter:
            out = model(x)
        out = out if isinstance(out, torch.Tensor) else out.last_hidden_state
        out.float().sum().backward()  # the graph is complete and runs
        results[name] = meter.bytes
    tokens = make_input().shape[:-1].numel()
    return Case(results["frozen"], results["plain"], results["ours"], tokens, n_targets)


def check_bounds(case: Case, u_bytes_each: int, extras: dict[str, int]) -> None:
    u_total = case.n_targets * u_bytes_each
    floor = case.frozen + u_total
    ceiling = floor + sum(extras.values())
    detail = f"frozen={case.frozen} plain={case.plain} ours={case.ours} u={u_total} extras={extras}"
    assert case.ours < case.plain, detail
    assert floor <= case.ours <= ceiling, detail


# --------------------------------------------------------------------------------------------
# ViT block (timm): LayerNorm -> qkv, SDPA -> proj, LayerNorm -> fc1, GELU -> fc2
# --------------------------------------------------------------------------------------------
VIT_DIM, VIT_HEADS, VIT_BATCH, VIT_TOKENS = 64, 4, 2, 10


def vit_block() -> nn.Module:
    from timm.models.vision_transformer import Block

    return Block(dim=VIT_DIM, num_heads=VIT_HEADS, mlp_ratio=4.0, qkv_bias=True)


def vit_input() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(VIT_BATCH, VIT_TOKENS, VIT_DIM, generator=g).requires_grad_(True)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_vit_block_saves_less_than_plain_and_at_most_listed_extras(autocast):
    case = measure(vit_block, vit_input, VIT_TARGETS, autocast)
    assert case.n_targets == 4
    act = 2 if autocast else 4  # bytes per element of the compute dtype
    tokens, d = case.tokens, VIT_DIM
    extras = {
        # input of attn.proj: SDPA output after transpose+reshape; free when it aliases the
        # storage SDPA saved (CPU flash attention), a copy otherwise
        "proj_input": tokens * d * act,
    }
    if autocast:
        # A and B cast to bf16 per adapted layer, saved for backward (qkv, proj, fc1, fc2)
        extras["lora_weight_casts"] = act * RANK * ((d + 3 * d) + (d + d) + (d + 4 * d) + (4 * d + d))
    check_bounds(case, tokens * RANK * act, extras)


def test_vit_block_ours_recomputes_normalised_and_activated_inputs():
    """The inputs of qkv and fc1 (LayerNorm) and fc2 (GELU) are not stored by ours, while plain
    LoRA stores all three: plain - ours >= their bytes minus ours' u tensors."""
    case = measure(vit_block, vit_input, VIT_TARGETS, autocast=False)
    tokens, d = case.tokens, VIT_DIM
    recomputed = tokens * d * 4 * 2 + tokens * 4 * d * 4  # LN1 out, LN2 out, GELU out
    assert case.plain - case.ours >= recomputed - case.n_targets * tokens * RANK * 4


# --------------------------------------------------------------------------------------------
# Llama decoder layer (transformers, SDPA): RMSNorm -> q/k/v, SDPA -> o, RMSNorm -> gate/up,
# SiLU(gate) * up -> down
# --------------------------------------------------------------------------------------------
LLAMA_HIDDEN, LLAMA_INTER, LLAMA_HEADS, LLAMA_KV, LLAMA_BATCH, LLAMA_TOKENS = 64, 160, 4, 2, 2, 12


def llama_layer(dtype: torch.dtype):
    def make() -> nn.Module:
        from transformers import LlamaConfig, LlamaModel

        config = LlamaConfig(
            hidden_size=LLAMA_HIDDEN,
            intermediate_size=LLAMA_INTER,
            num_hidden_layers=1,
            num_attention_heads=LLAMA_HEADS,
            num_key_value_heads=LLAMA_KV,
            vocab_size=32,
            use_cache=False,
            attn_implementation="sdpa",
        )
        return LlamaModel(config).to(dtype)

    return make


def llama_input(dtype: torch.dtype):
    def make() -> torch.Tensor:
        g = torch.Generator().manual_seed(1)
        return torch.randn(LLAMA_BATCH, LLAMA_TOKENS, LLAMA_HIDDEN, generator=g).to(dtype).requires_grad_(True)

    return make


class _EmbedsModel(nn.Module):
    """``LlamaModel`` fed with ``inputs_embeds`` (a leaf that requires grad)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor):
        return self.inner(inputs_embeds=x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_llama_layer_saves_less_than_plain_and_at_most_listed_extras(dtype):
    case = measure(lambda: _EmbedsModel(llama_layer(dtype)()), llama_input(dtype), LLAMA_TARGETS, autocast=False)
    assert case.n_targets == 7
    act = torch.empty((), dtype=dtype).element_size()
    tokens, d = case.tokens, LLAMA_HIDDEN
    extras = {
        # (the RMSNorm outputs feeding q/k/v and gate/up are recomputed from the norm's input and
        # rstd: the rms_norm recipe, in fp32 and with the bf16 cast, so they are no extra)
        # input of o_proj: SDPA output after transpose+reshape (free when it aliases SDPA's own)
        "o_proj_input": tokens * d * act,
    }
    check_bounds(case, tokens * RANK * act, extras)


def test_llama_layer_ours_recomputes_mlp_product():
    """``down_proj``'s input ``silu(gate) * up`` ([tokens, intermediate]) is not stored by ours;
    plain LoRA stores it."""
    dtype = torch.float32
    case = measure(lambda: _EmbedsModel(llama_layer(dtype)()), llama_input(dtype), LLAMA_TARGETS, autocast=False)
    assert case.plain - case.ours >= case.tokens * LLAMA_INTER * 4 - case.n_targets * case.tokens * RANK * 4
