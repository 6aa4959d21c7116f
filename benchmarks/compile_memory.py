#!/usr/bin/env python
"""Saved activations of one forward under ``torch.compile``: what AOTAutograd's min-cut
partitioner keeps for backward, for the frozen base and for LoRA, on one timm ViT-S block and one
transformers Llama decoder layer (built from configs, no download).

Modes, each its own fresh compilation (``torch._dynamo.reset()`` between them):

* ``eager``                    no compile: our node recomputes its input from its producer;
* ``compiled``                 the partitioner's defaults;
* ``compiled_recompute``       ``torch._functorch.config.ban_recompute_materialized_backward =
                               False``: the partitioner may recompute a forward value that backward
                               materialises (an adapter input read by the ``dA`` GEMM) instead of
                               saving it -- the eager recompute, chosen by the compiler;
* ``compiled_budget_0.5``      ``activation_memory_budget = 0.5`` (recompute until half the bytes).

Saved bytes come from ``SavedTensorMeter`` (distinct storages saved during one forward). Backend
``aot_eager_decomp_partition``: inductor's decompositions and partitioner, without its C++ compile
(the saved set is the partitioner's choice, the same under inductor). Each compiled mode's input
and LoRA gradients are checked against eager's before its bytes are reported.

    python benchmarks/compile_memory.py            # ~1 min
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch._functorch.config as functorch_config  # noqa: E402
from torch import nn  # noqa: E402

from lightning_peft import LoRA, apply_adapter  # noqa: E402
from lightning_peft.memory import SavedTensorMeter  # noqa: E402

MODES: dict[str, Callable[[], Any]] = {
    "compiled": contextlib.nullcontext,
    "compiled_recompute": lambda: functorch_config.patch(ban_recompute_materialized_backward=False),
    "compiled_budget_0.5": lambda: functorch_config.patch(activation_memory_budget=0.5),
}
VIT_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def vit_block(dim: int) -> nn.Module:
    from timm.models.vision_transformer import Block

    return Block(dim=dim, num_heads=dim // 64, mlp_ratio=4.0, qkv_bias=True)


class LlamaLayer(nn.Module):
    """One ``LlamaDecoderLayer`` with its rotary embedding: ``[B, T, H] -> [B, T, H]``."""

    def __init__(self, hidden: int, intermediate: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        import transformers.models.llama.modeling_llama as llama

        config = llama.LlamaConfig(
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=1,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            vocab_size=64,
            max_position_embeddings=4096,
            attn_implementation="sdpa",
        )
        self.layer = llama.LlamaDecoderLayer(config, layer_idx=0)
        self.rotary = llama.LlamaRotaryEmbedding(config)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        out = self.layer(h, position_ids=positions, position_embeddings=self.rotary(h, positions))
        return out[0] if isinstance(out, tuple) else out


def adapted(base: nn.Module, targets: list[str]) -> nn.Module:
    model = copy.deepcopy(base)
    apply_adapter(model, LoRA(rank=16, alpha=32.0, target_modules=targets))
    with torch.no_grad():  # a live update (B = 0 would hide errors in A's path)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    return model


def saved_and_grads(model: nn.Module, x: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
    x = x.detach().requires_grad_(True)
    model(x).square().mean().backward()  # compiles (or warms up) outside the meter
    x.grad = None
    model.zero_grad(set_to_none=True)
    with SavedTensorMeter() as meter:
        out = model(x)
    out.square().mean().backward()
    grads = [x.grad] + [p.grad for p in model.parameters() if p.requires_grad]
    return meter.bytes, [g.detach().clone() for g in grads]


def measure(name: str, base: nn.Module, targets: list[str], x: torch.Tensor) -> dict[str, Any]:
    frozen, ours = base.requires_grad_(False), adapted(base, targets)
    row: dict[str, Any] = {"case": name, "input": list(x.shape)}
    reference: dict[str, list[torch.Tensor]] = {}
    for variant, model in (("frozen", frozen), ("ours", ours)):
        saved, reference[variant] = saved_and_grads(model, x)
        row[f"{variant}_eager_MiB"] = saved / 2**20
        for mode, around in MODES.items():
            torch._dynamo.reset()
            with around():
                saved, grads = saved_and_grads(torch.compile(model, backend="aot_eager_decomp_partition", fullgraph=True), x)
            for got, want in zip(grads, reference[variant], strict=True):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(1.0, want.abs().max().item()))
            row[f"{variant}_{mode}_MiB"] = saved / 2**20
    torch._dynamo.reset()
    for mode in ("eager", *MODES):
        row[f"ours_over_frozen_{mode}"] = row[f"ours_{mode}_MiB"] / row[f"frozen_{mode}_MiB"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/compile_memory_cpu.json")
    args = p.parse_args()
    torch.manual_seed(0)
    rows = [
        measure("vit_s_block_b8", vit_block(384), VIT_TARGETS, torch.randn(8, 197, 384)),
        measure("llama_layer_512_2x512", LlamaLayer(512, 1376, heads=8, kv_heads=4), LLAMA_TARGETS, torch.randn(2, 512, 512)),
    ]
    for row in rows:
        print(row["case"])
        for mode in ("eager", *MODES):
            print(
                f"  {mode:22s} frozen {row[f'frozen_{mode}_MiB']:7.2f} MiB  ours {row[f'ours_{mode}_MiB']:7.2f} MiB"
                f"  = {row[f'ours_over_frozen_{mode}']:.3f}x"
            )
    result = {"benchmark": "compile_memory", "torch": torch.__version__, "machine": platform.machine(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
