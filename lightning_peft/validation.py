"""Argument checks shared by every spec, callback, strategy, module and datamodule ``__init__``.

Each check raises an ``InvalidArgumentError`` (a ``ValueError``) or ``InvalidArgumentTypeError``
(a ``TypeError``) whose message names the argument, repeats the value and says what is
accepted; ``.argument`` holds the argument's name, which the CLI turns into the config key.
Pure Python: adapters (pure torch) and the Lightning layer both use it.

NaN is refused everywhere a number is taken: ``nan <= 0`` is False, so a bare ``if x <= 0``
lets it through; every check here tests the accepted range positively instead.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any


class InvalidArgumentError(ValueError):
    """A value of the right type outside the accepted set; ``argument`` names it."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(message)
        self.argument = argument


class InvalidArgumentTypeError(TypeError):
    """A value of the wrong type; ``argument`` names it."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(message)
        self.argument = argument


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _quoted_hint(value: Any, parse: Callable[[str], Any]) -> str:
    """A hint for a number written as a string (``"0.1"``): drop the quotes."""
    if isinstance(value, str):
        try:
            parse(value)
        except ValueError:
            return ""
        return f"; write {value.strip()} without quotes"
    return ""


def _range_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


def _in_range(value: float, low: float | None, high: float | None, low_open: bool, high_open: bool) -> bool:
    if low is not None and not (value > low if low_open else value >= low):
        return False
    return high is None or (value < high if high_open else value <= high)


def check_int(
    name: str,
    value: Any,
    low: int | None = None,
    high: int | None = None,
    allow_none: bool = False,
) -> int | None:
    """``value`` as an ``int`` in ``[low, high]``; ``bool``, floats (even ``8.0``) and strings
    are refused, so a typo never becomes a silently truncated number."""
    if value is None and allow_none:
        return None
    what = "an int" + (f" {_range_text(low, high, False, False)}" if low is not None or high is not None else "")
    what += " or None" if allow_none else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        hint = ""
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            hint = f"; write {int(value)} (no decimal point)"
        hint = hint or _quoted_hint(value, int)
        raise InvalidArgumentTypeError(name, f"{name} must be {what}, got {_describe(value)}{hint}")
    if not _in_range(int(value), low, high, False, False):
        raise InvalidArgumentError(name, f"{name} must be {what}, got {value!r}")
    return int(value)


def check_float(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
) -> float | None:
    """``value`` as a finite ``float`` in the range (``low_open``/``high_open``: exclusive
    bounds). Ints are accepted; ``bool``, strings, NaN and infinities are refused."""
    if value is None and allow_none:
        return None
    bounds = _range_text(low, high, low_open, high_open)
    what = ("a number" if low is not None and high is not None else "a finite number") + (f" {bounds}" if bounds else "")
    what += " or None" if allow_none else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentTypeError(name, f"{name} must be {what}, got {_describe(value)}{_quoted_hint(value, float)}")
    number = float(value)
    if not math.isfinite(number) or not _in_range(number, low, high, low_open, high_open):
        raise InvalidArgumentError(name, f"{name} must be {what}, got {value!r}")
    return number


def check_positive(name: str, value: Any, kind: type = int) -> None:
    """``value > 0``: an ``int`` (``kind=int``) or a finite number (``kind=float``)."""
    if kind is int:
        check_int(name, value, low=1)
    else:
        check_float(name, value, low=0.0, low_open=True)


def check_bool(name: str, value: Any, allow_none: bool = False) -> bool | None:
    """``True`` or ``False`` exactly: ``"false"`` (a non-empty, so truthy, string) and ``0``/``1``
    are refused."""
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        hint = ""
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            hint = f"; write {value.strip().lower()} without quotes (YAML) or {value.strip().capitalize()} (Python)"
        raise InvalidArgumentTypeError(
            name, f"{name} must be True or False{' or None' if allow_none else ''}, got {_describe(value)}{hint}"
        )
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any], allow_none: bool = False) -> Any:
    """``value`` is one of ``choices`` (a Literal's values)."""
    options = list(choices)
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or value not in options or type(value) is not type(next((o for o in options if o == value), value)):
        listed = ", ".join(repr(o) for o in options) + (" or None" if allow_none else "")
        raise InvalidArgumentError(name, f"{name} must be one of {listed}, got {_describe(value)}")
    return value


def check_str(name: str, value: Any, allow_none: bool = False, allow_empty: bool = False) -> str | None:
    """A string (non-empty unless ``allow_empty``)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, str):
        raise InvalidArgumentTypeError(name, f"{name} must be a string{' or None' if allow_none else ''}, got {_describe(value)}")
    if not allow_empty and not value.strip():
        raise InvalidArgumentError(name, f"{name} must be a non-empty string{' or None' if allow_none else ''}, got {value!r}")
    return value


def check_str_list(name: str, value: Any, allow_none: bool = True, allow_empty: bool = False) -> list[str] | None:
    """A list (or tuple) of non-empty strings; a lone string is refused (it would be iterated
    character by character)."""
    if value is None and allow_none:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        hint = f"; write [{value!r}]" if isinstance(value, str) else ""
        raise InvalidArgumentTypeError(
            name, f"{name} must be a list of strings{' or None' if allow_none else ''}, got {_describe(value)}{hint}"
        )
    if not value and not allow_empty:
        raise InvalidArgumentError(name, f"{name} must be a non-empty list of strings{' or None' if allow_none else ''}, got []")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise InvalidArgumentTypeError(name, f"{name}[{i}] must be a string, got {_describe(item)}")
        if not item.strip():
            raise InvalidArgumentError(name, f"{name}[{i}] is an empty string: name a module (or remove the entry)")
    return list(value)


def check_mapping(name: str, value: Any, check_value: Callable[[str, Any], Any], allow_none: bool = True) -> dict[str, Any] | None:
    """A ``{non-empty str: value}`` dict, each value checked by ``check_value(f"{name}[key]", v)``;
    ``"re:"`` keys (module-name patterns) must compile."""
    if value is None and allow_none:
        return None
    if not isinstance(value, Mapping):
        raise InvalidArgumentTypeError(
            name, f"{name} must be a dict with string keys{' or None' if allow_none else ''}, got {_describe(value)}"
        )
    out = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key.strip():
            raise InvalidArgumentTypeError(name, f"{name} keys must be non-empty strings, got {_describe(key)}")
        check_name_pattern(f"{name}[{key!r}]", key)
        out[key] = check_value(f"{name}[{key!r}]", item)
    return out


def check_name_pattern(name: str, entry: str) -> None:
    """An ``"re:..."`` entry must be a valid regular expression (checked at construction, not
    at the first match)."""
    if entry.startswith("re:"):
        check_regex(name, entry[3:], f"{entry!r}")


def check_regex(name: str, pattern: str, shown: str | None = None) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise InvalidArgumentError(
            name,
            f"{name} entry {shown or repr(pattern)} is not a valid regular expression ({err}); "
            "fix the pattern, or use re.escape(name) to match a name literally",
        ) from None
