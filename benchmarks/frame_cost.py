"""Cost part of ``benchmarks/frame.py``: step time and activation memory at d = 384 (MiniLM).

Two shapes, every method measured in the same run, interleaved round by round (the order
rotates), so that drift on a shared machine hits all of them alike:

* ``encoder``: all 6 MiniLM layers (``Top`` with ``split_layer = 0``; the frozen embedding
  output is the input), every linear adapted, batch ``B x T`` tokens, one step = forward +
  cross-entropy + backward (FRAME adds its balance loss's gradient) + AdamW + ``zero_grad``;
* ``layer``: one adapted ``Linear(384, 384)`` on ``B*T`` tokens (the adapter's own overhead,
  undiluted by attention and the frozen matmuls), forward + mean square + backward + AdamW;
  ``layer_ffn``: the same for ``Linear(384, 1536)``; ``layer*_8x_tokens``: on ``8 B T`` tokens.

Time: median over the timed steps of process CPU time (single thread: wall time on a shared
machine also measures the neighbours) and, for reference, of wall time; ratios FRAME / MoE-LoRA
and FRAME / LoRA both of medians and as the median of per-round ratios. Memory: the saved-tensor
meter (``lightning_peft.memory.SavedTensorMeter``) around one forward + backward: peak live saved
activation bytes, parameters and buffers excluded; exact and deterministic. Reported with and
(``*_excl_bases``) without the cached DFrFT bases ``V [n, n]`` that FRAME's factor construction
saves for backward: they are constants held once per size (like weights), not activations.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import frame_train as ft
import torch
from torch import nn

METHODS = ["frozen", "lora", "moe_lora", "fourier_moe", "frame"]


class _OneLinear(nn.Module):
    """One ``Linear(d_in, d_out)`` under a name ``TARGET`` and the LoRA rank pattern match
    (``query`` for a square layer, ``intermediate.dense`` for the FFN's up-projection shape)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Module()])
        if d_in == d_out:
            self.layers[0].attention = nn.Module()
            self.layers[0].attention.self = nn.Module()
            self.layers[0].attention.self.query = nn.Linear(d_in, d_out)
        else:
            self.layers[0].intermediate = nn.Module()
            self.layers[0].intermediate.dense = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[0].get_submodule("attention.self.query" if hasattr(self.layers[0], "attention") else "intermediate.dense")(x)


def _models(shape: dict[str, Any], encoder: nn.Module, args: Any, lora_spec: Any, device: str) -> dict[str, nn.Module]:
    from lightning_peft import apply_adapter

    out: dict[str, nn.Module] = {}
    for method in METHODS:
        torch.manual_seed(0)
        if shape["kind"] == "encoder":
            model: nn.Module = ft.Top(encoder, 0)
        else:
            model = _OneLinear(shape["d_in"], shape["d_out"])
        if method == "frozen":
            model.requires_grad_(False)
        else:
            spec = lora_spec if method == "lora" else ft.moe_spec(method, args)
            apply_adapter(model, spec, check_gradients=False)
        out[method] = model.to(device)
    return out


def _step_fn(shape: dict[str, Any], model: nn.Module, inputs: dict[str, torch.Tensor], args: Any) -> Any:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = ft.optimizer(model, args) if params else None

    def loss_of() -> torch.Tensor:
        if shape["kind"] == "encoder":
            logits = model(inputs["hidden"], inputs["mask"], inputs["task"])
            loss = nn.functional.cross_entropy(logits, inputs["label"])
        else:
            loss = model(inputs["x"]).square().mean()
        return loss  # FRAME adds its balance loss's gradient itself

    def step() -> None:
        loss_of().backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step, loss_of


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _inputs(shape: dict[str, Any], encoder: nn.Module, sample: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    if shape["kind"] == "layer":
        x = torch.randn(shape["tokens"], shape["d_in"], generator=torch.Generator().manual_seed(0))
        return {"x": x.to(device).requires_grad_(True)}
    with torch.no_grad():
        hidden = encoder.embeddings(input_ids=sample["ids"].to(next(encoder.parameters()).device))
    # the frozen-base limit still back-propagates to the input (as under a trainable prefix)
    return {"hidden": hidden.to(device).requires_grad_(True), **{k: sample[k].to(device) for k in ("mask", "task", "label")}}


def _bases(model: nn.Module) -> nn.Module:
    """A module whose buffers are the cached DFrFT bases ``V`` (and ``k``) FRAME's layers use:
    autograd saves them, but they are constants held once per size (like weights), not
    activations of the step."""
    from frame_hooks import frame_layers

    from lightning_peft.adapters.kernels.frft import frft_basis

    holder = nn.Module()
    for m in frame_layers(model).values():
        if m.spatial:
            continue
        dtype = torch.promote_types(m.lora_A.dtype, torch.float32)  # what the factors use
        for n in {m.in_features, m.out_features}:
            v, k = frft_basis(n, dtype, m.lora_A.device)
            holder.register_buffer(f"v{n}", v, persistent=False)
            holder.register_buffer(f"k{n}", k, persistent=False)
    return holder


def memory(model: nn.Module, loss_of: Any) -> dict[str, int]:
    """Saved-tensor peak of one forward + backward, with and without FRAME's constant bases."""
    from lightning_peft.memory.meters import SavedTensorMeter

    out = {}
    for key, scope in (("", model), ("_excl_bases", nn.ModuleList([model, _bases(model)]))):
        with SavedTensorMeter(scope) as meter:
            loss = loss_of()
            forward = meter.live_bytes
            loss.backward()
        model.zero_grad(set_to_none=True)
        out[f"saved_forward_bytes{key}"], out[f"saved_peak_bytes{key}"] = int(forward), int(meter.peak_bytes)
    return out


def measure_shape(shape: dict[str, Any], encoder: nn.Module, sample: dict[str, torch.Tensor], args: Any, lora_spec: Any) -> dict[str, Any]:
    device = args.device
    models = _models(shape, encoder, args, lora_spec, device)
    inputs = _inputs(shape, encoder, sample, device)
    steps = {m: _step_fn(shape, model, inputs, args) for m, model in models.items()}
    result: dict[str, Any] = {"shape": shape} | {
        m: {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)} for m, model in models.items()
    }
    for m, (step, loss_of) in steps.items():
        result[m].update(memory(models[m], loss_of))
        for _ in range(args.cost_warmup):
            step()
    cpu: dict[str, list[float]] = {m: [] for m in METHODS}
    wall: dict[str, list[float]] = {m: [] for m in METHODS}
    for r in range(args.cost_rounds):
        for m in METHODS[r % len(METHODS) :] + METHODS[: r % len(METHODS)]:
            for _ in range(args.cost_steps):
                _sync(device)
                c0, w0 = time.process_time(), time.perf_counter()
                steps[m][0]()
                _sync(device)
                cpu[m].append(time.process_time() - c0)
                wall[m].append(time.perf_counter() - w0)
    for m in METHODS:
        result[m]["cpu_s_median"] = statistics.median(cpu[m])
        result[m]["wall_s_median"] = statistics.median(wall[m])
        result[m]["wall_s_all"] = wall[m]
    result["ratios"] = _ratios(cpu if device == "cpu" else wall, result, args.cost_steps)
    return result


def _ratios(times: dict[str, list[float]], result: dict[str, Any], per_round: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for base in ("moe_lora", "lora", "fourier_moe"):
        med = statistics.median
        out[f"frame_vs_{base}_time"] = med(times["frame"]) / med(times[base])
        rounds = [
            med(times["frame"][i : i + per_round]) / med(times[base][i : i + per_round]) for i in range(0, len(times["frame"]), per_round)
        ]
        out[f"frame_vs_{base}_time_paired"] = med(rounds)
        for key in ("", "_excl_bases"):
            peak = {m: result[m][f"saved_peak_bytes{key}"] for m in ("frame", base, "frozen")}
            out[f"frame_vs_{base}_saved_peak{key}"] = peak["frame"] / peak[base]
            extra_b = peak[base] - peak["frozen"]
            out[f"frame_vs_{base}_adapter_saved_peak{key}"] = (peak["frame"] - peak["frozen"]) / extra_b if extra_b > 0 else float("nan")
    return out


def measure(encoder: nn.Module, sample: dict[str, torch.Tensor], args: Any, lora_spec: Any) -> dict[str, Any]:
    """Every shape; ``sample``: ``ids, mask, task, label`` of ``args.cost_batch`` real examples.

    ``layer`` is ``Linear(384, 384)`` on the encoder step's ``B*T`` tokens; ``layer_*`` add the
    FFN shape ``Linear(384, 1536)`` and 8x the tokens: FRAME's factor construction costs
    ``O(E r (d_in^2 + d_out^2))`` per step whatever the token count, so its overhead over
    MoE-LoRA shrinks as tokens per step grow and grows with ``d``."""
    encoder = copy.deepcopy(encoder).to(args.device) if args.device != "cpu" else encoder
    d, tokens = encoder.config.hidden_size, args.cost_batch * sample["mask"].shape[1]
    shapes = {
        "layer": {"kind": "layer", "d_in": d, "d_out": d, "tokens": tokens},
        "layer_ffn": {"kind": "layer", "d_in": d, "d_out": encoder.config.intermediate_size, "tokens": tokens},
        "layer_8x_tokens": {"kind": "layer", "d_in": d, "d_out": d, "tokens": 8 * tokens},
        "layer_ffn_8x_tokens": {"kind": "layer", "d_in": d, "d_out": encoder.config.intermediate_size, "tokens": 8 * tokens},
        "encoder": {"kind": "encoder", "batch": args.cost_batch, "tokens_per_example": sample["mask"].shape[1]},
    }
    out = {}
    for name, shape in shapes.items():
        print(f"  cost: {name} {shape}", flush=True)
        out[name] = measure_shape(shape, encoder, sample, args, lora_spec)
        r = out[name]["ratios"]
        print(
            f"    FRAME/MoE-LoRA time {r['frame_vs_moe_lora_time']:.3f}  saved peak {r['frame_vs_moe_lora_saved_peak']:.3f};"
            f"  FRAME/LoRA time {r['frame_vs_lora_time']:.3f}",
            flush=True,
        )
    return out
