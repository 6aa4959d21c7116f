"""Byte sizes: ``parse_bytes``/``format_bytes`` and the memory-budget forms (``parse_budget``)."""

from __future__ import annotations

import math
import numbers
from typing import Literal

from lightning_peft.validation import InvalidArgumentError, InvalidArgumentTypeError

__all__ = ["parse_bytes", "format_bytes", "parse_budget"]

_UNITS = {
    "b": 1,
    "": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}


def parse_bytes(text: str) -> int:
    """``"2GiB"`` -> 2147483648; ``"512 MB"`` -> 512000000; ``"1e9"`` -> 1000000000."""
    s = text.strip().lower().replace(" ", "").replace("_", "")
    i = len(s)
    while i > 0 and s[i - 1].isalpha():
        i -= 1
    number, unit = s[:i], s[i:]
    if unit not in _UNITS or not number:
        raise ValueError(
            f"cannot read {text!r} as a size in bytes: use a number with an optional unit "
            f"(B, KB, KiB, MB, MiB, GB, GiB, TB, TiB), e.g. '2GiB'"
        )
    try:
        value = float(number)
    except ValueError as err:
        raise ValueError(f"cannot read {text!r} as a size in bytes, e.g. '2GiB'") from err
    return int(value * _UNITS[unit])


def format_bytes(n: float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"  # pragma: no cover


_BUDGET_FORMS = (
    "bytes (an int >= 1 or a string with a unit: '2GiB', '512MB'), a fraction of device memory "
    "(a float in (0, 1], e.g. 0.5, or the same as a string, '0.5'), or a percentage string ('40%')"
)


def parse_budget(budget: int | float | str | None) -> tuple[Literal["bytes", "fraction"], float] | None:
    """``("bytes", n)`` or ``("fraction", f)`` for a budget, ``None`` for none. Accepted: an int
    (bytes), a float in ``(0, 1]`` (fraction of device memory) or ``>= 1024`` (bytes), a string
    with a unit (``"2GiB"``), a percentage (``"40%"``), or a unit-less number string read as
    the number it spells (``"0.5"``: a fraction, as the float; ``"1e9"``: bytes). NaN and infinities are refused."""
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (numbers.Real, str)):
        raise InvalidArgumentTypeError("budget", f"budget must be {_BUDGET_FORMS}; got {budget!r} ({type(budget).__name__})")
    if isinstance(budget, numbers.Real) and not isinstance(budget, str):  # numpy scalars too
        budget = int(budget) if isinstance(budget, numbers.Integral) else float(budget)
    if isinstance(budget, str):
        return _parse_budget_text(budget)
    if isinstance(budget, float):
        if math.isfinite(budget) and 0.0 < budget <= 1.0:
            return "fraction", budget
        if math.isfinite(budget) and budget >= 1024:
            return "bytes", float(int(budget))
        raise InvalidArgumentError(
            "budget",
            f"got budget={budget!r}: a float budget is a fraction of the device's total memory in (0, 1]; budget must be {_BUDGET_FORMS}",
        )
    if budget < 1:
        raise InvalidArgumentError("budget", f"got budget={budget!r}, not a positive size; budget must be {_BUDGET_FORMS}")
    return "bytes", float(budget)


def _parse_budget_text(budget: str) -> tuple[Literal["bytes", "fraction"], float]:
    """A budget written as a string: a percentage, a unit-less number or a size with a unit."""
    text = budget.strip()
    if text.endswith("%"):
        try:
            percent = float(text[:-1])
        except ValueError:
            percent = math.nan
        if not 0 < percent <= 100:  # False for NaN too
            raise InvalidArgumentError(
                "budget", f"a percentage budget must be in (0, 100]%, got {budget!r}; budget must be {_BUDGET_FORMS}"
            )
        return "fraction", percent / 100.0
    try:
        number = float(text)
    except ValueError:
        number = None
    if number is not None and not math.isfinite(number):
        raise InvalidArgumentError("budget", f"budget must be {_BUDGET_FORMS}; got {budget!r}")
    if number is not None and 0 < number <= 1 and not text.isdigit():  # "0.5", "1.0": as the float
        return "fraction", number
    try:
        size = parse_bytes(text)
    except ValueError:
        raise InvalidArgumentError("budget", f"budget must be {_BUDGET_FORMS}; cannot read {budget!r}") from None
    if not size >= 1:
        raise InvalidArgumentError("budget", f"got budget={budget!r}, not a positive size; budget must be {_BUDGET_FORMS}")
    return "bytes", float(size)
