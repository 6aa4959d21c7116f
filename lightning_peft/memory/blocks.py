"""Block discovery: :func:`find_blocks` finds the repeated blocks of a model.

timm ``blocks``, transformers ``layers``/``layer``/``h``, or a dotted path given by the user.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

__all__ = ["BlockDiscoveryError", "block_candidates", "find_blocks"]


class BlockDiscoveryError(ValueError):
    """No repeated blocks could be found (or a given path does not name a list of blocks)."""


_PREFERRED_NAMES = ("blocks", "layers", "layer", "h", "block", "resblocks")


def block_candidates(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """All ``ModuleList``/``Sequential`` containers: ``(path, container, description)``."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 0:
            classes = [type(child).__name__ for child in module]
            uniq = list(dict.fromkeys(classes))
            desc = f"{len(module)} x {uniq[0]}" if len(uniq) == 1 else f"{', '.join(uniq[:4])}"
            found.append((name, module, desc))
    return found


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _is_repeated(container: nn.Module) -> bool:
    children = list(container)
    if len(children) < 2:
        return False
    first = type(children[0])
    if any(type(c) is not first for c in children):
        return False
    # blocks are composite modules with parameters (not a list of bare Linear/activation layers)
    return all(len(list(c.children())) > 0 and any(True for _ in c.parameters()) for c in children)


def find_blocks(model: nn.Module, paths: str | Iterable[str] | None = None) -> list[tuple[str, nn.Module]]:
    """Find the repeated blocks of ``model``.

    Args:
        model: any module (a LightningModule works: its submodules are searched).
        paths: dotted attribute paths of block lists (``"model.layers"``), or ``None`` to search:
            every ``nn.ModuleList``/``nn.Sequential`` of two or more composite children of one
            class is a candidate; the one holding the most parameters is chosen, plus any other
            candidate outside it with at least a quarter of its parameters (encoder *and*
            decoder stacks). Ties prefer the names ``blocks``, ``layers``, ``layer``, ``h``.

    Returns:
        ``[(path, container), ...]``; the blocks are ``list(container)`` in forward order.

    Raises:
        BlockDiscoveryError: nothing found; the message lists the candidate module lists.
    """
    if paths is not None:
        return _blocks_at_paths(model, [paths] if isinstance(paths, str) else list(paths))
    return _discover_blocks(model)


def _discover_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The search of :func:`find_blocks` (no paths given)."""
    candidates = [(name, mod) for name, mod, _ in block_candidates(model) if _is_repeated(mod)]
    if not candidates:
        raise BlockDiscoveryError(
            f"no repeated blocks found in {type(model).__name__} (looked for an nn.ModuleList/nn.Sequential "
            f"of two or more blocks of one class); candidate module lists: {_describe_candidates(model)}. "
            "Pass blocks='dotted.path.to.list' to choose one."
        )

    def score(item: tuple[str, nn.Module]) -> tuple[int, int, int]:
        name, mod = item
        leaf = name.rsplit(".", 1)[-1]
        return (_numel(mod), int(leaf in _PREFERRED_NAMES), -name.count("."))

    candidates.sort(key=score, reverse=True)
    best_numel = _numel(candidates[0][1])
    chosen: list[tuple[str, nn.Module]] = []
    for name, mod in candidates:
        if chosen and _numel(mod) * 4 < best_numel:
            continue
        if any(_nested(name, other) or _nested(other, name) for other, _ in chosen):
            continue
        chosen.append((name, mod))
    # forward order of the stacks: registration order in the model
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    chosen.sort(key=lambda item: order.get(item[0], 0))
    return chosen


def _nested(inner: str, outer: str) -> bool:
    return outer == "" or inner == outer or inner.startswith(outer + ".")


def _describe_candidates(model: nn.Module) -> str:
    found = block_candidates(model)
    if not found:
        return "none (the model has no nn.ModuleList or nn.Sequential)"
    return ", ".join(f"'{name or '<root>'}' ({desc})" for name, _, desc in found[:12]) + (
        f", ... ({len(found) - 12} more)" if len(found) > 12 else ""
    )


def _blocks_at_paths(model: nn.Module, paths: list[str]) -> list[tuple[str, nn.Module]]:
    """The block lists the user named, each checked to be a non-empty ``ModuleList``/``Sequential``."""
    result = []
    for path in paths:
        try:
            container = model.get_submodule(path)
        except AttributeError as err:
            raise BlockDiscoveryError(
                f"blocks path {path!r} does not exist in {type(model).__name__}; candidate module lists: {_describe_candidates(model)}"
            ) from err
        if not isinstance(container, (nn.ModuleList, nn.Sequential)) or len(container) == 0:
            raise BlockDiscoveryError(
                f"blocks path {path!r} is a {type(container).__name__}, not a non-empty nn.ModuleList/"
                f"nn.Sequential of blocks; candidate module lists: {_describe_candidates(model)}"
            )
        result.append((path, container))
    return result
