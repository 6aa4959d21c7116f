"""HRM (state-space residual adapter) against LoRA: state tracking, cost per context length, BT init.

1. **Base.** A small Llama-config decoder (random init) is pretrained here on one synthetic
   language: next-token prediction on strings of a fixed random probabilistic automaton
   (``StateTrackingDataModule(task="pdfa", target="next_token")``). It is saved once, under
   ``--cache-dir`` (keyed by its settings), and reused.
2. **Quality at equal trainable parameters.** The base, frozen, gets a sequence head
   (``LlamaForSequenceClassification``: the last real token, ``EOS``) and one adapter, then is
   fine-tuned on parity and DFA-recognition tasks of increasing length (balanced accept/reject,
   chance = 0.5). Arms:

   * ``head``: only the head trains (what the frozen base already offers);
   * ``lora``: LoRA rank ``r`` on q/k/v/o and gate/up/down of every layer;
   * ``hrm_mlp``: HRM at every MLP output, balanced-truncation init, ``(input_dim, state_dim)``
     picked by ``hrm_dims_for_lora_budget`` to match LoRA's trainable count;
   * ``hrm_attention``: the same at every attention output;
   * ``hrm_mlp_random``: ``hrm_mlp`` with ``init="random"`` (part 3, "BT earns its place").

   Each arm trains the same head (its parameters are counted apart). Seeds change the head and
   adapter initialisation and the batch order; the base and the data are the same for all.
   Reported: test accuracy and the training loss after N steps (mean over the last 10 % of
   steps), per seed, mean and sample std.
3. **Cost against context length.** One training step (forward, loss, backward, AdamW,
   ``zero_grad``) of ``hrm_mlp`` and ``lora`` at sequence lengths 128..4096, batch 1, repeats
   interleaved (the order rotates each round); the median step time and the HRM / LoRA ratio
   (also the median of per-round ratios); the peak of saved activations over the step
   (``SavedTensorMeter``, deterministic bytes). The HRM residual alone (one layer's
   ``P_in -> FFT convolution -> P_out``, forward + backward) is timed too, to show its
   ``L log L`` growth apart from attention's ``L^2``.

Runs on CPU with one thread (``torch.set_num_threads(1)``; the JSON says so, and that the
machine was shared with other jobs, so absolute times are noisy: read the ratios).

    python benchmarks/hrm.py            # full: ~25 min on one shared core
    python benchmarks/hrm.py --quick    # ~2 min: one short task, one seed, lengths 128..512
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lightning_peft.datamodules.state_tracking import StateTrackingDataModule, builtin_dfa  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = dict(
    vocab_size=6,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=4096,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)
PRETRAIN = dict(task="pdfa", min_length=8, max_length=64, train_size=8192, steps=500, batch_size=32, lr=3e-3, seed=0)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (task, min_length, max_length): parity and three automata, lengths increasing
TASKS = [("parity", 2, 8), ("mod3", 4, 16), ("parity", 4, 16)]
ARMS = ["head", "lora", "hrm_mlp", "hrm_attention", "hrm_mlp_random"]


# --------------------------------------------------------------------------------------------
# Base: pretrained once, cached
# --------------------------------------------------------------------------------------------
def _llama(kind: str, **extra: Any) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    config = LlamaConfig(**{**MODEL, **extra}, attn_implementation="sdpa")
    return (LlamaForCausalLM if kind == "lm" else LlamaForSequenceClassification)(config)


def oracle_loss(dm: StateTrackingDataModule, tensors: dict[str, torch.Tensor]) -> float:
    """Mean next-token loss of the true generating process (emissions given the known DFA state,
    plus the uniform-length stop hazard): the floor a perfect LM reaches on these strings."""
    dfa, lo, hi = dm.dfa, dm.min_length, dm.max_length
    total, count = 0.0, 0
    for ids, mask in zip(tensors["input_ids"].tolist(), tensors["attention_mask"].tolist()):
        n, state = sum(mask) - 2, dfa.start
        for t in range(n + 1):  # predict a_1..a_n, then EOS
            stop = 0.0 if t < lo else 1.0 / (hi - t + 1)
            if t == n:
                total -= math.log(stop)
                break
            a = ids[t + 1] - 3
            total -= math.log((1 - stop) * dfa.emissions[state, a])
            state = int(dfa.transitions[state, a])
        count += n + 1
    return total / count


def pretrained_base(cache_dir: Path, steps: int, log: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    settings = {**PRETRAIN, "steps": steps, "model": MODEL, "torch": torch.__version__}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir / f"hrm_base_{key}.pt"
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file():
        log(f"base: cached {path}")
        return torch.load(path, map_location="cpu", weights_only=True), json.loads(meta_path.read_text())
    p = PRETRAIN
    dm = StateTrackingDataModule(
        task=p["task"], target="next_token", min_length=p["min_length"], max_length=p["max_length"], train_size=p["train_size"]
    )
    train, val = dm.split_tensors("train"), dm.split_tensors("val")
    torch.manual_seed(p["seed"])
    lm = _llama("lm")
    opt = torch.optim.AdamW(lm.parameters(), lr=p["lr"])
    gen = torch.Generator().manual_seed(p["seed"])
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, p["train_size"], (p["batch_size"],), generator=gen)
        loss = lm(**{k: v[idx] for k, v in train.items()}).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0:
            log(f"base: step {step} loss {loss.item():.3f}")
    lm.eval()
    with torch.no_grad():
        val_loss = lm(**val).loss.item()
    meta = {
        "language": f"StateTrackingDataModule(task={p['task']!r}, target='next_token'), lengths {p['min_length']}..{p['max_length']}",
        "settings": settings,
        "seconds": round(time.perf_counter() - start, 1),
        "val_loss": round(val_loss, 4),
        "oracle_val_loss": round(oracle_loss(dm, val), 4),
        "uniform_loss": round(math.log(dm.vocab_size), 4),
        "parameters": sum(q.numel() for q in lm.parameters()),
    }
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save(lm.state_dict(), path)
    meta_path.write_text(json.dumps(meta, indent=1))
    log(f"base: val loss {val_loss:.3f} (oracle {meta['oracle_val_loss']}), saved {path}")
    return lm.state_dict(), meta


# --------------------------------------------------------------------------------------------
# Arms: one adapter each on the same frozen base, the same trainable head
# --------------------------------------------------------------------------------------------
def lora_spec(rank: int) -> Any:
    from lightning_peft import LoRA

    return LoRA(rank=rank, alpha=2 * rank, target_modules=LORA_TARGETS)


def hrm_spec(arm: str, dims: tuple[int, int], fit: str) -> Any:
    from lightning_peft import HRM

    input_dim, state_dim = dims
    site = "attention" if arm == "hrm_attention" else "mlp"
    init = "random" if arm == "hrm_mlp_random" else "balanced_truncation"
    return HRM(input_dim=input_dim, state_dim=state_dim, site=site, init=init, fit=fit)


def matched_hrm_dims(base: dict[str, torch.Tensor], rank: int) -> dict[str, tuple[int, int]]:
    """``(input_dim, state_dim)`` per HRM site with at most LoRA rank ``rank``'s trainable count."""
    from lightning_peft import hrm_dims_for_lora_budget

    model = _llama("clf", num_labels=2)
    return {site: hrm_dims_for_lora_budget(model, lora_spec(rank), site=site) for site in ("mlp", "attention")}


def build(arm: str, base: dict[str, torch.Tensor], seed: int, rank: int, dims: dict[str, tuple[int, int]], fit: str) -> tuple[Any, Any]:
    """The frozen base with a fresh head (seeded) and the arm's adapter; returns (model, report)."""
    from lightning_peft import apply_adapter

    torch.manual_seed(seed)
    layers = 1 + max(int(k.split(".")[2]) for k in base if k.startswith("model.layers."))
    model = _llama("clf", num_labels=2, num_hidden_layers=layers)
    result = model.load_state_dict(base, strict=False)
    assert result.missing_keys == ["score.weight"] and result.unexpected_keys == ["lm_head.weight"], result
    if arm == "head":
        model.requires_grad_(False)
        model.score.requires_grad_(True)
        return model, None
    spec = lora_spec(rank) if arm == "lora" else hrm_spec(arm, dims["attention" if arm == "hrm_attention" else "mlp"], fit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not calibrated yet": calibrate() follows
        report = apply_adapter(model, spec, trainable_modules=["score"], check_gradients=False)
    return model, report


def counts(model: torch.nn.Module, report: Any) -> dict[str, int]:
    head = model.score.weight.numel()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report is None or report.trainable == trainable
    return {"adapter_trainable": trainable - head, "head_trainable": head}


# --------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------
def batches_of(tensors: dict[str, torch.Tensor], size: int, keys: tuple[str, ...] = ("input_ids", "attention_mask")) -> list[dict]:
    n = len(tensors["input_ids"])
    return [{k: tensors[k][i : i + size] for k in keys} for i in range(0, n, size)]


def calibrated_state(model: torch.nn.Module, train: dict[str, torch.Tensor], batch_size: int) -> tuple[dict, dict]:
    """Run balanced truncation on the first calibration batches of the training set; return the
    HRM tensors it wrote (the same for every seed: the data and the base are fixed) and a summary."""
    from lightning_peft import calibrate_hrm
    from lightning_peft.hrm_calibration import hrm_layers

    start = time.perf_counter()
    report = calibrate_hrm(model, batches_of(train, batch_size))
    state = {f"{name}.{k}": v.detach().clone() for name, layer in hrm_layers(model).items() for k, v in layer.adapter_state_dict().items()}
    return state, {"seconds": round(time.perf_counter() - start, 2), "report": str(report)}


@torch.no_grad()
def evaluate(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> tuple[float, float]:
    model.eval()
    losses, correct = [], 0
    for batch in batches_of(tensors, 256, ("input_ids", "attention_mask", "labels")):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses.append(F.cross_entropy(logits, batch["labels"], reduction="sum").item())
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
    model.train()
    n = len(tensors["labels"])
    return sum(losses) / n, correct / n


def train(model: torch.nn.Module, data: dict[str, dict], steps: int, lr: float, batch_size: int, seed: int) -> dict[str, Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1000 + seed)
    n, curve, losses = len(data["train"]["labels"]), [], []
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        logits = model(input_ids=data["train"]["input_ids"][idx], attention_mask=data["train"]["attention_mask"][idx]).logits
        loss = F.cross_entropy(logits, data["train"]["labels"][idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 20) == 0:
            curve.append([step + 1, round(statistics.fmean(losses[-max(1, steps // 20) :]), 4)])
    seconds = time.perf_counter() - start
    val_loss, val_acc = evaluate(model, data["val"])
    test_loss, test_acc = evaluate(model, data["test"])
    tail = losses[-max(1, steps // 10) :]
    finite = all(math.isfinite(v) for v in losses)
    return {
        "train_loss_final": round(statistics.fmean(tail), 4),
        "val_loss": round(val_loss, 4),
        "test_loss": round(test_loss, 4),
        "test_acc": round(test_acc, 4),
        "finite": finite,
        "curve": curve,
        "seconds": round(seconds, 1),
    }


# --------------------------------------------------------------------------------------------
# Part 2: cost against context length
# --------------------------------------------------------------------------------------------
def _step_fn(model: torch.nn.Module, ids: torch.Tensor, label: torch.Tensor) -> Any:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    mask = torch.ones_like(ids)

    def step() -> None:
        loss = F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, label)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _peak_saved(model: torch.nn.Module, ids: torch.Tensor, label: torch.Tensor) -> int:
    from lightning_peft.memory.meters import SavedTensorMeter

    with SavedTensorMeter(model) as meter:
        F.cross_entropy(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, label).backward()
    model.zero_grad(set_to_none=True)
    return int(meter.peak_bytes)


def _residual_time(layer: Any, length: int, repeats: int) -> float:
    """Median seconds of one HRM residual (P_in, FFT convolution, P_out) forward + backward."""
    x = torch.randn(1, length, layer.d_in, requires_grad=True)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        layer.residual(x, None).sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def cost(base: dict[str, torch.Tensor], lengths: list[int], repeats: int, rank: int, dims: dict, log: Any) -> dict[str, Any]:
    from lightning_peft.hrm_calibration import hrm_layers

    variants = ("frozen", "lora", "hrm_mlp")
    rows = []
    for length in lengths:
        gen = torch.Generator().manual_seed(length)
        ids = torch.cat([torch.tensor([1]), torch.randint(3, 5, (length - 2,), generator=gen), torch.tensor([2])])[None]
        label = torch.tensor([1])
        arms = {"frozen": "head", "lora": "lora", "hrm_mlp": "hrm_mlp_random"}
        models = {v: build(arms[v], base, 0, rank, dims, "fir")[0] for v in variants}
        # the frozen-base limit: no adapter, but the token embeddings train, so the whole backward runs
        models["frozen"].model.embed_tokens.weight.requires_grad_(True)
        steps = {v: _step_fn(m, ids, label) for v, m in models.items()}
        times: dict[str, list[float]] = {v: [] for v in variants}
        for v in variants:  # warm-up
            steps[v]()
        for r in range(repeats):
            for v in variants[r % len(variants) :] + variants[: r % len(variants)]:  # the order rotates
                start = time.perf_counter()
                steps[v]()
                times[v].append(time.perf_counter() - start)
        paired = [h / lo for h, lo in zip(times["hrm_mlp"], times["lora"])]
        layer = next(iter(hrm_layers(models["hrm_mlp"]).values()))
        row = {
            "length": length,
            **{f"{v}_step_s_median": round(statistics.median(times[v]), 5) for v in variants},
            **{f"{v}_step_s": [round(t, 5) for t in times[v]] for v in variants},
            "ratio_hrm_vs_lora": round(statistics.median(times["hrm_mlp"]) / statistics.median(times["lora"]), 4),
            "ratio_hrm_vs_lora_paired": round(statistics.median(paired), 4),
            **{f"{v}_peak_saved_bytes": _peak_saved(m, ids, label) for v, m in models.items()},
            "hrm_residual_s_median": round(_residual_time(layer, length, repeats), 6),
        }
        row["peak_ratio_hrm_vs_lora"] = round(row["hrm_mlp_peak_saved_bytes"] / row["lora_peak_saved_bytes"], 4)
        for v in ("lora", "hrm_mlp"):
            row[f"{v}_vs_frozen_step"] = round(row[f"{v}_step_s_median"] / row["frozen_step_s_median"], 4)
        rows.append(row)
        lora_s, hrm_s = row["lora_step_s_median"], row["hrm_mlp_step_s_median"]
        log(f"cost: L={length} lora {lora_s:.4f}s hrm {hrm_s:.4f}s ratio {row['ratio_hrm_vs_lora']}")
    # growth of the residual alone: time / (L log2 L), normalised to the first length
    first = rows[0]
    norm = first["hrm_residual_s_median"] / (first["length"] * math.log2(first["length"]))
    for row in rows:
        n = row["length"]
        row["hrm_residual_vs_LlogL"] = round(row["hrm_residual_s_median"] / (n * math.log2(n)) / norm, 3)
    for prev, row in zip(rows, rows[1:]):
        row["hrm_residual_loglog_slope"] = round(
            math.log(row["hrm_residual_s_median"] / prev["hrm_residual_s_median"]) / math.log(row["length"] / prev["length"]), 3
        )
        row["lora_step_loglog_slope"] = round(
            math.log(row["lora_step_s_median"] / prev["lora_step_s_median"]) / math.log(row["length"] / prev["length"]), 3
        )
    note = "HRM timed with init='random': the same step as a calibrated one (calibration runs once, before training)"
    layers = 1 + max(int(k.split(".")[2]) for k in base if k.startswith("model.layers."))
    return {"batch_size": 1, "repeats": repeats, "layers": layers, "lora_rank": rank, "hrm_dims": dims["mlp"], "note": note, "rows": rows}


# --------------------------------------------------------------------------------------------
# Part 1 and 3: quality per task, arm and seed
# --------------------------------------------------------------------------------------------
def task_data(task: str, lo: int, hi: int, train_size: int) -> dict[str, dict[str, torch.Tensor]]:
    dm = StateTrackingDataModule(task=task, min_length=lo, max_length=hi, train_size=train_size, val_size=512, test_size=1024)
    return {split: dm.split_tensors(split) for split in ("train", "val", "test")}


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(values), 4), "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0}


def _prepared(arm: str, base: dict, seed: int, rank: int, dims: dict, fit: str, data: dict, calibrations: dict, batch_size: int) -> tuple:
    model, report = build(arm, base, seed, rank, dims, fit)
    if arm in ("hrm_mlp", "hrm_attention"):  # balanced truncation: once per task and site
        if arm not in calibrations:
            calibrations[arm] = calibrated_state(model, data["train"], batch_size)
        result = model.load_state_dict(calibrations[arm][0], strict=False)
        assert not result.unexpected_keys, result.unexpected_keys
    return model, report


def choose_lrs(base: dict[str, torch.Tensor], args: argparse.Namespace, rank: int, dims: dict, log: Any) -> dict[str, Any]:
    """Per arm, the learning rate of ``args.lr_grid`` with the lowest *validation* loss on the
    first task, seed 0 (the test sets are not looked at)."""
    task, lo, hi = args.tasks[0]
    data = task_data(task, lo, hi, args.train_size)
    calibrations: dict[str, tuple[dict, dict]] = {}
    table: dict[str, dict[str, float]] = {}
    for arm in args.arms:
        table[arm] = {}
        for lr in args.lr_grid:
            model, _ = _prepared(arm, base, 0, rank, dims, args.fit, data, calibrations, args.batch_size)
            run = train(model, data, args.steps, lr, args.batch_size, 0)
            table[arm][str(lr)] = run["val_loss"] if run["finite"] else float("inf")
            log(f"lr sweep {task}_{lo}-{hi} {arm} lr {lr}: val loss {run['val_loss']:.3f} val-selected")
    chosen = {arm: float(min(losses, key=losses.get)) for arm, losses in table.items()}
    return {"task": f"{task}_{lo}-{hi}", "seed": 0, "grid": args.lr_grid, "val_loss": table, "chosen": chosen}


def quality(base: dict[str, torch.Tensor], args: argparse.Namespace, rank: int, dims: dict, lrs: dict[str, float], log: Any) -> dict:
    out: dict[str, Any] = {}
    for task, lo, hi in args.tasks:
        key = f"{task}_{lo}-{hi}"
        data = task_data(task, lo, hi, args.train_size)
        calibrations: dict[str, tuple[dict, dict]] = {}
        arms: dict[str, Any] = {}
        for arm in args.arms:
            runs = []
            for seed in args.seeds:
                model, report = _prepared(arm, base, seed, rank, dims, args.fit, data, calibrations, args.batch_size)
                run = {"seed": seed, "lr": lrs[arm], **train(model, data, args.steps, lrs[arm], args.batch_size, seed)}
                runs.append(run)
                log(f"{key} {arm} seed {seed}: test acc {run['test_acc']:.3f} train loss {run['train_loss_final']:.3f} ({run['seconds']}s)")
            arms[arm] = {
                **counts(model, report),
                "lr": lrs[arm],
                "test_acc": _mean_std([r["test_acc"] for r in runs]),
                "train_loss_final": _mean_std([r["train_loss_final"] for r in runs]),
                "val_loss": _mean_std([r["val_loss"] for r in runs]),
                "runs": runs,
            }
        out[key] = {
            "task": task,
            "lengths": [lo, hi],
            "states": builtin_dfa(task).num_states,
            "arms": arms,
            "calibration": {arm: info for arm, (_, info) in calibrations.items()},
        }
    return out


def summarise(quality_rows: dict[str, Any], cost_rows: dict[str, Any] | None) -> dict[str, Any]:
    summary: dict[str, Any] = {"per_task": {}}
    for key, row in quality_rows.items():
        arms = row["arms"]
        acc = {arm: a["test_acc"]["mean"] for arm, a in arms.items()}
        entry: dict[str, Any] = {"test_acc_mean": acc}
        if "lora" in arms and "hrm_mlp" in arms:
            entry["hrm_mlp_minus_lora_acc"] = round(acc["hrm_mlp"] - acc["lora"], 4)
        if "hrm_attention" in arms and "hrm_mlp" in arms:
            entry["hrm_mlp_minus_hrm_attention_acc"] = round(acc["hrm_mlp"] - acc["hrm_attention"], 4)
        if "hrm_mlp_random" in arms and "hrm_mlp" in arms:
            bt, rnd = arms["hrm_mlp"]["train_loss_final"], arms["hrm_mlp_random"]["train_loss_final"]
            entry["bt_vs_random_train_loss"] = {"balanced_truncation": bt, "random": rnd, "difference": round(bt["mean"] - rnd["mean"], 4)}
        summary["per_task"][key] = entry
    if cost_rows:
        at = {r["length"]: r for r in cost_rows["rows"]}
        if 2048 in at:
            ratio = at[2048]["ratio_hrm_vs_lora"]
            summary["step_time_ratio_at_2048"] = ratio
            summary["goal_step_time_within_1.3x_lora_at_2048"] = bool(ratio <= 1.3)
    return summary


# --------------------------------------------------------------------------------------------
# Figure and entry point
# --------------------------------------------------------------------------------------------
def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    quality_rows = result.get("quality") or {}
    if quality_rows:
        ax = axes[0, 0]
        tasks, arms = list(quality_rows), list(next(iter(quality_rows.values()))["arms"])
        width = 0.8 / len(arms)
        for i, arm in enumerate(arms):
            means = [quality_rows[t]["arms"][arm]["test_acc"]["mean"] for t in tasks]
            stds = [quality_rows[t]["arms"][arm]["test_acc"]["std"] for t in tasks]
            ax.bar(np.arange(len(tasks)) + i * width, means, width, yerr=stds, capsize=3, label=arm)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks)
        ax.set_ylim(0.4, 1.02)
        ax.set_ylabel("test accuracy (mean +- std over seeds)")
        ax.set_title("state tracking, equal trainable parameters, frozen base")
        ax.legend(fontsize=7)
        ax = axes[1, 1]
        for j, task in enumerate(tasks):
            for arm, style in (("hrm_mlp", "-"), ("hrm_mlp_random", "--")):
                if arm not in quality_rows[task]["arms"]:
                    continue
                curves = np.array([r["curve"] for r in quality_rows[task]["arms"][arm]["runs"]])
                ax.plot(curves[0, :, 0], curves[:, :, 1].mean(0), style, color=f"C{j}", label=f"{task} {arm}")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (mean over seeds)")
        ax.set_title("HRM at MLP: balanced truncation (solid) vs random init (dashed)")
        ax.legend(fontsize=6)
    else:
        axes[0, 0].axis("off")
        axes[1, 1].axis("off")
    cost_rows = (result.get("cost") or {}).get("rows") or []
    if cost_rows:
        lengths = [r["length"] for r in cost_rows]
        ax = axes[0, 1]
        if "frozen_step_s_median" in cost_rows[0]:
            ax.loglog(lengths, [r["frozen_step_s_median"] for r in cost_rows], "x--", color="grey", label="frozen base step (no adapter)")
        ax.loglog(lengths, [r["lora_step_s_median"] for r in cost_rows], "o-", label="LoRA step")
        ax.loglog(lengths, [r["hrm_mlp_step_s_median"] for r in cost_rows], "s-", label="HRM (MLP) step")
        ax.loglog(lengths, [r["hrm_residual_s_median"] for r in cost_rows], "^-", label="HRM residual alone (fwd+bwd)")
        ref = cost_rows[0]["hrm_residual_s_median"] / (lengths[0] * math.log2(lengths[0]))
        ax.loglog(lengths, [ref * n * math.log2(n) for n in lengths], ":", color="grey", label="c L log L")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("seconds (median)")
        ratio = ", ".join(f"{r['length']}: {r['ratio_hrm_vs_lora']:.2f}" for r in cost_rows)
        ax.set_title(f"training step time, batch 1\nHRM / LoRA: {ratio}", fontsize=9)
        ax.legend(fontsize=7)
        ax = axes[1, 0]
        if "frozen_peak_saved_bytes" in cost_rows[0]:
            ax.loglog(lengths, [r["frozen_peak_saved_bytes"] / 2**20 for r in cost_rows], "x--", color="grey", label="frozen base")
        ax.loglog(lengths, [r["lora_peak_saved_bytes"] / 2**20 for r in cost_rows], "o-", label="LoRA")
        ax.loglog(lengths, [r["hrm_mlp_peak_saved_bytes"] / 2**20 for r in cost_rows], "s-", label="HRM (MLP)")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("peak saved activations (MiB)")
        ax.set_title("activation memory of one step (SavedTensorMeter)")
        ax.legend(fontsize=7)
        for ax in (axes[0, 1], axes[1, 0]):
            ax.set_xticks(lengths, [str(n) for n in lengths])
            ax.minorticks_off()
    run = "quick" if result["quick"] else "full"
    parts = result["settings"]["parts"] if isinstance(result.get("settings"), dict) else ""
    fig.suptitle(f"HRM vs LoRA ({run} run, parts: {parts}; CPU, {result['threads']} thread, shared machine)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one short task, one seed, few steps, lengths 128..512")
    parser.add_argument("--parts", default="quality,cost", help="comma list of: quality (parts 1 and 3), cost (part 2)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS)
    parser.add_argument("--steps", type=int, default=400, help="fine-tuning steps per run")
    parser.add_argument("--pretrain-steps", type=int, default=PRETRAIN["steps"])
    parser.add_argument("--lr", type=float, default=None, help="AdamW learning rate of every arm (default: chosen per arm)")
    parser.add_argument("--lr-grid", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2], help="learning rates the per-arm choice tries")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-size", type=int, default=4096)
    parser.add_argument("--lora-rank", type=int, default=2, help="LoRA rank; HRM dims are matched to its trainable count")
    parser.add_argument("--fit", default="fir", choices=["fir", "arx"], help="HRM's high-order fit before balanced truncation")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cost-layers", type=int, default=MODEL["num_hidden_layers"], help="decoder layers of part 2's model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "lightning_peft_bench")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/hrm[_quick].json)")
    args = parser.parse_args(argv)
    args.tasks = TASKS
    if args.quick:
        args.tasks, args.seeds, args.steps = TASKS[:1], args.seeds[:1], 60
        args.pretrain_steps, args.lengths, args.repeats = 100, [128, 256, 512], 3
        args.lr = args.lr or 3e-3
    args.out = args.out or RESULTS / ("hrm_quick.json" if args.quick else "hrm.json")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {msg}", flush=True)

    import transformers

    base, base_meta = pretrained_base(args.cache_dir, args.pretrain_steps, log)
    dims = matched_hrm_dims(base, args.lora_rank)
    parts = set(args.parts.split(","))
    result: dict[str, Any] = {
        "benchmark": "hrm",
        "quick": args.quick,
        "threads": args.threads,
        "machine": f"CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} cores shared with other jobs: "
        "absolute times are noisy, compare the ratios",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()},
        "base": {"config": MODEL, **base_meta},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "lora": {"rank": args.lora_rank, "alpha": 2 * args.lora_rank, "targets": LORA_TARGETS},
        "hrm_dims": {site: {"input_dim": m, "state_dim": n} for site, (m, n) in dims.items()},
    }
    if "quality" in parts:
        if args.lr is None:
            result["lr_choice"] = choose_lrs(base, args, args.lora_rank, dims, log)
            lrs = result["lr_choice"]["chosen"]
        else:
            lrs = dict.fromkeys(args.arms, args.lr)
        result["quality"] = quality(base, args, args.lora_rank, dims, lrs, log)
    if "cost" in parts:
        cost_base = base
        if args.cost_layers != MODEL["num_hidden_layers"]:  # timing does not depend on the weights
            torch.manual_seed(0)
            cost_base = _llama("lm", num_hidden_layers=args.cost_layers).state_dict()
        result["cost"] = cost(cost_base, args.lengths, args.repeats, args.lora_rank, dims, log)
        random_base = f"a random-init {args.cost_layers}-layer base (timing only)"
        result["cost"]["base"] = "the pretrained base" if cost_base is base else random_base
    result["summary"] = summarise(result.get("quality") or {}, result.get("cost"))
    result["seconds"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(result, args.out.with_suffix(".png"))
    log(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    print(json.dumps(result["summary"], indent=1))
    return result


if __name__ == "__main__":
    main()
