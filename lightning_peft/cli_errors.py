"""Short CLI errors: one message naming the config key and the fix, instead of the chained
jsonargparse tracebacks (about 120 lines for one bad ``alpha``).

Two sources: a *parse* error (jsonargparse's nested ``Parser key ... / Problem with given
class_path ...`` text) and an *instantiation* error (a class's ``__init__`` refused a value;
jsonargparse wraps it in union errors). Both become a ``ConfigError`` whose ``key`` is the full
config key, e.g. ``trainer.callbacks[1].init_args.adapter.init_args.alpha``. Set
``LIGHTNING_PEFT_DEBUG=1`` to get the original exception (and its traceback) instead.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
from pathlib import Path
from typing import Any

DEBUG_ENV = "LIGHTNING_PEFT_DEBUG"


def debug_requested() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


class ConfigError(Exception):
    """A configuration value the CLI refuses. ``key``: the config key (``None`` if unknown);
    ``message``: what is wrong and how to fix it; ``source``: the class that refused it."""

    def __init__(self, key: str | None, message: str, source: str | None = None) -> None:
        self.key, self.message, self.source = key, message, source
        super().__init__(self.render())

    def render(self) -> str:
        head = f"error: {self.key}: {self.message}" if self.key else f"error: {self.message}"
        where = f"in {self.source}; " if self.source else ""
        return f"{head}\n  ({where}`lightning-peft --help` lists the options; {DEBUG_ENV}=1 shows the full traceback)"


# --------------------------------------------------------------------------------------------
# Parse errors: jsonargparse's nested message
# --------------------------------------------------------------------------------------------
_BOILERPLATE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Given value:",
    "Not a valid subclass of",
    "Subclass types expect one of:",
    "- a class path",
    "- a dict with",
    "- a dict without",
    "Expected a <class 'NoneType'>",
    "Expected a <class 'list'>",
)
_KEY = re.compile(r'^Parser key "([^"]+)":\s*(.*)$')
_CLASS = re.compile(r"^Problem with given class_path '([^']+)':\s*(.*)$")


def _leaves(message: str) -> list[tuple[list[tuple[str, str]], str]]:
    """``(path, text)`` for every leaf line of a jsonargparse message; ``path`` is the chain of
    ``("key", name)`` / ``("class", class_path)`` components above it (by indentation)."""
    stack: list[tuple[int, tuple[str, str]]] = []
    out = []
    for raw in message.splitlines():
        if not raw.strip():
            continue
        indent = len(raw) - len(raw.lstrip())
        text = raw.strip()
        if text.startswith("- "):
            text, indent = text[2:], indent + 2
        while stack and stack[-1][0] >= indent:
            stack.pop()
        for pattern, kind in ((_KEY, "key"), (_CLASS, "class")):
            match = pattern.match(text)
            if match:
                stack.append((indent, (kind, match.group(1))))
                text = match.group(2)
                break
        if text and not text.startswith(_BOILERPLATE):
            out.append(([c for _, c in stack], text))
    return out


def _config_files(args: list[str]) -> list[Path]:
    files = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            files.append(Path(args[i + 1]))
        elif arg.startswith("--config="):
            files.append(Path(arg.split("=", 1)[1]))
    return files


def _list_index(args: list[str], key: str, class_path: str, from_command_line: bool) -> int | None:
    """Best-effort index of the list item at ``key`` (e.g. ``trainer.callbacks``) that the
    error is about: the last item for a command-line override (jsonargparse applies
    ``--trainer.callbacks.init_args.x`` to it), else the item with that ``class_path``."""
    import yaml

    items = None
    for path in _config_files(args):
        try:
            node: Any = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            continue
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, list):
            items = node
    appended = sum(1 for arg in args if arg.startswith(f"--{key}+="))  # `--trainer.callbacks+=Class`
    if not items and not appended:
        return None
    if from_command_line:
        return len(items or []) + appended - 1
    leaf = class_path.rsplit(".", 1)[-1]
    for i, item in enumerate(items or []):
        given = item.get("class_path", "") if isinstance(item, dict) else item if isinstance(item, str) else ""
        if given == class_path or given.rsplit(".", 1)[-1] == leaf:
            return i
    return None


def _init_parameters(class_path: str) -> list[str]:
    # class paths here come from the user's own CLI config, which jsonargparse imports anyway to
    # build the run; an adapter *file* never reaches this (files name specs via the registry)
    try:
        module, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    except Exception:  # noqa: BLE001  (an unimportable class: no suggestions)
        return []


def _reword(text: str) -> str:
    match = re.match(r"^Expected a <class '(\w+)'>\. Got value: (.*)$", text)
    if match:
        kind, value = match.groups()
        names = {"int": "an int", "float": "a number", "bool": "true or false", "str": "a string", "dict": "a mapping", "list": "a list"}
        return f"must be {names.get(kind, 'a ' + kind)}, got {value!r}"
    match = re.match(r"^Expected a (?:typing\.)?Literal\[(.*)\]\. Got value: (.*)$", text)
    if match:
        return f"must be one of {match.group(1)}, got {match.group(2)!r}"
    return text


def parse_error(message: str, args: list[str]) -> ConfigError:
    """The ``ConfigError`` for a jsonargparse parse error ``message`` (``args``: the command line)."""
    match = re.match(r"^Group '([^']+)' does not accept option '([^']+)'", message.strip())
    if match:
        group, option = match.groups()
        hint = ""
        if group == "trainer":
            from lightning.pytorch import Trainer

            close = difflib.get_close_matches(option, list(inspect.signature(Trainer.__init__).parameters), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "; see `lightning-peft fit --help`"
        return ConfigError(f"{group}.{option}", f"is not accepted: {group} has no option {option!r}{hint}")
    leaves = _leaves(message)
    if not leaves:
        return ConfigError(None, message.strip().splitlines()[0] if message.strip() else "invalid arguments")
    path, text = max(leaves, key=lambda leaf: len(leaf[0]))  # the most specific (first on ties)
    key, source = "", None
    nested_arg = "NestedArg(" in message
    for i, (kind, name) in enumerate(path):
        if kind == "key":
            key = f"{key}.{name}" if key else name
        else:
            source = name
            if i == 1 and key in ("trainer.callbacks", "trainer.logger", "trainer.plugins"):
                index = _list_index(args, key, name, nested_arg)
                key += f"[{index}]" if index is not None else "[?]"
            key += ".init_args"
    option = re.match(r"^Option '([^']+)' is not accepted", text)
    if option:
        name = option.group(1)
        known = _init_parameters(source) if source else []
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else (f"; accepted: {known}" if known else "")
        return ConfigError(f"{key}.{name}" if key else name, f"is not accepted by {source or 'this class'}{hint}", source)
    return ConfigError(key or None, _reword(text), source)


# --------------------------------------------------------------------------------------------
# Instantiation errors: a class's __init__ refused a value
# --------------------------------------------------------------------------------------------
def _chain(err: BaseException) -> list[BaseException]:
    out, todo, seen = [], [err], set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        out.append(e)
        todo += [e.__cause__, e.__context__]
    return out


def _init_frame(err: BaseException) -> Any:
    """The frame of the first ``__init__`` (outside jsonargparse) in ``err``'s traceback: the
    constructor of the class whose arguments were refused."""
    tb = err.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "__init__" and "self" in frame.f_locals and "jsonargparse" not in frame.f_code.co_filename:
            return frame
        tb = tb.tb_next
    return None


def _class_nodes(node: Any, key: str = "") -> list[tuple[str, Any]]:
    """``(key, node)`` for every ``class_path`` node of a parsed config, keys like
    ``trainer.callbacks[1].init_args.adapter``."""
    out: list[tuple[str, Any]] = []
    if isinstance(node, list):
        for i, item in enumerate(node):
            out += _class_nodes(item, f"{key}[{i}]")
        return out
    if not hasattr(node, "__dict__") or isinstance(node, type):
        return out
    fields = vars(node) if not isinstance(node, dict) else node
    if "class_path" in fields:
        out.append((key, node))
    for name, value in fields.items():
        if name.startswith("__") or name == "class_path":
            continue
        out += _class_nodes(value, f"{key}.{name}" if key else name)
    return out


def _resolve(class_path: Any) -> Any:
    if not isinstance(class_path, str):
        return None
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:  # noqa: BLE001  (not importable here: cannot be the class that failed)
        return None


def _as_dict(init_args: Any) -> dict[str, Any]:
    if init_args is None:
        return {}
    return dict(init_args) if isinstance(init_args, dict) else dict(vars(init_args))


def _matching(init_args: Any, given: dict[str, Any]) -> int:
    """How many scalar ``init_args`` equal the constructor's arguments ``given``."""
    scalar = (str, int, float, bool, type(None))
    return sum(1 for k, v in _as_dict(init_args).items() if isinstance(v, scalar) and given.get(k, object()) == v)


def _argument(err: BaseException, message: str, names: list[str], given: dict[str, Any]) -> str | None:
    """The constructor argument an error is about: our checks' ``.argument`` (``"rank_pattern['q']"``
    -> ``rank_pattern``), else the parameter whose string value (a path, say) the message quotes,
    else the first parameter name the message mentions."""
    argument = getattr(err, "argument", None)
    match = re.match(r"\w+", argument) if isinstance(argument, str) else None
    if match and match.group(0) in names:
        return match.group(0)
    quoted = [p for p in names if isinstance(given.get(p), str) and len(given[p]) > 2 and given[p] in message]
    if len(quoted) == 1:
        return quoted[0]
    found = sorted((m.start(), p) for p in names for m in [re.search(rf"\b{re.escape(p)}\b", message)] if m)
    return found[0][1] if found else None


def instantiation_error(err: BaseException, config: Any) -> ConfigError | None:
    """The ``ConfigError`` for an exception raised while instantiating ``config`` (the parsed,
    not yet instantiated namespace), or ``None`` when no class ``__init__`` raised it."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    # refusals of a value, not bugs: an AttributeError or a RuntimeError keeps its traceback
    refusals = (ValueError, TypeError, OSError, ImportError, MisconfigurationException)
    found = next(((c, f) for c in _chain(err) if isinstance(c, refusals) and (f := _init_frame(c)) is not None), None)
    if found is None:
        return None
    candidate, frame = found
    instance = frame.f_locals["self"]
    cls = type(instance)
    message = str(candidate).strip()
    nodes = [
        (k, n)
        for k, n in _class_nodes(config)
        if _resolve(n.get("class_path") if isinstance(n, dict) else getattr(n, "class_path", None)) is cls
    ]
    key = None
    if nodes:  # the config node that holds these arguments
        key, _ = max(nodes, key=lambda item: _matching(getattr(item[1], "init_args", None), frame.f_locals))
        key += ".init_args"
    else:
        from lightning.pytorch import Trainer

        if isinstance(instance, Trainer):  # trainer: a group of the config, not a class_path node
            key = "trainer"
    names = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    argument = _argument(candidate, message, names, frame.f_locals)
    if key is not None and argument is not None:
        key = f"{key}.{argument}"
    return ConfigError(key, message, f"{cls.__module__}.{cls.__qualname__}")
