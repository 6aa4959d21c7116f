"""What ``lightning-peft merge`` and ``lightning-peft inspect`` share: their one-line errors, the
export check, and the atomic output directory.

An error is one line on stderr (``error: <what is wrong and the fix>``) and exit status 2, as
for a refused config (:mod:`lightning_peft.cli_errors`); ``LIGHTNING_PEFT_DEBUG=1`` raises the
original exception instead.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning_peft.cli_errors import debug_requested


class HandoffError(Exception):
    """A refused ``merge`` / ``inspect`` request; the message names the file and the fix."""


def run_handoff(command: Callable[[list[str]], Any], argv: list[str]) -> Any:
    """Run ``command(argv)``; a ``HandoffError`` (or a ``ValueError`` / ``OSError`` from the
    checks it calls) prints one line to stderr and exits with status 2."""
    try:
        return command(argv)
    except (HandoffError, ValueError, OSError) as err:
        if debug_requested():
            raise
        message = " ".join(str(err).split())  # one line, whatever the source's layout
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def check_export_dir(path: Path) -> None:
    """Refuse a missing export (or a path that is a file) before anything is built."""
    from lightning_peft.io import WEIGHTS_NAME

    if not path.exists():
        raise HandoffError(f"--adapter {str(path)!r} does not exist; pass the export directory a run wrote (…/adapter)")
    if not path.is_dir() or not (path / WEIGHTS_NAME).is_file():
        raise HandoffError(f"--adapter {str(path)!r} is not an adapter export directory (it holds no {WEIGHTS_NAME})")


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse an existing output (unless ``overwrite``) before any work is done."""
    if out.exists() and not overwrite:
        raise HandoffError(f"--out {str(out)!r} exists; pass --overwrite to replace it, or choose another directory")
    if out.exists() and not out.is_dir():
        raise HandoffError(f"--out {str(out)!r} is a file, not a directory; remove it or choose another path")
