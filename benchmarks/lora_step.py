#!/usr/bin/env python
"""LoRA training-step benchmark: full fine-tune, frozen-base limit, ours, Hugging Face peft.

One run measures, for each model, every variant from the same initial weights (each in its own
model copy), interleaving the variants round by round so that drift and noise hit all of them:

* ``full``       every parameter trains (AdamW over all of them);
* ``frozen``     no adapter, every weight frozen, inputs / embeddings require grad so the whole
                 backward still runs: the *frozen-base limit* no adapter can beat;
* ``ours``       ``apply_adapter(model, LoRA(rank=16, alpha=32, ...))`` (+ trainable ViT head);
* ``peft``       ``peft.get_peft_model`` with the same rank, alpha and targets (+ ``modules_to_save``
                 head for ViT);
* ``peft_bf16``  (Llama with bf16 weights only) peft with ``autocast_adapter_dtype=False``;
* ``plain``      (opt-in) the textbook ``base(x) + B(A(x)) * s`` modules;
* ``dora``, ``peft_dora``  (opt-in) ``DoRA(...)`` and peft's ``use_dora=True``, same rank, alpha, targets.
* ``ours_whole_replay``  (opt-in) ``ours`` with the CPU replay of a recomputed input done whole
                 instead of in row chunks (``kernels.recompute.REPLAY_CHUNK_ELEMENTS``): the A/B of
                 that choice in one run.
* ``ours_direct_outer``  (opt-in) ``ours`` with LoRA's ``dB`` always as ``dy^T u``, never as the
                 transposed product ``(u^T dy)^T`` (``kernels.lora.THIN_OUTER_MIN_ELEMENTS``).
* ``ours_unmerged``  (opt-in) ``ours`` with the base GEMMs always on ``W`` plus the thin update,
                 never on the merged ``W + s B A`` (``kernels.lora.MERGE_MIN_ROWS_PER_COLUMN``).
* ``<variant>_compiled`` (opt-in: ``frozen_compiled``, ``ours_compiled``, ``peft_compiled`` ...)
                 the same variant with every transformer block (timm ``Block``, ``LlamaDecoderLayer``)
                 compiled by ``torch.compile`` (inductor; ``--compile-mode``), ``fullgraph=True``
                 except for peft. Ratios of compiled variants are against ``frozen_compiled`` when
                 it is in the run (the compiled frozen-base limit), else against ``frozen``.

A step is forward + loss + backward + AdamW step + ``zero_grad(set_to_none=True)``.
Reported per variant: median step time, throughput, trainable parameters, and memory:

* CUDA: the allocator peak of the whole step (``max_memory_allocated`` after
  ``reset_peak_memory_stats``), counted as this variant's own resident bytes (parameters,
  buffers, optimizer state) plus the peak increase during the step, so other resident variants
  do not count; and the saved-activation bytes of one forward;
* CPU: saved-activation bytes of one forward (``SavedTensorMeter``), parameter + gradient +
  optimizer-state bytes, and their sum as the peak estimate.

Ratios are against ``frozen`` (throughput: frozen_time / time; memory: peak / frozen_peak) and
ours against peft. Each eager variant's matmul-type FLOPs of one forward + backward are counted
(``lightning_peft.metrics.count_step_flops``), which gives two more figures: the *FLOP ceiling*
``frozen_flops / flops``, the throughput ratio the variant would reach if its extra work ran at
the frozen base's average FLOP rate, and the *extra-work rate*, the FLOP rate of the variant's
extra FLOPs over its extra time against the frozen base's rate (1.0: the ceiling is reached;
element-wise work and host time land in the extra time). Before timing, each model is checked
once: with B = 0, ours, peft and frozen give the same loss; with peft's A and a random B copied
into ours, ours and peft give the same loss and LoRA gradients. Results go to ``--out`` (JSON,
rewritten after every model).

    python benchmarks/lora_step.py --device cpu --quick              # CPU, small shapes, ~2 min
    python benchmarks/lora_step.py --device cuda                     # H200: ViT-S, ViT-B, Llama 1.1B
    python benchmarks/lora_step.py --device cpu --quick --variants frozen,ours,peft,frozen_compiled,ours_compiled,peft_compiled
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

import machine  # noqa: E402  (benchmarks/machine.py: the CPU this ran on)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from lightning_peft.memory import SavedTensorMeter  # noqa: E402
from lightning_peft.metrics import count_step_flops  # noqa: E402

RANK, ALPHA = 16, 32
VIT_TARGETS = r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"  # not patch_embed.proj (a conv)
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MiB = 2**20
COMPILED = "_compiled"  # variant-name suffix: the same variant with its transformer blocks compiled
BLOCK_TYPES = ("Block", "LlamaDecoderLayer")  # timm ViT block, transformers Llama layer


# --------------------------------------------------------------------------------------------
# Model shapes
# --------------------------------------------------------------------------------------------
def model_spec(name: str, args: argparse.Namespace) -> dict[str, Any]:
    q = args.quick
    if name in ("vit_s", "vit_b"):
        spec: dict[str, Any] = {
            "kind": "vit",
            "timm_name": {"vit_s": "vit_small_patch16_224", "vit_b": "vit_base_patch16_224"}[name],
            "img": 64 if q else 224,
            "depth": (12 if name == "vit_s" else 4) if q else None,
            "batch": (8 if name == "vit_s" else 4) if q else 128,
        }
        if args.img:
            spec["img"] = args.img
    elif name == "llama":
        spec = {
            "kind": "llama",
            "hidden": 512 if q else 2048,
            "intermediate": 1408 if q else 5632,
            "layers": 4 if q else 22,
            "heads": 8 if q else 32,
            "kv_heads": 2 if q else 4,
            "vocab": 4096 if q else 32000,
            "batch": 2 if q else 8,
            "seq": 128 if q else 2048,
        }
        if args.seq:
            spec["seq"] = args.seq
    else:
        raise SystemExit(f"unknown model {name!r}; choose from vit_s, vit_b, llama")
    if args.batch:
        spec["batch"] = args.batch
    return spec


def build_reference(spec: dict[str, Any], device: torch.device, dtype: torch.dtype) -> nn.Module:
    if spec["kind"] == "vit":
        import timm

        kwargs: dict[str, Any] = {"img_size": spec["img"]}
        if spec["depth"]:
            kwargs["depth"] = spec["depth"]
        model = timm.create_model(spec["timm_name"], pretrained=False, **kwargs)
        return model.to(device=device, dtype=dtype)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"],
        vocab_size=spec["vocab"],
        max_position_embeddings=max(2048, spec["seq"]),
        tie_word_embeddings=False,
        use_cache=False,
        attn_implementation="sdpa",
    )
    with torch.device(device):  # initialise where it runs (1.1B random weights on CPU is slow)
        model = LlamaForCausalLM(config)
    return model.to(dtype=dtype)


# --------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------
@dataclass
class Variant:
    name: str
    model: nn.Module
    loss_fn: Callable[[], torch.Tensor]
    optimizer: torch.optim.Optimizer | None
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    host_times: list[float] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)
    increments: list[int] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)
    around: Callable[[], Any] = contextlib.nullcontext  # a context every step of this variant runs in

    def step(self) -> None:
        if self.name.endswith(COMPILED):  # a new iteration for CUDA graph trees (reduce-overhead); else a no-op
            torch.compiler.cudagraph_mark_step_begin()
        with self.around():
            loss = self.loss_fn()
            loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


def whole_replay() -> Any:
    """Recomputed LoRA inputs replayed whole (one ``[N, d]`` tensor), not in row chunks."""
    from lightning_peft.adapters.kernels import recompute

    return mock.patch.object(recompute, "REPLAY_CHUNK_ELEMENTS", 1 << 62)


def direct_outer() -> Any:
    """LoRA's ``dB`` as ``dy^T u`` at every size (see ``kernels.lora.thin_outer``)."""
    from lightning_peft.adapters.kernels import lora

    return mock.patch.object(lora, "THIN_OUTER_MIN_ELEMENTS", 1 << 62)


def unmerged() -> Any:
    """LoRA's base GEMMs on ``W`` with the thin update added, never on ``W + s B A``."""
    from lightning_peft.adapters.kernels import lora

    return mock.patch.object(lora, "MERGE_MIN_ROWS_PER_COLUMN", float("inf"))


AROUND = {"ours_whole_replay": whole_replay, "ours_direct_outer": direct_outer, "ours_unmerged": unmerged}  # A/B variants of ours


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def tensor_bytes(tensors: Any) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def resident_bytes(v: Variant) -> dict[str, int]:
    params = tensor_bytes([*v.model.parameters(), *v.model.buffers()])
    grads = sum(p.numel() * p.element_size() for p in trainable(v.model))
    state = 0
    if v.optimizer is not None:
        state = tensor_bytes(t for s in v.optimizer.state.values() for t in s.values())
    return {"params": params, "grads": grads, "optimizer_state": state}


def make_variant(
    name: str,
    ref: nn.Module,
    spec: dict[str, Any],
    batch: dict[str, torch.Tensor],
    autocast: Callable[[], Any],
    compile_mode: str | None = None,
) -> Variant:
    if name.endswith(COMPILED):
        variant = make_variant(name.removesuffix(COMPILED), ref, spec, batch, autocast)
        compile_blocks(variant.model, compile_mode, fullgraph=not name.startswith("peft"))
        variant.name = name
        return variant
    model = copy.deepcopy(ref)
    model.train()
    vit = spec["kind"] == "vit"
    if name == "full":
        model.requires_grad_(True)
    elif name == "frozen":
        model.requires_grad_(False)
        # the embeddings (not the raw inputs) require grad: backward runs through every block,
        # as it must for any adapter, but not through the patch-embedding conv / token lookup
        embed = model.patch_embed if vit else model.get_input_embeddings()
        embed.register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    elif name == "ours" or name in AROUND:
        from lightning_peft import LoRA, apply_adapter

        targets = VIT_TARGETS if vit else LLAMA_TARGETS
        apply_adapter(model, LoRA(rank=RANK, alpha=ALPHA, target_modules=targets), trainable_modules=["head"] if vit else None)
    elif name == "dora":
        from lightning_peft import DoRA, apply_adapter

        targets = VIT_TARGETS if vit else LLAMA_TARGETS
        apply_adapter(model, DoRA(rank=RANK, alpha=ALPHA, target_modules=targets), trainable_modules=["head"] if vit else None)
    elif name == "plain":
        plain_lora(model, vit)
    elif name in ("peft", "peft_bf16", "peft_dora"):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=RANK,
            lora_alpha=ALPHA,
            lora_dropout=0.0,
            target_modules=VIT_TARGETS if vit else LLAMA_TARGETS,
            modules_to_save=["head"] if vit else None,
            use_dora=name == "peft_dora",
        )
        model = get_peft_model(model, config, autocast_adapter_dtype=(name != "peft_bf16"))
        model.train()
    else:
        raise ValueError(name)

    if vit:
        x, y = batch["x"], batch["y"]

        def loss_fn() -> torch.Tensor:
            with autocast():
                return F.cross_entropy(model(x), y)

    else:
        ids = batch["ids"]

        def loss_fn() -> torch.Tensor:
            with autocast():
                return model(input_ids=ids, labels=ids).loss

    params = trainable(model)
    optimizer = make_optimizer(params)
    return Variant(name, model, loss_fn, optimizer, around=AROUND.get(name, contextlib.nullcontext))


def compile_blocks(model: nn.Module, mode: str | None, fullgraph: bool) -> int:
    """``torch.compile`` every transformer block in place (regional compilation: blocks of one
    layout share one compiled graph, embeddings / head / loss stay eager). Returns the count."""
    blocks = [m for m in model.modules() if type(m).__name__ in BLOCK_TYPES]
    if not blocks:
        raise RuntimeError(f"no transformer block ({', '.join(BLOCK_TYPES)}) found to compile")
    for block in blocks:
        block.compile(mode=mode, fullgraph=fullgraph)
    return len(blocks)


def make_optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer | None:
    """AdamW, fused (one kernel; CPU and CUDA) when this torch supports it, the same for all."""
    if not params:
        return None
    try:
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=1e-4)


class PlainLoRALinear(nn.Module):
    """The textbook two-matmul LoRA: ``base(x) + B(A(x)) * s`` (the anchors' "plain LoRA")."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scale


def plain_lora(model: nn.Module, vit: bool) -> None:
    import re

    model.requires_grad_(False)
    pattern = re.compile(VIT_TARGETS) if vit else None
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        hit = pattern.fullmatch(name) if vit else name.rsplit(".", 1)[-1] in LLAMA_TARGETS
        if hit:
            model.set_submodule(name, PlainLoRALinear(module, RANK, ALPHA))
    if vit:
        model.head.requires_grad_(True)


# --------------------------------------------------------------------------------------------
# Correctness check: ours and peft agree at step 0
# --------------------------------------------------------------------------------------------
def lora_pairs(ours: nn.Module, peft_model: nn.Module) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
    """(name, ours param, peft param) for every lora_A / lora_B weight."""
    peft_params = {}
    for n, p in peft_model.named_parameters():
        if ".lora_A." in n or ".lora_B." in n:
            key = n.removeprefix("base_model.model.").replace(".default.", ".")
            peft_params[key] = p
    pairs = []
    for n, p in ours.named_parameters():
        if ".lora_A." in n or ".lora_B." in n:
            pairs.append((n, p, peft_params[n]))
    if len(pairs) != len(peft_params):
        raise RuntimeError(f"ours has {len(pairs)} LoRA tensors, peft {len(peft_params)}")
    return pairs


def check_same_init(variants: dict[str, Variant], device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {}
    ours = variants.get("ours")
    peft_names = [n for n in ("peft_bf16", "peft") if n in variants]
    if ours is None or not peft_names:
        return {"skipped": "needs ours and peft"}
    with torch.no_grad():
        for name in ("frozen", "ours", *peft_names):
            if name in variants:
                out[f"zero_B_loss_{name}"] = float(variants[name].loss_fn())
    # same A, random B: copy the first peft's adapters into ours, every other peft gets the same
    gen = torch.Generator(device="cpu").manual_seed(1)
    ref_pairs = lora_pairs(ours.model, variants[peft_names[0]].model)
    with torch.no_grad():
        for n, p_ours, p_peft in ref_pairs:
            if ".lora_B." in n:
                p_peft.copy_(0.02 * torch.randn(p_peft.shape, generator=gen))
            p_ours.copy_(p_peft)
        ref = {n: p_peft for n, _, p_peft in ref_pairs}
        for other in peft_names[1:]:
            for n, _, p_other in lora_pairs(ours.model, variants[other].model):
                p_other.copy_(ref[n])
    grads: dict[str, dict[str, torch.Tensor]] = {}
    for name in ("ours", *peft_names):
        v = variants[name]
        loss = v.loss_fn()
        loss.backward()
        out[f"loss_{name}"] = loss.item()
        pairs = lora_pairs(ours.model, v.model) if name != "ours" else [(n, p, p) for n, p, _ in ref_pairs]
        grads[name] = {n: p_var.grad.detach().float().clone() for n, _, p_var in pairs}
        v.optimizer.zero_grad(set_to_none=True)
        del loss
    if len(peft_names) == 2:  # the noise floor: peft against itself in the other adapter dtype
        a, b = grads[peft_names[0]], grads[peft_names[1]]
        out["grad_rel_err_peft_bf16_vs_peft"] = max((a[n] - b[n]).norm().item() / max(b[n].norm().item(), 1e-30) for n in a)
    for name in peft_names:
        errs = [(grads["ours"][n] - grads[name][n]).norm().item() / max(grads[name][n].norm().item(), 1e-30) for n in grads["ours"]]
        out[f"grad_rel_err_ours_vs_{name}"] = max(errs)
        out[f"loss_abs_diff_ours_vs_{name}"] = abs(out["loss_ours"] - out[f"loss_{name}"])
    # back to the standard init (B = 0), all LoRA variants with the same A
    with torch.no_grad():
        for name in ("ours", *peft_names):
            for n, _, p in lora_pairs(ours.model, variants[name].model):
                if ".lora_B." in n:
                    p.zero_()
    del grads
    return out


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed_step(v: Variant, device: torch.device, record: bool) -> None:
    cuda = device.type == "cuda"
    own = 0
    if cuda and record:
        sync(device)
        r = resident_bytes(v)
        own = r["params"] + r["optimizer_state"]  # grads are None between steps
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    v.step()
    host = time.perf_counter() - t0  # CUDA: time to enqueue the step (CPU-bound if ~ step time)
    sync(device)
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    if record:
        v.times.append(dt)
        v.cpu_times.append(dc)
        v.host_times.append(host)
        if cuda:
            increment = torch.cuda.max_memory_allocated(device) - before
            v.increments.append(increment)
            v.peaks.append(own + increment)


class _DetachingMeter(SavedTensorMeter):
    """``SavedTensorMeter`` (same counting) that hands autograd *detached* tensors.

    A pack hook that keeps a forward *output* with its ``grad_fn`` (the tensor itself, or an
    object holding it) makes a reference cycle node -> packed -> tensor -> node that Python's
    garbage collector cannot see, so the whole graph of the measured forward is never freed
    (1.1B Llama: tens of GB per measurement). A detached tensor shares storage and version
    counter, so counting and LoRA's reads of saved tensors are unchanged.
    """

    def _pack(self, tensor: torch.Tensor) -> Any:
        packed = super()._pack(tensor)
        if isinstance(packed, torch.Tensor):
            return packed.detach() if packed.grad_fn is not None else packed
        inner = getattr(packed, "tensor", None)
        if isinstance(inner, torch.Tensor) and inner.grad_fn is not None:
            try:
                packed.tensor = inner.detach()
            except AttributeError:
                pass
        return packed

    _pack._lightning_peft_transparent = True  # type: ignore[attr-defined]


def saved_activation_bytes(v: Variant) -> int:
    with _DetachingMeter(v.model) as meter:
        loss = v.loss_fn()
    del loss
    return meter.bytes


def step_flops(v: Variant) -> int:
    """Matmul-type FLOPs of one forward + backward of ``v`` (no optimizer step), grads cleared."""
    with v.around():
        flops = sum(count_step_flops(lambda: v.loss_fn().backward()).values())
    for p in v.model.parameters():
        p.grad = None
    return flops


def profile_variant(v: Variant, device: torch.device, steps: int = 2) -> dict[str, Any]:
    """Top operators of ``steps`` steps by self device time (CUDA) or self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            v.step()
        sync(device)
    rows = []
    for e in prof.key_averages():
        if not (e.key.startswith("aten::") or "LoRA" in e.key or e.key.startswith("Optimizer")):
            continue
        dev = getattr(e, "self_device_time_total", None)
        if dev is None:
            dev = getattr(e, "self_cuda_time_total", 0)
        t = dev if cuda else e.self_cpu_time_total
        rows.append((e.key, t / steps / 1000, e.count / steps))  # ms per step, calls per step
    rows.sort(key=lambda r: -r[1])
    return {
        "unit": "ms per step (self " + ("device" if cuda else "CPU") + " time)",
        "total_ms": sum(r[1] for r in rows),
        "top": [{"op": k, "ms": round(t, 4), "calls": c} for k, t, c in rows[:30]],
    }


def fmt_bytes(n: float | None) -> str:
    return "-" if n is None else f"{n / MiB:,.1f}"


def run_model(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    spec = model_spec(name, args)
    vit = spec["kind"] == "vit"
    cuda = device.type == "cuda"
    if cuda:
        dtype = torch.float32 if vit else torch.bfloat16
        use_autocast = vit
    else:
        dtype = torch.bfloat16 if args.cpu_dtype == "bf16" else torch.float32
        use_autocast = args.cpu_autocast

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast)

    torch.manual_seed(0)
    ref = build_reference(spec, device, dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    if vit:
        batch = {
            "x": torch.randn(spec["batch"], 3, spec["img"], spec["img"], generator=gen).to(device=device, dtype=dtype),
            "y": torch.randint(0, ref.num_classes, (spec["batch"],), generator=gen).to(device),
        }
        items, unit = spec["batch"], "img/s"
    else:
        batch = {"ids": torch.randint(0, spec["vocab"], (spec["batch"], spec["seq"]), generator=gen).to(device)}
        items, unit = spec["batch"] * spec["seq"], "tok/s"

    names = ["full", "frozen", "ours", "peft"]
    if not vit and dtype == torch.bfloat16:
        names.append("peft_bf16")
    if args.variants:
        wanted = [w for w in args.variants.split(",") if w != "peft_bf16" or "peft_bf16" in names]
        names = [n for n in names if n in wanted] + [n for n in wanted if n not in names]
    result: dict[str, Any] = {
        "spec": spec,
        "weights_dtype": str(dtype).removeprefix("torch."),
        "autocast": "bf16" if use_autocast else None,
        "unit": unit,
        "items_per_step": items,
        "variants": {},
        "errors": {},
    }
    variants: dict[str, Variant] = {}
    for n in names:
        try:
            variants[n] = make_variant(n, ref, spec, batch, autocast, args.compile_mode)
        except Exception as exc:  # keep the others
            result["errors"][n] = f"build: {exc!r}"
            traceback.print_exc()
    del ref
    free(device)
    if any(n.endswith(COMPILED) for n in variants):
        torch._dynamo.reset()  # each model's compiled graphs and counters start from nothing
        torch._dynamo.utils.counters.clear()

    try:
        result["check"] = check_same_init(variants, device)
    except Exception as exc:
        result["check"] = {"error": repr(exc)}
        traceback.print_exc()
    print(
        f"[{name}] step-0 check: " + ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in result["check"].items()),
        flush=True,
    )

    # interleaved rounds: warm-up rounds, then timed rounds; the order rotates every round
    order = list(variants)
    for rnd in range(args.warmup + args.repeats):
        shift = rnd % max(len(order), 1)
        for n in order[shift:] + order[:shift]:
            v = variants.get(n)
            if v is None:
                continue
            try:
                timed_step(v, device, record=rnd >= args.warmup)
            except Exception as exc:
                result["errors"][n] = f"step: {exc!r}"
                traceback.print_exc()
                del variants[n], v
                free(device)

    for n, v in list(variants.items()):
        try:
            r = resident_bytes(v)
            try:
                saved: int | None = saved_activation_bytes(v)
            except Exception as exc:  # e.g. saved-tensor hooks a compiled mode refuses: keep the timing
                saved = None
                result["errors"][f"{n} saved bytes"] = repr(exc)
            res: dict[str, Any] = {
                "step_s_median": statistics.median(v.times),
                "step_s_min": min(v.times),
                "step_s_all": v.times,
                "cpu_s_median": statistics.median(v.cpu_times),
                "host_s_median": statistics.median(v.host_times),
                "throughput": items / statistics.median(v.times),
                "trainable_params": sum(p.numel() for p in trainable(v.model)),
                "saved_activation_bytes": saved,
                "param_bytes": r["params"],
                "grad_bytes": r["grads"],
                "optimizer_state_bytes": r["optimizer_state"],
            }
            if cuda:
                res["peak_bytes"] = max(v.peaks)
                res["peak_increment_bytes"] = max(v.increments)
                res["peak_kind"] = "cuda max_memory_allocated: own resident + step increment"
            else:
                res["peak_bytes"] = None if saved is None else saved + r["params"] + r["grads"] + r["optimizer_state"]
                res["peak_kind"] = "estimate: saved activations + params + grads + optimizer state"
            if not n.endswith(COMPILED):  # counting runs eagerly: a compiled variant's count is its eager one's
                res["flops_per_step"] = step_flops(v)
            if args.profile:
                res["profile"] = profile_variant(v, device)
            result["variants"][n] = res
        except Exception as exc:
            result["errors"][n] = f"report: {exc!r}"
            traceback.print_exc()
        del variants[n], v
        free(device)
    del variants
    free(device)

    if any(n.endswith(COMPILED) for n in names):
        counters = torch._dynamo.utils.counters
        result["dynamo"] = {
            "unique_graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
            "recompiles": sum(v for k, v in counters["recompiles"].items()) if "recompiles" in counters else None,
        }
    add_ratios(result)
    print_table(name, result)
    return result


def baseline_of(name: str, variants: dict[str, Any]) -> str | None:
    """The frozen-base limit a variant is measured against: ``frozen_compiled`` for a compiled
    variant when it ran (compiled against compiled), else ``frozen``."""
    if name.endswith(COMPILED) and "frozen" + COMPILED in variants:
        return "frozen" + COMPILED
    return "frozen" if "frozen" in variants else None


def add_ratios(result: dict[str, Any]) -> None:
    vs = result["variants"]
    for n, v in vs.items():
        base_name = baseline_of(n, vs)
        if base_name is None:
            continue
        base = vs[base_name]
        v["baseline"] = base_name
        v["throughput_vs_frozen"] = base["step_s_median"] / v["step_s_median"]
        # noise-robust companions: per-round paired ratios, and process CPU time (CPU runs)
        pairs = [f / t for f, t in zip(base["step_s_all"], v["step_s_all"])]
        v["throughput_vs_frozen_paired"] = statistics.median(pairs)
        v["throughput_vs_frozen_cpu_time"] = base["cpu_s_median"] / v["cpu_s_median"]
        if v["peak_bytes"] is not None and base["peak_bytes"] is not None:
            v["peak_vs_frozen"] = v["peak_bytes"] / base["peak_bytes"]
        if v["saved_activation_bytes"] is not None and base["saved_activation_bytes"] is not None:
            v["saved_vs_frozen"] = v["saved_activation_bytes"] / max(base["saved_activation_bytes"], 1)
        if v.get("flops_per_step") and base.get("flops_per_step"):
            v["flop_ceiling_vs_frozen"] = base["flops_per_step"] / v["flops_per_step"]
            extra_flops, extra_s = v["flops_per_step"] - base["flops_per_step"], v["step_s_median"] - base["step_s_median"]
            if extra_flops > 0 and extra_s > 0:
                v["extra_work_rate_vs_frozen"] = (extra_flops / extra_s) / (base["flops_per_step"] / base["step_s_median"])
        if n.endswith(COMPILED) and "frozen" in vs:
            v["throughput_vs_frozen_eager"] = vs["frozen"]["step_s_median"] / v["step_s_median"]
    summary: dict[str, Any] = {}
    for suffix in ("", COMPILED):
        ours = vs.get("ours" + suffix)
        if not ours:
            continue
        peft_names = [n + suffix for n in ("peft", "peft_bf16") if n + suffix in vs]
        for n in peft_names:
            summary[f"ours{suffix}_speedup_vs_{n}"] = vs[n]["step_s_median"] / ours["step_s_median"]
            if ours["peak_bytes"] is not None and vs[n]["peak_bytes"] is not None:
                summary[f"ours{suffix}_peak_vs_{n}"] = ours["peak_bytes"] / vs[n]["peak_bytes"]
        if peft_names and not suffix:
            best = min(peft_names, key=lambda n: vs[n]["step_s_median"])
            summary["best_peft"] = best
            summary["ours_speedup_vs_best_peft"] = vs[best]["step_s_median"] / ours["step_s_median"]
            summary["ours_peak_vs_best_peft"] = ours["peak_bytes"] / vs[best]["peak_bytes"]
        if "throughput_vs_frozen" in ours:
            goal = 0.95 if suffix else 0.90
            summary[f"target{suffix}_throughput_ge_{goal:.2f}"] = ours["throughput_vs_frozen"] >= goal
            if "peak_vs_frozen" in ours:
                summary[f"target{suffix}_peak_le_1.10"] = ours["peak_vs_frozen"] <= 1.10
    add_dora_ratios(vs, summary)
    result["summary"] = summary


def add_dora_ratios(vs: dict[str, Any], summary: dict[str, Any]) -> None:
    """DoRA against our LoRA (goal: step time within 1.15x) and against peft's DoRA."""
    dora = vs.get("dora")
    if dora is None:
        return
    for n in ("ours", "peft_dora", "peft"):
        if n in vs:
            summary[f"dora_step_vs_{n}"] = dora["step_s_median"] / vs[n]["step_s_median"]
            summary[f"dora_step_vs_{n}_paired"] = statistics.median(d / o for d, o in zip(dora["step_s_all"], vs[n]["step_s_all"]))
            summary[f"dora_peak_vs_{n}"] = dora["peak_bytes"] / vs[n]["peak_bytes"]
    if "ours" in vs:
        summary["target_dora_step_le_1.15x_lora"] = summary["dora_step_vs_ours"] <= 1.15
    if "peft_dora" in vs:
        summary["peft_dora_step_vs_ours"] = vs["peft_dora"]["step_s_median"] / vs["ours"]["step_s_median"] if "ours" in vs else None


def print_table(name: str, result: dict[str, Any]) -> None:
    unit, spec = result["unit"], result["spec"]
    print(f"\n== {name}: {spec}  weights {result['weights_dtype']}, autocast {result['autocast']}")
    header = (
        f"{'variant':<11} {'step ms':>9} {'host ms':>8} {unit:>10} {'x limit':>8} {'paired':>7} {'cpu-t':>6} {'ceiling':>7} "
        f"{'saved MiB':>10} {'x limit':>8} {'peak MiB':>10} {'x limit':>8} {'trainable':>13}"
    )
    print(header)
    print("-" * len(header))
    for n, v in result["variants"].items():
        print(
            f"{n:<11} {1000 * v['step_s_median']:>9.2f} {1000 * v['host_s_median']:>8.2f} {v['throughput']:>10,.0f} "
            f"{v.get('throughput_vs_frozen', float('nan')):>8.3f} "
            f"{v.get('throughput_vs_frozen_paired', float('nan')):>7.3f} {v.get('throughput_vs_frozen_cpu_time', float('nan')):>6.3f} "
            f"{v.get('flop_ceiling_vs_frozen', float('nan')):>7.3f} "
            f"{fmt_bytes(v['saved_activation_bytes']):>10} {v.get('saved_vs_frozen', float('nan')):>8.3f} "
            f"{fmt_bytes(v['peak_bytes']):>10} {v.get('peak_vs_frozen', float('nan')):>8.3f} "
            f"{v['trainable_params']:>13,}"
        )
    for n, e in result["errors"].items():
        print(f"{n:<11} ERROR {e}")
    if result.get("summary"):
        print("summary: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in result["summary"].items()))
    print(flush=True)


def environment(device: torch.device) -> dict[str, Any]:
    import importlib.metadata as md

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    for pkg in ("timm", "transformers", "peft"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    env["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    env.update(machine.describe())
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default="vit_s,vit_b,llama", help="comma-separated: vit_s, vit_b, llama")
    p.add_argument("--variants", default=None, help="comma-separated subset/extra (full,frozen,ours,peft,peft_bf16,plain)")
    p.add_argument("--batch", type=int, default=None, help="override the batch size of every model")
    p.add_argument("--seq", type=int, default=None, help="Llama sequence length (default 2048, quick 128)")
    p.add_argument("--img", type=int, default=None, help="ViT image size (default 224, quick 64)")
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="small shapes for CPU (one step well under a second)")
    p.add_argument("--cpu-dtype", choices=["fp32", "bf16"], default="fp32", help="CPU weight dtype (CUDA: ViT fp32, Llama bf16)")
    p.add_argument("--cpu-autocast", action="store_true", help="bf16 autocast on CPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--compile-mode",
        default=None,
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        help="torch.compile mode of the *_compiled variants (reduce-overhead: CUDA graphs, for host-bound models on a GPU)",
    )
    p.add_argument(
        "--compile-recompute-inputs",
        action="store_true",
        help="compile with torch._functorch.config.ban_recompute_materialized_backward=False (every *_compiled variant, "
        "frozen included): the partitioner recomputes LoRA inputs instead of saving them (docs/compile.md)",
    )
    p.add_argument("--profile", action="store_true", help="add each variant's top operators (torch.profiler, 2 steps) to the JSON")
    p.add_argument("--out", default="lora_step_results.json")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile_recompute_inputs:  # read when each block compiles (its first call)
        import torch._functorch.config as functorch_config

        functorch_config.ban_recompute_materialized_backward = False

    results: dict[str, Any] = {
        "benchmark": "lora_step",
        "args": vars(args),
        "environment": environment(device),
        "lora": {"rank": RANK, "alpha": ALPHA, "vit_targets": VIT_TARGETS, "llama_targets": LLAMA_TARGETS},
        "models": {},
    }
    out = Path(args.out)
    t_start = time.perf_counter()
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        t0 = time.perf_counter()
        try:
            results["models"][name] = run_model(name, args, device)
        except Exception as exc:
            traceback.print_exc()
            results["models"][name] = {"error": repr(exc)}
        results["models"][name]["wall_s"] = time.perf_counter() - t0
        free(device)
        out.write_text(json.dumps(results, indent=2))
    results["wall_s"] = time.perf_counter() - t_start
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out} ({results['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
