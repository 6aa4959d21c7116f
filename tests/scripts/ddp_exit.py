"""End a multi-process test script cleanly: wait for every rank, then destroy the process group.

Lightning leaves the gloo process group alive at the end of ``fit``; torn down by the
interpreter's exit instead, its transport threads can still be running and abort the process
("terminate called without an active exception") after all results were written.
"""

from __future__ import annotations

import torch.distributed as dist


def finish_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
