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
    num_hidden_layers=4,
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
TASKS = [("parity", 2, 8), ("parity", 4, 16), ("mod3", 4, 16), ("tomita6", 8, 32), ("cycle5", 8, 32)]
ARMS = ["head", "lora", "hrm_mlp", "hrm_attention", "hrm_mlp_random"]


# --------------------------------------------------------------------------------------------
# Base: pretrained once, cached
# --------------------------------------------------------------------------------------------
def _llama(kind: str, **extra: Any) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    config = LlamaConfig(**MODEL, **extra, attn_implementation="sdpa")
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
