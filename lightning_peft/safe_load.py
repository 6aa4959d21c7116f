"""Read a ``torch.save`` file (e.g. a Lightning ``.ckpt``) without running any code from it.

``torch.load(weights_only=True)`` refuses checkpoints whose ``hyper_parameters`` pickle
objects (an ``nn.Module`` passed as ``net``, a ``functools.partial`` optimizer), and
``weights_only=False`` runs whatever the file names. :func:`load_checkpoint_tensors` sits in
between: it unpickles with an ``Unpickler`` whose ``find_class`` hands out real objects only
from a fixed allowlist (what torch needs to rebuild tensors and plain containers), each
wrapped to accept only the argument types ``torch.save`` writes; every other global becomes an
inert placeholder class (:class:`Unloaded`) that swallows its arguments and state and never
calls anything.

Why this is enough: every pickle opcode that calls something (``REDUCE``, ``NEWOBJ``,
``NEWOBJ_EX``, ``BUILD`` via ``__setstate__``, ``INST``, ``OBJ``, ``EXT1/2/4``) can only reach
a callable that came out of ``find_class`` (or a method of an object built from one), so the
only callables a file can reach are the allowlisted ones and the placeholders. TorchScript
archives (which ``torch.load`` would hand to ``torch.jit.load``) and the pre-1.6 non-zip
format are refused before ``torch.load`` sees them.
"""

from __future__ import annotations

import collections
import os
import pickle
import types
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["Unloaded", "load_checkpoint_tensors", "read_safetensors", "tensor_state_dict"]


class Unloaded:
    """Stands in for an object a file named but that was not loaded (anything outside the
    allowlist). ``qualname`` says what it was; ``args``, ``state`` and ``items`` keep what the
    file passed to it, unexamined. Nothing of it is ever called."""

    __slots__ = ("args", "state", "items")
    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Unloaded:
        self = object.__new__(cls)
        object.__setattr__(self, "args", (args, kwargs))
        object.__setattr__(self, "state", None)
        object.__setattr__(self, "items", [])
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # REDUCE calls cls(*args)
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> Unloaded:
        # a placeholder used as a callable (REDUCE on e.g. a pickled functools.partial) gives
        # another placeholder: nothing is called
        return type(self)(*args, **kwargs)

    def __setstate__(self, state: Any) -> None:  # BUILD; kept, never applied
        object.__setattr__(self, "state", state)

    # dict / list subclasses pickle their items through SETITEMS / APPENDS
    def __setitem__(self, key: Any, value: Any) -> None:
        self.items.append((key, value))

    def append(self, value: Any) -> None:
        self.items.append(value)

    def extend(self, values: Any) -> None:
        self.items.extend(values)

    def __repr__(self) -> str:
        return f"<not loaded: {type(self).qualname}>"


def _placeholder(module: str, name: str) -> type:
    qualname = f"{module}.{name}"
    # __slots__=() keeps placeholder instances without a __dict__: a file cannot give them
    # attributes (e.g. a `dtype` that torch's storage loader would read)
    return type(str(name), (Unloaded,), {"__slots__": (), "qualname": qualname, "__module__": "lightning_peft.safe_load"})


# ---------------------------------------------------------------------------------------------
# The allowlist: checked wrappers around what torch.save writes
# ---------------------------------------------------------------------------------------------
def _refuse(what: str, value: Any) -> None:
    raise pickle.UnpicklingError(f"unexpected {what} in a tensor record: {type(value).__name__}")


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list, torch.Size)) or not all(type(v) is int for v in value):
        _refuse(what, value)
    return tuple(value)


def _check_tensor_args(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, metadata: Any) -> None:
    if not isinstance(storage, torch.storage.TypedStorage):
        _refuse("storage", storage)
    if type(offset) is not int:
        _refuse("storage offset", offset)
    _ints(size, "size")
    _ints(stride, "stride")
    if type(requires_grad) is not bool:
        _refuse("requires_grad", requires_grad)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(k, str) and type(v) in (bool, int) for k, v in metadata.items())
    ):
        _refuse("tensor metadata", metadata)


def _empty_hooks() -> collections.OrderedDict[Any, Any]:
    # torch never serializes hooks (its Note "Don't serialize hooks"); whatever a file put
    # there is dropped so that nothing it names can run at backward time
    return collections.OrderedDict()


def _rebuild_tensor_v2(
    storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any, backward_hooks: Any, metadata: Any = None
) -> torch.Tensor:
    _check_tensor_args(storage, storage_offset, size, stride, requires_grad, metadata)
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, tuple(size), tuple(stride), requires_grad, _empty_hooks(), metadata)


def _rebuild_tensor_v3(
    storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any, backward_hooks: Any, dtype: Any, metadata: Any = None
) -> torch.Tensor:
    _check_tensor_args(storage, storage_offset, size, stride, requires_grad, metadata)
    if not isinstance(dtype, torch.dtype):
        _refuse("dtype", dtype)
    return torch._utils._rebuild_tensor_v3(
        storage, storage_offset, tuple(size), tuple(stride), requires_grad, _empty_hooks(), dtype, metadata
    )


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> torch.nn.Parameter:
    if type(data) is not torch.Tensor:
        _refuse("parameter data", data)
    if type(requires_grad) is not bool:
        _refuse("requires_grad", requires_grad)
    return torch.nn.Parameter(data, requires_grad)


def _rebuild_parameter_with_state(data: Any, requires_grad: Any, backward_hooks: Any, state: Any) -> torch.nn.Parameter:
    # the state (python attributes set on the parameter) is dropped: only the values matter here
    return _rebuild_parameter(data, requires_grad, backward_hooks)


class _TensorType(Unloaded):
    """``torch.Tensor`` / ``torch.nn.Parameter`` as named by ``_rebuild_from_type_v2``: a
    marker, not the class (so a file cannot call the tensor constructors directly)."""

    __slots__ = ()


def _tensor_marker(qualname: str) -> type:
    return type(qualname.rsplit(".", 1)[1], (_TensorType,), {"__slots__": (), "qualname": qualname})


_REBUILDERS = (_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter, _rebuild_parameter_with_state)


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> torch.Tensor:
    """A tensor subclass: rebuilt as the plain tensor (or Parameter) it holds; the subclass and
    its python state are not loaded."""
    if func not in _REBUILDERS or not isinstance(args, tuple):
        _refuse("tensor rebuild function", func)
    tensor = func(*args)
    if isinstance(new_type, type) and issubclass(new_type, _TensorType) and new_type.qualname.endswith("Parameter"):
        return torch.nn.Parameter(tensor.detach(), tensor.requires_grad)
    return tensor


def _codecs_encode(text: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    # protocol-2 pickles write bytes as _codecs.encode(str, "latin1")
    if type(text) is not str or encoding not in ("latin1", "latin-1", "utf-8", "utf8") or errors != "strict":
        _refuse("bytes record", text)
    return text.encode(encoding)


def _allowlist() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("torch._tensor", "Tensor"): _tensor_marker("torch.Tensor"),
        ("torch", "Tensor"): _tensor_marker("torch.Tensor"),
        ("torch.nn.parameter", "Parameter"): _tensor_marker("torch.nn.Parameter"),
        # torch's persistent_load compares the storage type by identity; constructing one
        # only allocates memory
        ("torch", "UntypedStorage"): torch.UntypedStorage,
        ("torch.storage", "UntypedStorage"): torch.UntypedStorage,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "complex"): complex,
        ("builtins", "slice"): slice,
        ("builtins", "range"): range,
        ("_codecs", "encode"): _codecs_encode,
    }
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype):  # dtypes are pickled as globals (torch.float32)
            allowed[("torch", name)] = value
    return allowed


_ALLOWED: dict[tuple[str, str], Any] | None = None
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class SafeUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose globals come only from the allowlist; everything else is an
    :class:`Unloaded` placeholder class. Never imports a module."""

    def find_class(self, module: str, name: str) -> Any:
        global _ALLOWED
        if _ALLOWED is None:
            _ALLOWED = _allowlist()
        key = (_PY2_MODULES.get(module, module), name)
        if key in _ALLOWED:
            return _ALLOWED[key]
        cache = self.__dict__.setdefault("_placeholders", {})
        if key not in cache:
            cache[key] = _placeholder(*key)
        return cache[key]


def _safe_load(file: Any, **kwargs: Any) -> Any:
    return SafeUnpickler(file, **kwargs).load()


# what torch.load uses of a pickle module: .Unpickler (and .load for the legacy format we refuse)
_PICKLE_MODULE = types.SimpleNamespace(__name__="lightning_peft.safe_load", Unpickler=SafeUnpickler, load=_safe_load)


def _check_archive(path: Path) -> None:
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{str(path)!r} is damaged or not a torch.save file (not a zip archive; files written by "
            "torch < 1.6 are not supported: re-save them with a current torch)"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        raise ValueError(f"{str(path)!r} is damaged: {error}") from error
    if any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in names):
        raise ValueError(
            f"{str(path)!r} is a TorchScript archive, not a checkpoint; it is not loaded (load it with torch.jit.load if you trust it)"
        )
    if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        raise ValueError(f"{str(path)!r} is damaged or not a torch.save file (no data.pkl record)")


def load_checkpoint_tensors(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The object a ``torch.save`` file holds (a dict: e.g. a Lightning checkpoint), loaded
    without running any code from the file.

    Tensors and Parameters (every dtype), plain containers, ``OrderedDict``, ``torch.Size``,
    dtypes and devices come back as they were saved; any other object (an ``nn.Module`` or
    ``functools.partial`` in ``hyper_parameters``, an optimizer class, a numpy array) comes back
    as an :class:`Unloaded` placeholder. Tensor subclasses come back as plain tensors.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file for a
    damaged or truncated one, a TorchScript archive, or one that does not hold a dict.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no checkpoint file {str(file)!r}")
    if file.suffix == ".safetensors":
        return dict(read_safetensors(file, device=str(map_location))[0])
    _check_archive(file)
    try:
        if os.getenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0").lower() in ("1", "y", "yes", "true"):
            # the user forced torch's strictest loader for every load; respect that
            obj = torch.load(file, map_location=map_location, weights_only=True)
        else:
            # weights_only=False only because torch takes a custom pickle module only so; the
            # module is ours and unpickles nothing outside the allowlist
            obj = torch.load(file, map_location=map_location, weights_only=False, pickle_module=_PICKLE_MODULE, mmap=False)
    except Exception as error:  # noqa: BLE001 - any failure to read the archive means damage
        raise ValueError(f"{str(file)!r} is damaged or not a torch.save checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(obj, dict):
        raise ValueError(f"{str(file)!r} holds a {type(obj).__name__}, not a checkpoint dict or state dict")
    return obj


def tensor_state_dict(obj: Any, source: str | os.PathLike[str], key: str = "state_dict") -> dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint: ``obj[key]`` when ``obj`` has it, else ``obj``
    itself. Every key must be a string and every value a tensor (names the ones that are not)."""
    state = obj.get(key, obj) if isinstance(obj, dict) and isinstance(obj.get(key), dict) else obj
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{str(source)!r} holds no state dict (got {type(state).__name__})")
    bad_keys = [k for k in state if not isinstance(k, str)]
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad_keys or bad:
        raise ValueError(
            f"{str(source)!r} is not a plain state dict: "
            + (f"non-string keys {bad_keys[:4]}; " if bad_keys else "")
            + (f"non-tensor values under {[str(k) for k in bad[:6]]} ({', '.join(repr(state[k]) for k in bad[:3])})" if bad else "")
        )
    return dict(state)


def read_safetensors(path: str | os.PathLike[str], device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a ``.safetensors`` file (safetensors never runs code); a
    truncated or otherwise damaged file raises ``ValueError`` naming it."""
    from safetensors import safe_open

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no safetensors file {str(file)!r}")
    try:
        with safe_open(str(file), "pt", device=device) as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as error:  # noqa: BLE001 - SafetensorError, OSError, ...: the file is unreadable
        raise ValueError(f"{str(file)!r} is damaged or not a safetensors file ({type(error).__name__}: {error})") from error
    return tensors, metadata
