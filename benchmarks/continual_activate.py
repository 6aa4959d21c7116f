"""``AdapterLibrary.activate`` against re-loading a full model copy, for ``benchmarks/continual.py``.

On one base (the full all-MiniLM-L6-v2 encoder, 22.7 M parameters, and the continual benchmark's
tiny ViT) the library holds two LoRA adapters of the same layout (rank 4 on every linear layer,
non-zero ``B``). Measured in the same process, interleaved, ``repeats`` times each:

* ``activate``: ``library.activate(a)`` then ``library.activate(b)`` alternately (after one warm-up
  activate that injects the layers; same layout afterwards, so only the adapter's tensors move);
* ``full_reload``: ``safetensors.torch.load_file(full copy)`` + ``model.load_state_dict`` of a full
  copy of the plain model written once to disk (what switching "task models" costs without a library).

Reported: medians (seconds), ``full_reload / activate``, and the bytes each moves (adapter tensors
vs the full state dict).
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn


def _random_lora_export(base: nn.Module, rank: int, seed: int, directory: Path) -> int:
    """Save a LoRA export of ``base`` with random non-zero factors; returns its tensor bytes."""
    from lightning_peft import LoRA, apply_adapter
    from lightning_peft.io import save_adapter

    model = copy.deepcopy(base)
    apply_adapter(model, LoRA(rank=rank, alpha=2.0 * rank), check_gradients=False)
    g = torch.Generator().manual_seed(seed)
    size = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
                size += p.numel() * p.element_size()
    save_adapter(model, directory)
    return size


def measure(base: nn.Module, label: str, repeats: int = 9, rank: int = 4) -> dict[str, Any]:
    from safetensors.torch import load_file, save_file

    from lightning_peft import AdapterLibrary

    base = base.eval()
    parameters = sum(p.numel() for p in base.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        reference = {k: v.detach().clone().contiguous() for k, v in base.state_dict().items()}
        full_path = tmp / "full.safetensors"
        save_file(reference, str(full_path))
        reload_target = copy.deepcopy(base)
        sizes = [_random_lora_export(base, rank, seed, tmp / f"adapter{seed}") for seed in (0, 1)]
        library = AdapterLibrary(tmp / "library", base=base)
        for seed in (0, 1):
            library.add(f"a{seed}", tmp / f"adapter{seed}")
        started = time.perf_counter()
        library.activate("a0")  # first activate: injects the layers
        first = time.perf_counter() - started
        activate, reload = [], []
        for r in range(repeats):
            started = time.perf_counter()
            library.activate(f"a{(r + 1) % 2}")
            activate.append(time.perf_counter() - started)
            started = time.perf_counter()
            reload_target.load_state_dict(load_file(str(full_path)))
            reload.append(time.perf_counter() - started)
        # activating really switches the computation (a sanity check on what was timed)
        x = _probe_input(base)
        with torch.no_grad():
            out_1 = library.model(**x) if isinstance(x, dict) else library.model(x)
            library.activate("a0")
            out_0 = library.model(**x) if isinstance(x, dict) else library.model(x)
        differs = not torch.allclose(_tensor(out_0), _tensor(out_1))
        full_bytes = sum(v.numel() * v.element_size() for v in reference.values())
        report = library.report()
    med_a, med_r = statistics.median(activate), statistics.median(reload)
    return {
        "base": label,
        "parameters": parameters,
        "repeats": repeats,
        "lora_rank": rank,
        "first_activate_s": first,
        "activate_median_s": med_a,
        "full_reload_median_s": med_r,
        "reload_over_activate": med_r / med_a,
        "activate_s": activate,
        "full_reload_s": reload,
        "adapter_bytes": sizes[0],
        "full_copy_bytes": full_bytes,
        "full_copy_file_bytes": full_path_size(reference),
        "bytes_ratio": full_bytes / sizes[0],
        "switch_changes_output": differs,
        "library_report_keys": sorted(report) if isinstance(report, dict) else None,
    }


def full_path_size(state: dict[str, torch.Tensor]) -> int:
    from safetensors.torch import save

    return len(save(state))


def _probe_input(base: nn.Module) -> Any:
    if hasattr(base, "embeddings"):
        return {"input_ids": torch.arange(16).view(1, 16) + 1000}
    return torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))


def _tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return out.last_hidden_state


def run(repeats: int = 9) -> list[dict[str, Any]]:
    from continual_data import _encoder, pretrained_vit

    return [
        measure(_encoder(), "all-MiniLM-L6-v2 encoder", repeats),
        measure(pretrained_vit(), "tiny ViT (continual vision base)", repeats),
    ]
