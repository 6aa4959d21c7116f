"""End a multi-process test script cleanly: wait for every rank, then destroy the process group.

Lightning leaves the gloo process group alive at the end of ``fit``; torn down by the
interpreter's exit instead, its transport threads can still be running and abort the process
("terminate called without an active exception") after all results were written. The CLI does
the same at its end (``lightning_peft.cli.close_process_group``); scripts that drive a
``Trainer`` themselves call this.
"""

from __future__ import annotations

from lightning_peft.cli import close_process_group


def finish_distributed() -> None:
    close_process_group()
