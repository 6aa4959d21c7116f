"""MACs per forward: matmul-type operators counted exactly, the model left as it was."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft import LoRA, apply_adapter
from lightning_peft.adapters.kernels.lora import takes_merged_weight
from lightning_peft.metrics import count_flops_by_operator, count_macs, count_step_flops


def test_linear_and_conv_counts():
    torch.manual_seed(0)
    assert count_macs(nn.Linear(8, 4), torch.randn(3, 8)) == 3 * 8 * 4
    conv = nn.Conv2d(2, 5, kernel_size=3, padding=1)  # per output element: 2 * 3 * 3 MACs
    assert count_macs(conv, torch.randn(1, 2, 6, 6)) == 5 * 6 * 6 * 2 * 3 * 3
    mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 2))
    assert count_macs(mlp, torch.randn(4, 8)) == 4 * (8 * 16 + 16 * 2)  # element-wise work not counted


class Attention(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def test_attention_counted_on_cpu():
    b, h, n, d = 2, 3, 5, 4
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    flops = count_flops_by_operator(Attention(), (q, k, v))
    # QK^T and AV: b*h*n*n*d MACs each, whichever kernel ran
    assert sum(flops.values()) // 2 == 2 * b * h * n * n * d


def test_keyword_inputs_and_lora_update():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)

        def forward(self, x, scale=1.0):
            return self.fc(x) * scale

    net = Net()
    assert count_macs(net, {"x": torch.randn(2, 6), "scale": 2.0}) == 2 * 36
    apply_adapter(net, LoRA(rank=2, target_modules=["fc"]))
    # base 6x6 plus the two low-rank factors (6 -> 2 -> 6); the kernel adds B's product in place
    assert count_macs(net, torch.randn(2, 6)) == 2 * (36 + 12 + 12)


def test_inplace_matmuls_counted():
    class InPlace(nn.Module):
        def forward(self, out, a, b, x, y):
            out.addmm_(a, b)  # [3, 4] += [3, 5] @ [5, 4]
            return torch.baddbmm(x, x, y).baddbmm_(x, y)  # [2, 3, 3] += [2, 3, 3] @ [2, 3, 3], twice

    args = (torch.zeros(3, 4), torch.randn(3, 5), torch.randn(5, 4), torch.randn(2, 3, 3), torch.randn(2, 3, 3))
    assert count_macs(InPlace(), args) == 3 * 5 * 4 + 2 * (2 * 3 * 3 * 3)


def test_model_state_unchanged():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_macs(model, torch.randn(8, 4))
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # eval mode: running stats untouched


def test_not_a_module_refused():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        count_macs(lambda x: x, torch.randn(1))


def test_quantized_linear_counted_as_its_dense_matmul():
    import bitsandbytes as bnb

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 64))
    quantized = nn.Sequential(bnb.nn.Linear4bit(128, 64, quant_type="nf4"), nn.ReLU(), bnb.nn.Linear4bit(64, 64, quant_type="nf4"))
    x = torch.randn(4, 128)
    assert count_macs(quantized.to("cpu"), x) == count_macs(dense, x) == 4 * (128 * 64 + 64 * 64)


class _DequantizingLinear(nn.Linear):
    """A quantized-looking layer whose forward runs a plain matmul the counter already sees."""


_DequantizingLinear.__module__ = "bitsandbytes.fake"


def test_quantized_linear_that_counter_sees_is_not_counted_twice():
    x = torch.randn(3, 16)
    assert count_macs(_DequantizingLinear(16, 8), x) == 3 * 16 * 8


def test_attention_backward_counted_on_cpu():
    b, h, n, d = 2, 3, 5, 4
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))
    flops = count_step_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())
    # forward QK^T, AV; backward the QK^T recompute and four gradient matmuls: 7 of b*h*n*n*d MACs
    assert sum(flops.values()) // 2 == 7 * b * h * n * n * d


@pytest.mark.parametrize("rows", [16, 64])
def test_lora_step_flops_on_the_merged_and_the_plain_path(rows):
    torch.manual_seed(0)
    d_in, d_out, r = 8, 6, 2
    net = nn.Sequential(nn.Linear(d_in, d_out))
    apply_adapter(net, LoRA(rank=r, target_modules=["0"]))
    x = torch.randn(rows, d_in, requires_grad=True)
    flops = sum(count_step_flops(lambda: net(x).sum().backward()).values())
    base = 4 * rows * d_in * d_out  # forward and dx of the frozen base
    merged = takes_merged_weight(rows, d_in, x.dtype) and takes_merged_weight(rows, d_out, x.dtype)
    assert merged == (rows == 64)  # both paths are exercised
    # merged: the thin u = x A^T, dy B, dA, dB, and W + s B A built twice; else six thin GEMMs
    lora = 4 * rows * r * (d_in + d_out) + 4 * r * d_in * d_out if merged else 6 * rows * r * (d_in + d_out)
    assert flops == base + lora
    assert x.grad is not None and all(p.grad is not None for p in net.parameters() if p.requires_grad)
