"""The adapter contract: a spec says *what* to adapt, a layer *is* the adapted module.

``AdapterSpec`` (configuration, typed for jsonargparse) selects modules by name and ``wrap``s
each match into an ``AdapterLayer`` (an ``nn.Module`` holding the frozen base and the trainable
adapter tensors). Everything the rest of the package calls on a spec or a layer is declared
here, with a default where one makes sense, so callers never probe with ``hasattr``:

* ``AdapterSpec``: ``kind``, ``trains_base``, ``training_callbacks``; ``supports``, ``check``,
  ``default_targets``, ``select``, ``wrap``, ``base_parameters_to_train``, ``attach``,
  ``to_config``, ``retargeted``.
* ``AdapterLayer``: ``spec``, ``base_layer``, ``merged``, ``base_fingerprint``, ``base_shape``;
  ``merge``, ``unmerge``, ``merge_refusal``, ``adapter_state_dict``, ``adapter_parameters``,
  ``num_trainable``, ``peft_metadata``, ``peft_scaling``, ``peft_config_entry``, ``peft_state_dict``,
  ``from_peft_state_dict``.

* ``LinearAdapterLayer``: an ``AdapterLayer`` on an ``nn.Linear`` whose update is one dense
  ``delta_weight()``: ``in_features``, ``out_features``, ``base_shape`` and exact merging by it.

A new adapter is one file with a subclass of each (or of the spec only, for an adapter that
changes the base in place, as BitFit) plus one line in ``registry._BUILTIN``. Pure torch.
"""

from __future__ import annotations

import copy
import inspect
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_peft.validation import (  # noqa: F401  (check_positive: re-exported for the spec files)
    InvalidArgumentError,
    InvalidArgumentTypeError,
    check_name_pattern,
    check_positive,
    check_regex,
    check_str,
    check_str_list,
)


def name_matches(name: str, entry: str) -> bool:
    """``entry`` matches the dotted module ``name`` if equal to it or to a dotted suffix of it;
    an entry starting with ``"re:"`` is a regular expression matched against the full name."""
    if entry.startswith("re:"):
        return re.fullmatch(entry[3:], name) is not None
    return name == entry or name.endswith("." + entry)


def first_match(name: str, entries: Iterable[str]) -> str | None:
    return next((entry for entry in entries if name_matches(name, entry)), None)


def check_targets(name: str, targets: object) -> None:
    """``target_modules``: ``None``, ``"all-linear"``, one regular expression (a string), or a
    non-empty list of names / ``"re:"`` expressions; every expression must compile."""
    if targets is None:
        return
    if isinstance(targets, str):
        if not targets.strip():
            raise InvalidArgumentError(
                name,
                f"{name} must not be an empty string (got {targets!r}): use 'all-linear', a regular expression, or a list of module names",  # noqa: E501
            )
        if targets != "all-linear":
            check_regex(name, targets.removeprefix("re:"), repr(targets))
        return
    if not isinstance(targets, (list, tuple)):
        raise InvalidArgumentTypeError(
            name,
            f"{name} must be 'all-linear', a regular expression (str) or a list of module names, "
            f"got {targets!r} ({type(targets).__name__})",
        )
    if len(targets) == 0:
        raise InvalidArgumentError(name, f"{name} must not be an empty list: name at least one module, or use 'all-linear'")
    check_str_list(name, targets)
    for entry in targets:
        check_name_pattern(name, entry)


class AdapterSpec:
    """Base class of adapter configurations.

    Args:
        target_modules: which modules to adapt. A list of names matches a module whose full
            dotted name equals an entry or ends with ``"." + entry`` (``"query"`` matches
            ``encoder.layer.0.attention.self.query``); entries starting with ``"re:"`` are
            regular expressions matched against the full name. A plain string is one regular
            expression (full match), except ``"all-linear"``: every ``nn.Linear`` but the
            output head. ``None`` means the spec's own default.
        exclude_modules: names (same rules as a target list) never adapted.
        module_path: only inject below this submodule (e.g. ``"model.encoder"``).
    """

    #: human-readable name used in reports and files
    kind: str = "adapter"
    #: parameters of the base module that train (BitFit: biases; full fine-tune: all)
    trains_base: bool = False
    #: class paths of Lightning callbacks this adapter needs to train correctly, added by
    #: ``AdapterCallback`` (AdaLoRA: its allocator). Class paths, not classes: adapters never
    #: import Lightning
    training_callbacks: tuple[str, ...] = ()

    def __init__(
        self,
        target_modules: str | list[str] | None = None,
        exclude_modules: list[str] | None = None,
        module_path: str | None = None,
    ) -> None:
        check_targets("target_modules", target_modules)
        exclude = check_str_list("exclude_modules", exclude_modules, allow_none=True, allow_empty=True)
        for entry in exclude or []:
            check_name_pattern("exclude_modules", entry)
        check_str("module_path", module_path, allow_none=True)
        self.target_modules = list(target_modules) if isinstance(target_modules, (list, tuple)) else target_modules
        self.exclude_modules = list(exclude or [])
        self.module_path = module_path

    # --- selection -----------------------------------------------------------------------
    def supports(self, module: nn.Module) -> bool:
        """Whether ``module`` is a type this adapter can wrap."""
        return isinstance(module, nn.Linear)

    def check(self, name: str, module: nn.Module) -> None:
        """Raise (``TypeError`` / ``ValueError`` naming ``name`` and the fix) if ``module``
        cannot take this adapter; called before anything changes."""
        if not self.supports(module):
            raise TypeError(f"{type(self).__name__} cannot adapt {name!r}: it is a {type(module).__name__}")

    def default_targets(self) -> str | list[str]:
        """What ``target_modules=None`` selects."""
        return "all-linear"

    def select(self, model: nn.Module, names: list[str]) -> list[str]:
        """The final choice among ``names`` (what the target rules selected: full names in
        ``model``), for a spec that needs the model's structure (NA-LoRA keeps the projections of
        gated FFNs, or raises naming what it looked for). Called before anything changes.
        Default: ``names``."""
        return names

    # --- construction --------------------------------------------------------------------
    def wrap(self, name: str, module: nn.Module) -> nn.Module:
        """Return the module that replaces ``module`` (an ``AdapterLayer``), or ``module``
        itself after changing it in place (BitFit). Must not modify ``module`` before every
        check has passed, so that a failure leaves the model as it was."""
        return module

    def base_parameters_to_train(self, name: str, module: nn.Module) -> list[str]:
        """Names of ``module``'s own parameters that train (BitFit: ``["bias"]``)."""
        return []

    def attach(self, model: nn.Module, layers: dict[str, nn.Module]) -> list[Any]:
        """Called by ``apply_adapter`` once every replacement is in ``model`` (the module it was
        applied to) with this spec's modules by name (relative to ``model``), for adapters that
        need the whole model (HRM captures the padding mask from the model's arguments).
        Returns removable hook handles; ``remove_adapter`` removes them. Default: nothing."""
        return []

    # --- serialisation -------------------------------------------------------------------
    def to_config(self) -> dict[str, Any]:
        """``{"class_path": ..., "init_args": {...}}``: the spec as LightningCLI writes it."""
        init_args = {}
        for param in inspect.signature(type(self).__init__).parameters.values():
            if param.name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            init_args[param.name] = getattr(self, param.name)
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": init_args}

    def retargeted(self, names: Sequence[str]) -> AdapterSpec:
        """A new, validated spec equal to this one except that it adapts exactly the modules
        ``names`` (full names relative to the module it is applied to) and has no
        ``module_path``. Specs are not changed after validation: loaders that must pin a
        spec to the modules a file names use this."""
        targets = ["re:" + re.escape(n) for n in names]
        check_targets("target_modules", targets)
        init_args = self.to_config()["init_args"]
        if "target_modules" in init_args and "module_path" in init_args:
            return type(self)(**{**init_args, "target_modules": targets, "module_path": None})
        pinned = copy.copy(self)  # a subclass whose __init__ fixes its targets: the copy is pinned instead
        pinned.target_modules, pinned.module_path = targets, None
        return pinned

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_config()["init_args"].items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.to_config() == other.to_config()  # type: ignore[union-attr]

    __hash__ = object.__hash__


class AdapterLayer(nn.Module):
    """A module that holds a frozen ``base_layer`` plus adapter tensors.

    Subclasses implement ``forward``, ``merge`` and ``unmerge``; ``adapter_state_dict``
    returns the tensors that define the adapter (everything but ``base_layer.*``), with keys
    relative to this layer.
    """

    spec: AdapterSpec
    base_layer: nn.Module
    merged: bool = False
    #: ``module_fingerprint`` of the base module this layer replaced (set by ``apply_adapter``;
    #: ``None`` for a layer built by hand): files record it to refuse a different base
    base_fingerprint: str | None = None

    @property
    def base_shape(self) -> list[int] | None:
        """``[out_features, in_features]`` of a linear-like layer (what files record to refuse a
        load into a differently shaped module); ``None`` for other layouts (experts)."""
        return None

    def merge(self, keep_original: bool = True) -> None:
        """Fold the adapter into the base weights; ``keep_original`` keeps what ``unmerge``
        needs to restore them exactly."""
        raise NotImplementedError

    def unmerge(self) -> None:
        raise NotImplementedError

    def for_weight_readers(self, attributes: set[str]) -> AdapterLayer | None:
        """This layer in a form a parent can use that reads ``attributes`` of its child itself
        (``self.proj.weight`` in the parent's forward), or ``None`` when it has none: the parent
        is then refused (``lightning_peft.weight_readers``). Called before the layer is placed."""
        return None

    def merge_refusal(self) -> str | None:
        """Why this layer can never be merged (e.g. a token-routed mixture), or ``None``.
        ``merge_adapter`` asks every layer first and refuses before merging any."""
        return None

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base_layer.")}

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("base_layer.")]

    def peft_metadata(self) -> dict[str, Any]:
        """Per-layer hyper-parameters written into the adapter file (rank, alpha, ...)."""
        return {}

    def num_trainable(self) -> int:
        """Trainable parameters this adapter effectively has (what reports count). Layers that
        store adapters at a fixed maximum rank with a rank mask count only the active slots."""
        return sum(p.numel() for p in self.adapter_parameters())

    # --- Hugging Face peft export (a layer opts in) --------------------------------------------
    def peft_scaling(self) -> tuple[bool, float] | None:
        """``(use_rslora, dropout)`` this layer needs from peft's one global ``LoraConfig``
        setting, or ``None`` when it adapts its alphas to whatever the others use. Layers that
        disagree make the adapter unrepresentable in peft."""
        return None

    def peft_config_entry(self, name: str, use_rslora: bool = False) -> dict[str, Any] | None:
        """``LoraConfig`` fields this layer (named ``name`` relative to the export root) needs,
        or ``None`` when peft cannot represent it: ``target_modules`` and/or
        ``target_parameters``; either ``rank`` / ``alpha`` (one value for all its targets:
        written as the global ``r`` / ``lora_alpha`` or as pattern entries where they differ)
        or explicit ``rank_pattern`` / ``alpha_pattern`` entries; ``use_dora: True`` for a DoRA layer
        (peft's ``use_dora`` is global: layers that disagree make the export our own format)."""
        return None

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """The layer's tensors in peft's layout, keys relative to this layer."""
        return self.adapter_state_dict()

    def from_peft_state_dict(self, tensors: dict[str, torch.Tensor], entry: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Inverse of ``peft_state_dict``: ``adapter_state_dict`` keys from peft-layout tensors
        and this layer's saved metadata ``entry`` (what ``peft_metadata`` returned)."""
        return tensors


class LinearAdapterLayer(AdapterLayer):
    """An adapter on an ``nn.Linear`` ``base_layer`` whose update is one dense
    ``delta_weight() [out_features, in_features]`` (fp32): the shape properties, and merging by
    adding that delta (``unmerge`` restores the kept original bit for bit, or subtracts it)."""

    _original: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def base_shape(self) -> list[int] | None:
        return [self.out_features, self.in_features]

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self, keep_original: bool = True) -> None:
        if self.merged:
            return
        self._original = add_to_weight(self.base_layer.weight, self.delta_weight(), keep_original)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        restore_weight(self.base_layer.weight, self._original, self.delta_weight)
        self._original = None
        self.merged = False


@torch.no_grad()
def add_to_weight(weight: torch.Tensor, delta: torch.Tensor, keep_original: bool) -> torch.Tensor | None:
    """``weight += delta``, summed in fp32 and rounded once to ``weight``'s dtype (merging).
    Returns a host copy of the weight as it was when ``keep_original`` (what ``restore_weight``
    needs to undo the merge bit for bit), else ``None``."""
    original = weight.detach().to("cpu", copy=True) if keep_original else None
    weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
    return original


@torch.no_grad()
def restore_weight(weight: torch.Tensor, original: torch.Tensor | None, delta: Callable[[], torch.Tensor]) -> None:
    """Undo ``add_to_weight``: copy ``original`` back, or without one subtract ``delta()``
    (exact up to rounding)."""
    if original is not None:
        weight.copy_(original.to(weight.device))
    else:
        weight.copy_((weight.float() - delta().to(weight.device)).to(weight.dtype))
