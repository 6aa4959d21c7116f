"""Shard records: prove that a checkpoint holds every rank's part of every saved tensor.

A sharded run (FSDP2) saves full tensors that were all-gathered from the ranks' shards; a
replicated run (DDP) saves rank 0's copy of tensors every rank holds. Either save can go wrong
without any shape changing: a gather that kept only rank 0's shards and filled the rest
(accelerate #4206: the resume then silently resets ``(N-1)/N`` of the adapter), or replicas
that drifted apart. So at save every rank digests what it really holds and the record goes
into the checkpoint::

    record = {"version": 1, "world_size": N, "tensors": {section: {name: {
        "shape": [global shape], "dtype": "torch.float32",
        "shards": [{"ranks": [r, ...], "offset": [global offset per dim], "shape": [local shape],
                    "digest": blake2b(dtype, shape, bytes of the local tensor)}, ...]}}}}

``section`` is ``"state_dict"`` or ``"optimizer_states.<i>"`` (names ``"<param index>.<state
key>"``, e.g. ``"3.exp_avg"``). A shard held by several ranks (replicas, or a replicated mesh
dimension) is listed once with all its ranks, and they must agree. ``shard_problems`` checks a
checkpoint's full tensors against the record: each shard's slice of the saved tensor must have
the digest its ranks recorded, and the shards must tile the whole tensor. The same check runs
at save (before the file is written) and at load (before anything is copied into the model).
Digests are exact (bytes, no tolerance): the saved tensor is the gathered shards themselves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

RECORD_KEY = "lightning_peft_shards"
_VERSION = 1

#: one rank's view: (section, name) -> (global shape, dtype, offset, local shape, digest)
LocalShards = dict[tuple[str, str], tuple[list[int], str, list[int], list[int], str]]


def tensor_digest(tensor: torch.Tensor) -> str:
    """blake2b over the dtype, the shape and the raw bytes of ``tensor`` (CPU, contiguous)."""
    t = tensor.detach().to("cpu").contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _local_part(tensor: torch.Tensor) -> tuple[list[int], list[int], torch.Tensor]:
    """(global offset, local shape, local tensor) of what this rank holds of ``tensor``."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local = tensor.to_local()
        shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
        return list(offset), list(shape), local
    return [0] * tensor.dim(), list(tensor.shape), tensor


def local_shards(live: Mapping[tuple[str, str], torch.Tensor]) -> LocalShards:
    """Digest this rank's part of each live tensor (a ``DTensor``'s local shard, a plain
    tensor whole). Local: no communication."""
    shards: LocalShards = {}
    for key, tensor in live.items():
        offset, shape, local = _local_part(tensor)
        shards[key] = (list(tensor.shape), str(tensor.dtype), offset, shape, tensor_digest(local))
    return shards


def gather_shards(local: LocalShards) -> list[LocalShards]:
    """Every rank's ``local_shards`` (collective when a process group of several ranks is up)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [local]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return gathered


def build_record(per_rank: list[LocalShards]) -> tuple[dict[str, Any], list[str]]:
    """The record of ``gather_shards``' result, and the problems found while building it:
    tensors that not every rank holds, or replicas (same offset and shape) that differ."""
    problems: list[str] = []
    keys = sorted({k for shards in per_rank for k in shards})
    tensors: dict[str, dict[str, Any]] = {}
    for section, name in keys:
        holders = [(r, shards[(section, name)]) for r, shards in enumerate(per_rank) if (section, name) in shards]
        if len(holders) != len(per_rank):
            problems.append(f"{section}[{name!r}] is held by ranks {[r for r, _ in holders]} only, of {len(per_rank)}")
        shape, dtype = holders[0][1][0], holders[0][1][1]
        boxes: dict[tuple[tuple[int, ...], tuple[int, ...]], dict[str, Any]] = {}
        for rank, (_, _, offset, local_shape, digest) in holders:
            new = {"ranks": [], "offset": offset, "shape": local_shape, "digest": digest}
            box = boxes.setdefault((tuple(offset), tuple(local_shape)), new)
            if box["digest"] != digest:
                problems.append(
                    f"{section}[{name!r}]: rank {rank} and rank {box['ranks'][0]} hold different values of the same part "
                    f"(offset {offset}, shape {local_shape}): the replicas are out of sync"
                )
            box["ranks"].append(rank)
        tensors.setdefault(section, {})[name] = {"shape": shape, "dtype": dtype, "shards": list(boxes.values())}
    return {"version": _VERSION, "world_size": len(per_rank), "tensors": tensors}, problems


def _saved_tensor(checkpoint: Mapping[str, Any], section: str, name: str) -> Any:
    """The checkpoint's tensor for a record entry, or ``None`` when it is absent."""
    if section == "state_dict":
        return checkpoint.get("state_dict", {}).get(name)
    index = int(section.rpartition(".")[2])
    states = checkpoint.get("optimizer_states", [])
    if index >= len(states):
        return None
    param, _, key = name.partition(".")
    state = states[index].get("state", {})
    return (state.get(int(param)) or state.get(param) or {}).get(key)


def shard_problems(checkpoint: Mapping[str, Any], record: Mapping[str, Any]) -> list[str]:
    """What does not match ``record`` in ``checkpoint``: a recorded tensor missing, of another
    shape or dtype, shards that do not tile it, or a shard whose saved slice has another digest
    than its ranks recorded (e.g. one rank's contribution dropped or overwritten)."""
    problems: list[str] = []
    if record.get("version") != _VERSION:
        return [f"unknown shard record version {record.get('version')!r} (this lightning-peft writes {_VERSION})"]
    for section, entries in record.get("tensors", {}).items():
        for name, entry in entries.items():
            where = f"{section}[{name!r}]"
            saved = _saved_tensor(checkpoint, section, name)
            if not isinstance(saved, torch.Tensor):
                problems.append(f"{where} is missing from the checkpoint")
                continue
            if list(saved.shape) != list(entry["shape"]) or str(saved.dtype) != entry["dtype"]:
                was = f"{tuple(entry['shape'])} {entry['dtype']}"
                problems.append(f"{where} is {tuple(saved.shape)} {saved.dtype} in the file but was {was} on the ranks")
                continue
            covered = 0
            for shard in entry["shards"]:
                part = saved
                for dim, (start, size) in enumerate(zip(shard["offset"], shard["shape"])):
                    part = part.narrow(dim, start, size)
                covered += part.numel()
                if tensor_digest(part) != shard["digest"]:
                    span = ", ".join(f"{o}:{o + s}" for o, s in zip(shard["offset"], shard["shape"]))
                    problems.append(f"{where}[{span}] differs from what rank(s) {shard['ranks']} held at save")
            if covered != saved.numel():
                problems.append(f"{where}: the recorded shards cover {covered} of its {saved.numel()} elements")
    return problems


def check_shard_record(checkpoint: Mapping[str, Any], source: str) -> None:
    """Raise if ``checkpoint`` carries a shard record its tensors do not match (no record: an
    older file or one written without ``AdapterCallback``; nothing to check)."""
    record = checkpoint.get(RECORD_KEY)
    if record is None:
        return
    problems = shard_problems(checkpoint, record)
    if problems:
        raise ValueError(
            f"{source} does not hold every rank's part of its tensors ({len(problems)} problem(s), e.g. {'; '.join(problems[:3])}). "
            f"It was written by {record.get('world_size')} rank(s) and was damaged or saved incompletely; resuming from it would "
            "silently reset those parts. Resume from an earlier checkpoint."
        )
