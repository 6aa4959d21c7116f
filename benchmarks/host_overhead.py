#!/usr/bin/env python
"""Host cost of an adapted linear layer: where the arithmetic is negligible, what is left is
Python, autograd and dispatcher work per layer -- what bounds small models on a GPU.

A stack of ``--layers`` (48) ``Linear(64, 64)`` layers on an ``[8, 64]`` input (which requires
grad, so the whole backward runs), forward + ``sum().backward()``. Variants, each its own model
copy from the same weights, timed in interleaved rounds (median of the rounds' mean step):

* ``frozen``   no adapter: the frozen-base cost every adapter adds to;
* ``ours``     ``apply_adapter(model, LoRA(rank=8, alpha=16))``;
* ``ours_nogroup``  (group and Llama cases, where ``ours`` is ``group_shared_inputs=True``) the same
                   with ``group_shared_inputs=False`` (the default);
* ``peft``     ``peft.get_peft_model`` with the same rank, alpha and targets;
* ``plain``    the textbook ``base(x) + B(A(x)) * s`` with ``nn.Linear`` modules for ``A`` and ``B``;
* ``minimal``  the smallest LoRA ``autograd.Function``: 3 ATen ops forward (addmm, mm, addmm_),
               7 backward (mm, mul_, mm, addmm_, mm, mm, mul_) and nothing else -- the eager
               floor of a one-node-per-layer design;
* ``compiled_frozen`` / ``compiled_ours``  the same under ``torch.compile`` (inductor);
* ``compiled_ours_unguarded``  ``compiled_ours`` with Dynamo's guards on every module dropped
               (``torch.compiler.skip_guard_on_all_nn_modules_unsafe``): what the guard check of
               the compiled step costs. Unsafe in use (a ``merge()`` or a ``training`` change goes
               unseen), so measured, not offered.

Reported per variant, by wall time and by process CPU time (steadier on a loaded machine):
median step time, and for adapters the extra host cost per adapted layer
``(t - t_frozen) / n_adapted`` in microseconds and as a multiple of a frozen layer's own cost
``t_frozen / n_layers`` (compiled variants against the compiled frozen base).

The ``group`` case: ``--blocks`` blocks of three projections (q, k, v) that read the same input,
``x <- x + q(x) + k(x) + v(x)`` -- where a shared-input group runs as one node.

    python benchmarks/host_overhead.py              # ~3 min on 2 threads
    python benchmarks/host_overhead.py --quick      # smoke run (a few seconds)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

import machine  # noqa: E402  (benchmarks/machine.py: the CPU this ran on)
import torch  # noqa: E402
from torch import nn  # noqa: E402

RANK, ALPHA, WIDTH, BATCH = 8, 16.0, 64, 8


class MinimalLoRA(torch.autograd.Function):
    """``y = x W^T + b + s (x A^T) B^T``: the fewest ops one fused LoRA node can run."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:  # type: ignore[override]
        u = torch.mm(x, a.t())
        out = torch.addmm(bias, x, w.t())
        out.addmm_(u, b.t(), alpha=s)
        ctx.save_for_backward(x, w, a, b, u)
        ctx.s = s
        return out

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, w, a, b, u = ctx.saved_tensors
        g = torch.mm(dy, b).mul_(ctx.s)
        dx = torch.mm(dy, w).addmm_(g, a)
        return dx, None, None, torch.mm(g.t(), x), torch.mm(dy.t(), u).mul_(ctx.s), None


class MinimalLoRALayer(nn.Module):
    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Parameter(torch.randn(RANK, base.in_features) * 0.1)
        self.lora_B = nn.Parameter(torch.randn(base.out_features, RANK) * 0.1)
        self.s = ALPHA / RANK

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return MinimalLoRA.apply(x, self.base_layer.weight, self.base_layer.bias, self.lora_A, self.lora_B, self.s)


class PlainLoRALayer(nn.Module):
    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, RANK, bias=False)
        self.lora_B = nn.Linear(RANK, base.out_features, bias=False)
        self.s = ALPHA / RANK

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.s


class Stack(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class QKVBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(WIDTH, WIDTH) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.q_proj(x) + self.k_proj(x) + self.v_proj(x)


class QKVStack(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(QKVBlock() for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class LlamaLikeBlock(nn.Module):
    """A small pre-norm decoder block (RMSNorm, q/k/v/o attention, SwiGLU MLP) with the
    Llama module names, so q/k/v and gate/up form shared-input groups."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.input_layernorm, self.post_attention_layernorm = nn.RMSNorm(d), nn.RMSNorm(d)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate_proj, self.up_proj = nn.Linear(d, 4 * d, bias=False), nn.Linear(d, 4 * d, bias=False)
        self.down_proj = nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.input_layernorm(x)
        q, k, v = (p(h).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(att.transpose(1, 2).reshape(b, t, d))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(torch.nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


class LlamaLikeStack(nn.Module):
    def __init__(self, n: int, d: int = 128, heads: int = 4) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(LlamaLikeBlock(d, heads) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def frozen(model: nn.Module) -> nn.Module:
    return model.requires_grad_(False)


def replace_linears(model: nn.Module, layer: Callable[[nn.Linear], nn.Module]) -> nn.Module:
    model.requires_grad_(False)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, layer(child))
    return model


def ours(model: nn.Module, **kwargs: Any) -> nn.Module:
    from lightning_peft import apply_adapter
    from lightning_peft.adapters.lora import LoRA

    apply_adapter(model, LoRA(rank=RANK, alpha=ALPHA, target_modules=r".*(layers\.\d+|[qkvo]_proj|gate_proj|up_proj|down_proj)", **kwargs))
    for module in model.modules():  # a random B: the update is live, as in training
        if hasattr(module, "lora_B"):
            nn.init.normal_(module.lora_B.weight, std=0.1)
    return model


def peft_model(model: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=r".*(layers\.\d+|_proj)"))


def unguarded_compile(model: nn.Module, **compile_kwargs: Any) -> nn.Module:
    """``torch.compile`` without module guards, on its own copy of the top-level ``forward`` code:
    Dynamo caches compiled graphs per code object, and without module guards the frozen model's
    calls would otherwise be served this model's graph."""
    forward = type(model).forward
    own = types.FunctionType(forward.__code__.replace(co_name=f"{forward.__name__}_unguarded"), forward.__globals__)
    model.__class__ = type(f"{type(model).__name__}Unguarded", (type(model),), {"forward": own})
    options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
    return torch.compile(model, options=options, **compile_kwargs)


def step_fn(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        model(x).sum().backward()

    return step


def measure(variants: dict[str, Callable[[], None]], rounds: int, steps: int) -> dict[str, dict[str, float]]:
    """Median over interleaved rounds of the mean step time, as wall time and as this process's
    CPU time (all its threads): on a shared, loaded machine the CPU time is the steadier figure,
    since waiting for a core is not counted."""
    for fn in variants.values():  # warm-up (and compilation)
        for _ in range(max(3, steps // 4)):
            fn()
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(steps):
                fn()
            times[name]["wall"].append((time.perf_counter() - wall) / steps)
            times[name]["cpu"].append((time.process_time() - cpu) / steps)
    return {name: {clock: statistics.median(t[clock]) for clock in t} for name, t in times.items()}


def op_counts(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """ATen ops of one forward and one backward (profiler, CPU)."""
    from torch.profiler import ProfilerActivity, profile

    model(x).sum().backward()
    counts: dict[str, dict[str, int]] = {}
    for phase in ("forward", "backward"):
        out = model(x).sum() if phase == "backward" else None
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            if phase == "forward":
                model(x)
            else:
                out.backward()  # type: ignore[union-attr]
        counts[phase] = {}
        for event in prof.key_averages():
            if event.key.startswith("aten::"):
                counts[phase][event.key] = event.count
    return counts


def summarise(times: dict[str, dict[str, float]], n_layers: int, n_adapted: int, base: str) -> dict[str, Any]:
    """Per clock: a frozen layer's cost, and per variant the extra cost per adapted layer in us
    and as a multiple of the frozen layer's."""
    result: dict[str, Any] = {}
    for clock in ("cpu", "wall"):
        per_layer = times[base][clock] / n_layers
        entry: dict[str, Any] = {"frozen_layer_us": per_layer * 1e6}
        for name, t in times.items():
            row: dict[str, Any] = {"step_ms": t[clock] * 1e3}
            if name != base:
                extra = (t[clock] - times[base][clock]) / n_adapted
                row["extra_per_layer_us"] = extra * 1e6
                row["extra_over_frozen_layer"] = extra / per_layer
            entry[name] = row
        result[clock] = entry
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--blocks", type=int, default=16, help="q/k/v blocks of the group case")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=30, help="steps per variant per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke run: few layers, rounds and steps, no compile")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "host_overhead.json")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.blocks, args.rounds, args.steps, args.no_compile = 6, 2, 3, 4, True
        if args.out == ROOT / "benchmarks" / "results" / "host_overhead.json":
            args.out = args.out.with_name("host_overhead_quick.json")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    load_before = os.getloadavg()
    x = torch.randn(BATCH, WIDTH, requires_grad=True)

    # ---- a stack of independent layers
    base = Stack(args.layers)
    models: dict[str, nn.Module] = {
        "frozen": frozen(copy.deepcopy(base)),
        "ours": ours(copy.deepcopy(base)),
        "plain": replace_linears(copy.deepcopy(base), PlainLoRALayer),
        "minimal": replace_linears(copy.deepcopy(base), MinimalLoRALayer),
    }
    if not args.no_peft:
        models["peft"] = peft_model(copy.deepcopy(base))
    variants = {name: step_fn(m, x) for name, m in models.items()}
    if not args.no_compile:
        variants["compiled_frozen"] = step_fn(torch.compile(models["frozen"]), x)
        variants["compiled_ours"] = step_fn(torch.compile(models["ours"]), x)
        variants["compiled_ours_unguarded"] = step_fn(unguarded_compile(ours(copy.deepcopy(base))), x)
    times = measure(variants, args.rounds, args.steps)
    eager = {k: v for k, v in times.items() if not k.startswith("compiled_")}
    stack = {"eager": summarise(eager, args.layers, args.layers, "frozen")}
    if not args.no_compile:
        compiled = {k: v for k, v in times.items() if k.startswith("compiled_")}
        stack["compiled"] = summarise(compiled, args.layers, args.layers, "compiled_frozen")
    stack["aten_ops_per_step"] = {name: op_counts(models[name], x) for name in ("frozen", "ours", "minimal")}

    # ---- shared-input groups: q/k/v read the same x
    qkv = QKVStack(args.blocks)
    group_models: dict[str, nn.Module] = {
        "frozen": frozen(copy.deepcopy(qkv)),
        "ours": ours(copy.deepcopy(qkv), group_shared_inputs=True),
        "minimal": replace_linears(copy.deepcopy(qkv), MinimalLoRALayer),
    }
    try:
        group_models["ours_nogroup"] = ours(copy.deepcopy(qkv), group_shared_inputs=False)
    except TypeError:  # before shared-input groups existed
        pass
    group_variants = {name: step_fn(m, x) for name, m in group_models.items()}
    if not args.no_compile:
        group_variants["compiled_frozen"] = step_fn(torch.compile(group_models["frozen"]), x)
        group_variants["compiled_ours"] = step_fn(torch.compile(group_models["ours"]), x)
    gtimes = measure(group_variants, args.rounds, args.steps)
    n_group_layers = 3 * args.blocks
    group_eager = {k: v for k, v in gtimes.items() if not k.startswith("compiled_")}
    group = {"eager": summarise(group_eager, n_group_layers, n_group_layers, "frozen")}
    if not args.no_compile:
        group["compiled"] = summarise(
            {k: v for k, v in gtimes.items() if k.startswith("compiled_")}, n_group_layers, n_group_layers, "compiled_frozen"
        )

    # ---- a real block: Llama-like decoder layers (q/k/v and gate/up grouped), small size
    llama = LlamaLikeStack(4)
    tokens = torch.randn(2, 32, 128, requires_grad=True)
    llama_models = {
        "frozen": frozen(copy.deepcopy(llama)),
        "ours": ours(copy.deepcopy(llama), group_shared_inputs=True),
        "ours_nogroup": ours(copy.deepcopy(llama), group_shared_inputs=False),
    }
    ltimes = measure({name: step_fn(m, tokens) for name, m in llama_models.items()}, args.rounds, max(2, args.steps // 3))
    llama_block = {
        "shape": {"blocks": 4, "d_model": 128, "tokens": [2, 32], "adapted_per_block": 6},
        "eager": {
            clock: {name: {"step_ms": t[clock] * 1e3, "over_frozen": t[clock] / ltimes["frozen"][clock]} for name, t in ltimes.items()}
            for clock in ("cpu", "wall")
        },
    }

    result = {
        "command": " ".join(["python", "benchmarks/host_overhead.py", *sys.argv[1:]]),
        "shape": {"layers": args.layers, "width": WIDTH, "batch": BATCH, "rank": RANK, "group_blocks": args.blocks},
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "threads": args.threads,
        "load_average_before_after": [list(load_before), list(os.getloadavg())],
        "torch": torch.__version__,
        "machine": platform.platform(),
        **machine.describe(),
        "stack": stack,
        "group": group,
        "llama_block": llama_block,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for case, res in (("stack", stack), ("group", group)):
        for mode in ("eager", "compiled"):
            for clock in ("cpu", "wall"):
                if mode in res:
                    summary = res[mode][clock]
                    print(f"{case} {mode} ({clock} time): frozen layer {summary['frozen_layer_us']:.1f} us")
                    for name, entry in summary.items():
                        if isinstance(entry, dict) and "extra_per_layer_us" in entry:
                            print(f"  {name:16s} +{entry['extra_per_layer_us']:7.1f} us/layer = {entry['extra_over_frozen_layer']:.2f}x")
    for clock in ("cpu", "wall"):
        for name, entry in llama_block["eager"][clock].items():
            print(f"llama block ({clock}) {name:14s} {entry['step_ms']:.2f} ms = {entry['over_frozen']:.3f}x frozen")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
