#!/usr/bin/env python
"""Adaptive activation checkpointing: memory budget vs recomputation, against static plans.

Every variant trains the same LoRA model with Lightning and ``AdaptiveCheckpointCallback`` (the
static plans run through the same callback with ``mode="none"|"all"|"every_k"|"first_k"``), so
memory is measured by the same source for all of them, in one run:

CPU (``--device cpu``, deterministic; the memory source is the saved-activation meter, so every
byte figure is activation bytes, exact and reproducible; recompute is counted in block FLOPs):

* a timm ViT and a Llama-config decoder (``transformers.LlamaConfig``, small, random), LoRA on
  the attention and MLP projections;
* budgets at 30/50/70 % of the no-checkpointing activation peak: the measured peak of every step
  against the budget, the adaptive plan's recompute against the cheapest static "first k blocks"
  plan that fits the same budget (every k measured), peak reduction and step time next to
  no checkpointing and full checkpointing;
* variable-length text batches: per-shape plans against one worst-case plan at the same budget.

CUDA (``--device cuda``; peak = ``torch.cuda.max_memory_allocated`` of a step, throughput =
median of timed steps after warm-up): ViT-B/16 batch 128 under bf16 autocast and a Llama-shape
decoder in bf16; a self-check of every block mode (LoRA gradients against no checkpointing, peak,
time); none / all / every-2 / first-k / adaptive at 50 % and 70 % of the no-checkpointing peak
(also with selective checkpointing allowed, and with ``--offload`` offloading allowed): the
Pareto curve of peak GiB against throughput. ``--compile`` adds ``torch.compile`` with
``activation_memory_budget`` (slow to compile; off by default).

Results go to ``--out`` (JSON) and the curve to ``--png``.

    python benchmarks/adaptive_checkpoint.py                      # CPU, ~6 min on 2 cores
    python benchmarks/adaptive_checkpoint.py --device cuda --quick   # H200, < 3 min
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

GiB = 1024**3
MiB = 1024**2


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------
def build_vit(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    import timm

    from lightning_peft import LoRA, apply_adapter

    if device.type == "cuda":
        name, kw, batch, img = "vit_base_patch16_224", {}, args.batch or 128, 224
    else:
        name, kw, batch, img = "vit_small_patch16_224", dict(img_size=48, patch_size=8, embed_dim=128, num_heads=4), args.batch or 8, 48
    torch.manual_seed(0)
    with torch.device(device):
        model = timm.create_model(name, num_classes=10, **kw)
    apply_adapter(model, LoRA(rank=16, alpha=32, target_modules=["qkv", "proj", "fc1", "fc2"]), trainable_modules=["head"])
    info = dict(
        model=name,
        batch=batch,
        img=img,
        blocks=len(model.blocks),
        unit="img/s",
        items=batch,
        precision="bf16-mixed" if device.type == "cuda" else "32-true",
        **kw,
    )
    return model, info


def llama_config(device: torch.device, layers: int | None):
    import transformers

    if device.type == "cuda":  # TinyLlama dimensions (1.1B)
        dims = dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=layers or 22,
            num_attention_heads=32,
            num_key_value_heads=4,
            vocab_size=32000,
        )
    else:
        dims = dict(
            hidden_size=128,
            intermediate_size=344,
            num_hidden_layers=layers or 10,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=512,
        )
    return transformers.LlamaConfig(**dims, max_position_embeddings=4096, use_cache=False)


def build_llama(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    import transformers

    from lightning_peft import LoRA, apply_adapter

    cfg = llama_config(device, args.layers)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg)
    if device.type == "cuda":
        model.to(torch.bfloat16)
    apply_adapter(
        model, LoRA(rank=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    )
    batch = args.batch or (8 if device.type == "cuda" else 4)
    seq = args.seq or (2048 if device.type == "cuda" else 128)
    info = dict(
        model="llama",
        layers=cfg.num_hidden_layers,
        hidden=cfg.hidden_size,
        batch=batch,
        seq=seq,
        blocks=cfg.num_hidden_layers,
        unit="tok/s",
        items=batch * seq,
        precision="bf16-true" if device.type == "cuda" else "32-true",
    )
    return model, info


def image_batches(info: dict[str, Any], device: torch.device, n: int) -> list[Any]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(info["batch"], 3, info["img"], info["img"], generator=g).to(device)
    y = torch.randint(0, 10, (info["batch"],), generator=g).to(device)
    return [(x, y)] * n


def text_batches(info: dict[str, Any], device: torch.device, lengths: list[int], vocab: int) -> list[Any]:
    g = torch.Generator().manual_seed(0)
    cache: dict[int, torch.Tensor] = {}
    out = []
    for n in lengths:
        if n not in cache:
            cache[n] = torch.randint(0, vocab, (info["batch"], n), generator=g).to(device)
        out.append({"input_ids": cache[n]})
    return out


def step_loss(model: nn.Module, kind: str, batch: Any) -> torch.Tensor:
    """Training loss of one batch: cross-entropy of a ViT on ``(x, y)``, or Llama's LM loss."""
    if kind == "vit":
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)
    ids = batch["input_ids"]
    return model(input_ids=ids, labels=ids, use_cache=False).loss


# --------------------------------------------------------------------------------------------
# Lightning harness
# --------------------------------------------------------------------------------------------
def make_module(model: nn.Module, kind: str):
    import lightning as L

    class Bench(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.seen = 0

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            self.seen += 1
            return step_loss(self.model, kind, batch)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-4)

    return Bench()


def make_timer():
    from lightning.pytorch.callbacks import Callback

    class Timer(Callback):
        """Synchronised wall time of each training step (forward, backward, optimizer)."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self._t0 = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if torch.cuda.is_available() and pl_module.device.type == "cuda":
                torch.cuda.synchronize()
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if torch.cuda.is_available() and pl_module.device.type == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._t0)

    return Timer()


def fit(model: nn.Module, kind: str, batches: list[Any], cb, device: torch.device, precision: str) -> dict[str, Any]:
    import lightning as L

    timer = make_timer()
    module = make_module(model, kind)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        max_steps=len(batches),
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[cb, timer],
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    trainer.fit(module, loader)
    assert module.seen >= len(batches), (module.seen, len(batches))
    for p in model.parameters():
        p.grad = None
    return {"history": cb.history, "times": timer.times}


def summarize(run: dict[str, Any], warmup: int, items: int) -> dict[str, Any]:
    hist = run["history"]
    steady = [h for h in hist[warmup:] if not h["events"]] or hist[warmup:] or hist
    times = run["times"][warmup:] or run["times"]
    t = statistics.median(times)
    return {
        "peak_bytes_max": max(h["measured_peak_bytes"] for h in hist),
        "peak_bytes_steady": max(h["measured_peak_bytes"] for h in steady),
        "predicted_bytes_steady": steady[-1]["predicted_peak_bytes"],
        "checkpointed": steady[-1]["checkpointed"],
        "modes": steady[-1]["modes"],
        "recompute_fraction": statistics.mean(h["recompute_fraction"] for h in steady),
        "step_time_s": t,
        "throughput": items / t,
        "steps": len(hist),
        "events": sorted({e for h in hist for e in h["events"]}),
    }


def callback(**kw):
    from lightning_peft import AdaptiveCheckpointCallback

    kw.setdefault("verbose", False)
    kw.setdefault("log_every_n_steps", 0)
    return AdaptiveCheckpointCallback(**kw)


# --------------------------------------------------------------------------------------------
# CPU: deterministic meter
# --------------------------------------------------------------------------------------------
def first_k_sweep(model: nn.Module, kind: str, batch: Any, profiles, pre: int, post: int) -> list[dict[str, Any]]:
    """Measure the peak of every static first-k plan (one step each, saved-activation meter)."""
    from lightning_peft.memory import SavedTensorMeter, find_blocks, predict_peak, static_modes, unwrap_blocks, wrap_blocks

    blocks = [b for _, c in find_blocks(model) for b in c]
    schedule = wrap_blocks(blocks)
    out = []
    try:
        for k in range(len(blocks) + 1):
            modes = static_modes("first_k", len(blocks), k)
            schedule.set_modes(modes)
            schedule.begin_step(profiling=False)
            model.zero_grad(set_to_none=True)
            with SavedTensorMeter(model) as meter:
                step_loss(model, kind, batch).backward()
            flops = sum(p.flops for p, m in zip(profiles, modes) if m == "checkpoint")
            out.append(dict(k=k, peak_bytes=meter.peak_bytes, predicted=predict_peak(profiles, modes, pre, post), recompute_flops=flops))
    finally:
        unwrap_blocks(blocks)
        model.zero_grad(set_to_none=True)
    return out


def cpu_model(kind: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    model, info = (build_vit if kind == "vit" else build_llama)(args, device)
    steps = args.steps or 6
    if kind == "vit":
        batches = image_batches(info, device, steps)
    else:
        batches = text_batches(info, device, [info["seq"]] * steps, model.config.vocab_size)
    prec = info["precision"]
    result: dict[str, Any] = {"info": info, "variants": {}}
    log = lambda msg: print(f"[{kind}] {msg}", flush=True)  # noqa: E731

    runs = {}
    for name, kw in [("none", dict(mode="none")), ("all", dict(mode="all")), ("every_2", dict(mode="every_k", k=2))]:
        runs[name] = fit(model, kind, batches, callback(**kw), device, prec)
        result["variants"][name] = summarize(runs[name], 1, info["items"])
        log(
            f"{name}: peak {result['variants'][name]['peak_bytes_max'] / MiB:.2f} MiB, step {result['variants'][name]['step_time_s']:.3f} s"
        )
    none_peak = result["variants"]["none"]["peak_bytes_max"]
    full_t = result["variants"]["all"]["step_time_s"]
    none_t = result["variants"]["none"]["step_time_s"]

    # profile once (an adaptive run's first step) for FLOPs and the first-k sweep
    budgets = {}
    for frac in args.budgets:
        budget = int(frac * none_peak)
        cb = callback(budget=budget, headroom=0.0)
        try:
            run = fit(model, kind, batches, cb, device, prec)
        except ValueError as err:  # BudgetTooSmallError: below the all-checkpointed floor
            result.setdefault("infeasible", {})[f"{frac:.2f}"] = str(err)
            log(f"adaptive @ {frac:.0%}: {err}")
            continue
        bucket = next(iter(cb._buckets.values()))
        s = summarize(run, 1, info["items"])
        full_flops = sum(p.flops for p in bucket.profiles)
        adaptive_flops = s["recompute_fraction"] * full_flops
        budgets[frac] = dict(
            budget_bytes=budget, adaptive=s, cb_bucket=bucket, history=run["history"], full_flops=full_flops, adaptive_flops=adaptive_flops
        )
        log(
            f"adaptive @ {frac:.0%}: plan {s['checkpointed']}, peak {s['peak_bytes_max'] / MiB:.2f} MiB "
            f"(budget {budget / MiB:.2f}), recompute {s['recompute_fraction']:.2f}, step {s['step_time_s']:.3f} s"
        )

    if not budgets:
        return result
    bucket = next(iter(budgets.values()))["cb_bucket"]
    sweep = first_k_sweep(model, kind, batches[0], bucket.profiles, bucket.pre, bucket.post)
    result["first_k"] = sweep
    log("first-k peaks (MiB): " + ", ".join(f"{r['k']}:{r['peak_bytes'] / MiB:.1f}" for r in sweep))
    result["budgets"] = {}
    for frac, b in budgets.items():
        fits = [r for r in sweep if r["peak_bytes"] <= b["budget_bytes"]]
        best = min(fits, key=lambda r: r["recompute_flops"]) if fits else None
        s = b["adaptive"]
        hist = b["history"]
        profile_flops = 2 * b["full_flops"]  # one all-checkpointed step + the side profiling forward
        entry = dict(
            budget_fraction=frac,
            budget_bytes=b["budget_bytes"],
            no_checkpoint_peak_bytes=none_peak,
            max_measured_over_budget=max(h["measured_peak_bytes"] for h in hist) / b["budget_bytes"],
            every_step_within_budget=all(h["measured_peak_bytes"] <= b["budget_bytes"] for h in hist),
            prediction_max_relative_error=max(
                abs(h["predicted_peak_bytes"] - h["measured_peak_bytes"]) / h["measured_peak_bytes"] for h in hist if not h["events"]
            ),
            predicted_never_below_measured=all(h["predicted_peak_bytes"] >= h["measured_peak_bytes"] for h in hist if not h["events"]),
            adaptive_checkpointed=s["checkpointed"],
            adaptive_recompute_flops_per_step=b["adaptive_flops"],
            best_first_k=None if best is None else best["k"],
            best_first_k_recompute_flops_per_step=None if best is None else best["recompute_flops"],
            best_first_k_peak_bytes=None if best is None else best["peak_bytes"],
            adaptive_over_first_k_recompute=(
                None if best is None or best["recompute_flops"] == 0 else b["adaptive_flops"] / best["recompute_flops"]
            ),
            adaptive_recompute_le_first_k=best is not None and b["adaptive_flops"] <= best["recompute_flops"] + 1e-6,
            one_time_profile_flops=profile_flops,
            one_time_profile_extra_flops_vs_first_k=profile_flops - (best["recompute_flops"] if best else 0.0),
            profile_note="the first step of a shape bucket checkpoints every block and runs one side forward per "
            "block: 2x the block FLOPs of a full recomputation, once",
            peak_reduction_vs_none=1 - s["peak_bytes_steady"] / none_peak,
            step_time_s=s["step_time_s"],
            step_time_overhead_vs_none=s["step_time_s"] / none_t - 1,
            full_checkpointing_overhead_vs_none=full_t / none_t - 1,
            full_checkpointing_peak_reduction=1 - result["variants"]["all"]["peak_bytes_max"] / none_peak,
        )
        result["budgets"][f"{frac:.2f}"] = entry
        result["variants"][f"adaptive_{int(frac * 100)}"] = s
    return result


def cpu_variable_length(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Per-shape plans vs one worst-case plan for variable-length batches (same budget)."""
    from lightning_peft.memory import predict_peak

    model, info = build_llama(args, device)
    longest = info["seq"]
    lengths = [
        longest,
        longest // 4,
        longest // 2,
        longest // 4,
        3 * longest // 4,
        longest // 2,
        longest // 4,
        longest,
        longest // 2,
        longest // 4,
        3 * longest // 4,
        longest // 4,
    ]
    vocab = model.config.vocab_size
    none = fit(model, "llama", text_batches(info, device, [longest], vocab), callback(mode="none"), device, info["precision"])
    budget = int(0.5 * none["history"][0]["measured_peak_bytes"])
    cb = callback(budget=budget, headroom=0.0)
    try:
        fit(model, "llama", text_batches(info, device, lengths, vocab), cb, device, info["precision"])
    except ValueError as err:  # BudgetTooSmallError: a short batch's floor is above half the longest's peak
        print(f"[variable length] @ 50%: {err}", flush=True)
        return {"infeasible": str(err), "lengths": lengths, "budget_bytes": budget}
    worst = cb._buckets[max(cb._buckets, key=lambda k: int(k.split("x")[1]))]
    steps = []
    for h, n in zip(cb.history, lengths):
        b = cb._buckets[h["bucket"]]
        flops_full = sum(p.flops for p in b.profiles)
        per_shape = h["recompute_fraction"] * flops_full
        worst_modes = worst.plan.modes
        worst_flops = sum(p.flops for p, m in zip(b.profiles, worst_modes) if m == "checkpoint")
        steps.append(
            dict(
                seq=n,
                events=h["events"],
                measured_peak_bytes=h["measured_peak_bytes"],
                per_shape_checkpointed=h["checkpointed"],
                per_shape_recompute_flops=per_shape,
                worst_case_checkpointed=[i for i, m in enumerate(worst_modes) if m == "checkpoint"],
                worst_case_recompute_flops=worst_flops,
                worst_case_predicted_peak=predict_peak(b.profiles, worst_modes, b.pre, b.post),
            )
        )
    steady = [s for s in steps if not s["events"]]
    total = lambda key, rows: sum(r[key] for r in rows)  # noqa: E731
    out = dict(
        info=info,
        lengths=lengths,
        budget_bytes=budget,
        buckets=sorted(cb._buckets),
        every_step_within_budget=all(s["measured_peak_bytes"] <= budget for s in steps),
        steady_per_shape_recompute_flops=total("per_shape_recompute_flops", steady),
        steady_worst_case_recompute_flops=total("worst_case_recompute_flops", steady),
        all_steps_per_shape_recompute_flops=total("per_shape_recompute_flops", steps),
        all_steps_worst_case_recompute_flops=total("worst_case_recompute_flops", steps),
        steps=steps,
    )
    out["steady_ratio_per_shape_over_worst_case"] = (
        out["steady_per_shape_recompute_flops"] / out["steady_worst_case_recompute_flops"]
        if out["steady_worst_case_recompute_flops"]
        else None
    )
    print(
        f"[varlen] buckets {out['buckets']}: per-shape recompute {out['steady_per_shape_recompute_flops'] / 1e9:.2f} "
        f"GFLOP vs worst-case plan {out['steady_worst_case_recompute_flops'] / 1e9:.2f} GFLOP (steady steps); "
        f"within budget every step: {out['every_step_within_budget']}",
        flush=True,
    )
    return out


# --------------------------------------------------------------------------------------------
# CUDA: allocator peaks and throughput
# --------------------------------------------------------------------------------------------
def cuda_model(kind: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    model, info = (build_vit if kind == "vit" else build_llama)(args, device)
    L_ = info["blocks"]
    warm = 2
    steps = args.steps or (10 if args.quick else 16)
    vocab = getattr(getattr(model, "config", None), "vocab_size", 0)
    batches = image_batches(info, device, steps) if kind == "vit" else text_batches(info, device, [info["seq"]] * steps, vocab)
    result: dict[str, Any] = {"info": info, "variants": {}}
    log = lambda msg: print(f"[{kind}] {msg}", flush=True)  # noqa: E731

    def run(name: str, **kw: Any) -> None:
        t0 = time.perf_counter()
        try:
            r = fit(model, kind, batches, callback(**kw), device, info["precision"])
            s = summarize(r, warm, info["items"])
            s["wall_s"] = time.perf_counter() - t0
            result["variants"][name] = s
            log(
                f"{name:>22}: peak {s['peak_bytes_steady'] / GiB:6.2f} GiB  {s['throughput']:9.1f} {info['unit']}  "
                f"plan {''.join('.CSO'[('none', 'checkpoint', 'selective', 'offload').index(m)] for m in s['modes'])}  "
                f"({s['wall_s']:.0f} s)"
            )
        except Exception as err:  # keep going: one failing variant must not lose the others
            result["variants"][name] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}
            log(f"{name}: FAILED {type(err).__name__}: {err}")
        finally:
            gc.collect()
            torch.cuda.empty_cache()
        if "budget" in kw:
            result["variants"][name]["budget_bytes"] = kw["budget"]

    if not args.no_selfcheck:
        result["selfcheck"] = cuda_selfcheck(model, kind, info, batches[0], device)
    run("none", mode="none")
    none = result["variants"]["none"]
    if "error" in none:
        return result
    none_peak = none["peak_bytes_steady"]
    run("all", mode="all")
    run("every_2", mode="every_k", k=2)
    for k in sorted({L_ // 4, L_ // 2, (3 * L_) // 4}):
        run(f"first_{k}", mode="first_k", k=k)
    for frac in args.budgets_cuda:
        run(f"adaptive_{int(frac * 100)}", budget=int(frac * none_peak), headroom=0.03)
    frac = args.budgets_cuda[0]
    budget = int(frac * none_peak)
    run(f"adaptive_{int(frac * 100)}_selective", budget=budget, headroom=0.03, selective=True)
    if args.offload:
        run(f"adaptive_{int(frac * 100)}_offload", budget=budget, headroom=0.03, offload=True)
    if args.compile and kind == "vit":
        result["variants"].update(compiled_budget_sweep(model, info, batches, device))
    # ratios against no checkpointing
    for s in result["variants"].values():
        if "error" in s:
            continue
        s["peak_over_none"] = s["peak_bytes_steady"] / none_peak
        s["throughput_over_none"] = s["throughput"] / none["throughput"]
        if "budget_bytes" in s:
            s["within_budget_every_step"] = s["peak_bytes_max"] <= s["budget_bytes"]
    return result  # the model is freed with this frame; the next model starts from an empty cache


def cuda_selfcheck(model: nn.Module, kind: str, info: dict[str, Any], batch: Any, device: torch.device) -> dict[str, Any]:
    """One step per block mode, straight through the wrapper: LoRA gradients equal to no
    checkpointing (bf16 tolerance), with each mode's peak and step time (offload included)."""
    from lightning_peft.memory import find_blocks, unwrap_blocks, wrap_blocks

    blocks = [b for _, c in find_blocks(model) for b in c]
    schedule = wrap_blocks(blocks)
    autocast = info["precision"] == "bf16-mixed"
    lora = [(n, p) for n, p in model.named_parameters() if p.requires_grad and "lora" in n.lower()]
    out: dict[str, Any] = {}
    ref = None
    try:
        for mode in ("none", "checkpoint", "selective", "offload"):
            schedule.set_modes([mode] * len(blocks))
            times = []
            for rep in range(3):
                schedule.begin_step(profiling=False)
                model.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                if rep == 1:
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                    loss = step_loss(model, kind, batch)
                loss.backward()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            grads = torch.cat([p.grad.float().flatten() for _, p in lora])
            if ref is None:
                ref = grads
            rel = float((grads - ref).norm() / ref.norm().clamp_min(1e-30))
            out[mode] = dict(
                peak_bytes=torch.cuda.max_memory_allocated(),
                fwd_bwd_time_s=min(times[1:]),
                grad_rel_diff_vs_none=rel,
                recomputed_blocks=sum(1 for c in schedule.recomputed if c),
            )
            print(
                f"[{kind}] selfcheck {mode:>10}: peak {out[mode]['peak_bytes'] / GiB:6.2f} GiB, "
                f"fwd+bwd {out[mode]['fwd_bwd_time_s'] * 1e3:7.1f} ms, grad rel diff {rel:.1e}",
                flush=True,
            )
    except Exception as err:
        out["error"] = f"{type(err).__name__}: {err}"
        out["trace"] = traceback.format_exc()[-2000:]
        print(f"[{kind}] selfcheck FAILED: {out['error']}", flush=True)
    finally:
        unwrap_blocks(blocks)
        model.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
    return out


def compiled_budget_sweep(model: nn.Module, info: dict[str, Any], batches: list[Any], device: torch.device) -> dict[str, Any]:
    """torch.compile with ``activation_memory_budget`` (the compiler's min-cut rematerialisation)."""
    import torch._functorch.config as fconfig

    out = {}
    params = [p for p in model.parameters() if p.requires_grad]
    for budget in (1.0, 0.5):
        fconfig.activation_memory_budget = budget
        torch._dynamo.reset()
        compiled = torch.compile(model)
        opt = torch.optim.AdamW(params, lr=1e-4)
        times = []
        torch.cuda.reset_peak_memory_stats()
        for i, (x, y) in enumerate(batches):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(compiled(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            if i == 1:
                torch.cuda.reset_peak_memory_stats()
        t = statistics.median(times[2:])
        out[f"compiled_budget_{budget}"] = dict(
            peak_bytes_steady=torch.cuda.max_memory_allocated(), step_time_s=t, throughput=info["items"] / t, modes=[], checkpointed=[]
        )
    fconfig.activation_memory_budget = 1.0
    return out


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------
def plot(results: dict[str, Any], path: Path, device: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", flush=True)
        return
    models = [m for m in ("vit", "llama") if m in results["models"]]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, m in zip(axes[0], models):
        r = results["models"][m]
        v = r["variants"]
        if device == "cpu":
            none = v["none"]["peak_bytes_max"]
            full = r["budgets"][next(iter(r["budgets"]))]
            fk = r["first_k"]
            total = full["one_time_profile_flops"] / 2
            ax.plot(
                [x["recompute_flops"] / total for x in fk],
                [x["peak_bytes"] / none for x in fk],
                "o-",
                color="grey",
                label="static first-k (k = 0..L)",
            )
            ax.plot([0.5], [v["every_2"]["peak_bytes_max"] / none], "s", color="tab:blue", label="static every-2")
            for key, e in r["budgets"].items():
                ax.axhline(e["budget_bytes"] / none, color="tab:red", lw=0.6, ls=":")
                ax.plot(
                    [e["adaptive_recompute_flops_per_step"] / total],
                    [1 - e["peak_reduction_vs_none"]],
                    "*",
                    ms=14,
                    color="tab:red",
                    label="adaptive (budget: dotted)" if key == next(iter(r["budgets"])) else None,
                )
            ax.set_xlabel("recomputed block FLOPs / all blocks (per step)")
            ax.set_ylabel("peak saved-activation bytes / no checkpointing")
            info = r["info"]
            shape = (
                f"dim {info.get('embed_dim')}, {info['img']}px/patch {info.get('patch_size')}"
                if m == "vit"
                else f"hidden {info.get('hidden')}, seq {info.get('seq')}"
            )
            ax.set_title(f"{m}: {info['blocks']} blocks, {shape}, batch {info['batch']} (CPU, exact meter)", fontsize=9)
        else:
            none = v.get("none", {})
            for name, s in v.items():
                if "error" in s:
                    continue
                color = "tab:red" if name.startswith("adaptive") else ("tab:green" if name.startswith("compiled") else "grey")
                star = color == "tab:red"
                ax.plot(s["throughput"], s["peak_bytes_steady"] / GiB, "*" if star else "o", ms=12 if star else 7, color=color)
                ax.annotate(name, (s["throughput"], s["peak_bytes_steady"] / GiB), fontsize=7, xytext=(4, 3), textcoords="offset points")
            if "peak_bytes_steady" in none:
                ax.axhline(0.5 * none["peak_bytes_steady"] / GiB, color="tab:red", lw=0.6, ls=":")
            info = r["info"]
            ax.set_xlabel(f"throughput ({info['unit']})")
            ax.set_ylabel("peak allocated (GiB)")
            ax.set_title(f"{m}: {info['model']}, batch {info['batch']} ({results['env'].get('gpu', 'cuda')})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7) if device == "cpu" else None
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}", flush=True)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--models", default="vit,llama", help="comma-separated: vit, llama")
    p.add_argument("--quick", action="store_true", help="fewer steps (CUDA: fits in < 3 minutes on an H200)")
    p.add_argument("--steps", type=int, default=None, help="training steps per variant")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None, help="Llama sequence length (CUDA 2048, CPU 128)")
    p.add_argument("--layers", type=int, default=None, help="Llama layers (CUDA 22, CPU 10)")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5, 0.7], help="CPU budget fractions")
    p.add_argument("--budgets-cuda", type=float, nargs="+", default=[0.5, 0.7], help="CUDA budget fractions")
    p.add_argument("--no-varlen", action="store_true", help="CPU: skip the variable-length experiment")
    p.add_argument("--offload", action="store_true", help="CUDA: add an adaptive variant that may offload")
    p.add_argument("--compile", action="store_true", help="CUDA: add torch.compile activation_memory_budget (slow)")
    p.add_argument("--no-selfcheck", action="store_true", help="CUDA: skip the per-mode gradient/peak self-check")
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU default 1: steadier on shared cores)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/adaptive_checkpoint_<device>.json)")
    p.add_argument("--png", default=None, help="plot path (default docs/adaptive_checkpointing_<device>.png)")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but CUDA is not available")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"adaptive_checkpoint_{args.device}.json")
    png = Path(args.png or ROOT / "docs" / f"adaptive_checkpointing_{args.device}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(
        torch=torch.__version__, python=platform.python_version(), device=args.device, threads=torch.get_num_threads(), argv=sys.argv[1:]
    )
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    results: dict[str, Any] = {"env": env, "models": {}}
    t_start = time.perf_counter()
    for kind in [m.strip() for m in args.models.split(",") if m.strip()]:
        t0 = time.perf_counter()
        results["models"][kind] = (cpu_model if device.type == "cpu" else cuda_model)(kind, args, device)
        results["models"][kind]["wall_s"] = time.perf_counter() - t0
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        out.write_text(json.dumps(results, indent=2, default=str))
    if device.type == "cpu" and not args.no_varlen and "llama" in args.models:
        results["variable_length"] = cpu_variable_length(args, device)
    results["wall_s"] = time.perf_counter() - t_start
    for m in results["models"].values():  # drop non-JSON helpers
        for b in m.get("budgets", {}).values():
            b.pop("cb_bucket", None)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"results written to {out} ({results['wall_s']:.0f} s)", flush=True)
    plot(results, png, args.device)
    print_summary(results, args.device)


def print_summary(results: dict[str, Any], device: str) -> None:
    print("\nsummary", flush=True)
    for m, r in results["models"].items():
        if device == "cpu":
            for key, e in r.get("budgets", {}).items():
                ratio = e["adaptive_over_first_k_recompute"]
                print(
                    f"  {m} budget {float(key):.0%}: within budget every step {e['every_step_within_budget']}, "
                    f"peak -{e['peak_reduction_vs_none']:.0%} vs none, adaptive blocks {e['adaptive_checkpointed']}, "
                    f"recompute / best first-{e['best_first_k']} = {ratio if ratio is None else round(ratio, 3)}, "
                    f"step time +{e['step_time_overhead_vs_none']:.0%} vs none (full checkpointing "
                    f"+{e['full_checkpointing_overhead_vs_none']:.0%})"
                )
        else:
            for name, s in r["variants"].items():
                if "error" in s:
                    print(f"  {m} {name}: ERROR {s['error']}")
                    continue
                print(
                    f"  {m} {name:>24}: peak {s.get('peak_over_none', float('nan')):.2f} x none, "
                    f"throughput {s.get('throughput_over_none', float('nan')):.2f} x none"
                )
    if "variable_length" in results:
        v = results["variable_length"]
        ratio = v.get("steady_ratio_per_shape_over_worst_case", f"infeasible ({v.get('infeasible')})")
        print(f"  variable length: per-shape / worst-case recompute (steady) = {ratio}")


if __name__ == "__main__":
    main()
