"""Memory meters, memory sources and block discovery (lightning_peft.memory)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_peft.memory import (
    BlockDiscoveryError,
    SavedTensorMeter,
    SavedTensorSource,
    SimulatedMemorySource,
    current_meter,
    find_blocks,
    format_bytes,
    parse_bytes,
)


class Block(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class Net(nn.Module):
    def __init__(self, depth: int = 3, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(depth))
        self.head = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def test_parse_and_format_bytes() -> None:
    assert parse_bytes("2GiB") == 2 * 1024**3
    assert parse_bytes("512 MB") == 512 * 1000**2
    assert parse_bytes("1.5KiB") == 1536
    assert parse_bytes("1000") == 1000
    with pytest.raises(ValueError, match="GiB"):
        parse_bytes("two gigs")
    assert format_bytes(3 * 1024**2) == "3.00 MiB"


def test_meter_counts_saved_activations_deterministically() -> None:
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(4, 8)
    counts = []
    for _ in range(2):
        with SavedTensorMeter(net) as meter:
            net(x).sum()
        counts.append(meter.bytes)
    assert counts[0] == counts[1] > 0
    # parameters, and views of them such as the weight.t() a frozen linear saves for dx, are
    # never counted, even without passing the model
    frozen = nn.Linear(8, 8).requires_grad_(False)
    with SavedTensorMeter() as meter:
        frozen(torch.randn(4, 8, requires_grad=True)).sum()
    assert meter.bytes == 0


def test_meter_live_bytes_return_to_zero_and_peak_is_forward_end() -> None:
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(4, 8, requires_grad=True)
    with SavedTensorMeter(net) as meter:
        loss = net(x).sum()
        saved = meter.bytes
        assert meter.live_bytes == saved
        loss.backward()
    assert meter.live_bytes == 0  # every saved tensor released by backward
    assert meter.peak_bytes == saved == meter.forward_peak_bytes
    assert current_meter() is None


def test_meter_sees_recomputation_transient() -> None:
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    block = Block(32)
    x = torch.randn(16, 32, requires_grad=True)
    with SavedTensorMeter(block) as plain:
        block(x).sum().backward()
    with SavedTensorMeter(block) as meter:
        ctx = lambda: (torch.utils.checkpoint.noop_context_fn()[0], current_meter().recompute_context())  # noqa: E731
        y = checkpoint(block, x, use_reentrant=False, context_fn=ctx)
        kept = meter.bytes
        y.sum().backward()
    assert kept < plain.bytes  # only the input is kept
    # the recomputation re-materialises about the block's activations
    assert meter.peak_bytes >= plain.bytes - x.numel() * 4
    assert meter.live_bytes == 0


def test_simulated_source_raises_out_of_memory() -> None:
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(64, 8, requires_grad=True)
    src = SavedTensorSource()
    src.start(net)
    net(x).sum().backward()
    src.stop()
    need = src.peak_bytes()
    sim = SimulatedMemorySource(capacity=need // 2)
    sim.start(net)
    with pytest.raises(torch.OutOfMemoryError, match="simulated out of memory"):
        net(x).sum().backward()
    sim.stop()
    assert sim.ooms == 1
    ok = SimulatedMemorySource(capacity=need, oom_on_starts=[1])
    ok.start(net)
    net(x).sum().backward()  # fits
    ok.stop()
    ok.start(net)
    with pytest.raises(torch.OutOfMemoryError):
        net(x).sum().backward()  # forced on the second start
    ok.stop()
    assert current_meter() is None


def test_find_blocks_custom_and_path() -> None:
    net = Net(depth=4)
    [(path, blocks)] = find_blocks(net)
    assert path == "layers" and len(blocks) == 4
    [(path, blocks)] = find_blocks(net, "layers")
    assert blocks is net.layers


def test_find_blocks_errors_list_candidates() -> None:
    class NoBlocks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))

    with pytest.raises(BlockDiscoveryError, match=r"candidate module lists: 'mlp' \(Linear, ReLU\)"):
        find_blocks(NoBlocks())
    with pytest.raises(BlockDiscoveryError, match="does not exist"):
        find_blocks(Net(), "encoder.layers")
    with pytest.raises(BlockDiscoveryError, match="not a non-empty"):
        find_blocks(Net(), "embed")


def test_find_blocks_timm_vit() -> None:
    import timm
    vit = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2)
    [(path, blocks)] = find_blocks(vit)
    assert path == "blocks" and len(blocks) == 3


def test_find_blocks_transformers_llama_and_encoder_decoder() -> None:
    import transformers
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2,
    )
    llama = transformers.LlamaForCausalLM(cfg)
    [(path, blocks)] = find_blocks(llama)
    assert path == "model.layers" and len(blocks) == 3

    t5cfg = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2)
    t5 = transformers.T5ForConditionalGeneration(t5cfg)
    found = find_blocks(t5)
    assert [p for p, _ in found] == ["encoder.block", "decoder.block"]
