"""The registry of adapter kinds: the only way a file names an adapter spec.

An adapter file (``save_adapter``'s metadata, a policy library's layout) records each spec as
``{"class_path": "lightning_peft.adapters.lora.LoRA", "init_args": {...}}``. Loading never
imports what a file names: :func:`adapter_class` resolves the name in this registry only (the
library's own specs, plus the classes a user registered with :func:`register_adapter`), and
:func:`spec_from_config` checks ``init_args`` against the class's ``__init__`` before calling
it.

Built-in specs are listed by name and imported lazily from our own modules (so that resolving
``LoRA`` never imports bitsandbytes): the module path comes from the table below, never from a
file.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Mapping, Sequence
from importlib import import_module
from typing import Any, Literal, TypeVar, Union

from lightning_peft.adapters.base import AdapterSpec

__all__ = ["adapter_class", "register_adapter", "registered_adapters", "spec_from_config"]

# class path (as AdapterSpec.to_config writes it) -> (our module, class name)
_BUILTIN: dict[str, tuple[str, str]] = {
    "lightning_peft.adapters.lora.LoRA": ("lightning_peft.adapters.lora", "LoRA"),
    "lightning_peft.adapters.quantized.QLoRA": ("lightning_peft.adapters.quantized", "QLoRA"),
    "lightning_peft.adapters.bitfit.BitFit": ("lightning_peft.adapters.bitfit", "BitFit"),
    "lightning_peft.adapters.full.FullFineTune": ("lightning_peft.adapters.full", "FullFineTune"),
    "lightning_peft.adapters.experts.spec.ExpertLoRA": ("lightning_peft.adapters.experts.spec", "ExpertLoRA"),
    "lightning_peft.adapters.adalora.AdaLoRA": ("lightning_peft.adapters.adalora", "AdaLoRA"),
    "lightning_peft.adapters.hrm.HRM": ("lightning_peft.adapters.hrm", "HRM"),
    "lightning_peft.adapters.bara.BaRA": ("lightning_peft.adapters.bara", "BaRA"),
    "lightning_peft.adapters.frame.FRAME": ("lightning_peft.adapters.frame", "FRAME"),
    "lightning_peft.adapters.nalora.NALoRA": ("lightning_peft.adapters.nalora", "NALoRA"),
    "lightning_peft.adapters.litelora.LiteLoRA": ("lightning_peft.adapters.litelora", "LiteLoRA"),
}
# short names: the class name and the spec's ``kind`` (what reports and index files show)
_BUILTIN_ALIASES: dict[str, str] = {
    "LoRA": "lightning_peft.adapters.lora.LoRA",
    "lora": "lightning_peft.adapters.lora.LoRA",
    "QLoRA": "lightning_peft.adapters.quantized.QLoRA",
    "qlora": "lightning_peft.adapters.quantized.QLoRA",
    "BitFit": "lightning_peft.adapters.bitfit.BitFit",
    "bitfit": "lightning_peft.adapters.bitfit.BitFit",
    "FullFineTune": "lightning_peft.adapters.full.FullFineTune",
    "full": "lightning_peft.adapters.full.FullFineTune",
    "ExpertLoRA": "lightning_peft.adapters.experts.spec.ExpertLoRA",
    "expert_lora": "lightning_peft.adapters.experts.spec.ExpertLoRA",
    # the class path files written before adapters/experts.py became a package record
    "lightning_peft.adapters.experts.ExpertLoRA": "lightning_peft.adapters.experts.spec.ExpertLoRA",
    "AdaLoRA": "lightning_peft.adapters.adalora.AdaLoRA",
    "adalora": "lightning_peft.adapters.adalora.AdaLoRA",
    "HRM": "lightning_peft.adapters.hrm.HRM",
    "hrm": "lightning_peft.adapters.hrm.HRM",
    "BaRA": "lightning_peft.adapters.bara.BaRA",
    "bara": "lightning_peft.adapters.bara.BaRA",
    "FRAME": "lightning_peft.adapters.frame.FRAME",
    "frame": "lightning_peft.adapters.frame.FRAME",
    "NALoRA": "lightning_peft.adapters.nalora.NALoRA",
    "nalora": "lightning_peft.adapters.nalora.NALoRA",
    "LiteLoRA": "lightning_peft.adapters.litelora.LiteLoRA",
    "litelora": "lightning_peft.adapters.litelora.LiteLoRA",
    # lightning_peft's public names (``from lightning_peft import LoRA``)
    "lightning_peft.LoRA": "lightning_peft.adapters.lora.LoRA",
    "lightning_peft.QLoRA": "lightning_peft.adapters.quantized.QLoRA",
    "lightning_peft.BitFit": "lightning_peft.adapters.bitfit.BitFit",
    "lightning_peft.FullFineTune": "lightning_peft.adapters.full.FullFineTune",
    "lightning_peft.ExpertLoRA": "lightning_peft.adapters.experts.spec.ExpertLoRA",
    "lightning_peft.AdaLoRA": "lightning_peft.adapters.adalora.AdaLoRA",
    "lightning_peft.HRM": "lightning_peft.adapters.hrm.HRM",
    "lightning_peft.BaRA": "lightning_peft.adapters.bara.BaRA",
    "lightning_peft.FRAME": "lightning_peft.adapters.frame.FRAME",
    "lightning_peft.NALoRA": "lightning_peft.adapters.nalora.NALoRA",
    "lightning_peft.LiteLoRA": "lightning_peft.adapters.litelora.LiteLoRA",
}

_USER: dict[str, type[AdapterSpec]] = {}  # every name a registered class answers to -> class

S = TypeVar("S", bound=type[AdapterSpec])


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_adapter(cls: S) -> S:
    """Allow files to name the ``AdapterSpec`` subclass ``cls`` (also usable as a decorator).

    Files then resolve it by its class path (``"<module>.<QualName>"``, what ``to_config``
    writes), its class name or its ``kind``. Register it in every process that loads such a
    file, before loading (e.g. next to the class definition, as ``@register_adapter``).
    Registering the same class twice is harmless; a name already taken by another class is
    refused. Returns ``cls``.
    """
    if not (isinstance(cls, type) and issubclass(cls, AdapterSpec)) or cls is AdapterSpec:
        raise TypeError(f"register_adapter takes an AdapterSpec subclass, got {cls!r}")
    names = [_class_path(cls), cls.__name__]
    if "kind" in cls.__dict__:  # its own kind, not one inherited from the class it extends
        names.append(cls.kind)
    for name in names:
        builtin = _BUILTIN_ALIASES.get(name, name if name in _BUILTIN else None)
        taken = _USER.get(name)
        if taken is not None and taken is not cls:
            raise ValueError(
                f"adapter name {name!r} is already registered for {_class_path(taken)}; give {_class_path(cls)} another name or kind"
            )
        if builtin is not None and _class_path(cls) != builtin:
            raise ValueError(f"adapter name {name!r} belongs to the built-in {builtin}; give {_class_path(cls)} another class name or kind")
    for name in names:
        _USER[name] = cls
    return cls


def registered_adapters() -> list[str]:
    """The class paths files may name (built-in and registered)."""
    return sorted(set(_BUILTIN) | {_class_path(c) for c in _USER.values()})


def adapter_class(name: str, source: str | None = None) -> type[AdapterSpec]:
    """The registered ``AdapterSpec`` class a file calls ``name`` (a class path such as
    ``"lightning_peft.adapters.lora.LoRA"``, a class name ``"LoRA"`` or a kind ``"lora"``).
    Nothing named by a file is imported; an unknown name raises ``ValueError``.
    ``source``: the file, for the error message."""
    where = f"{source}: " if source else ""
    if not isinstance(name, str):
        raise ValueError(f"{where}an adapter class_path must be a string, got {type(name).__name__} {name!r}")
    if name in _USER:
        return _USER[name]
    path = _BUILTIN_ALIASES.get(name, name)
    if path in _BUILTIN:
        module, cls_name = _BUILTIN[path]
        return getattr(import_module(module), cls_name)  # type: ignore[no-any-return]
    raise ValueError(
        f"{where}unknown adapter class {name!r}: files may only name registered adapter specs "
        f"({', '.join(registered_adapters())}; or their class names / kinds). If this is your own "
        "AdapterSpec subclass, register it before loading: `from lightning_peft import register_adapter` "
        "and `register_adapter(MySpec)` (or decorate the class with @register_adapter)."
    )


# ---------------------------------------------------------------------------------------------
# init_args validation
# ---------------------------------------------------------------------------------------------
def _fits(value: Any, annotation: Any) -> bool:
    """Whether JSON ``value`` fits ``annotation`` (forms this package's specs use; anything
    else is left to the class's own checks)."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return True
    if annotation is None or annotation is type(None):
        return value is None
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Union or origin is types.UnionType:
        return any(_fits(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if annotation is bool:
        return type(value) is bool
    if annotation is int:
        return type(value) is int
    if annotation is float:
        return type(value) in (int, float) and math.isfinite(value)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple, Sequence) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
        item = args[0] if args else Any
        return all(_fits(v, item) for v in value)
    if origin in (dict, Mapping) or annotation is dict:
        if not isinstance(value, dict):
            return False
        key, item = args if len(args) == 2 else (Any, Any)
        return all(_fits(k, key) and _fits(v, item) for k, v in value.items())
    return True


def _init_parameters(cls: type[AdapterSpec]) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    signature = inspect.signature(cls.__init__)
    params = {n: p for n, p in signature.parameters.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    var_keyword = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: leave it to the class
        hints = {}
    return params, hints, var_keyword


def spec_from_config(config: Any, source: str | None = None) -> AdapterSpec:
    """Build the spec a file describes as ``{"class_path": ..., "init_args": {...}}``.

    The class comes from :func:`adapter_class`; ``init_args`` must be a dict whose keys are
    the class's ``__init__`` parameters (all required ones present) and whose values fit their
    type hints (finite numbers). Every refusal is a ``ValueError`` naming ``source`` (the file)
    and the key."""
    where = f"{source}: " if source else ""
    if not isinstance(config, dict) or "class_path" not in config:
        raise ValueError(f"{where}an adapter spec must be a dict with 'class_path' and 'init_args', got {config!r:.200}")
    cls = adapter_class(config["class_path"], source)
    init_args = config.get("init_args", {})
    if not isinstance(init_args, dict):
        raise ValueError(f"{where}init_args of {config['class_path']!r} must be a dict, got {type(init_args).__name__}")
    params, hints, var_keyword = _init_parameters(cls)
    unknown = [k for k in init_args if k not in params]
    if unknown and not var_keyword:
        raise ValueError(
            f"{where}{cls.__name__} has no init argument(s) {unknown} (it takes {sorted(params)}); "
            "the file is damaged or from another version"
        )
    missing = [n for n, p in params.items() if p.default is p.empty and n not in init_args]
    if missing:
        raise ValueError(f"{where}{cls.__name__} init_args lack the required {missing}; the file is damaged")
    for key, value in init_args.items():
        if key in params and not _fits(value, hints.get(key, params[key].annotation)):
            wanted = hints.get(key, params[key].annotation)
            raise ValueError(f"{where}{cls.__name__} init_args[{key!r}] = {value!r:.100} does not fit its type {wanted}")
    try:
        return cls(**init_args)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}{cls.__name__} init_args are refused: {error}") from error
