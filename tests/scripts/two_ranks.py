"""Run a two-rank test script (``tests/scripts/<name> OUT_DIR``) in a subprocess, as its test does.

The environment drops the distributed variables of any enclosing run (Lightning's ``ddp``
launcher in the script starts the second rank itself) and gives each process one thread: two
processes share this machine's two cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
DIST_VARS = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RANK")


def run_two_ranks(name: str, out: Path, timeout: float = 300) -> None:
    """Run ``SCRIPTS / name`` with ``out`` as its argument; fail with its output unless it exits 0."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, str(SCRIPTS / name), str(out)], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
