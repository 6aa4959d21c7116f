"""Peak-memory probes: the CPU estimate's parts, the live-tensor tracker, the CUDA path (faked)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from lightning_peft.memory.meters import SavedTensorMeter, current_meter
from lightning_peft.metrics.memory import (
    MIB,
    CpuMemoryProbe,
    CudaMemoryProbe,
    LiveTensorTracker,
    gradient_bytes,
    memory_probe_for,
    model_bytes,
    optimizer_state_bytes,
)

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from fake_devices import FakeCuda  # noqa: E402


def mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    model[0].weight.requires_grad_(False)  # a frozen part: no gradient, no optimizer state
    return model


def test_static_byte_counts():
    model = mlp()
    params, buffers = model_bytes(model)
    assert params == 4 * (32 * 64 + 64 + 64 * 8 + 8) and buffers == 0
    assert gradient_bytes(model) == 4 * (64 + 64 * 8 + 8)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    assert optimizer_state_bytes([opt]) == 0
    model(torch.randn(4, 32)).sum().backward()
    opt.step()
    moments = 2 * gradient_bytes(model)
    steps = sum(s["step"].numel() * s["step"].element_size() for s in opt.state.values())
    assert optimizer_state_bytes([opt]) == moments + steps


def test_cpu_training_estimate_adds_its_parts():
    model = mlp()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    probe = CpuMemoryProbe()
    probe.begin_phase(model, training=True)
    peaks, metered = [], []
    for batch in (4, 16, 16, 8):
        probe.begin_step(model, key=(batch, 32))
        meter = current_meter()
        metered.append(meter is not None)
        model(torch.randn(batch, 32)).sum().backward()
        probe.after_backward()
        if meter is not None:
            peaks.append(meter.peak_bytes)
        probe.end_step()
        opt.step()
    assert metered == [True, True, False, True]  # once per batch shape
    assert current_meter() is None  # no hooks left behind
    peak = probe.end_phase(model, [opt])
    assert peak.source == "cpu-estimate" and peak.estimated
    assert peak.breakdown["activations"] == max(peaks) > 0
    assert peak.breakdown["gradients"] == gradient_bytes(model)
    assert peak.breakdown["optimizer_state"] == optimizer_state_bytes([opt]) > 0
    assert peak.bytes == sum(peak.breakdown.values()) and peak.mib == peak.bytes / MIB


def test_every_step_meters_every_step():
    model = mlp()
    probe = CpuMemoryProbe(every_step=True)
    probe.begin_phase(model, training=True)
    for _ in range(2):
        probe.begin_step(model, key=(4, 32))
        assert current_meter() is not None
        probe.end_step()


def test_cpu_probe_does_not_shadow_another_meter():
    model = mlp()
    probe = CpuMemoryProbe()
    probe.begin_phase(model, training=True)
    with SavedTensorMeter(model) as outer:
        probe.begin_step(model)
        assert current_meter() is outer  # the other meter keeps seeing the tensors
        model(torch.randn(4, 32)).sum().backward()
        probe.after_backward()
        probe.end_step()
    assert probe.activation_peak == outer.peak_bytes > 0


def test_live_tensor_tracker_peak():
    x = torch.randn(1000, 1000)  # 4 MB, created outside: not counted
    with torch.inference_mode(), LiveTensorTracker() as tracker:
        y = x * 2  # +4 MB
        z = y + 1  # +4 MB: peak 8 MB
        del y
        w = z.view(-1)  # a view: nothing new
        z.add_(1)  # in place: nothing new
        del z, w
        v = x * 3  # +4 MB after the frees: still 8 MB at most
        del v
    assert tracker.peak_bytes == 8_000_000 and tracker.live_bytes == 0


def test_cpu_inference_estimate():
    model = mlp().eval()
    probe = CpuMemoryProbe()
    probe.begin_phase(model, training=False)
    probe.begin_step(model, key=(10, 32))
    assert current_meter() is None  # nothing runs inside the timed loop
    probe.end_step()
    batch = torch.randn(10, 32)  # the batch exists before the forward: not counted
    peak = probe.end_phase(model, forward_inputs=[batch, batch[:2]])
    params, _ = model_bytes(model)
    # the hidden layer's output and its ReLU (10 x 64 floats each) live together; the 10 x 8 output may join them
    assert 2 * 4 * 10 * 64 <= peak.breakdown["activations"] <= 4 * 10 * (64 + 64 + 8)
    assert "gradients" not in peak.breakdown and peak.bytes == params + peak.breakdown["activations"]
    assert probe.measure_forward(model, {"input": batch[:1]}) < peak.breakdown["activations"]


def test_cuda_probe_reads_the_allocator():
    cuda = FakeCuda(peak_bytes=3 * MIB)
    probe = CudaMemoryProbe("cuda:1", cuda=cuda)
    model = mlp()
    probe.begin_phase(model, training=True)
    probe.begin_step(model)
    probe.end_step()
    peak = probe.end_phase(model)
    assert cuda.resets == [torch.device("cuda:1")]
    assert peak.bytes == 3 * MIB and peak.source == "cuda-allocator" and not peak.estimated


def test_probe_for_device():
    assert isinstance(memory_probe_for("cpu"), CpuMemoryProbe)
    assert isinstance(memory_probe_for("cuda:0"), CudaMemoryProbe)


def test_begin_step_twice_leaves_one_meter():
    model = mlp()
    probe = CpuMemoryProbe()
    probe.begin_phase(model, training=True)
    probe.begin_step(model, key=1)
    probe.begin_step(model, key=2)  # a step that raised never ended
    assert current_meter() is not None
    probe.end_step()
    assert current_meter() is None
