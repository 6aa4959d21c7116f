"""NA-LoRA's controller under 2-process gloo DDP (pure torch): run as ``python nalora_ddp.py OUT``.

Each rank trains the same model on its half of every batch (gradients averaged by all-reduce,
as DDP does) and writes its controller state to ``OUT/rank{r}.pt``; the parent process also
trains one process on the whole batches and writes ``OUT/single.pt``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from nalora_nets import adapted, data, loss_of  # noqa: E402

STEPS = 7


def flat_state(ctl) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return {f"{n}.{k}": getattr(g, k).clone() for n, g in ctl.gates.items() for k in ("importance", "shares", "mask", "groups")}


def run(rank: int, world: int, out: Path) -> None:
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("NALORA_PORT", "29561"))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    model, opt, ctl = adapted(warmup_steps=2, refresh_every=2)
    x = data(n=8)
    for step in range(STEPS):
        batch = x[step % 2 :: 2]  # 4 sequences, split over the ranks
        shard = batch[rank::world]
        loss_of(model, shard).backward()
        if world > 1:
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world
        ctl.before_step(step, opt)
        opt.step()
        ctl.after_step(opt)
        opt.zero_grad()
    torch.save(flat_state(ctl), out / ("single.pt" if world == 1 else f"rank{rank}.pt"))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(run, args=(2, out), nprocs=2, join=True)
    run(0, 1, out)
