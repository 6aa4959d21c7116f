"""AdapterLibrary: many adapters (and exact combinations of them) over one base model of any
kind, and that base as the one live model they run on.

``activate(name)`` injects an entry's adapter layers into the live model once per *layout*
(specs, adapted modules, ranks: :func:`~lightning_peft.library.layout.layout_key`) and
otherwise only copies the entry's tensors into those layers in place: switching between
adapters of one layout costs time proportional to the adapter's bytes, keeps every module
object (a ``torch.compile``d model does not recompile) and never re-reads the base.

Bytes: a LoRA adapter of rank ``r`` on a ``d_in -> d_out`` layer stores ``r (d_in + d_out)``
values against ``d_in d_out + d_out`` for a full copy; for ``N`` entries the library (plus the
base the user keeps) holds ``base + N adapter`` bytes against ``N`` full copies, a saving of
``1 - 1/N - 1/f`` for a per-entry ratio ``f`` (see :meth:`AdapterLibrary.report`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.adapters.lora import LoRALinear
from lightning_peft.io import WEIGHTS_NAME, adapter_layers, merge_adapter, read_adapter, save_adapter, unmerge_adapter
from lightning_peft.io_checks import LoadPlan, plan_load
from lightning_peft.library.factors import Factors, combine_factors, entry_factors, normalise_weights
from lightning_peft.library.fingerprint import module_fingerprints
from lightning_peft.library.layout import inject_lora_ranks, inject_plan, kind_of, layout_key, lookup, ranks, strip_adapters
from lightning_peft.library.per_sample import clear_mixed, mixed_stacks, set_mixed
from lightning_peft.library.report import format_report, library_report
from lightning_peft.library.store import (
    ADAPTER_DIR,
    FORMAT,
    INDEX_NAME,
    export_bytes,
    install_dir,
    library_path,
    read_index,
    slug,
    tensor_bytes,
    write_json,
)
from lightning_peft.targeting import adapter_record, combine_fingerprints

__all__ = ["AdapterLibrary"]

COEFFICIENT_BYTES = 4  # a combination's coefficient, as the report counts it (fp32)


def _shared_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree whose tensors *are* ``model``'s (no memory): the plain
    structure io's checks plan loads against after the live model has adapters injected."""
    memo: dict[int, Any] = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


class AdapterLibrary:
    """Adapters for one base model on disk, and the base as the live model that runs them.

    Args:
        root: the library's directory (created with an empty index when it holds none).
        base: the plain model (no adapters). It becomes *the* live model: adapters are injected
            into it in place on the first activate. When ``root`` holds a library, ``base`` is
            checked against the stored fingerprint. Base weights are not copied into the library
            (the user owns the base); the index keeps its fingerprints and byte count. Without a
            base an existing library can still be listed, reported, combined and pruned.
        cache: keep entries' validated tensors in memory after their first use (they are small).

    Example::

        lib = AdapterLibrary("runs/library", base=model)
        lib.add("sports", "runs/sports/adapter")          # an export dir, or an adapted model
        lib.add_combination("mix", {"sports": 0.5, "tech": 0.5})
        lib.activate("sports")(batch)                      # lib.model, adapter loaded
        with lib.per_sample(["sports", None, "tech"]):     # one forward, one adapter per sample
            out = lib.model(batch_of_three)
        print(lib.format_report())
    """

    def __init__(self, root: str | os.PathLike[str], base: nn.Module | None = None, cache: bool = True) -> None:
        if base is not None and not isinstance(base, nn.Module):
            raise TypeError(f"base must be an nn.Module (the plain model), got {type(base).__name__}")
        if not isinstance(cache, bool):
            raise TypeError(f"cache must be a bool, got {cache!r}")
        if base is not None and (adapter_record(base) is not None or adapter_layers(base)):
            raise ValueError(
                f"base {type(base).__name__} already has adapters: pass the plain model (lightning_peft.remove_adapter(model) first)"
            )
        self._init_state(root, base, cache)
        index_path = self.root / INDEX_NAME
        if index_path.is_file():
            self.index = self._read_index(index_path)
            if base is not None:
                fp = combine_fingerprints(module_fingerprints(base))
                if fp != self.base_fingerprint:
                    raise ValueError(
                        f"library {str(self.root)!r} was built on base {self.index['base'].get('model')!r} with fingerprint "
                        f"{self.base_fingerprint}; the base given ({type(base).__name__}) has fingerprint {fp}. "
                        "Pass the model the library was built on, open it without base=, or use another root."
                    )
        else:
            if base is None:
                raise FileNotFoundError(
                    f"no adapter library at {str(self.root)!r} (no {INDEX_NAME}); pass base= (the plain model) to create one"
                )
            self._create(base)

    def _init_state(self, root: str | os.PathLike[str], base: nn.Module | None, cache: bool) -> None:
        self.root = Path(root)
        self.cache = cache
        self._model = base
        # the plain structure plans are checked against, copied while the base is still plain
        self._planning = _shared_copy(base) if base is not None else None
        self._cache: dict[str, tuple[LoadPlan, dict[str, Any], str]] = {}  # entry -> (plan, metadata, layout)
        self._layout: str | None = None  # the injected adapter layout
        self._overridden: set[str] = set()  # non-adapter keys the active entry changed
        self._base_values: dict[str, Tensor] = {}  # their base values, saved before the first change
        self.active: str | None = None
        self.merged = False
        self._plain_state: dict[str, Tensor] | None = None  # the planning copy's state (shared tensors)
        self._live: dict[str, Tensor] = {}  # key -> live tensor of the injected layout

    #: the index key that holds the entries (the RL PolicyLibrary's format 3 calls them "tasks")
    ENTRIES_KEY = "entries"
    ITEM = "entry"  # what an entry is called in messages

    @property
    def _entries(self) -> dict[str, Any]:
        return self.index[self.ENTRIES_KEY]

    # ------------------------------------------------------------------ files
    def _read_index(self, path: Path) -> dict[str, Any]:
        index = read_index(path)
        for name, entry in index["entries"].items():
            if entry.get("type", "adapter") == "adapter":
                library_path(self.root, entry["file"], f"entry {name!r}")
        return index

    def _create(self, base: nn.Module) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        modules = module_fingerprints(base)
        state = base.state_dict()
        self.index = {
            "format": FORMAT,
            "base": {
                "model": type(base).__name__,
                "fingerprint": combine_fingerprints(modules),
                "modules": modules,
                "tensor_bytes": tensor_bytes(state.values()),
                "num_values": int(sum(t.numel() for t in state.values())),
            },
            "entries": {},
        }
        self._write_index()

    def _write_index(self) -> None:
        write_json(self.root / INDEX_NAME, self.index)

    # ------------------------------------------------------------------ what it holds
    @property
    def base_fingerprint(self) -> str:
        return str(self.index["base"]["fingerprint"])

    @property
    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def model(self) -> nn.Module:
        """The live model (the ``base`` given); whatever was activated last is loaded in it."""
        if self._model is None:
            raise ValueError(f"library {str(self.root)!r} was opened without base=: pass the plain model to run its adapters")
        return self._model

    def _entry(self, name: str) -> dict[str, Any]:
        if not isinstance(name, str) or name not in self._entries:
            raise ValueError(f"{self.ITEM} {name!r} is not in the library; it holds {self.names} (library {str(self.root)!r})")
        return self._entries[name]

    def _describe_base(self) -> str:
        return f"{self.index['base'].get('model')!r} (fingerprint {self.base_fingerprint}, library {str(self.root)!r})"

    @property
    def _planning_model(self) -> nn.Module:
        if self._planning is None:
            self.model  # noqa: B018 - raises: opened without base=
        assert self._planning is not None
        return self._planning

    def _read(self, name: str) -> tuple[LoadPlan, dict[str, Any], str]:
        """``(load plan, metadata, layout)`` of adapter entry ``name``, read and validated by io
        (:func:`~lightning_peft.io.read_adapter`, :func:`~lightning_peft.io_checks.plan_load`)
        before anything is changed."""
        if name in self._cache:
            return self._cache[name]
        entry = self._entry(name)
        path = library_path(self.root, entry["file"], f"entry {name!r}")
        found = self._plan(path)
        if self.cache:
            self._cache[name] = found
        return found

    def _plan(self, path: Path) -> tuple[LoadPlan, dict[str, Any], str]:
        meta, tensors, extra = read_adapter(path)
        where = f"base of library {str(self.root)} (fingerprint {self.base_fingerprint})"
        # a library holds adapters of one base: no strict_base=False to suggest
        plan = plan_load(self._planning_model, str(path / WEIGHTS_NAME), meta, tensors, extra, True, lambda _: where, base_lift=None)
        return plan, meta, layout_key(meta)

    # ------------------------------------------------------------------ add
    def add(self, name: str, source: str | os.PathLike[str] | nn.Module, overwrite: bool = False) -> dict[str, Any]:
        """Store an adapter as entry ``name`` and return its index entry.

        ``source``: an export directory (:func:`~lightning_peft.io.save_adapter`,
        ``AdapterCallback(export_dir=...)``) or a live adapted model (its current adapter is
        exported). Refused, with nothing written and the live model unchanged: a name already
        present (unless ``overwrite``), an adapter made for another base (fingerprints named),
        modules or shapes that do not fit, merged adapters, damaged files, and overwriting an
        adapter that combination entries use.
        """
        self._check_new_name(name, overwrite)
        self._check_not_used(name, "overwrite")
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if not path.is_dir():
                raise FileNotFoundError(f"adapter source {str(path)!r} is not an export directory (save_adapter / AdapterCallback export)")
            plan, meta, layout = self._plan(path)  # validates everything against this library's base
            return self._install(name, path, (plan, meta, layout))
        if not isinstance(source, nn.Module):
            raise TypeError(f"source must be an adapter export directory or an adapted nn.Module, got {type(source).__name__}")
        self._check_source_model(source)
        with tempfile.TemporaryDirectory(prefix=".staging-", dir=self.root) as tmp:
            staged = save_adapter(source, Path(tmp) / "export")
            found = self._plan(staged)
            return self._install(name, staged, found)

    def _check_new_name(self, name: Any, overwrite: bool) -> None:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"an entry name must be a non-empty string, got {name!r}")
        if not isinstance(overwrite, bool):
            raise TypeError(f"overwrite must be a bool, got {overwrite!r}")
        if name in self._entries and not overwrite:
            raise ValueError(f"{name!r} is already in the library {str(self.root)!r}; pass overwrite=True to replace it")

    def _users(self, name: str) -> list[str]:
        return sorted(c for c, e in self._entries.items() if e.get("type", "adapter") == "combination" and name in e["weights"])

    def _check_not_used(self, name: str, action: str) -> None:
        users = self._users(name)
        if users:
            raise ValueError(f"cannot {action} {name!r}: combination entries {users} use it; remove them first")

    def _check_source_model(self, source: nn.Module) -> None:
        """An adapted, unmerged model whose frozen modules are this library's base (by the
        per-module fingerprints): refused by name otherwise."""
        if adapter_record(source) is None:
            raise ValueError(
                f"{type(source).__name__} has no adapter: apply_adapter (or AdapterCallback) first, or pass an export directory"
            )
        layers = adapter_layers(source)
        merged = [n for n, m in layers.items() if m.merged]
        if merged:
            raise ValueError(f"adapters of {merged[:3]} are merged into the base: unmerge_adapter(model) first")
        ours = self.index["base"]["modules"]
        theirs = module_fingerprints(source)
        trained = {n for n, m in source.named_modules() if any(p.requires_grad for p in m.parameters(recurse=False))}
        foreign = [n for n in theirs if n not in ours]
        differ = [n for n, fp in theirs.items() if n in ours and fp != ours[n] and n not in trained]
        if foreign or differ:
            what = (
                f"it has modules the base lacks ({foreign[:4]})" if foreign else f"its frozen modules {differ[:4]} differ from the base's"
            )
            raise ValueError(
                f"this adapter was made for another base (fingerprint {combine_fingerprints(theirs)}), not this library's "
                f"base {self._describe_base()}: {what}. Train the adapter on the library's base."
            )

    def _install(self, name: str, path: Path, found: tuple[LoadPlan, dict[str, Any], str]) -> dict[str, Any]:
        """Copy the checked export at ``path`` into the library and index it."""
        plan, meta, _ = found
        rel = f"{ADAPTER_DIR}/{slug(name)}"
        dest = library_path(self.root, rel, f"entry {name!r}")
        _, tensors, extra = read_adapter(path)
        stored = list(tensors.values()) + list(extra.values())
        factors, problems = entry_factors(name, plan, meta)
        if dest.resolve() != path.resolve():
            install_dir(path, dest)
        entry = {
            "type": "adapter",
            "file": rel,
            "kind": kind_of(meta),
            "tensor_bytes": tensor_bytes(stored),
            "file_bytes": export_bytes(dest),
            "num_values": int(sum(t.numel() for t in stored)),
            "ranks": ranks(meta),
            "targets": sorted(meta["targets"]),
            "lora": not problems,
        }
        self._entries[name] = entry
        self._write_index()
        self._cache.pop(name, None)
        if self.active == name:
            self.activate(name)  # the live model shows the new version
        return entry

    # ------------------------------------------------------------------ combinations
    def _lora_only(self, name: str) -> Factors:
        """An adapter entry's factors, refused by name unless it is pure LoRA."""
        entry = self._entry(name)
        if entry.get("type", "adapter") != "adapter":
            raise ValueError(f"{name!r} is a combination entry; combinations and mixed batches are made of adapter entries")
        plan, meta, _ = self._read(name)
        factors, problems = entry_factors(name, plan, meta)
        if problems:
            raise ValueError(f"adapter entry {name!r} is not a plain LoRA adapter: {'; '.join(problems)}")
        return factors

    def _parts(self, names: Iterable[str]) -> dict[str, Factors]:
        """Factors of adapter entries that adapt the same modules with the same shapes; refused
        naming the entries and the modules that differ."""
        parts = {n: self._lora_only(n) for n in names}
        first = next(iter(parts))
        for n, f in parts.items():
            if set(f) != set(parts[first]):
                only_first, only_n = sorted(set(parts[first]) - set(f)), sorted(set(f) - set(parts[first]))
                raise ValueError(
                    f"adapter entries {first!r} and {n!r} adapt different modules (only {first!r}: {only_first[:4]}; "
                    f"only {n!r}: {only_n[:4]}): combinations need adapters with the same targets"
                )
        return parts

    def _combination(self, weights: Any) -> tuple[dict[str, dict[str, float]], Factors]:
        if not isinstance(weights, Mapping) or not weights:
            raise ValueError(f"weights must be a non-empty mapping {{adapter entry: weight or {{module: weight}}}}, got {weights!r}")
        for n in weights:
            self._entry(n)
        parts = self._parts(weights)
        normal = normalise_weights(weights, parts)
        return normal, combine_factors(parts, normal)

    def add_combination(self, name: str, weights: Mapping[str, float | Mapping[str, float]], overwrite: bool = False) -> dict[str, Any]:
        """Store entry ``name`` as coefficients over existing LoRA adapter entries: ``{entry: w}``
        or per module ``{entry: {module: w}}`` (absent modules weigh 0). Its update is exactly
        ``sum_i w_i s_i B_i A_i`` per module, run as one LoRA layer of rank ``sum_i r_i``
        (:mod:`lightning_peft.library.factors`). Refused before anything is written: unknown
        entries, entries that are not pure LoRA or adapt different modules, a name in use."""
        self._check_new_name(name, overwrite)
        if name in weights:
            raise ValueError(f"combination {name!r} cannot use itself")
        if name in self._entries and self._entries[name].get("type", "adapter") == "adapter":
            self._check_not_used(name, "overwrite")
        normal, factors = self._combination(weights)
        entry = {
            "type": "combination",
            "kind": "lora",
            "weights": normal,
            "ranks": {m: int(a.shape[0]) for m, (a, _, _) in factors.items()},
            "targets": sorted(factors),
            "tensor_bytes": COEFFICIENT_BYTES * sum(len(w) for w in normal.values()),
            "file_bytes": 0,
        }
        previous = self._entries.get(name)
        self._entries[name] = entry
        self._write_index()
        self._cache.pop(name, None)
        if previous is not None and previous.get("type", "adapter") == "adapter":
            self._remove_files(name, previous)
        if self.active == name:
            self.activate(name)
        return entry

    def lora_factors(self, name: str) -> dict[str, tuple[Tensor, Tensor, float]]:
        """``{module name of the plain base: (A [r, d_in], B [d_out, r], scale)}`` of a LoRA
        adapter entry, or of a combination entry (its exact factors, scale 1)."""
        entry = self._entry(name)
        if entry.get("type", "adapter") == "combination":
            return self._combination(entry["weights"])[1]
        return self._lora_only(name)

    # ------------------------------------------------------------------ activate
    def activate(self, name: str, merge: bool = False) -> nn.Module:
        """Load entry ``name`` (an adapter or a combination) into the live model and return it
        (frozen; put in eval mode when a layout is injected). With the layout of the active entry this copies the entry's
        tensors into the existing layers in place (and restores base tensors the previous entry
        had changed); another layout is injected first. ``merge=True`` folds the adapter into
        the base weights afterwards (undone by the next activate/deactivate)."""
        entry = self._entry(name)
        if entry.get("type", "adapter") == "combination":
            self._activate_factors(self._combination(entry["weights"])[1])
        else:
            plan, meta, layout = self._read(name)
            self._load(plan.state, layout, lambda model: inject_plan(model, plan, meta))
        self.active = name
        return self._finish(merge)

    def combine(self, weights: Mapping[str, float | Mapping[str, float]], merge: bool = False) -> nn.Module:
        """Activate an unsaved combination (see :meth:`add_combination`); ``active`` is ``None``."""
        self._activate_factors(self._combination(weights)[1])
        self.active = None
        return self._finish(merge)

    def _activate_factors(self, factors: Factors) -> None:
        module_ranks = {m: int(a.shape[0]) for m, (a, _, _) in factors.items()}
        planning = dict(self._planning_model.named_modules())
        not_linear = [m for m in module_ranks if not isinstance(planning.get(m), nn.Linear)]
        if not_linear:
            raise ValueError(f"combinations run on nn.Linear layers; {not_linear[:4]} are not nn.Linear modules of this base")
        tensors = {}
        for m, (a, b, _) in factors.items():
            tensors[f"{m}.lora_A.weight"], tensors[f"{m}.lora_B.weight"] = a, b
        layout = json.dumps({"combination": module_ranks}, sort_keys=True)
        self._load(tensors, layout, lambda model: inject_lora_ranks(model, module_ranks))

    def _load(self, tensors: Mapping[str, Tensor], layout: str, inject: Any) -> None:
        model = self.model
        if self.merged:
            unmerge_adapter(model)
            self.merged = False
        if self._plain_state is None:  # the planning copy never changes structure: its keys once
            self._plain_state = dict(self._planning_model.state_dict(keep_vars=True))
        plain = self._plain_state
        overridden = {k for k in tensors if k in plain}
        with torch.no_grad():
            for key in overridden - set(self._base_values):
                self._base_values[key] = plain[key].detach().clone()  # still the base's value: saved before any change
            if layout != self._layout:
                strip_adapters(model)
                self._layout, self._live = None, {}
                self._restore(self._overridden)
                self._overridden = set()
                inject(model)
                self._layout = layout
            # the live tensors of this layout, looked up once (the same objects until the layout changes)
            targets = {k: self._live[k] if k in self._live else self._live.setdefault(k, lookup(model, k)) for k in tensors}
            self._restore(self._overridden - overridden)  # the previous entry's, not this one's
            for key, value in tensors.items():
                targets[key].copy_(value)
        self._overridden = overridden

    def _restore(self, keys: Iterable[str]) -> None:
        for key in keys:
            lookup(self.model, key).copy_(self._base_values[key])

    def _finish(self, merge: bool) -> nn.Module:
        model = self.model
        if merge and adapter_layers(model):
            merge_adapter(model)
            self.merged = True
        return model

    def deactivate(self) -> nn.Module:
        """Remove every adapter: the live model computes the plain base again."""
        model = self.model
        with torch.no_grad():
            strip_adapters(model)
            self._restore(self._overridden)
        self._layout, self._overridden, self.merged, self.active, self._live = None, set(), False, None, {}
        return model

    # ------------------------------------------------------------------ mixed batches
    @contextlib.contextmanager
    def per_sample(self, adapter_names: Sequence[str | None]) -> Iterator[nn.Module]:
        """Within the block, sample ``n`` of each batch through the live model's LoRA layers uses
        adapter ``adapter_names[n]`` (``None``: the plain base); the batch is dim 0 of each
        layer's input (``[N, ..., d_in]``). The named adapters must be pure LoRA entries (or
        combinations); ranks and targets may differ (a sample's adapter leaves the modules it does
        not adapt as the base's). On exit the previously active entry is back (an unsaved
        :meth:`combine` is not: the plain base is)."""
        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence) or not adapter_names:
            raise ValueError(f"adapter_names must be a non-empty list with one entry name (or None) per sample, got {adapter_names!r}")
        distinct = list(dict.fromkeys(n for n in adapter_names if n is not None))
        for n in distinct:
            self._entry(n)
        factors = {n: self.lora_factors(n) if self._entry(n).get("type", "adapter") == "combination" else None for n in distinct}
        factors.update({n: self._lora_only(n) for n in distinct if factors[n] is None})  # targets may differ
        stacks, slots = mixed_stacks(adapter_names, factors)  # type: ignore[arg-type]
        previous, previous_merged = self.active, self.merged
        if distinct:
            covering = next((n for n in distinct if set(factors[n]) == set(stacks)), None)  # type: ignore[arg-type]
            if covering is not None:
                self.activate(covering)  # LoRA layers on every module the adapters adapt
            else:  # no one entry adapts them all: rank-1 zero layers on the union (slot 0 of the stacks)
                # serve, since in a mixed batch a layer runs the stacks, not its own factors
                self._activate_factors({m: (a[0, :1], b[0, :, :1], 1.0) for m, (a, b) in stacks.items()})
                self.active = None
            live = dict(self.model.named_modules())
            wrong = [m for m in stacks if not isinstance(live.get(m), LoRALinear)]
            if wrong:
                self._back_to(previous, previous_merged)
                raise ValueError(f"per_sample runs on LoRA layers of nn.Linear modules; {wrong[:4]} are not")
            set_mixed(self.model, stacks, slots)
        else:
            self.deactivate()
        try:
            yield self.model
        finally:
            clear_mixed(self.model)
            self._back_to(previous, previous_merged)

    def _back_to(self, previous: str | None, merged: bool) -> None:
        if previous is None:
            self.deactivate()
        else:
            self.activate(previous, merge=merged)

    # ------------------------------------------------------------------ remove
    def remove(self, name: str) -> None:
        """Delete entry ``name``; refused while a combination entry uses it (they are named).
        Removing the active entry leaves the live model on the plain base."""
        entry = self._entry(name)
        self._check_not_used(name, "remove")
        if self.active == name:
            self.deactivate()
        del self._entries[name]
        self._write_index()
        if entry.get("type", "adapter") == "adapter":
            self._remove_files(name, entry)
        self._cache.pop(name, None)

    def _remove_files(self, name: str, entry: Mapping[str, Any]) -> None:
        path = library_path(self.root, entry["file"], f"entry {name!r}")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ report
    def report(self, library_sizes: Iterable[int] = (10, 50)) -> dict[str, Any]:
        """Bytes per entry against a full copy of the base, and library savings (see
        :func:`~lightning_peft.library.report.library_report`)."""
        return library_report(self.index["base"], self._entries, library_sizes)

    def format_report(self) -> str:
        return format_report(self.root, self.report())

    def __repr__(self) -> str:
        return f"AdapterLibrary({str(self.root)!r}, entries={self.names}, active={self.active!r})"
