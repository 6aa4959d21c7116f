"""Model, methods and training loop of ``benchmarks/frame.py`` (plain PyTorch, CPU).

The frozen MiniLM encoder is split at layer ``K``: layers ``0..K-1`` carry no adapter and are
frozen, so their output is a constant of each example and is computed once (``encode_cache``);
the adapters go into layers ``K..5`` (``Top``), which is all that runs in a training step. This
is exactly the same computation as running the whole encoder each step with dropout off, only
cheaper.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import torch
from frame_data import TASKS, Example
from torch import nn

TASK_NAMES = list(TASKS)
#: every linear of a BERT layer (attention q/k/v/output, FFN in/out)
TARGET = r"layers\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"


def load_encoder() -> nn.Module:
    from transformers import AutoModel

    from lightning_peft.datamodules.text import default_text_model_path, hub_offline

    hub_offline()
    model = AutoModel.from_pretrained(default_text_model_path(), local_files_only=True, attn_implementation="sdpa")
    for module in model.modules():  # dropout off: cached lower layers are then exact
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model.eval().requires_grad_(False)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[B, T]`` 0/1 attention mask -> ``[B, 1, 1, T]`` additive mask (0 or dtype min)."""
    return torch.where(mask.bool()[:, None, None, :], 0.0, torch.finfo(dtype).min).to(dtype)


def tokenise(examples: list[Example], max_length: int) -> dict[str, torch.Tensor]:
    """``ids, mask [N, T]``, ``task, label [N]`` of ``examples`` (MiniLM's tokenizer)."""
    from lightning_peft.datamodules.text import default_text_model_path, load_tokenizer

    tok = load_tokenizer(default_text_model_path())
    enc = tok([e.text for e in examples], max_length=max_length, truncation=True, padding="max_length", return_tensors="pt")
    return {
        "ids": enc["input_ids"],
        "mask": enc["attention_mask"].long(),
        "task": torch.tensor([TASK_NAMES.index(e.task) for e in examples]),
        "label": torch.tensor([e.label for e in examples]),
    }


@torch.no_grad()
def encode_cache(
    examples: list[Example], encoder: nn.Module, split_layer: int, max_length: int, cache_dir: str | None
) -> dict[str, torch.Tensor]:
    """Tokenise ``examples`` and run embeddings + layers ``0..split_layer-1``.

    Returns ``hidden [N, T, H]`` (float32), ``mask [N, T]``, ``task [N]`` (index in TASKS),
    ``label [N]``. Cached on disk under ``cache_dir`` keyed by the examples and settings.
    """
    key = hashlib.sha256(repr((split_layer, max_length, [(e.task, e.text, e.label) for e in examples])).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"frame_cache_{key}.pt" if cache_dir else None
    if path is not None and path.exists():
        return torch.load(path, weights_only=True)  # our own file, tensors only
    tokens = tokenise(examples, max_length)
    ids, mask = tokens["ids"], tokens["mask"]
    hidden = torch.empty(len(examples), max_length, encoder.config.hidden_size)
    for i in range(0, len(examples), 64):
        h = encoder.embeddings(input_ids=ids[i : i + 64])
        m = additive_mask(mask[i : i + 64])
        for layer in encoder.encoder.layer[:split_layer]:
            h = layer(h, attention_mask=m)
        hidden[i : i + 64] = h
    out = {"hidden": hidden, "mask": mask, "task": tokens["task"], "label": tokens["label"]}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, path)
    return out


class Top(nn.Module):
    """Layers ``K..L-1`` of the encoder + masked mean pooling + one linear head per task.

    ``forward(hidden [B, T, H], mask [B, T], task [B]) -> logits [B, C_max]``: row ``b`` holds
    the logits of its own task's head in the first ``C_task`` columns, ``-inf`` after them.
    """

    def __init__(self, encoder: nn.Module, split_layer: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(list(encoder.encoder.layer[split_layer:])))
        width = encoder.config.hidden_size
        self.heads = nn.ModuleList(nn.Linear(width, len(names)) for names in TASKS.values())
        self.width = max(len(names) for names in TASKS.values())

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        h = hidden
        add = additive_mask(mask, h.dtype)
        for layer in self.layers:
            h = layer(h, attention_mask=add)
        m = mask.to(h.dtype).unsqueeze(-1)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        logits = pooled.new_full((len(pooled), self.width), float("-inf"))
        for t, head in enumerate(self.heads):
            rows = (task == t).nonzero().squeeze(1)
            if len(rows):
                logits[rows, : head.out_features] = head(pooled[rows])
        return logits


# --------------------------------------------------------------------------------------------
# Methods and parameter matching
# --------------------------------------------------------------------------------------------
def moe_spec(method: str, args: Any) -> Any:
    """The FRAME-family spec of ``method`` (``moe_lora``, ``fourier_moe``, ``frame``, ``frame_g1``)."""
    from lightning_peft import FRAME

    common = dict(
        rank=args.rank, num_experts=args.experts, top_k=args.top_k, alpha=args.alpha, balance_coef=args.balance_coef, target_modules=TARGET
    )
    if method == "moe_lora":
        return FRAME(order_init=0.0, train_orders=False, **common)
    if method == "fourier_moe":
        return FRAME(order_init=1.0, train_orders=False, **common)
    if method == "frame":
        return FRAME(order_init="spread", train_orders=True, order_lr=args.order_lr, **common)
    if method == "frame_g1":  # ablation: one Switch-style balance loss over all experts
        return FRAME(order_init="spread", train_orders=True, order_lr=args.order_lr, balance_groups=1, **common)
    raise ValueError(method)


def adapter_params(model: nn.Module) -> dict[str, int]:
    """Trainable parameters per adapted module (heads excluded)."""
    from lightning_peft.adapters.base import AdapterLayer

    return {n: sum(p.numel() for p in m.parameters() if p.requires_grad) for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def matched_lora(encoder: nn.Module, args: Any) -> tuple[Any, dict[str, Any]]:
    """A ``LoRA`` whose rank per module kind makes its trainable parameters closest to FRAME's
    on the same modules: ``r_kind = round(P_frame(module) / (d_in + d_out))``."""
    from lightning_peft import LoRA, apply_adapter

    probe = Top(encoder, args.split_layer)
    apply_adapter(probe, moe_spec("frame", args), check_gradients=False)
    per_module = adapter_params(probe)
    pattern: dict[str, int] = {}
    for name, count in per_module.items():
        base = probe.get_submodule(name).base_layer if hasattr(probe.get_submodule(name), "base_layer") else None
        d_in, d_out = _linear_dims(probe, name, base)
        kind = name.split(".", 2)[2]  # e.g. attention.self.query
        pattern.setdefault(kind, max(1, round(count / (d_in + d_out))))
    rank_pattern = {f"re:layers\\.\\d+\\.{k.replace('.', chr(92) + '.')}": r for k, r in pattern.items()}
    spec = LoRA(rank=max(pattern.values()), alpha=2.0 * max(pattern.values()), rank_pattern=rank_pattern, target_modules=TARGET)
    return spec, {"frame_params_per_module": per_module, "lora_rank_per_kind": pattern}


def _linear_dims(model: nn.Module, name: str, base: nn.Module | None) -> tuple[int, int]:
    layer = base if isinstance(base, nn.Linear) else model.get_submodule(name)
    if hasattr(layer, "in_features"):
        return int(layer.in_features), int(layer.out_features)
    raise TypeError(f"cannot read the shape of {name}")


def build(method: str, encoder: nn.Module, args: Any, lora_spec: Any, seed: int) -> Top:
    """A fresh ``Top`` with ``method``'s adapter; the heads' init depends on ``seed`` only."""
    from lightning_peft import apply_adapter

    torch.manual_seed(seed)
    model = Top(encoder, args.split_layer)
    torch.manual_seed(10_000 + seed)  # adapter init: same stream for every method of a seed
    spec = lora_spec if method == "lora" else moe_spec(method, args)
    apply_adapter(model, spec, trainable_modules=["heads"], check_gradients=False)
    return model


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def balance(model: nn.Module) -> float | None:
    """FRAME's load-balancing loss of the last forward, for the log (``None`` for LoRA); it
    reaches the router's gradient inside FRAME's backward, the loop does not add it."""
    from frame_hooks import balance_value

    return balance_value(model)


def optimizer(model: nn.Module, args: Any) -> torch.optim.Optimizer:
    from frame_hooks import param_groups

    return torch.optim.AdamW(param_groups(model, args.lr), lr=args.lr, weight_decay=0.0)


def batches(n: int, batch: int, steps: int, seed: int) -> list[torch.Tensor]:
    """``steps`` index batches: seeded reshuffles of ``range(n)`` laid end to end."""
    rng = random.Random(seed)
    out, pool = [], []
    while len(out) < steps:
        if len(pool) < batch:
            order = list(range(n))
            rng.shuffle(order)
            pool += order
        out.append(torch.tensor(pool[:batch]))
        pool = pool[batch:]
    return out


@torch.no_grad()
def evaluate(model: Top, data: dict[str, torch.Tensor], batch: int = 128) -> dict[str, float]:
    model.eval()
    preds = []
    for i in range(0, len(data["label"]), batch):
        sl = slice(i, i + batch)
        preds.append(model(data["hidden"][sl], data["mask"][sl], data["task"][sl]).argmax(-1))
    model.train()
    correct = torch.cat(preds) == data["label"]
    return {t: float(correct[data["task"] == i].float().mean()) for i, t in enumerate(TASK_NAMES)}


def train(model: Top, train_data: dict[str, torch.Tensor], args: Any, seed: int) -> dict[str, Any]:
    """``args.steps`` AdamW steps (linear warm-up over 10 %, then linear decay to 0)."""
    opt = optimizer(model, args)
    warm = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min((t + 1) / warm, max(0.0, (args.steps - t) / (args.steps - warm))))
    losses, aux_values, times = [], [], []
    model.train()
    for step, idx in enumerate(batches(len(train_data["label"]), args.batch, args.steps, seed)):
        start = time.perf_counter()
        logits = model(train_data["hidden"][idx], train_data["mask"][idx], train_data["task"][idx])
        loss = nn.functional.cross_entropy(logits, train_data["label"][idx])
        loss.backward()
        aux = balance(model)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
        aux_values.append(aux)
        if step % 25 == 0 or step == args.steps - 1:
            print(f"    step {step:4d}  loss {losses[-1]:.4f}" + ("" if aux is None else f"  aux {aux_values[-1]:.4f}"), flush=True)
    return {
        "loss_first10": sum(losses[:10]) / min(10, len(losses)),
        "loss_last10": sum(losses[-10:]) / min(10, len(losses)),
        "aux_last10": None if aux_values[-1] is None else sum(aux_values[-10:]) / 10,
        "step_s_median": sorted(times)[len(times) // 2],
    }


def default_cache_dir() -> str:
    return os.environ.get("FRAME_BENCH_CACHE", str(Path("/tmp") / "lightning_peft_frame_bench"))


def mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, s
