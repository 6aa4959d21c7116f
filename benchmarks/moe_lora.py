"""Expert LoRA on an OLMoE-shaped MoE LM: ours vs peft ``target_parameters``, in one run.

Every method trains LoRA on attention (q/k/v/o) *and* on every routed expert's ``gate_up_proj``
and ``down_proj`` at the same rank and alpha:

* ``frozen_limit``: no adapter, every weight frozen, backward still run for input gradients --
  no adapter method can be faster or leaner;
* ``peft``: ``LoraConfig(target_modules=[q,k,v,o], target_parameters=["experts.gate_up_proj",
  "experts.down_proj"])`` with peft's default fp32 adapter autocast, and ``peft_bf16``
  (``autocast_adapter_dtype=False``; CUDA only) -- the better of the two is the bar;
* ``ours``: ``[ExpertLoRA(rank), LoRA(rank, q/k/v/o)]`` (grouped matmuls over the routed tokens).

Step = forward + backward + AdamW on the trainable parameters. Reported: step time (median of
the timed steps after warm-up; CUDA: wall time; CPU: single-threaded process CPU time, since
wall time on a shared machine measures the neighbours), tokens/s, peak memory (CUDA: ``torch.cuda.max_memory_allocated``
over the timed steps; every device: saved-activation bytes of one step via
``lightning_peft.memory.SavedTensorMeter``), and ratios ours / best peft. JSON goes to ``--out``.

    python benchmarks/moe_lora.py                       # CPU, small shape (~2 min on 1-2 cores)
    python benchmarks/moe_lora.py --device cuda --quick # OLMoE-1B-7B shape, 4 of 16 layers, 4 x 2048
    python benchmarks/moe_lora.py --device cuda         # all 16 layers (the H200 anchor's shape)

A method that fails (peft without ``target_parameters``, out of memory, ...) is reported with its
error; the run continues.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_PARAMS = ["experts.gate_up_proj", "experts.down_proj"]

#: OLMoE-1B-7B (allenai/OLMoE-1B-7B-0924) dimensions
OLMOE_1B_7B = dict(
    vocab_size=50304,
    hidden_size=2048,
    intermediate_size=1024,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=16,
    num_experts=64,
    num_experts_per_tok=8,
    max_position_embeddings=4096,
)
#: small shape with the same structure for CPU runs
CPU_SHAPE = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    num_experts=16,
    num_experts_per_tok=4,
    max_position_embeddings=1024,
)


def build_model(shape: dict[str, Any], layers: int, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    from transformers import OlmoeConfig, OlmoeForCausalLM

    config = OlmoeConfig(**{**shape, "num_hidden_layers": layers}, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    with torch.device(device):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = OlmoeForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
    try:  # transformers' default and fastest experts kernel (CUDA and CPU) for the baselines; ours replaces it
        model.set_experts_implementation("grouped_mm")
    except Exception:  # noqa: BLE001 - older transformers without the switch
        pass
    return model.train()


def prepare(method: str, model: torch.nn.Module, rank: int, alpha: float) -> tuple[torch.nn.Module, list[torch.nn.Parameter], str]:
    if method == "frozen_limit":
        model.requires_grad_(False)
        model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_())
        return model, [], "no adapter"
    if method in ("peft", "peft_bf16"):
        import peft

        config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=ATTENTION, target_parameters=EXPERT_PARAMS)
        wrapped = peft.get_peft_model(model, config, autocast_adapter_dtype=(method == "peft"))
        params = [p for p in wrapped.parameters() if p.requires_grad]
        return wrapped, params, f"peft {peft.__version__}, adapters {params[0].dtype}"
    if method == "ours":
        from lightning_peft import ExpertLoRA, LoRA, apply_adapter

        report = apply_adapter(model, [ExpertLoRA(rank=rank, alpha=alpha), LoRA(rank=rank, alpha=alpha, target_modules=ATTENTION)])
        params = [p for p in model.parameters() if p.requires_grad]
        return model, params, f"lightning-peft, adapters {params[0].dtype}, effective trainable {report.trainable:,}"
    raise ValueError(method)


def grouped_mm_fallbacks() -> list[str]:
    """``kind/device/dtype`` where ``F.grouped_mm`` refused a shape and expert LoRA fell back to a loop."""
    from lightning_peft.adapters.experts import _GMM_FAILED

    return sorted(f"{k}/{d}/{t}" for k, d, t in _GMM_FAILED)


def verify(device: torch.device) -> dict[str, Any]:
    """Our fused expert LoRA against a dense per-expert reference (fp32, autograd) on ``device``:
    relative error of the output and of the gradients (input, A, B), in fp32 and (CUDA) bf16."""
    from lightning_peft import ExpertLoRA, apply_adapter
    from lightning_peft.adapters.experts import expert_layers

    tiny = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    report: dict[str, Any] = {}
    for dtype in (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,):
        model = build_model(tiny, 1, device, dtype, 0)
        apply_adapter(model, ExpertLoRA(rank=8, alpha=16.0))
        layer = next(iter(expert_layers(model).values()))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for b in layer.lora_B.values():
                b.copy_(torch.randn(b.shape, generator=g).to(device, dtype) * 0.05)
        n = 96
        hidden = (torch.randn(n, 64, generator=g) * 0.5).to(device, dtype).requires_grad_()
        idx = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(n)]).to(device)
        weights = torch.rand(n, 2, generator=g).to(device, dtype)
        out = layer(hidden, idx, weights)
        grad = torch.randn(out.shape, generator=g).to(device, dtype)
        params = [hidden, *layer.lora_A.values(), *layer.lora_B.values()]
        got = torch.autograd.grad(out, params, grad)
        # dense reference in fp32
        base = layer.base_layer
        h32 = hidden.detach().float().requires_grad_()
        a32 = {k: v.detach().float().requires_grad_() for k, v in layer.lora_A.items()}
        b32 = {k: v.detach().float().requires_grad_() for k, v in layer.lora_B.items()}
        ref = torch.zeros_like(h32)
        for e in range(8):
            token, slot = torch.where(idx == e)
            if not len(token):
                continue
            w_gu = base.gate_up_proj[e].float() + layer.scale * b32["gate_up_proj"][e] @ a32["gate_up_proj"][e]
            w_d = base.down_proj[e].float() + layer.scale * b32["down_proj"][e] @ a32["down_proj"][e]
            gate, up = (h32[token] @ w_gu.t()).chunk(2, dim=-1)
            y = (base.act_fn(gate) * up) @ w_d.t()
            ref = ref.index_add(0, token, y * weights[token, slot, None].float())
        want = torch.autograd.grad(ref, [h32, *a32.values(), *b32.values()], grad.float())

        def rel(x: torch.Tensor, y: torch.Tensor) -> float:
            return float((x.detach().float() - y.detach()).norm() / y.detach().norm().clamp_min(1e-12))

        report[str(dtype).replace("torch.", "")] = {
            "output_rel_err": rel(out, ref),
            "grad_rel_err": {name: rel(x, y) for name, x, y in zip(["input", "A_gate_up", "A_down", "B_gate_up", "B_down"], got, want)},
        }
    report["grouped_mm_fallbacks"] = grouped_mm_fallbacks()
    return report


def run_method(method: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    from lightning_peft.memory import SavedTensorMeter

    result: dict[str, Any] = {"method": method}
    model = build_model(args.shape, args.layers, device, dtype, args.seed)
    model, params, note = prepare(method, model, args.rank, args.alpha)
    result["note"] = note
    result["trainable"] = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(3, args.shape["vocab_size"], (args.batch, args.seq), generator=g).to(device)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    sync()
    with SavedTensorMeter(model) as meter:  # deterministic activation bytes of one forward
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    result["saved_activation_bytes"] = meter.bytes
    del loss
    if device.type == "cuda":
        gc.collect()
        torch.cuda.reset_peak_memory_stats(device)
    times, cpu_times = [], []
    for _ in range(args.repeats):
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        result["loss"] = step()
        sync()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    result["wall_step_s"] = statistics.median(times)
    result["cpu_step_s"] = statistics.median(cpu_times)
    # on a GPU the wall time is the measure; on a (shared) CPU run single-threaded, the process's
    # CPU time is the work done and does not count time other processes held the cores
    result["step_s"] = result["wall_step_s"] if device.type == "cuda" else result["cpu_step_s"]
    result["step_times_s"] = times
    result["tokens_per_s"] = args.batch * args.seq / result["step_s"]
    if device.type == "cuda":
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    model = optimizer = params = None  # free before the next method (the step closure holds them)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer layers/steps (CUDA: 4 of 16 OLMoE layers)")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--methods", default=None, help="comma-separated subset of frozen_limit,peft,peft_bf16,ours")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (CPU step time is process CPU time)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    args.shape = OLMOE_1B_7B if cuda else CPU_SHAPE
    args.layers = args.layers or (4 if cuda and args.quick else args.shape["num_hidden_layers"])
    args.batch = args.batch or (4 if cuda else 2)
    args.seq = args.seq or (2048 if cuda else 256)
    args.warmup = args.warmup if args.warmup is not None else 2 if cuda else 1
    args.repeats = args.repeats or (3 if args.quick else 6 if cuda else 3)
    methods = (
        args.methods.split(",")
        if args.methods
        else (["frozen_limit", "peft", "peft_bf16", "ours"] if cuda else ["frozen_limit", "peft", "ours"])
    )
    if not cuda:
        torch.set_num_threads(args.threads)

    shape = {**args.shape, "num_hidden_layers": args.layers}
    header = {
        "benchmark": "moe_lora",
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "gpu": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "shape": shape,
        "full_model_layers": args.shape["num_hidden_layers"],
        "batch": args.batch,
        "seq": args.seq,
        "rank": args.rank,
        "alpha": args.alpha,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "quick": args.quick,
    }
    try:
        import transformers

        header["transformers"] = transformers.__version__
        import peft

        header["peft"] = peft.__version__
    except ImportError as err:
        header["import_error"] = str(err)
    print(
        f"MoE LoRA benchmark: OLMoE-shaped, {args.layers} of {args.shape['num_hidden_layers']} layers "
        f"({'quick' if args.quick else 'full'}), {args.batch} x {args.seq} tokens, {header['dtype']}, rank {args.rank}",
        flush=True,
    )

    try:
        header["verify"] = verify(device)
    except Exception as err:  # noqa: BLE001 - report, still benchmark
        header["verify"] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=4)}
    print("verify (ours vs dense fp32 reference):", json.dumps(header["verify"]), flush=True)

    results = []
    for method in methods:
        t0 = time.perf_counter()
        try:
            r = run_method(method, args, device, dtype)
        except Exception as err:  # noqa: BLE001 - report and continue (e.g. peft without target_parameters, OOM)
            r = {"method": method, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=3)}
            if cuda:
                gc.collect()
                torch.cuda.empty_cache()
        r["wall_s"] = time.perf_counter() - t0
        results.append(r)
        shown = {k: v for k, v in r.items() if k not in ("step_times_s", "traceback")}
        print(json.dumps(shown), flush=True)

    ok = {r["method"]: r for r in results if "error" not in r}
    summary: dict[str, Any] = {}
    peft_runs = [ok[m] for m in ("peft", "peft_bf16") if m in ok]
    if "ours" in ok and peft_runs:
        best = max(peft_runs, key=lambda r: r["tokens_per_s"])
        ours = ok["ours"]
        summary = {
            "peft_bar": best["method"],
            "throughput_ratio_vs_peft": ours["tokens_per_s"] / best["tokens_per_s"],
            "saved_activation_ratio_vs_peft": ours["saved_activation_bytes"] / best["saved_activation_bytes"],
        }
        if cuda:
            lean = min(peft_runs, key=lambda r: r["peak_bytes"])
            summary["peak_memory_ratio_vs_peft"] = ours["peak_bytes"] / lean["peak_bytes"]
            summary["peak_memory_bar"] = lean["method"]
        summary["goal"] = ">= 1.3x peft throughput and <= 0.75x its peak memory"
    if "frozen_limit" in ok and "ours" in ok:
        summary["throughput_vs_frozen_limit"] = ok["ours"]["tokens_per_s"] / ok["frozen_limit"]["tokens_per_s"]
    header["grouped_mm_fallbacks"] = grouped_mm_fallbacks()
    output = {**header, "results": results, "summary": summary}

    print("\nmethod        tok/s      step ms   saved act MiB" + ("   peak GiB" if cuda else "") + "   trainable")
    for r in results:
        if "error" in r:
            print(f"{r['method']:<12}  ERROR {r['error'][:100]}")
            continue
        peak = f"   {r['peak_bytes'] / 2**30:8.2f}" if cuda else ""
        print(
            f"{r['method']:<12}  {r['tokens_per_s']:9.0f}  {1000 * r['step_s']:9.1f}  "
            f"{r['saved_activation_bytes'] / 2**20:13.1f}{peak}   {r['trainable']:,}"
        )
    for k, v in summary.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) and math.isfinite(v) else f"{k}: {v}")

    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"moe_lora_{device.type}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(output, indent=1))
    print(f"wrote {out}")
    return output


if __name__ == "__main__":
    main()
