"""Strategies with adapters: plain DDP with only the callback, and AdapterFSDP2Strategy.

The multi-process runs are scripts under ``tests/scripts/`` run in a subprocess (Lightning's
``ddp`` launcher re-runs ``sys.argv``): 2 CPU processes, gloo. They write per-rank results that
the tests check here, together with single-process references.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

SCRIPTS = Path(__file__).parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
from adapter_models import HEAD, LORA_TARGETS, Classifier, lora_callback, make_loader, probe_input  # noqa: E402
from two_ranks import run_two_ranks  # noqa: E402

from lightning_peft import AdapterFSDP2Strategy, LoRA, apply_adapter, load_adapter  # noqa: E402
from lightning_peft.strategies import trainable_state_keys  # noqa: E402


def run_script(name: str, out: Path, timeout: float = 300) -> list[dict]:
    run_two_ranks(name, out, timeout)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def lora_model(seed: int = 0, **kwargs) -> Classifier:
    torch.manual_seed(seed)
    model = Classifier(**kwargs)
    apply_adapter(model, LoRA(rank=4, alpha=8, target_modules=LORA_TARGETS), trainable_modules=HEAD)
    return model


def single_process_trainer(root: Path, epochs: int) -> pl.Trainer:
    """One CPU process with the same LoRA callback as the scripts, no checkpoints."""
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        callbacks=[lora_callback()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=root,
    )


def both_ranks_loader(n: int = 64, per_rank_batch: int = 8, epoch: int = 0) -> torch.utils.data.DataLoader:
    """One process, batches of 16: step k holds rank 0's and rank 1's k-th batch. Lightning gives
    each DDP rank a DistributedSampler(shuffle=True, seed=0): rank r gets perm[r::2]."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0 + epoch)).tolist()
    per_rank = [perm[r::2] for r in range(2)]
    batches = [per_rank[0][k : k + per_rank_batch] + per_rank[1][k : k + per_rank_batch] for k in range(0, n // 2, per_rank_batch)]
    return torch.utils.data.DataLoader(make_loader(n).dataset, batch_sampler=batches)


# ------------------------------------------------------------------------------------------
# Fast checks
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"param_dtype": "fp8"}, ValueError),
        ({"frozen_dtype": "int8"}, ValueError),
        ({"data_parallel_size": 0}, ValueError),
        ({"tensor_parallel_size": 0}, ValueError),
        ({"block_paths": "model.blocks"}, TypeError),
    ],
)
def test_fsdp2_strategy_rejects_bad_arguments(kwargs: dict, error: type) -> None:
    with pytest.raises(error):
        AdapterFSDP2Strategy(**kwargs)


def test_fsdp2_strategy_is_configurable_from_yaml() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--strategy", type=AdapterFSDP2Strategy)
    cfg = parser.parse_args(
        [
            "--strategy",
            json.dumps(
                {
                    "class_path": "lightning_peft.AdapterFSDP2Strategy",
                    "init_args": {"frozen_dtype": "bfloat16", "block_paths": ["model.blocks"]},
                }
            ),
        ]
    )
    strategy = parser.instantiate(cfg).strategy
    assert isinstance(strategy, AdapterFSDP2Strategy)
    assert strategy.frozen_dtype == "bfloat16" and strategy.block_paths == ["model.blocks"] and strategy.trainable_dtype == "float32"
    with pytest.raises(argparse.ArgumentError, match="param_dtype"):  # typed: a wrong dtype is refused while parsing
        parser.parse_args(
            ["--strategy", json.dumps({"class_path": "lightning_peft.AdapterFSDP2Strategy", "init_args": {"param_dtype": "fp8"}})]
        )


def test_trainable_state_keys() -> None:
    model = lora_model()
    keys = trainable_state_keys(model)
    assert keys == [k for k in model.state_dict() if ".lora_" in k or k.startswith("model.head.")]
    assert keys and all(model.get_parameter(k).requires_grad for k in keys)


def test_fsdp2_block_discovery() -> None:
    from torch import nn

    from lightning_peft.memory import BlockDiscoveryError

    strategy = AdapterFSDP2Strategy()
    assert [name for name, _ in strategy._blocks(lora_model())] == ["model.blocks.0", "model.blocks.1"]
    assert [name for name, _ in AdapterFSDP2Strategy(block_paths=["model.blocks"])._blocks(lora_model())] == [
        "model.blocks.0",
        "model.blocks.1",
    ]
    with pytest.raises(BlockDiscoveryError, match="model.layers"):
        AdapterFSDP2Strategy(block_paths=["model.layers"])._blocks(lora_model())
    flat = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="block_paths"):
        assert strategy._blocks(flat) == []


# ------------------------------------------------------------------------------------------
# DDP with only the callback
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_lora_with_activation_checkpointing(tmp_path: Path) -> None:
    rank0, rank1 = run_script("ddp_adapter.py", tmp_path)
    for rank in (rank0, rank1):
        assert rank["ddp_wrapped"] == "DistributedDataParallel" and rank["find_unused_parameters"] is False
        assert rank["base_unchanged"]
        assert rank["trainable_changed"] == rank["trainable"]  # every LoRA factor and the head trained
    # the ranks saw different batches ...
    assert rank0["losses"] != rank1["losses"]
    # ... yet after every step their weights agree: the same probe batch gives the same loss
    assert rank0["probe_losses"] == rank1["probe_losses"] and len(rank0["probe_losses"]) == 4
    final0, final1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for name in final0:
        assert torch.equal(final0[name], final1[name]), name

    # checkpoints: written by rank 0 only, each file once, adapter-only
    assert sorted(rank0["writes"]) == ["epoch=0-step=1.ckpt", "last.ckpt"] and rank1["writes"] == []
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert set(checkpoint["state_dict"]) == set(rank0["trainable"])
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["last.ckpt"]

    # fit left every rank at its last step; the export holds the best (step 1) checkpoint's tensors
    assert rank0["live_is_last_step"] and rank1["live_is_last_step"]
    best = torch.load(tmp_path / "best" / "epoch=0-step=1.ckpt", weights_only=False)["state_dict"]
    torch.manual_seed(0)  # the script's base
    exported = {n: p for n, p in load_adapter(Classifier(), tmp_path / "adapter").named_parameters() if p.requires_grad}
    assert set(exported) == set(best) and all(torch.equal(exported[n], best[n]) for n in best)
    assert any(not torch.equal(best[n], final0[n]) for n in best)

    # the gradient was really averaged: equal to one process over both ranks' batches
    torch.manual_seed(0)
    reference = Classifier(activation_checkpointing=True, scheduler=False)
    single_process_trainer(tmp_path / "ref", epochs=1).fit(reference, both_ranks_loader())
    for name, value in reference.named_parameters():
        if value.requires_grad:
            torch.testing.assert_close(final0[name], value.detach(), atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------
# FSDP2
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fsdp2_adapter_strategy(tmp_path: Path) -> None:
    rank0, rank1 = run_script("fsdp2_adapter.py", tmp_path)
    for rank in (rank0, rank1):
        assert rank["units"] == ["model.blocks.0", "model.blocks.1", "model"]
        # frozen and trainable parameters are both sharded DTensors; the base never changed
        assert rank["frozen_all_dtensor"] and rank["trainable_all_dtensor"] and rank["frozen_sharded"]
        assert rank["frozen_unchanged"]
        assert rank["changed"] == rank["trainable_names"] and rank["n_trainable"] == 26
        # the optimizer was built over every parameter; the strategy kept only trainable ones
        assert rank["optimizer_params"] == rank["n_trainable"]
        # resume with the same strategy continues where it stopped, to the same weights
        assert rank["resumed_global_step"] == 8
        assert rank["resumed_losses"] == rank["straight_losses"][4:]
        assert rank["resume_max_diff"] == 0.0
        # frozen base in bf16, adapter master weights and optimizer state in fp32
        assert rank["mixed_frozen_dtypes"] == ["torch.bfloat16"]
        assert rank["mixed_trainable_dtypes"] == ["torch.float32"] and rank["mixed_optimizer_dtypes"] == ["torch.float32"]
        assert rank["mixed_changed"] == 26 and all(l == l and l < 10 for l in rank["mixed_losses"])
    assert rank0["writes"] == ["last.ckpt"] and rank1["writes"] == []  # written once, by rank 0

    sharded = torch.load(tmp_path / "sharded_A.pt")
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert set(checkpoint["state_dict"]) == set(rank0["trainable_names"])  # adapter-only
    for name, value in checkpoint["state_dict"].items():
        assert type(value) is torch.Tensor and torch.equal(value, sharded["trainable"][name]), name

    # the adapter-only checkpoint loads into a single-process model: same outputs
    single = lora_model()
    result = single.load_state_dict(checkpoint["state_dict"], strict=False)
    assert not result.unexpected_keys
    assert all(not single.get_parameter(k).requires_grad for k in result.missing_keys)
    single.eval()
    x = probe_input()
    with torch.no_grad():
        ref = sharded["logits"]  # tolerance scaled to the logits' magnitude (sums run in another order)
        torch.testing.assert_close(single(x), ref, atol=1e-5 * max(1.0, float(ref.abs().max())), rtol=1e-5)
    # so does the export written at fit end (gathered from the shards)
    torch.manual_seed(0)
    exported = load_adapter(Classifier().eval(), tmp_path / "export")
    with torch.no_grad():
        torch.testing.assert_close(exported(x), ref, atol=1e-5 * max(1.0, float(ref.abs().max())), rtol=1e-5)

    # the optimizer state is a plain torch.optim state dict over the trainable parameters
    optimizer = torch.optim.AdamW([p for p in single.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    optimizer.load_state_dict(checkpoint["optimizer_states"][0])
    assert all(int(s["step"]) == 4 for s in optimizer.state.values()) and len(optimizer.state) == 26

    # and a single-process run resumes from it
    torch.manual_seed(0)
    model = Classifier()
    trainer = single_process_trainer(tmp_path / "single", epochs=2)
    trainer.fit(model, make_loader(n=32), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 8


@pytest.mark.slow
def test_fsdp2_qlora_keeps_quantized_weights_whole(tmp_path: Path) -> None:
    import bitsandbytes  # noqa: F401  (a test dependency: fail loudly if missing)

    from lightning_peft import QLoRA

    rank0, rank1 = run_script("fsdp2_qlora.py", tmp_path)
    expected_quantized = [f"model.blocks.{i}.{m}.base_layer.weight" for i in range(2) for m in ("fc1", "fc2")]
    for rank in (rank0, rank1):
        assert rank["quantized"] == expected_quantized and sorted(rank["unsharded"]) == expected_quantized
        assert rank["quantized_whole"] and rank["others_sharded"]
        assert rank["changed"] == rank["trainable"]  # the packed base never changed; LoRA and head trained

    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert set(checkpoint["state_dict"]) == set(rank0["trainable"])  # no packed 4-bit weights
    torch.manual_seed(0)
    single = Classifier()
    apply_adapter(single, QLoRA(rank=4, alpha=8, target_modules=["fc1", "fc2"], compute_dtype="float32"), trainable_modules=["model.head"])
    single.load_state_dict(checkpoint["state_dict"], strict=False)
    with torch.no_grad():  # train mode, as in the script (bitsandbytes' CPU eval path repacks weights)
        ref = torch.load(tmp_path / "logits.pt")
        torch.testing.assert_close(single(probe_input()), ref, atol=1e-5 * max(1.0, float(ref.abs().max())), rtol=1e-5)
