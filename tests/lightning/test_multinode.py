"""Multi-node launches on one machine and resuming on another world size (CPU, gloo, loopback).

One chain of launches of ``tests/scripts/multinode_adapter.py`` (each launch costs seconds of
imports, so each does several jobs), run once per module:

1. torchrun, 2 "nodes" x 1 process (``--nnodes 2 --node_rank i --master_addr 127.0.0.1``):
   DDP and FSDP2 training with checkpoints, EPnG + AdaLoRA decisions.
2. Lightning's launcher, 1 node x 4 processes: training (4-rank checkpoints), resuming the
   2-rank checkpoints, the partial-save checks.
3. Lightning's own variables (``NODE_RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``),
   2 "nodes" x 1 process: training, resuming the 4-rank checkpoints.
4. One process: the single-process reference, resuming the 2-rank checkpoints, resuming a
   checkpoint with one rank's shard overwritten (prepared here).

Every step takes the same global batch (8 samples) at every world size, so losses and weights
must match across launches up to float summation order.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

SCRIPT = Path(__file__).parents[1] / "scripts" / "multinode_adapter.py"
ROOT = Path(__file__).parents[2]
TIMEOUT = 420  # seconds per launch: a loaded 2-core machine; a hang fails the test instead of blocking CI
_DIST_VARS = ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RANK")

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS and not k.startswith("TORCHELASTIC")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", GLOO_SOCKET_IFNAME="lo", **extra)
    return env


def run_all(commands: list[tuple[list[str], dict[str, str]]], what: str) -> None:
    """Start every command (each in its own process group), wait for all; on a timeout or a
    failure kill the groups we started and fail with their output."""
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        for cmd, env in commands
    ]
    outputs: list[str] = []
    failed = False
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=TIMEOUT)[0])
        except subprocess.TimeoutExpired:
            failed = True
            for other in procs:
                if other.poll() is None:
                    os.killpg(other.pid, signal.SIGKILL)
            outputs.append(proc.communicate()[0] + f"\n[killed after {TIMEOUT} s]")
        failed = failed or proc.returncode != 0
    assert not failed, f"{what} failed:\n" + "\n----\n".join(out[-6000:] for out in outputs)


def script(out: Path, tag: str, nodes: int, devices: int, jobs: str) -> list[str]:
    return [str(SCRIPT), str(out), tag, str(nodes), str(devices), jobs]


def torchrun_two_nodes(out: Path, tag: str, jobs: str) -> None:
    port = free_port()
    run_all(
        [
            (
                [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node)]
                + ["--master_addr", "127.0.0.1", "--master_port", str(port), *script(out, tag, 2, 1, jobs)],
                child_env(),
            )
            for node in range(2)
        ],
        "torchrun --nnodes 2",
    )


def lightning_env_two_nodes(out: Path, tag: str, jobs: str) -> None:
    port = str(free_port())
    run_all(
        [
            (
                [sys.executable, *script(out, tag, 2, 1, jobs)],
                child_env(NODE_RANK=str(node), LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            )
            for node in range(2)
        ],
        "NODE_RANK/MASTER_ADDR launch",
    )


def one_launch(out: Path, tag: str, devices: int, jobs: str) -> None:
    # Lightning's launcher picks MASTER_PORT itself and re-runs the script for ranks 1..devices-1
    run_all([([sys.executable, *script(out, tag, 1, devices, jobs)], child_env())], f"{devices}-process launch")


def ranks(out: Path, tag: str, world: int) -> list[dict[str, Any]]:
    return [json.loads((out / tag / f"rank{r}.json").read_text()) for r in range(world)]


def overwrite_one_rank_shard(source: Path, target: Path) -> str:
    """A copy of ``source`` with rank 1's shard of one LoRA factor replaced by rank 0's
    values (shapes unchanged: only the shard record can tell). Returns the tensor's name."""
    checkpoint = torch.load(source, weights_only=True)
    name = next(k for k in sorted(checkpoint["state_dict"]) if k.endswith("lora_B.weight"))
    entry = checkpoint["lightning_peft_shards"]["tensors"]["state_dict"][name]
    shard = next(s for s in entry["shards"] if s["ranks"] == [1])
    start, rows = shard["offset"][0], shard["shape"][0]
    checkpoint["state_dict"][name][start : start + rows] = checkpoint["state_dict"][name][:rows]
    torch.save(checkpoint, target)
    return name


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("multinode")
    torchrun_two_nodes(out, "n2t", "train,experts,adalora,adalora_resume:n2t")
    one_launch(out, "w4", 4, "train,resume:n2t,corrupt_save")
    lightning_env_two_nodes(out, "n2l", "train,resume:w4")
    overwrite_one_rank_shard(out / "n2t" / "fsdp2" / "epoch=0.ckpt", out / "corrupt.ckpt")
    one_launch(out, "w1", 1, "train:single,resume:n2t,corrupt_load:corrupt.ckpt")
    return out


def tol(reference: torch.Tensor | float) -> dict[str, float]:
    """Tolerances scaled to the magnitude: the runs differ only in summation order."""
    scale = float(torch.as_tensor(reference).abs().max())
    return {"atol": 2e-5 * max(1.0, scale), "rtol": 1e-4}


def global_losses(rank_reports: list[dict[str, Any]], key: str) -> torch.Tensor:
    """Per step, the loss over the global batch: the mean of the ranks' (equal-sized) batch losses."""
    return torch.tensor([r[key]["losses"] for r in rank_reports]).mean(dim=0)


# ------------------------------------------------------------------------------------------
# 1. multi-node
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tag", ["n2t", "n2l"])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_nodes_train_like_one_process(chain: Path, tag: str, strategy: str) -> None:
    node0, node1 = ranks(chain, tag, 2)
    reference = ranks(chain, "w1", 1)[0]["train_single"]
    run0, run1 = node0[f"train_{strategy}"], node1[f"train_{strategy}"]
    # two nodes of one process each: global ranks 0 and 1 on node ranks 0 and 1
    assert (run0["world_size"], run0["global_rank"], run0["node_rank"]) == (2, 0, 0)
    assert (run1["world_size"], run1["global_rank"], run1["node_rank"]) == (2, 1, 1)
    if tag == "n2t":  # launched by torchrun, not by Lightning
        assert node1["env"]["GROUP_RANK"] == "1" and node1["env"]["RANK"] == "1"
    # the ranks saw different halves of each batch, yet hold the same weights after every step
    assert run0["losses"] != run1["losses"]
    assert run0["probe_losses"] == run1["probe_losses"] and run0["digests"] == run1["digests"] and len(run0["digests"]) == 4
    # and the global batch's loss is one process's loss on it, step by step
    expected = torch.tensor(reference["losses"])
    torch.testing.assert_close(global_losses([node0, node1], f"train_{strategy}"), expected, **tol(expected))
    final = torch.load(chain / tag / f"{strategy}_trainable.pt")[4]
    single = torch.load(chain / "w1" / "single_trainable.pt")[4]
    assert set(final) == set(single)
    for name, value in single.items():
        torch.testing.assert_close(final[name], value, **tol(value))
    # the checkpoints: written once (by rank 0), adapter-only, with every rank's shards recorded
    assert run0["writes"] == ["epoch=0.ckpt", "epoch=1.ckpt"] and run1["writes"] == []
    checkpoint = torch.load(chain / tag / strategy / "epoch=0.ckpt", weights_only=True)
    assert sorted(checkpoint["state_dict"]) == run0["trainable_names"]
    assert all(".lora_" in k or k.startswith("model.head.") for k in checkpoint["state_dict"])
    record = checkpoint["lightning_peft_shards"]
    assert record["world_size"] == 2 and set(record["tensors"]["state_dict"]) == set(checkpoint["state_dict"])
    shard_ranks = [sorted(r for s in e["shards"] for r in s["ranks"]) for e in record["tensors"]["state_dict"].values()]
    assert all(r == [0, 1] for r in shard_ranks)
    shard_counts = {len(e["shards"]) for e in record["tensors"]["state_dict"].values()}
    assert shard_counts == ({2} if strategy == "fsdp2" else {1})  # FSDP2: two row blocks; DDP: one replica, held by both
    # AdaptiveCheckpointCallback planned on reduced measurements: the same plan on both ranks, and a real one
    assert run0["adaptive_modes"] == run1["adaptive_modes"] and len(run0["adaptive_modes"]) == 4
    assert any("checkpoint" in modes for modes in run0["adaptive_modes"])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_nodes_take_the_same_rank_decisions(chain: Path, strategy: str) -> None:
    node0, node1 = (r[f"experts_{strategy}"] for r in ranks(chain, "n2t", 2))
    # EPnG pruned and grew experts, from all-reduced router statistics: identically on both nodes
    assert node0["epng_history"] and node0["epng_history"] == node1["epng_history"]
    assert node0["importance"] == node1["importance"] and node0["expert_ranks"] == node1["expert_ranks"]
    # AdaLoRA pruned triplets, the same ones on both nodes
    masks = node0["adalora_masks"]
    assert masks and masks == node1["adalora_masks"]
    assert sum(map(sum, masks.values())) < 4 * len(masks)
    assert node0["digest"] == node1["digest"]
    # a checkpoint of that run holds AdaLoRA's importance statistics whole (not DTensor shards)
    checkpoint = torch.load(chain / "n2t" / f"experts_{strategy}.ckpt", weights_only=True)
    statistics = next(v for k, v in checkpoint["callbacks"].items() if "AdaLoRACallback" in k)
    shapes = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items()}
    assert statistics["ipt"] and all(type(v) is torch.Tensor and tuple(v.shape) == shapes[k] for k, v in statistics["ipt"].items())


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_adalora_resumes_its_pruning_from_an_epoch_checkpoint(chain: Path, strategy: str) -> None:
    node0, node1 = ranks(chain, "n2t", 2)
    straight, resumed = node0[f"adalora_{strategy}"], node0[f"adalora_resume_n2t_{strategy}"]
    assert straight["global_step"] == resumed["global_step"] == 6
    # both nodes pruned the same triplets, and the resumed run pruned what the uninterrupted one did
    masks = straight["masks"]
    assert masks and masks == node1[f"adalora_{strategy}"]["masks"] and resumed["masks"] == masks
    assert resumed["masks"] == node1[f"adalora_resume_n2t_{strategy}"]["masks"]
    assert sum(map(sum, masks.values())) < 4 * len(masks)
    # the epoch-0 checkpoint (step 3, mid-schedule) held the importance statistics whole
    checkpoint = torch.load(chain / "n2t" / f"adalora_{strategy}" / "epoch=0.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3
    statistics = next(v for k, v in checkpoint["callbacks"].items() if "AdaLoRACallback" in k)
    assert statistics["ipt"] and all(type(v) is torch.Tensor for v in statistics["ipt"].values())
    # and the resumed run ends where the uninterrupted one did
    final = torch.load(chain / "n2t" / f"adalora_{strategy}_final.pt")
    again = torch.load(chain / "n2t" / f"adalora_resumed_n2t_{strategy}.pt")
    assert set(again) == set(final)
    for name, value in final.items():
        torch.testing.assert_close(again[name], value, **tol(value))


# ------------------------------------------------------------------------------------------
# 2. resume on another world size
# ------------------------------------------------------------------------------------------
RESUMES = [("n2t", "w1", 1), ("n2t", "w4", 4), ("w4", "n2l", 2)]  # (written by, resumed in, world size)


@pytest.mark.parametrize("source, resumed_in, world", RESUMES)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_resume_on_another_world_size(chain: Path, source: str, resumed_in: str, world: int, strategy: str) -> None:
    reports = ranks(chain, resumed_in, world)
    result = [r[f"resume_{source}_{strategy}"] for r in reports]
    uninterrupted = ranks(chain, source, 2 if source.startswith("n2") else 4)
    # right after loading: the checkpoint's adapter and optimizer state, exactly
    assert result[0]["loaded_equal_file"]
    assert result[0]["optimizer_differences"] == [] and result[0]["optimizer_tensors"] == 3 * 26  # step, exp_avg, exp_avg_sq
    # the checkpoint was the uninterrupted run's state after step 2
    checkpoint = torch.load(chain / source / strategy / "epoch=0.ckpt", weights_only=True)
    assert checkpoint["lightning_peft_shards"]["world_size"] == len(uninterrupted)
    at_step_2 = torch.load(chain / source / f"{strategy}_trainable.pt")[2]
    assert all(torch.equal(checkpoint["state_dict"][k], at_step_2[k]) for k in at_step_2)
    # steps 3 and 4 continue the uninterrupted run: same global-batch losses, same weights
    assert all(r["global_step"] == 4 for r in result)
    expected = global_losses(uninterrupted, f"train_{strategy}")[2:]
    got = torch.tensor([r["losses"] for r in result]).mean(dim=0)
    torch.testing.assert_close(got, expected, **tol(expected))
    assert all(r["probe_losses"] == result[0]["probe_losses"] for r in result)
    resumed = torch.load(chain / resumed_in / f"resumed_{source}_{strategy}.pt")
    straight = torch.load(chain / source / f"{strategy}_trainable.pt")[4]
    assert set(resumed) == set(straight)
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, **tol(value))


def test_partial_or_diverged_save_is_refused_on_every_rank(chain: Path) -> None:
    reports = ranks(chain, "w4", 4)
    for report in reports:  # every rank raised (no rank left waiting in a collective), nothing written
        assert "does not hold every rank's part" in report["fsdp2_partial_save"]
        assert "differs from what rank(s) [1] held at save" in report["fsdp2_partial_save"]
        assert not report["fsdp2_partial_save_exists"]
        assert "replicas are out of sync" in report["ddp_diverged_save"] and "rank 3" in report["ddp_diverged_save"]
        assert not report["ddp_diverged_save_exists"]


def test_overwritten_shard_is_refused_at_load(chain: Path) -> None:
    report = ranks(chain, "w1", 1)[0]
    checkpoint = torch.load(chain / "corrupt.ckpt", weights_only=True)
    name = next(k for k in sorted(checkpoint["state_dict"]) if k.endswith("lora_B.weight"))
    for run in ("fsdp2", "single"):  # the strategy's loader and AdapterCallback's check both refuse it
        message = report[f"corrupt_load_{run}"]
        assert "does not hold every rank's part" in message and name in message and "rank(s) [1]" in message
        assert report[f"corrupt_load_{run}_steps"] == 0  # refused before any training step


# ------------------------------------------------------------------------------------------
# the shard record itself (no processes)
# ------------------------------------------------------------------------------------------
def _record_of_two_ranks(full: torch.Tensor) -> dict[str, Any]:
    from lightning_peft.shard_record import build_record, tensor_digest

    rows = math.ceil(full.shape[0] / 2)
    per_rank = [
        {("state_dict", "w"): (list(full.shape), str(full.dtype), [start, 0], [len(part), full.shape[1]], tensor_digest(part))}
        for start, part in ((0, full[:rows]), (rows, full[rows:]))
    ]
    record, problems = build_record(per_rank)
    assert problems == []
    return record


def test_shard_record_catches_each_kind_of_damage() -> None:
    from lightning_peft.shard_record import check_shard_record, shard_problems

    full = torch.arange(15.0).reshape(5, 3)
    record = _record_of_two_ranks(full)
    assert shard_problems({"state_dict": {"w": full.clone()}}, record) == []
    check_shard_record({"state_dict": {"w": full}, "lightning_peft_shards": record}, "ok.ckpt")
    check_shard_record({"state_dict": {"w": torch.zeros(5, 3)}}, "no record: nothing to check")

    lost = full.clone()
    lost[3:] = 0  # rank 1's rows lost (accelerate #4206)
    assert shard_problems({"state_dict": {"w": lost}}, record) == ["state_dict['w'][3:5, 0:3] differs from what rank(s) [1] held at save"]
    assert "is (3, 3)" in shard_problems({"state_dict": {"w": full[:3]}}, record)[0]  # only rank 0's shard saved
    assert shard_problems({"state_dict": {}}, record) == ["state_dict['w'] is missing from the checkpoint"]
    assert "torch.float64" in shard_problems({"state_dict": {"w": full.double()}}, record)[0]
    incomplete = {**record, "tensors": {"state_dict": {"w": {**record["tensors"]["state_dict"]["w"]}}}}
    incomplete["tensors"]["state_dict"]["w"]["shards"] = incomplete["tensors"]["state_dict"]["w"]["shards"][:1]
    assert shard_problems({"state_dict": {"w": full}}, incomplete) == ["state_dict['w']: the recorded shards cover 9 of its 15 elements"]
    with pytest.raises(ValueError, match=r"bad\.ckpt does not hold every rank's part.*written by 2 rank\(s\)"):
        check_shard_record({"state_dict": {"w": lost}, "lightning_peft_shards": record}, "bad.ckpt")


def test_shard_record_covers_optimizer_state_and_replicas() -> None:
    from lightning_peft.shard_record import build_record, local_shards, shard_problems

    exp_avg = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    live = {("state_dict", "w"): torch.ones(2), ("optimizer_states.0", "0.exp_avg"): exp_avg}
    record, problems = build_record([local_shards(live), local_shards(live)])  # two replicas (DDP)
    assert problems == [] and record["tensors"]["optimizer_states.0"]["0.exp_avg"]["shards"][0]["ranks"] == [0, 1]
    checkpoint = {"state_dict": {"w": torch.ones(2)}, "optimizer_states": [{"state": {0: {"exp_avg": exp_avg.clone()}}}]}
    assert shard_problems(checkpoint, record) == []
    checkpoint["optimizer_states"][0]["state"][0]["exp_avg"][1, 0] += 1e-3
    assert shard_problems(checkpoint, record) == ["optimizer_states.0['0.exp_avg'][0:4, 0:2] differs from what rank(s) [0, 1] held at save"]
    drifted = dict(live)
    drifted[("state_dict", "w")] = torch.tensor([1.0, 1.5])
    _, problems = build_record([local_shards(live), local_shards(drifted)])
    assert len(problems) == 1 and "rank 1 and rank 0 hold different values" in problems[0] and "out of sync" in problems[0]
    _, problems = build_record([local_shards(live), {}])
    assert len(problems) == 2 and "held by ranks [0] only, of 2" in problems[0]
