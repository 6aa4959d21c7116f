"""Parents that read a child's weights instead of calling it.

``nn.MultiheadAttention`` reads ``out_proj.weight`` and its packed q/k/v weights itself, and a
user's module may read ``self.proj.weight`` in its forward (T5 checks ``self.wo.weight.dtype``):
replacing such a child with an adapter layer would be a silent no-op (or an error mid-forward).
``apply_adapter`` uses the two functions here before it changes anything: targets are moved to
the attention module that applies them; a replacement whose parent reads an attribute the layer
lacks takes the layer's reader-serving form (LoRA: its effective weight ``W0 + s B A``) or, where
it has none (DoRA, QLoRA, ...), is refused.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from collections.abc import Sequence

from torch import nn

from lightning_peft.adapters.base import AdapterLayer, AdapterSpec


def redirect_to_weight_readers(model: nn.Module, claimed: dict[str, AdapterSpec], trainable: Sequence[str] = ()) -> dict[str, AdapterSpec]:
    """Targets moved to the ``nn.MultiheadAttention`` that applies them (before any wrap).

    An attention module reads ``out_proj.weight`` and its packed q/k/v weights itself, so:

    * the attention module itself targeted by name: one layer adapts q, k, v and out;
    * its ``out_proj`` targeted by name: only out is adapted (``out_proj`` is wrapped by a layer
      that hands the parent its effective weight);
    * ``out_proj`` picked by ``"all-linear"`` (or the spec's default targets): the attention
      module is adapted instead, q, k, v and out (q/k/v are linear maps too);
    * both targeted: ``out_proj`` is dropped (the attention layer adapts out).

    Raises (before anything changes) when a ``trainable_modules`` entry lies inside an adapted
    attention module, which the adapter layer replaces."""
    modules = dict(model.named_modules())
    out: dict[str, AdapterSpec] = {}
    for name, spec in claimed.items():
        parent_name = name.rpartition(".")[0]
        parent = modules.get(parent_name) if "." in name else None
        is_out_proj = isinstance(parent, nn.MultiheadAttention) and parent.out_proj is modules[name]
        generic = spec.target_modules is None or spec.target_modules == "all-linear"
        if is_out_proj and parent_name in claimed:
            continue
        if is_out_proj and generic and spec.supports(parent):
            out.setdefault(parent_name, spec)
            continue
        out[name] = spec
    for name, module in modules.items():
        if name in out and isinstance(module, nn.MultiheadAttention):
            inside = [t for t in trainable if t.startswith(name + ".")]
            if inside:
                raise ValueError(
                    f"trainable_modules {inside} lie inside {name!r} (nn.MultiheadAttention), which "
                    f"{type(out[name]).__name__} adapts as a whole: drop them from trainable_modules, "
                    f"or exclude {name!r} from the targets"
                )
    return out


@functools.lru_cache(maxsize=256)
def _forward_attribute_reads(cls: type) -> frozenset[tuple[str, ...]]:
    """Every ``self.a.b...`` chain (two names or more) in ``cls.forward`` and the methods of
    ``cls`` it calls (transitively), e.g. ``("proj", "weight")``; empty where the source cannot
    be read. Read from the AST, so comments and strings do not count."""
    chains: set[tuple[str, ...]] = set()
    seen: set[str] = set()
    todo = ["forward"]
    while todo:
        method = todo.pop()
        if method in seen:
            continue
        seen.add(method)
        fn = getattr(cls, method, None)
        if not inspect.isfunction(fn) or fn.__qualname__.split(".")[0] == "Module":  # nn.Module's own methods
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        except (OSError, TypeError, SyntaxError):  # no source (compiled, dynamic, builtin): nothing known
            continue
        for node in ast.walk(tree):
            func = node.func if isinstance(node, ast.Call) else None
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "self":
                todo.append(func.attr)  # self.method(...): follow it
            if isinstance(node, ast.Attribute):
                parts: list[str] = []
                inner: ast.expr = node
                while isinstance(inner, ast.Attribute):
                    parts.append(inner.attr)
                    inner = inner.value
                if isinstance(inner, ast.Name) and inner.id == "self" and len(parts) >= 2:
                    chains.add(tuple(reversed(parts)))
    return frozenset(chains)


def _keep_off_fused_path(module: nn.Module, args: tuple) -> None:
    """A no-op forward pre-hook. ``nn.TransformerEncoderLayer``'s fused inference path
    (``torch._transformer_encoder_layer_fwd``) reads its children's weights directly and is
    skipped when any submodule has a hook: adapter layers inside one carry this hook."""


def _has(layer: nn.Module, attribute: str) -> bool:
    """``hasattr`` that finds a class attribute (a property) without evaluating it."""
    return any(attribute in vars(k) for k in type(layer).__mro__) or hasattr(layer, attribute)


def _unmet_reads(modules: dict[str, nn.Module], name: str, new: nn.Module) -> list[tuple]:
    """``(name, owner, owner type, path, attributes, layer type)`` for every ancestor of ``name``
    whose forward reads attributes of it that ``new`` lacks."""
    parts = name.split(".")
    found = []
    for depth in range(len(parts)):  # every ancestor, the model itself included
        owner_name = ".".join(parts[:depth])
        owner = modules[owner_name]
        if type(owner).forward is nn.TransformerEncoderLayer.forward:
            continue  # reads weights only on its fused path, which the hook in check_weight_readers keeps off
        rel = tuple(parts[depth:])
        chains = _forward_attribute_reads(type(owner))
        read = {chain[len(rel)] for chain in chains if len(chain) > len(rel) and chain[: len(rel)] == rel}
        missing = sorted(attr for attr in read if not _has(new, attr))
        if missing:
            found.append((name, owner_name, type(owner).__name__, ".".join(rel), missing, type(new).__name__))
    return found


def check_weight_readers(model: nn.Module, replacements: dict[str, nn.Module]) -> None:
    """Refuse replacements whose parent reads an attribute of the replaced child that the
    adapter layer lacks (``self.proj.weight`` in ``forward`` instead of ``self.proj(x)``),
    unless the layer has a form that serves it (``AdapterLayer.for_weight_readers``: LoRA
    exposes its effective weight), which then replaces it in ``replacements``. Called once every
    replacement is built and nothing in ``model`` has changed yet; when everything passes, keeps
    torch's fused transformer paths off the adapted blocks."""
    modules = dict(model.named_modules())
    problems = []
    for name in list(replacements):
        found = _unmet_reads(modules, name, replacements[name])
        layer = replacements[name]
        if found and isinstance(layer, AdapterLayer):
            served = layer.for_weight_readers({attr for *_, missing, _ in found for attr in missing})
            if served is not None:
                replacements[name] = served
                found = _unmet_reads(modules, name, served)
        problems += found
    if problems:
        name, owner_name, owner_type, rel, missing, new_type = problems[0]
        reads = ", ".join(f"self.{rel}.{m}" for m in missing)
        names = list(dict.fromkeys(p[0] for p in problems))
        exclude = [name] if len(names) == 1 else sorted({n.rsplit(".", 1)[-1] for n in names})
        more = f" The same holds for {len(names) - 1} more: {names[1:6]}." if len(names) > 1 else ""
        raise ValueError(
            f"cannot adapt {name!r}: its parent {owner_name or '<model>'!r} ({owner_type}) reads {reads} in forward, "
            f"which {new_type} does not have (the parent uses the child's weights itself instead of only calling "
            f"self.{rel}(...)).{more} Exclude it (exclude_modules={exclude!r}), train it fully (trainable_modules=[{name!r}]) "
            "or target the modules the parent calls instead. The model was not changed."
        )
    for name, new in replacements.items():
        parts = name.split(".")
        owners = [modules[".".join(parts[:d])] for d in range(len(parts))]
        if any(isinstance(o, nn.TransformerEncoderLayer) for o in owners):
            new.register_forward_pre_hook(_keep_off_fused_path)
        for owner in owners:
            if isinstance(owner, nn.TransformerEncoder):
                owner.use_nested_tensor = False  # its nested-tensor fast path reads the layers' weights directly
