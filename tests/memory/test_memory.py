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
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    llama = transformers.LlamaForCausalLM(cfg)
    [(path, blocks)] = find_blocks(llama)
    assert path == "model.layers" and len(blocks) == 3

    t5cfg = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2)
    t5 = transformers.T5ForConditionalGeneration(t5cfg)
    found = find_blocks(t5)
    assert [p for p, _ in found] == ["encoder.block", "decoder.block"]


# --------------------------------------------------------------------------------------------
# The adaptive-checkpointing controller, driven by synthetic profiles and peaks (no Trainer)
# --------------------------------------------------------------------------------------------
from lightning_peft.memory import (  # noqa: E402
    BlockProfile,
    BudgetTooSmallError,
    CheckpointController,
    ControllerConfig,
    make_plan,
    plan_blocks,
    plan_cost,
    predict_peak,
    static_modes,
    tensor_shapes,
)

SHAPE = [[4, 8]]


def profiles4() -> list[BlockProfile]:
    # a = 100 bytes per block, c = 10 kept by a checkpoint: none everywhere peaks at 400
    return BlockProfile.uniform(4, act_bytes=100, input_bytes=10)


def controller(budget: int = 250, **kw) -> CheckpointController:
    cfg = ControllerConfig(num_blocks=4, budget_bytes=budget, headroom=0.0, **kw)
    return CheckpointController(cfg, warn=lambda m: None)


def profile_step(c: CheckpointController, shape=SHAPE, offset: float = 0.0):
    modes = c.start_step(shape, shape)
    assert c.profiling and modes == ("checkpoint",) * 4  # a new bucket: safest plan, profiled
    measured = predict_peak(profiles4(), modes) + offset
    return c.end_step(measured, False, (profiles4(), 0, 0))


def plain_step(c: CheckpointController, offset: float = 0.0, at_boundary: bool = True):
    """One step whose measured peak is the prediction of the plan that ran plus ``offset``."""
    modes = c.start_step(SHAPE, SHAPE, at_boundary)
    return modes, c.end_step(predict_peak(profiles4(), modes) + offset, False)


def test_controller_profiles_then_plans_under_the_budget():
    c = controller()
    out = profile_step(c)
    assert out.events == ["profile"] and c.counters["profiles"] == 1
    plan = c.bucket.plan
    assert plan == plan_blocks(profiles4(), 250)
    assert 0 < len(plan.checkpointed) < 4 and plan.predicted_peak <= 250
    modes, out = plain_step(c)
    assert modes == plan.modes and out.events == [] and out.predicted == plan.predicted_peak


def test_controller_tightens_at_once_when_the_peak_overshoots():
    c = controller()
    profile_step(c)
    before = c.bucket.plan
    modes, out = plain_step(c, offset=60)  # 60 bytes the activation model does not see
    assert out.events == ["tighten"] and c.counters["tightenings"] == 1
    assert c.bucket.offset == pytest.approx(60 + 0.01 * 250)
    after = c.bucket.plan
    assert len(after.checkpointed) > len(before.checkpointed)
    assert after.predicted_peak + c.bucket.offset <= 250


def test_controller_relaxes_only_after_calm_steps_below_the_hysteresis_band():
    c = controller(relax_after=3, hysteresis=0.0)
    profile_step(c)
    plain_step(c, offset=60)  # tighten: offset ~62.5
    tight = c.bucket.plan.modes
    for _ in range(3):  # the extra memory is gone: measured == predicted
        modes, out = plain_step(c)
        assert modes == tight and out.events == []
    assert c.bucket.pending_relax
    modes, _ = plain_step(c, at_boundary=False)  # not at an optimizer-step boundary: wait
    assert modes == tight and c.bucket.pending_relax
    modes, _ = plain_step(c)
    assert c.counters["relaxations"] == 1 and c.bucket.offset == 0.0
    assert modes != tight and sum(m != "none" for m in modes) < sum(m != "none" for m in tight)


def test_controller_does_not_relax_inside_the_hysteresis_band():
    c = controller(relax_after=2, hysteresis=0.9)  # relax only below 10% of the limit
    profile_step(c)
    plain_step(c, offset=60)
    for _ in range(5):
        plain_step(c)
    assert not c.bucket.pending_relax and c.bucket.calm == 0 and c.counters["relaxations"] == 0


def test_controller_after_oom_tightens_then_gives_up_at_the_floor():
    c = controller()
    profile_step(c)
    modes = c.start_step(SHAPE, SHAPE)
    new = c.after_oom(modes, "simulated")
    assert c.bucket.oom_scale == pytest.approx(0.85) and c.counters["oom_retries"] == 1
    assert predict_peak(profiles4(), new) < predict_peak(profiles4(), modes)
    assert c.end_step(predict_peak(profiles4(), new), True).events[0] == "oom-retry"
    floor = ("checkpoint",) * 4
    with pytest.raises(torch.OutOfMemoryError, match="already checkpointed"):
        c.after_oom(floor, "simulated")


def test_controller_budget_below_the_floor_is_refused_by_name():
    c = controller(budget=50)
    with pytest.raises(BudgetTooSmallError, match="all-checkpointed floor"):
        profile_step(c)


def test_controller_smaller_shape_runs_a_larger_shapes_plan_while_profiling():
    c = controller()
    profile_step(c, shape=[[4, 16]])
    big = c.bucket.plan.modes
    modes = c.start_step([[4, 8]], [[4, 8]])
    assert c.profiling and modes == big  # donor: the plan of a profiled shape that dominates


def test_controller_shape_bucket_scales_profiles_to_the_ceiling():
    c = controller(budget=10_000, shape_bucket=16)
    c.start_step([[4, 16]], [[4, 8]])  # rounded up: the profile is scaled by 16/8
    c.end_step(0.0, False, (profiles4(), 5, 0))
    b = c.bucket
    assert b.scale == 2.0 and b.pre == 10 and b.profiles[0].act_bytes == 200


def test_controller_state_round_trips():
    c = controller()
    profile_step(c)
    plain_step(c, offset=60)
    state = c.state_dict()
    d = controller()
    d.load_state_dict(state)
    assert d.buckets.keys() == c.buckets.keys()
    assert d.buckets["4x8"].plan.modes == c.buckets["4x8"].plan.modes
    assert d.buckets["4x8"].offset == c.buckets["4x8"].offset and d.counters == c.counters
    with pytest.raises(ValueError, match="for 4 blocks but the model has 3"):
        CheckpointController(ControllerConfig(num_blocks=3, budget_bytes=250)).load_state_dict(state)


def test_controller_static_plans_include_offload_first_k():
    c = controller(mode="offload_first_k", k=2)
    assert c.start_step(SHAPE, SHAPE) == ("offload", "offload", "none", "none")
    assert static_modes("offload_first_k", 3, 1) == ("offload", "none", "none")
    with pytest.raises(ValueError, match="offload_first_k"):
        static_modes("sometimes", 3)  # type: ignore[arg-type]


def test_offload_cost_is_one_computation():
    # blocks of different speeds: an offloaded block's copy hides behind the *next* block
    profiles = [BlockProfile(100, 10, 90, flops=1.0, time=t, offload_bandwidth=900.0) for t in (0.1, 0.01, 0.2, 0.05)]
    plan = plan_blocks(profiles, 300, allowed=("none", "checkpoint", "offload"), cost="time", offload_bandwidth=900.0)
    again = make_plan(profiles, plan.modes, kind="time", offload_bandwidth=900.0)
    assert again.cost == pytest.approx(plan.cost)
    assert plan_cost(profiles, plan.modes, "time", 900.0) == pytest.approx(plan.cost)
    c = CheckpointController(
        ControllerConfig(
            num_blocks=4, budget_bytes=300, headroom=0.0, cost_kind="time", allowed=("none", "checkpoint", "offload"), bandwidth=900.0
        )
    )
    c.start_step(SHAPE, SHAPE)
    c.end_step(0.0, False, (profiles, 0, 0))
    assert "offload" in plan.modes and c.make_plan(c.bucket, plan.modes).cost == pytest.approx(plan.cost)
    # block 0's 0.1 s copy hides behind block 1's 0.01 s forward (not its own 0.1 s): stall 0.09 + 0.08
    assert c.make_plan(c.bucket, ("offload", "none", "none", "none")).cost == pytest.approx(0.17)


def test_tensor_shapes_sorts_dict_keys_and_keeps_sequence_order():
    t = torch.zeros
    assert tensor_shapes({"b": t(2), "a": [t(1), {"z": t(3), "y": t(4)}]}) == [[1], [4], [3], [2]]
    assert tensor_shapes([{"b": t(1)}, {"a": t(2)}]) == [[1], [2]]
    assert tensor_shapes((t(5), "text", 3)) == [[5]]


def test_memory_package_imports_no_lightning():
    import subprocess
    import sys

    code = (
        "import sys, lightning_peft.memory, lightning_peft.checkpointing; "
        "bad = [m for m in sys.modules if m == 'lightning' or m.startswith(('lightning.', 'pytorch_lightning'))]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
