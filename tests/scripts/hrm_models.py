"""Tiny transformers models and helpers shared by the HRM tests."""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from lightning_peft.adapters.hrm import HRMLayer


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    return BertModel(cfg).eval()


def layers(model: nn.Module) -> list[HRMLayer]:
    return [m for m in model.modules() if isinstance(m, HRMLayer)]


def activate(model: nn.Module, seed: int = 1) -> None:
    """Non-zero P_out (the adapter's output is zero at the start by design)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers(model):
            layer.p_out.copy_(torch.randn(layer.p_out.shape, generator=g))


def ids(batch: int = 2, length: int = 12, seed: int = 3) -> torch.Tensor:
    return torch.randint(1, 40, (batch, length), generator=torch.Generator().manual_seed(seed))


#: a tiny Llama for ``CausalLM(config=...)`` (hidden 32, 2 layers, vocabulary 40)
LLAMA_CONFIG = {
    "model_type": "llama", "vocab_size": 40, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 64, "pad_token_id": 0,
}  # fmt: skip


def token_loader(n: int = 32, length: int = 16, batch_size: int = 4, shuffle: bool = False, seed: int = 0) -> torch.utils.data.DataLoader:
    """Dict batches ``input_ids``/``attention_mask``/``labels`` of a copy task with padding: the
    second half repeats the first; every third sequence is right-padded by 4 (labels -100 there)."""
    g = torch.Generator().manual_seed(seed)
    half = torch.randint(1, 40, (n, length // 2), generator=g)
    input_ids = torch.cat([half, half], dim=1)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[::3, -4:] = 0
    input_ids = input_ids.masked_fill(mask == 0, 0)
    labels = input_ids.masked_fill(mask == 0, -100)
    rows = [{"input_ids": i, "attention_mask": m, "labels": lab} for i, m, lab in zip(input_ids, mask, labels)]
    return torch.utils.data.DataLoader(rows, batch_size=batch_size, shuffle=shuffle)
