"""A library of specialist policies stored as one base plus one small adapter file per task.

Layout on disk (library format 3)::

    <root>/index.json             the library: base, tasks, byte counts
    <root>/base.safetensors       the base policy (PPO.save_policy format)
    <root>/adapters/<task>/       one adapter export per task (lightning_peft.io.save_adapter:
                                  adapter_model.safetensors + adapter_config.json): the adapter
                                  tensors plus any other tensor the task changed (trained log_std,
                                  updated observation statistics), the specs and the base's
                                  per-module fingerprints; read back with io's checks

A thin RL layer on :class:`~lightning_peft.library.AdapterLibrary` (which activates, combines,
runs mixed batches, removes and reports): this class adds the base policy file, task ids, the
task-fits-policy checks and the non-adapter task state (log_std, observation statistics).

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
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_peft.io import adapter_layers, read_adapter, save_adapter
from lightning_peft.library.library import AdapterLibrary
from lightning_peft.library.store import export_bytes, library_path, slug, tensor_bytes
from lightning_peft.rl.library_layout import kind_of, lookup, ranks
from lightning_peft.rl.library_report import format_report, library_report
from lightning_peft.rl.library_store import ADAPTER_DIR, BASE_NAME, FORMAT, INDEX_NAME, read_index, write_json
from lightning_peft.rl.policy_file import module_fingerprints, policy_fingerprint
from lightning_peft.targeting import adapter_record, apply_adapter, combine_fingerprints, refresh_trained_buffers

__all__ = ["PolicyLibrary"]


def _plain_key(key: str) -> str:
    """State-dict key of an adapted model -> the key of the plain base (drop ``base_layer``)."""
    return key.replace(".base_layer.", ".")


class PolicyLibrary(AdapterLibrary):
    """One base policy plus many task adapters on disk, and one live policy to run them.

    Args:
        root: the library's directory.
        base: when ``root`` holds no library yet, the base to create it from: a
            :class:`~lightning_peft.rl.ppo.PPO` without adapters, or the path of a policy
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

    ENTRIES_KEY = "tasks"
    ITEM = "task"

    def __init__(self, root: str | os.PathLike[str], base: Any = None, cache: bool = True) -> None:
        self._init_state(root, None, cache)  # the live policy is loaded from the base file on first use
        self._base_state: dict[str, Tensor] | None = None
        self._base_fingerprints: dict[str, str] = {}  # module -> core fingerprint of the base
        index_path = self.root / INDEX_NAME
        if index_path.is_file():
            self.index = read_index(index_path)
            files = [(f"task {t!r}", e["file"]) for t, e in self.index["tasks"].items() if "file" in e]
            for what, rel in [("base", self.index["base"]["file"]), *files]:
                library_path(self.root, rel, what)
            if base is not None:
                other = self._base_model_from(base)
                fp = policy_fingerprint(other)
                if fp != self.index["base"]["fingerprint"]:
                    raise ValueError(
                        f"library {str(self.root)!r} was built on base {self.index['base']['fingerprint']} "
                        f"(task {self.index['base']['task']!r}); the base given is {fp} (task "
                        f"{other.hparams['task']!r}). Open it without base=, or use another root."
                    )
        else:
            if base is None:
                raise FileNotFoundError(
                    f"no policy library at {str(self.root)!r} (no {INDEX_NAME}); pass base= (a PPO policy or a policy file) to create one"
                )
            self._create(self._base_model_from(base))

    # ------------------------------------------------------------------ creation
    @staticmethod
    def _base_model_from(base: Any) -> Any:
        from lightning_peft.rl.ppo import PPO

        if isinstance(base, (str, os.PathLike)):
            return PPO.from_policy_file(base)
        if isinstance(base, PPO):
            return base
        raise TypeError(f"base must be a PPO policy or the path of a policy file, got {type(base).__name__}")

    def _create(self, model: Any) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        base_path = self.root / BASE_NAME
        model.save_policy(base_path)  # refuses a policy with adapters
        state = model.state_dict()
        self.index = {
            "format": FORMAT,
            "base": {
                "file": BASE_NAME,
                "task": str(model.hparams["task"]),
                "fingerprint": policy_fingerprint(model),
                "tensor_bytes": tensor_bytes(state.values()),
                "file_bytes": base_path.stat().st_size,
                "hparams": json.loads(model.policy_metadata()["hparams"]),
            },
            "tasks": {},
        }
        self._write_index()

    def _write_index(self) -> None:
        write_json(self.root / INDEX_NAME, self.index)

    # ------------------------------------------------------------------ the live policy
    @property
    def tasks(self) -> list[str]:
        return self.names

    @property
    def model(self) -> Any:
        """The live policy (a ``PPO``); whatever task was activated last is loaded in it."""
        if self._model is None:
            from lightning_peft.rl.ppo import PPO

            self._model = PPO.from_policy_file(self.root / BASE_NAME)
            self._model.eval()
            self._model.requires_grad_(False)
            self._planning = PPO.from_policy_file(self.root / BASE_NAME)  # plain, never adapted: io's checks plan against it
            self._base_state = {k: v.detach().clone() for k, v in self._model.state_dict().items()}
            self._base_fingerprints = module_fingerprints(self._model)
        return self._model

    @property
    def base_state(self) -> dict[str, Tensor]:
        self.model  # noqa: B018 - loads it
        assert self._base_state is not None
        return self._base_state

    def _io_fingerprint(self, names: list[str]) -> str:
        """The base fingerprint ``save_adapter`` would record for adapters on ``names`` of this
        library's base (the same per-module scheme as the library's own fingerprint)."""
        self.model  # noqa: B018 - loads the base and its fingerprints
        unknown = [n for n in names if n not in self._base_fingerprints]
        if unknown:
            raise ValueError(f"the library's base has no layer {unknown[0]!r}")
        return combine_fingerprints({n: self._base_fingerprints[n] for n in names})

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
        from lightning_peft.rl.rollout import check_policy_fits_task
        from lightning_peft.rl.tasks import get_task

        task = get_task(task).name  # unknown -> ValueError listing the registered tasks
        if task in self.index["tasks"] and not overwrite:
            raise ValueError(f"task {task!r} is already in the library; pass overwrite=True to replace it")
        check_policy_fits_task(self.model, task)
        if isinstance(policy, (str, os.PathLike)):
            policy = self._policy_from_export(Path(policy))
        tensors = self._extract(policy)
        rel = f"{ADAPTER_DIR}/{slug(task)}"
        path = library_path(self.root, rel, f"task {task!r}")
        save_adapter(self._export_model(policy, tensors), path)
        meta, _, _ = read_adapter(path)
        entry = {
            "file": rel,
            "kind": kind_of(meta),
            "tensor_bytes": tensor_bytes(tensors.values()),
            "file_bytes": export_bytes(path),
            "num_values": int(sum(t.numel() for t in tensors.values())),
            "ranks": ranks(meta),
        }
        self.index["tasks"][task] = entry
        self._write_index()
        self._cache.pop(task, None)
        if self.active == task:
            self.active, self._layout = None, None  # reload on the next activate
        return entry

    def _policy_from_export(self, path: Path) -> Any:
        """A scratch copy of the base with the export at ``path`` loaded (fingerprint-checked)."""
        from lightning_peft.io import load_adapter
        from lightning_peft.rl.ppo import PPO

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

    def _extract(self, policy: Any) -> dict[str, Tensor]:
        """The tensors to store of an adapted ``policy``: its adapter tensors and the other
        tensors its task changed (checked against the library's base)."""
        layers = self._check_source(policy)
        tensors = {
            f"{name}.{key}": value.detach().cpu().clone()
            for name, layer in layers.items()
            for key, value in layer.adapter_state_dict().items()
        }
        tensors.update(self._task_state(policy, set(tensors)))
        return tensors

    def _export_model(self, policy: Any, tensors: dict[str, Tensor]) -> Any:
        """A fresh copy of the library's base with ``policy``'s adapters (pinned to the modules
        they adapt) holding exactly ``tensors``, for :func:`save_adapter`: the export records
        this library's base, and no tensor of another base can slip in."""
        from lightning_peft.rl.ppo import PPO

        found = adapter_record(policy)
        if found is None:
            raise ValueError("this policy has no adapter: apply_adapter (or AdapterCallback) first")
        if found[0]:
            raise ValueError("adapters must be applied to the PPO module itself, not a submodule of it")
        record = found[1]
        specs = [s.retargeted(own) for s in record.specs if (own := [n for n, k in record.targets.items() if k == s.kind])]
        scratch = PPO.from_policy_file(self.root / BASE_NAME)
        apply_adapter(scratch, specs, trainable_modules=list(record.trainable_modules), norm_stats=record.norm_stats, check_gradients=False)
        with torch.no_grad():
            for key, value in tensors.items():
                target = lookup(scratch, key)
                target.copy_(value)
                if isinstance(target, torch.nn.Parameter):
                    target.requires_grad_(True)  # trained: save_adapter keeps it
        refresh_trained_buffers(scratch)  # changed buffers (observation statistics) are trained state
        kept = adapter_record(scratch)[1].trained_buffers  # type: ignore[index]
        buffers, layers = dict(scratch.named_buffers()), tuple(f"{n}." for n in adapter_layers(scratch))
        kept += [k for k in tensors if k in buffers and k not in kept and not k.startswith(layers)]
        return scratch

    def _check_source(self, policy: Any) -> dict[str, Any]:
        """``policy``'s adapter layers, once it is known to be an unmerged ``PPO`` made from this
        library's base (by its recorded base fingerprint, when it has one)."""
        from lightning_peft.rl.ppo import PPO

        if not isinstance(policy, PPO):
            raise TypeError(f"policy must be a PPO module or an adapter export directory, got {type(policy).__name__}")
        if policy.base_fingerprint is not None and policy.base_fingerprint != self.base_fingerprint:
            raise ValueError(
                f"this adapter was trained on base {policy.base_fingerprint} ({policy.base_source}), but this library's "
                f"base is {self._describe_base()}. Train the adapter on the library's base "
                f"(model.init_args.base_checkpoint: {str(self.root / BASE_NAME)!r})."
            )
        layers = adapter_layers(policy)
        merged = [n for n, m in layers.items() if m.merged]
        if merged:
            raise ValueError(f"adapters of {merged[:3]} are merged into the base: unmerge_adapter(policy) first")
        return layers

    def _task_state(self, policy: Any, adapter_keys: set[str]) -> dict[str, Tensor]:
        """The non-adapter tensors ``policy`` trained (e.g. ``log_std``) or updated (observation
        statistics); every other tensor must equal the library's base exactly."""
        trainable = {id(p) for p in policy.parameters() if p.requires_grad}
        base = self.base_state
        tensors: dict[str, Tensor] = {}
        different_frozen: list[str] = []
        for key, value in policy.state_dict(keep_vars=True).items():
            if key in adapter_keys:
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
                + (f" ({policy.base_source})" if policy.base_source else "")
                + ". Train the adapter on the library's base."
            )
        return tensors

    # ------------------------------------------------------------------ activate, remove: AdapterLibrary's
    def activate_base(self) -> Any:
        """Remove every adapter: the live policy is the plain base again (:meth:`deactivate`)."""
        return self.deactivate()

    # ------------------------------------------------------------------ report
    def report(self, library_sizes: Iterable[int] = (10, 50)) -> dict[str, Any]:
        """Bytes per policy against a full copy, and library savings (see :func:`library_report`)."""
        return library_report(self.index, library_sizes)

    def format_report(self) -> str:
        return format_report(self.root, self.report())

    def __repr__(self) -> str:
        return f"PolicyLibrary({str(self.root)!r}, tasks={self.tasks}, active={self.active!r})"
