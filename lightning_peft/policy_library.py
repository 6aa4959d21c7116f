"""A library of specialist policies stored as one base plus one small adapter file per task.

Layout on disk::

    <root>/index.json                    the library: base, tasks, byte counts
    <root>/base.safetensors              the base policy (PPO.save_policy format)
    <root>/adapters/<task>.safetensors   one file per task: the adapter tensors plus any other
                                         tensor the task changed (trained log_std, updated
                                         observation statistics), and in its metadata the
                                         adapter specs and the base fingerprint

``activate(task)`` keeps one live policy whose adapter layers were injected once and copies the
task's tensors into them in place, so switching between tasks of one adapter layout costs time
proportional to the adapter's bytes, not the base's. A different layout (another rank or other
targets) is re-injected first. ``merge=True`` additionally folds the adapter into the base
weights for faster inference (a matmul per adapted layer; undone before the next switch).

Bytes: a LoRA adapter of rank ``r`` on a ``d_in -> d_out`` layer stores ``r (d_in + d_out)``
values against ``d_in d_out + d_out`` for a full copy; for ``N`` policies the library holds
``base + N adapter`` bytes against ``N`` full copies, a saving of ``1 - 1/N - 1/f`` for a
per-policy ratio ``f`` (see ``report()``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.io import adapter_layers, atomic_write_file, merge_adapter, unmerge_adapter

__all__ = ["PolicyLibrary"]

FORMAT = "lightning_peft.policy_library/1"
INDEX_NAME = "index.json"
BASE_NAME = "base.safetensors"
ADAPTER_DIR = "adapters"


def _tensor_bytes(tensors: Iterable[Tensor]) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


def _plain_key(key: str) -> str:
    """State-dict key of an adapted model -> the key of the plain base (drop ``base_layer``)."""
    return key.replace(".base_layer.", ".")


def _slug(task: str) -> str:
    import hashlib

    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", task).strip("_") or "task"
    return f"{safe[:80]}-{hashlib.sha256(task.encode()).hexdigest()[:8]}"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write_file(path, lambda f: f.write(data))


def _atomic_save_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    data = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=metadata)
    _atomic_write_bytes(path, data)


class PolicyLibrary:
    """One base policy plus many task adapters on disk, and one live policy to run them.

    Args:
        root: the library's directory.
        base: when ``root`` holds no library yet, the base to create it from: a
            :class:`~lightning_peft.modules.ppo.PPO` without adapters, or the path of a policy
            file (``PPO.save_policy`` / ``export_path``). When the library exists, an optional
            check: a different base is refused.
        cache: keep task tensors in memory after their first activation (they are small).

    Example::

        lib = PolicyLibrary("runs/library", base="runs/rl_base/policy.safetensors")
        lib.add("CartPole-v1/long-pole", adapted_policy)     # or an AdapterCallback export dir
        policy = lib.activate("CartPole-v1/long-pole")        # a PPO, adapter loaded
        action = policy.predict(obs)
        print(lib.format_report())
    """

    def __init__(self, root: str | os.PathLike[str], base: Any = None, cache: bool = True) -> None:
        self.root = Path(root)
        self.cache = cache
        self._cache: dict[str, tuple[dict[str, Tensor], str]] = {}  # task -> (tensors, layout JSON)
        self._model: Any = None
        self._base_state: dict[str, Tensor] | None = None
        self._layout: str | None = None  # JSON of the injected adapter layout
        self._overridden: set[str] = set()  # non-adapter keys the active task changed
        self.active: str | None = None
        self.merged = False
        index_path = self.root / INDEX_NAME
        if index_path.is_file():
            self.index = _read_index(index_path)
            for what, rel in [("base", self.index["base"]["file"])] + [(f"task {t!r}", e["file"]) for t, e in self.index["tasks"].items()]:
                self._library_path(rel, what)
            if base is not None:
                other = self._base_model_from(base)
                from lightning_peft.modules.ppo import policy_fingerprint

                fp = policy_fingerprint(other.state_dict())
                if fp != self.index["base"]["fingerprint"]:
                    raise ValueError(
                        f"library {str(self.root)!r} was built on base {self.index['base']['fingerprint']} "
                        f"(task {self.index['base']['task']!r}); the base given is {fp} (task "
                        f"{other.hparams['task']!r}). Open it without base=, or use another root."
                    )
        else:
            if base is None:
                raise FileNotFoundError(
                    f"no policy library at {str(self.root)!r} (no {INDEX_NAME}); pass base= (a PPO "
                    "policy or a policy file) to create one"
                )
            self._create(self._base_model_from(base))

    # ------------------------------------------------------------------ creation
    @staticmethod
    def _base_model_from(base: Any) -> Any:
        from lightning_peft.modules.ppo import PPO

        if isinstance(base, (str, os.PathLike)):
            return PPO.from_policy_file(base)
        if isinstance(base, PPO):
            return base
        raise TypeError(f"base must be a PPO policy or the path of a policy file, got {type(base).__name__}")

    def _create(self, model: Any) -> None:
        from lightning_peft.modules.ppo import policy_fingerprint

        self.root.mkdir(parents=True, exist_ok=True)
        base_path = self.root / BASE_NAME
        model.save_policy(base_path)  # refuses a policy with adapters
        state = model.state_dict()
        self.index = {
            "format": FORMAT,
            "base": {
                "file": BASE_NAME,
                "task": str(model.hparams["task"]),
                "fingerprint": policy_fingerprint(state),
                "tensor_bytes": _tensor_bytes(state.values()),
                "file_bytes": base_path.stat().st_size,
                "hparams": json.loads(model.policy_metadata()["hparams"]),
            },
            "tasks": {},
        }
        self._write_index()

    def _write_index(self) -> None:
        _atomic_write_bytes(self.root / INDEX_NAME, json.dumps(self.index, indent=2, sort_keys=True).encode())

    def _library_path(self, rel: Any, what: str) -> Path:
        """``root / rel`` for a ``file`` entry of the index, refused unless it stays inside the
        library root: a relative path without ``..`` that, symlinks resolved, is under root."""
        index = str(self.root / INDEX_NAME)
        if not isinstance(rel, str) or not rel:
            raise ValueError(f"{index!r}: the {what} entry's file {rel!r} is not a path; the index is damaged")
        pure = PurePosixPath(rel.replace("\\", "/"))
        if pure.is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive or ".." in pure.parts:
            raise ValueError(
                f"{index!r}: the {what} entry's file {rel!r} points outside the library {str(self.root)!r}; "
                "library files must be relative paths inside it (the index is damaged or crafted)"
            )
        path = self.root / pure
        root = self.root.resolve()
        resolved = path.resolve()
        if resolved != root and root not in resolved.parents:
            raise ValueError(
                f"{index!r}: the {what} entry's file {rel!r} resolves to {str(resolved)!r}, outside the library "
                f"{str(root)!r} (a symlink?); library files must stay inside it"
            )
        return path

    # ------------------------------------------------------------------ the live policy
    @property
    def base_fingerprint(self) -> str:
        return str(self.index["base"]["fingerprint"])

    @property
    def tasks(self) -> list[str]:
        return sorted(self.index["tasks"])

    def __contains__(self, task: str) -> bool:
        return task in self.index["tasks"]

    def __len__(self) -> int:
        return len(self.index["tasks"])

    @property
    def model(self) -> Any:
        """The live policy (a ``PPO``); whatever task was activated last is loaded in it."""
        if self._model is None:
            from lightning_peft.modules.ppo import PPO

            self._model = PPO.from_policy_file(self.root / BASE_NAME)
            self._model.eval()
            self._model.requires_grad_(False)
            self._base_state = {k: v.detach().clone() for k, v in self._model.state_dict().items()}
        return self._model

    @property
    def base_state(self) -> dict[str, Tensor]:
        self.model  # noqa: B018 - loads it
        assert self._base_state is not None
        return self._base_state

    def _io_fingerprint(self, names: Iterable[str]) -> str:
        """The base fingerprint ``save_adapter`` would record for adapters on ``names``."""
        from lightning_peft.adapters.base import AdapterLayer
        from lightning_peft.targeting import combine_fingerprints, module_fingerprint

        out = {}
        for name in names:
            module = self.model.get_submodule(name)
            if isinstance(module, AdapterLayer):
                out[name] = module.base_fingerprint
            else:
                out[name] = module_fingerprint(self._base_module(name))
        return combine_fingerprints(out)

    def _base_module(self, name: str) -> nn.Module:
        """The base's plain ``nn.Linear`` ``name`` (weights from the base file)."""
        weight = self.base_state.get(f"{name}.weight")
        bias = self.base_state.get(f"{name}.bias")
        if weight is None:
            raise ValueError(f"the library's base has no layer {name!r}")
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    # ------------------------------------------------------------------ add
    def _describe_base(self) -> str:
        b = self.index["base"]
        return f"{b['fingerprint']} (task {b['task']!r}, {str(self.root / b['file'])!r})"

    def add(self, task: str, policy: Any, overwrite: bool = False) -> dict[str, Any]:
        """Store ``policy``'s adapter for ``task`` and return its index entry.

        ``policy`` is a ``PPO`` whose adapters were trained on this library's base (e.g. the
        module after ``trainer.fit`` with ``AdapterCallback``), or a directory exported by
        ``save_adapter`` / ``AdapterCallback(export_dir=...)``. Refused, with nothing written:
        an unknown task, a task whose observation/action shapes do not fit the base, a task
        already present (unless ``overwrite``), an adapter made for a different base (both
        bases are named), merged adapters.
        """
        from lightning_peft.datamodules.rl import check_policy_fits_task
        from lightning_peft.rl_tasks import get_task

        task = get_task(task).name  # unknown -> ValueError listing the registered tasks
        if task in self.index["tasks"] and not overwrite:
            raise ValueError(f"task {task!r} is already in the library; pass overwrite=True to replace it")
        check_policy_fits_task(self.model, task)
        if isinstance(policy, (str, os.PathLike)):
            policy = self._policy_from_export(Path(policy))
        tensors, layout, kind = self._extract(policy)
        adapter_bytes = _tensor_bytes(tensors.values())
        rel = f"{ADAPTER_DIR}/{_slug(task)}.safetensors"
        meta = {
            "format": FORMAT,
            "task": task,
            "base_fingerprint": self.base_fingerprint,
            "layout": layout,
            "kind": kind,
        }
        _atomic_save_safetensors(self._library_path(rel, f"task {task!r}"), tensors, meta)
        entry = {
            "file": rel,
            "kind": kind,
            "tensor_bytes": adapter_bytes,
            "file_bytes": (self.root / rel).stat().st_size,
            "num_values": int(sum(t.numel() for t in tensors.values())),
            "ranks": _ranks(json.loads(layout)),
        }
        self.index["tasks"][task] = entry
        self._write_index()
        self._cache.pop(task, None)
        if self.active == task:
            self.active, self._layout = None, None  # reload on the next activate
        return entry

    def _policy_from_export(self, path: Path) -> Any:
        """A scratch copy of the base with the export at ``path`` loaded (fingerprint-checked)."""
        from lightning_peft.io import load_adapter, read_adapter
        from lightning_peft.modules.ppo import PPO

        meta, _, _ = read_adapter(path)
        targets = [n for n, e in meta.get("targets", {}).items() if "fingerprint" in e]
        modules = dict(self.model.named_modules())
        missing = [n for n in targets if n not in modules]
        if missing:
            raise ValueError(
                f"adapter at {str(path)!r} was made for base {meta.get('base_model')!r} (fingerprint "
                f"{meta.get('base_fingerprint')}), not this library's base {self._describe_base()}: "
                f"it adapts modules the base lacks ({missing[:4]})"
            )
        ours = self._io_fingerprint(targets)
        if targets and ours != meta.get("base_fingerprint"):
            raise ValueError(
                f"adapter at {str(path)!r} was made for base {meta.get('base_model')!r} with fingerprint "
                f"{meta.get('base_fingerprint')}, but this library's base is {self._describe_base()} "
                f"(fingerprint {ours} over the same layers). Train the adapter on this library's base."
            )
        scratch = PPO.from_policy_file(self.root / BASE_NAME)
        load_adapter(scratch, path)
        scratch.base_fingerprint = self.base_fingerprint
        return scratch

    def _extract(self, policy: Any) -> tuple[dict[str, Tensor], str, str]:
        """``(tensors to store, adapter layout JSON, kind)`` of an adapted ``policy``."""
        from lightning_peft.modules.ppo import PPO
        from lightning_peft.targeting import adapter_record

        if not isinstance(policy, PPO):
            raise TypeError(
                f"policy must be a PPO module or an adapter export directory, got {type(policy).__name__}"
            )
        source_fp = getattr(policy, "base_fingerprint", None)
        if source_fp is not None and source_fp != self.base_fingerprint:
            raise ValueError(
                f"this adapter was trained on base {source_fp} ({policy.base_source}), but this library's "
                f"base is {self._describe_base()}. Train the adapter on the library's base "
                f"(model.init_args.base_checkpoint: {str(self.root / BASE_NAME)!r})."
            )
        layers = adapter_layers(policy)
        merged = [n for n, m in layers.items() if m.merged]
        if merged:
            raise ValueError(f"adapters of {merged[:3]} are merged into the base: unmerge_adapter(policy) first")
        trainable = {id(p) for p in policy.parameters() if p.requires_grad}
        base = self.base_state
        tensors: dict[str, Tensor] = {}
        for name, layer in layers.items():
            for key, value in layer.adapter_state_dict().items():
                tensors[f"{name}.{key}"] = value.detach().cpu().clone()
        different_frozen: list[str] = []
        for key, value in policy.state_dict(keep_vars=True).items():
            if key in tensors:  # an adapter tensor
                continue
            plain = _plain_key(key)
            if plain not in base or base[plain].shape != value.shape:
                raise ValueError(
                    f"policy tensor {key!r} {tuple(value.shape)} has no counterpart in this library's base "
                    f"{self._describe_base()}: the policy was built with another architecture"
                )
            if id(value) in trainable:
                if plain != key:
                    raise ValueError(f"{key!r} is a trainable base weight inside an adapter layer; not supported")
                tensors[key] = value.detach().cpu().clone()
            elif not torch.equal(value.detach().cpu(), base[plain]):
                if key.startswith("obs_norm."):  # updated statistics belong to the task
                    tensors[key] = value.detach().cpu().clone()
                else:
                    different_frozen.append(key)
        if different_frozen:
            raise ValueError(
                f"this adapter's frozen base differs from this library's base {self._describe_base()} "
                f"(e.g. {different_frozen[:3]}); it was trained on another base policy"
                + (f" ({policy.base_source})" if getattr(policy, "base_source", None) else "")
                + ". Train the adapter on the library's base."
            )
        found = adapter_record(policy)
        if found is not None and found[0]:
            raise ValueError("adapters must be applied to the PPO module itself, not a submodule of it")
        specs = [s.to_config() for s in found[1].specs] if found else []
        layout = {
            "specs": specs,
            "targets": {n: {"kind": getattr(m.spec, "kind", "adapter"), **m.peft_metadata()} for n, m in sorted(layers.items())},
            "trainable_modules": list(found[1].trainable_modules) if found else [],
        }
        kind = "full" if not layers else "+".join(sorted({t["kind"] for t in layout["targets"].values()}))
        return tensors, json.dumps(layout, sort_keys=True), kind

    def remove(self, task: str) -> None:
        """Delete ``task``'s adapter from the library."""
        entry = self._entry(task)
        path = self._library_path(entry["file"], f"task {task!r}")
        del self.index["tasks"][task]
        self._write_index()
        path.unlink(missing_ok=True)
        self._cache.pop(task, None)
        if self.active == task:
            self.active = None

    # ------------------------------------------------------------------ activate
    def _entry(self, task: str) -> dict[str, Any]:
        if task not in self.index["tasks"]:
            raise ValueError(f"task {task!r} is not in the library; it holds {self.tasks}")
        return self.index["tasks"][task]

    def _read(self, task: str) -> tuple[dict[str, Tensor], str]:
        """``(tensors, layout JSON)`` of ``task``'s file, validated against the live policy
        (specs through the adapter registry, every tensor's name, shape, dtype and finiteness)
        before anything is changed."""
        if task in self._cache:
            return self._cache[task]
        from lightning_peft.safe_load import read_safetensors

        path = self._library_path(self._entry(task)["file"], f"task {task!r}")
        tensors, meta = read_safetensors(path)
        if meta.get("base_fingerprint") != self.base_fingerprint:
            raise ValueError(
                f"{str(path)!r} was written for base {meta.get('base_fingerprint')}, not this library's base "
                f"{self._describe_base()}"
            )
        layout = meta.get("layout")
        if not isinstance(layout, str):
            raise ValueError(f"task file {str(path)!r} is damaged: its metadata has no adapter 'layout'")
        self._check_task(path, tensors, layout)
        if self.cache:
            self._cache[task] = (tensors, layout)
        return tensors, layout

    def _check_task(self, path: Path, tensors: dict[str, Tensor], layout_json: str) -> None:
        """Build ``layout`` on a throwaway copy of the live policy and check that every tensor
        names one of its tensors with the same shape and dtype kind, and is finite."""
        import copy

        scratch = copy.deepcopy(self.model)
        _strip_adapters(scratch)
        _inject_layout(scratch, _parse_layout(layout_json, path), str(path))
        problems = []
        for key, value in tensors.items():
            try:
                like = _lookup(scratch, key)
            except (AttributeError, ValueError):
                problems.append(f"{key!r}: the policy has no such tensor")
                continue
            if tuple(like.shape) != tuple(value.shape):
                problems.append(f"{key!r}: shape {tuple(value.shape)} != policy {tuple(like.shape)}")
            elif like.is_floating_point() != value.is_floating_point() or (value.dtype == torch.bool) != (like.dtype == torch.bool):
                problems.append(f"{key!r}: dtype {value.dtype} does not fit the policy's {like.dtype}")
            elif value.is_floating_point() and not bool(torch.isfinite(value.to(like.dtype)).all()):
                problems.append(f"{key!r}: non-finite values (NaN/inf)")
        adapter_keys = {f"{n}.{k}" for n, m in adapter_layers(scratch).items() for k in m.adapter_state_dict()}
        missing = sorted(adapter_keys - set(tensors))
        if missing:
            problems.append(f"missing adapter tensors {missing[:6]}")
        if problems:
            raise ValueError(f"task file {str(path)!r} is damaged or does not fit this library's base: {'; '.join(problems[:8])}")

    def _strip_adapters(self) -> None:
        _strip_adapters(self.model)
        self._layout = None
        self.merged = False

    def _inject(self, layout_json: str) -> None:
        _inject_layout(self.model, _parse_layout(layout_json, self.root), str(self.root))
        self._layout = layout_json

    def activate(self, task: str, merge: bool = False) -> Any:
        """Load ``task``'s adapter into the live policy and return it (a ``PPO`` in eval mode).

        With the same adapter layout as the active task, this copies the task's tensors into
        the existing adapter parameters (and restores base tensors the previous task had
        changed): time proportional to the adapter's bytes. ``merge=True`` folds the adapter
        into the base weights afterwards (faster inference; undone by the next activate).
        """

        tensors, layout = self._read(task)
        model = self.model
        if self.merged:  # only ever set after merge_adapter found adapter layers
            unmerge_adapter(model)
            self.merged = False
        with torch.no_grad():
            if layout != self._layout:
                self._strip_adapters()
                for key in self._overridden:
                    _lookup(model, key).copy_(self.base_state[key])
                self._overridden = set()
                self._inject(layout)
            targets = {k: _lookup(model, k) for k in tensors}
            overridden = {k for k in tensors if k in self.base_state}
            for key in self._overridden - overridden:  # the previous task's, not this one's
                _lookup(model, key).copy_(self.base_state[key])
            for key, value in tensors.items():
                targets[key].copy_(value)
        self._overridden = overridden
        self.active = task
        if merge and adapter_layers(model):
            merge_adapter(model)
            self.merged = True
        return model

    def activate_base(self) -> Any:
        """Remove every adapter: the live policy is the plain base again."""
        with torch.no_grad():
            self._strip_adapters()
            for key in self._overridden:
                _lookup(self.model, key).copy_(self.base_state[key])
        self._overridden = set()
        self.active = None
        return self.model

    # ------------------------------------------------------------------ report
    def report(self, library_sizes: Iterable[int] = (10, 50)) -> dict[str, Any]:
        """Bytes per policy against a full copy, and library savings.

        ``full_copy_bytes`` = bytes of one standalone policy (the base's tensors: what a fully
        fine-tuned copy stores). Per task: ``tensor_bytes`` (adapter tensors), ``file_bytes``
        (with the safetensors header) and ``ratio`` = full / adapter. ``savings`` = ``1 -
        (base + sum(adapters)) / (N full copies)`` for the tasks held, and ``projected_savings``
        for libraries of ``library_sizes`` policies with this library's mean adapter size.
        """
        full = int(self.index["base"]["tensor_bytes"])
        tasks = self.index["tasks"]
        per = {
            t: {
                "kind": e["kind"],
                "ranks": e.get("ranks", {}),
                "tensor_bytes": e["tensor_bytes"],
                "file_bytes": e["file_bytes"],
                "ratio": full / max(1, e["tensor_bytes"]),
            }
            for t, e in sorted(tasks.items())
        }
        n = len(tasks)
        adapters = sum(e["tensor_bytes"] for e in tasks.values())
        library = full + adapters
        out: dict[str, Any] = {
            "base": dict(self.index["base"], hparams=None),
            "full_copy_bytes": full,
            "policies": per,
            "num_policies": n,
            "library_bytes": library,
            "full_copies_bytes": n * full,
            "savings": (1 - library / (n * full)) if n else None,
        }
        if n:
            mean = adapters / n
            out["mean_adapter_bytes"] = mean
            out["mean_ratio"] = full / max(mean, 1)
            out["projected_savings"] = {int(k): 1 - (full + k * mean) / (k * full) for k in library_sizes}
        return out

    def format_report(self) -> str:
        r = self.report()
        lines = [
            f"policy library {str(self.root)!r}: base {r['base']['task']} ({r['full_copy_bytes']:,} bytes per full copy)",
            f"{'task':<40} {'kind':<6} {'bytes':>10} {'x smaller':>10}",
        ]
        for t, e in r["policies"].items():
            lines.append(f"{t:<40} {e['kind']:<6} {e['tensor_bytes']:>10,} {e['ratio']:>10.1f}")
        if r["num_policies"]:
            lines.append(
                f"{r['num_policies']} policies: {r['library_bytes']:,} bytes vs {r['full_copies_bytes']:,} as full copies "
                f"(saves {100 * r['savings']:.1f}%); projected: "
                + ", ".join(f"{k} policies {100 * v:.1f}%" for k, v in r["projected_savings"].items())
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"PolicyLibrary({str(self.root)!r}, tasks={self.tasks}, active={self.active!r})"


def _lookup(model: nn.Module, key: str) -> Tensor:
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    value = getattr(module, attr, None)
    if not isinstance(value, Tensor):
        raise ValueError(f"{key!r} is not a tensor of the live policy")
    return value


def _ranks(layout: dict[str, Any]) -> dict[str, int]:
    return {n: int(t["rank"]) for n, t in layout.get("targets", {}).items() if "rank" in t}


def _read_index(path: Path) -> dict[str, Any]:
    """The parsed ``index.json``, its structure checked (a damaged index is named, not a
    ``KeyError`` later)."""
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"policy library index {str(path)!r} is damaged (not valid JSON: {error})") from error
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a policy library index (format {FORMAT})")
    base, tasks = index.get("base"), index.get("tasks")
    if not isinstance(base, dict) or not all(isinstance(base.get(k), str) for k in ("file", "fingerprint", "task")):
        raise ValueError(f"policy library index {str(path)!r} is damaged: its 'base' entry lacks file/fingerprint/task")
    if not isinstance(tasks, dict) or not all(isinstance(e, dict) and "file" in e for e in tasks.values()):
        raise ValueError(f"policy library index {str(path)!r} is damaged: every 'tasks' entry needs a 'file'")
    return index


def _parse_layout(layout_json: str, source: Any) -> dict[str, Any]:
    try:
        layout = json.loads(layout_json)
    except json.JSONDecodeError as error:
        raise ValueError(f"{str(source)!r}: the adapter layout is damaged (not valid JSON: {error})") from error
    if (
        not isinstance(layout, dict)
        or not isinstance(layout.get("specs"), list)
        or not isinstance(layout.get("targets"), dict)
        or not all(isinstance(t, dict) and isinstance(t.get("kind"), str) for t in layout["targets"].values())
        or not isinstance(layout.get("trainable_modules"), list)
    ):
        raise ValueError(f"{str(source)!r}: the adapter layout is damaged (needs specs, targets with kinds, trainable_modules)")
    return layout


def _strip_adapters(model: nn.Module) -> None:
    """Put every adapter layer's base back (unmerging first) and freeze ``model``."""
    from lightning_peft.adapters.base import AdapterLayer
    from lightning_peft.targeting import RECORD_ATTRIBUTE

    for name, module in list(model.named_modules()):
        if isinstance(module, AdapterLayer):
            if module.merged:
                module.unmerge()
            model.set_submodule(name, module.base_layer)
    model.__dict__.pop(RECORD_ATTRIBUTE, None)
    model.requires_grad_(False)


def _inject_layout(model: nn.Module, layout: dict[str, Any], source: str) -> None:
    """Inject the adapters ``layout`` describes; specs resolve only through the registry."""
    from lightning_peft.io import spec_from_config
    from lightning_peft.targeting import apply_adapter

    if layout["specs"]:
        specs = [spec_from_config(c, f"{source} (spec {i})") for i, c in enumerate(layout["specs"])]
        names = sorted(layout["targets"])
        specs = [spec.retargeted(own) for spec in specs if (own := [n for n in names if layout["targets"][n]["kind"] == spec.kind])]
        if specs:
            apply_adapter(model, specs, trainable_modules=layout["trainable_modules"], check_gradients=False)  # inference only
    model.eval()
    model.requires_grad_(False)
