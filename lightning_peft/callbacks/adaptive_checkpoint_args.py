"""The arguments of :class:`~lightning_peft.callbacks.adaptive_checkpoint.AdaptiveCheckpointCallback`:
their types and their validation (validate-then-act: nothing is set before every check passed)."""

from __future__ import annotations

from typing import Any, Literal

from lightning_peft.memory import MemorySource
from lightning_peft.validation import (
    InvalidArgumentError,
    InvalidArgumentTypeError,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_str,
    check_str_list,
)

__all__ = ["StaticMode", "check_arguments"]

#: ``"adaptive"`` or one of the static plans of :func:`lightning_peft.memory.static_modes`
StaticMode = Literal["adaptive", "none", "all", "every_k", "first_k", "offload_first_k"]
_MODES = ("adaptive", "none", "all", "every_k", "first_k", "offload_first_k")
_SOURCES = ("auto", "cuda", "saved_tensors")


def check_arguments(a: dict[str, Any]) -> None:
    """Validate the callback's arguments (``a``: its ``__init__`` arguments by name)."""
    check_choice("mode", a["mode"], _MODES)
    if a["mode"] == "adaptive" and a["budget"] is None:
        raise InvalidArgumentError("budget", "mode='adaptive' needs a budget, e.g. budget='8GiB' or budget=0.5 (of device memory)")
    check_int("k", a["k"], low=1 if a["mode"] == "every_k" else 0)
    if a["blocks"] is not None and not isinstance(a["blocks"], str):
        check_str_list("blocks", a["blocks"])
    elif isinstance(a["blocks"], str):
        check_str("blocks", a["blocks"])
    check_float("headroom", a["headroom"], 0.0, 1.0, high_open=True)
    check_float("hysteresis", a["hysteresis"], 0.0, 1.0, high_open=True)
    check_int("relax_after", a["relax_after"], low=1)
    check_int("shape_bucket", a["shape_bucket"], low=1, allow_none=True)
    check_choice("cost", a["cost"], ("auto", "flops", "time"))
    if a["selective"] != "auto":
        check_bool("selective", a["selective"])
    check_bool("offload", a["offload"])
    check_int("max_retries", a["max_retries"], low=0)
    check_float("oom_backoff", a["oom_backoff"], 0.0, 1.0, low_open=True, high_open=True)
    check_bool("use_reentrant", a["use_reentrant"])
    check_int("log_every_n_steps", a["log_every_n_steps"], low=0)  # 0: never
    check_bool("verbose", a["verbose"])
    source = a["memory_source"]
    if not (isinstance(source, MemorySource) or (isinstance(source, str) and source in _SOURCES)):
        raise InvalidArgumentTypeError(
            "memory_source", f"memory_source must be 'auto', 'cuda', 'saved_tensors' or a MemorySource, got {source!r}"
        )
