"""The four continual methods of ``benchmarks/continual.py``, as plain torch loops over one task sequence.

Every method sees the same backbone (the library's base, ``forward -> [B, H]``), the same tasks in
the same order, the same per-task 2-way heads (same init per seed), the same number of AdamW steps
per task with the same batches. After task ``i`` it is evaluated on every task ``j <= i`` (the task
id picks the head and, for the library methods, the library entry), giving ``acc[i][j]``.

* ``litelora``: ``lightning_peft.continual.begin_task`` / ``l0_penalty`` / ``end_task`` around each
  task (a bank of every adapter recruited so far, per-module coefficients, one hard-concrete gate per
  task); the library keeps one combination entry per task and an adapter entry only for the tasks
  that recruited. Evaluated through ``AdapterLibrary.activate(task)``.
* ``lora_per_task``: a fresh LoRA per task, added to the library (no reuse); ``activate(task)``.
* ``shared_lora``: one LoRA trained on task after task (the forgetting baseline).
* ``full_ft``: every backbone weight trained on task after task (lower learning rate).

Heads: ``2 * (H + 1)`` fp32 numbers per task for every method; reported apart from the adapter bytes.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from continual_data import Task
from torch import nn

METHODS = ("litelora", "lora_per_task", "shared_lora", "full_ft")
LIBRARY_METHODS = ("litelora", "lora_per_task")


@dataclass
class Budget:
    """Training budget and hyper-parameters shared by the methods of one sequence."""

    steps: int = 60
    batch: int = 32
    lr: float = 5e-3  # adapters, coefficients and heads
    full_lr: float = 1e-3  # full fine-tune (a full update at 5e-3 wrecks the pretrained features)
    gate_lr: float = 0.1  # LiteLoRA's log_alpha: lets the gate cross from open to closed within one task
    rank: int = 4
    alpha: float = 8.0
    l0_weight: float = 0.05
    log_alpha_init: float = 2.0
    gate_threshold: float = 0.1
    eval_batch: int = 128


def tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def new_heads(width: int, count: int, seed: int) -> list[nn.Linear]:
    """Per-task 2-way heads, initialised from ``seed`` (identical across methods)."""
    heads = []
    for t in range(count):
        torch.manual_seed(10_000 * seed + t)
        heads.append(nn.Linear(width, 2))
    return heads


@torch.no_grad()
def accuracy(backbone: nn.Module, head: nn.Module, task: Task, batch: int = 128) -> float:
    was = backbone.training
    backbone.eval()
    correct = 0
    for start in range(0, len(task.x_test), batch):
        logits = head(backbone(task.x_test[start : start + batch]))
        correct += int((logits.argmax(dim=-1) == task.y_test[start : start + batch]).sum())
    backbone.train(was)
    return correct / len(task.x_test)


def train_task(
    backbone: nn.Module,
    head: nn.Module,
    task: Task,
    budget: Budget,
    seed: int,
    lr: float,
    gate_params: list[nn.Parameter] = (),
    penalty=None,
) -> float:
    """``budget.steps`` AdamW steps (no weight decay) on ``CE(head(backbone(x)), y) [+ penalty()]``
    over every parameter of ``backbone`` and ``head`` that requires grad (``gate_params`` at
    ``budget.gate_lr``). Batches are drawn with a generator seeded by ``seed``. Returns the last loss."""
    gate_ids = {id(p) for p in gate_params}
    params = [p for p in list(backbone.parameters()) + list(head.parameters()) if p.requires_grad and id(p) not in gate_ids]
    if not params:
        raise ValueError(f"nothing trains in {type(backbone).__name__} + head: check the method's setup")
    groups = [{"params": params, "lr": lr}]
    if gate_params:
        groups.append({"params": list(gate_params), "lr": budget.gate_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    backbone.train()
    loss = torch.zeros(())
    for _ in range(budget.steps):
        idx = torch.randint(len(task.x_train), (budget.batch,), generator=g)
        loss = F.cross_entropy(head(backbone(task.x_train[idx])), task.y_train[idx])
        if penalty is not None:
            loss = loss + penalty()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(loss.detach())


def _lora(budget: Budget):
    from lightning_peft import LoRA

    return LoRA(rank=budget.rank, alpha=budget.alpha)


def _litelora(budget: Budget):
    from lightning_peft.adapters.litelora import LiteLoRA

    return LiteLoRA(
        rank=budget.rank,
        alpha=budget.alpha,
        coefficients="per_module",
        gate_scope="global",
        log_alpha_init=budget.log_alpha_init,
        l0_weight=budget.l0_weight,
        gate_threshold=budget.gate_threshold,
    )


def run_method(method: str, base: nn.Module, tasks: list[Task], budget: Budget, seed: int, width: int) -> dict[str, Any]:
    """Train ``method`` over ``tasks`` from a copy of ``base``; returns the accuracy matrix and the
    storage figures (``adapters_kept``, ``adapter_bytes``, ``head_bytes``) plus per-task details."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
    from lightning_peft import apply_adapter
    from lightning_peft.io import save_adapter

    plain = copy.deepcopy(base).eval()
    for p in plain.parameters():
        p.requires_grad_(False)
    heads = new_heads(width, len(tasks), seed)
    names = [f"task{t}" for t in range(len(tasks))]
    acc: list[list[float]] = []
    details: list[dict[str, Any]] = []
    adapter_bytes = 0
    adapters_kept = 0
    recruited: list[str] = []  # LiteLoRA's adapter entries
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        library = None
        if method in LIBRARY_METHODS:
            from lightning_peft import AdapterLibrary

            library = AdapterLibrary(Path(tmp) / "library", base=copy.deepcopy(plain))
        live = copy.deepcopy(plain)
        if method == "shared_lora":
            apply_adapter(live, _lora(budget), check_gradients=False)
            adapter_bytes = tensor_bytes(p for p in live.parameters() if p.requires_grad)
            adapters_kept = 1
        elif method == "full_ft":
            for p in live.parameters():
                p.requires_grad_(True)
            adapter_bytes = tensor_bytes(live.parameters())  # the one full copy kept
        for t, task in enumerate(tasks):
            torch.manual_seed(1000 * seed + t)  # adapter init and gate noise
            step_seed = 1000 * seed + t
            info: dict[str, Any] = {"task": task.name}
            if method == "litelora":
                from lightning_peft.continual import begin_task, end_task, l0_penalty

                if library.active is not None:
                    library.deactivate()
                model = copy.deepcopy(plain)
                # the bank named explicitly: the adapter entries recruited so far (AdapterLibrary's
                # lora_factors also answers for combination entries, which must not join the bank)
                begin_task(model, library, _litelora(budget), names[t], bank=list(recruited))
                gates = [p for n, p in model.named_parameters() if n.endswith("log_alpha")]
                info["loss"] = train_task(model, heads[t], task, budget, step_seed, budget.lr, gates, lambda m=model: l0_penalty(m))
                decision = end_task(model, library, names[t])
                adapter_bytes += decision.bytes
                adapters_kept += int(decision.recruited)
                if decision.recruited:
                    recruited.append(decision.adapter)
                info.update(recruited=decision.recruited, gate=decision.gate, gate_eval=decision.gate_eval, bytes=decision.bytes)
            elif method == "lora_per_task":
                if library.active is not None:
                    library.deactivate()
                model = copy.deepcopy(plain)
                apply_adapter(model, _lora(budget), check_gradients=False)
                size = tensor_bytes(p for p in model.parameters() if p.requires_grad)
                info["loss"] = train_task(model, heads[t], task, budget, step_seed, budget.lr)
                export = Path(tmp) / f"export_{t}"
                save_adapter(model, export)
                library.add(names[t], export)
                adapter_bytes += size
                adapters_kept += 1
                info["bytes"] = size
            else:
                lr = budget.full_lr if method == "full_ft" else budget.lr
                info["loss"] = train_task(live, heads[t], task, budget, step_seed, lr)
            for p in heads[t].parameters():
                p.requires_grad_(False)  # an earlier task's head stays as trained
            row = []
            for j in range(t + 1):
                model = library.activate(names[j]) if library is not None else live
                row.append(accuracy(model, heads[j], tasks[j], budget.eval_batch))
            acc.append(row)
            details.append(info)
        if library is not None:
            library_report = library.report()
    result = {
        "method": method,
        "seed": seed,
        "acc": acc,
        "adapters_kept": adapters_kept,
        "adapter_bytes": adapter_bytes,
        "head_bytes": tensor_bytes(p for h in heads for p in h.parameters()),
        "backbone_bytes": tensor_bytes(plain.parameters()),
        "seconds": time.perf_counter() - started,
        "tasks": details,
    }
    if library is not None:
        result["library_report"] = _jsonable(library_report)
    return result


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return str(value)
