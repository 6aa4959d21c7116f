"""The layering rule, read from the import graph (every import, module-level or inside a function).

Ranks (imports only go down, or stay within a rank):
0. shared leaves: argument checks, the safe unpickler;
1. rank allocation (``allocation/``: slot and budget maths on tensors, no adapter types);
2. pure-torch adapters (``adapters/``);
3. pure-torch core on top of them: targeting and the report, files (io), memory meters and the
   checkpointing planner/controller, trained buffers, gradient checks, efficiency metrics;
4. Lightning integration: callbacks, strategies, modules, datamodules;
5. the CLI;
6. ``rl/`` (imports the core; the core never imports it).
Ranks 0-3 never import Lightning. Thin compatibility modules that only re-export a moved module
(``policy_library``, ``rl_tasks``, ``modules/ppo``, ``datamodules/rl``, ``checkpointing``) take the
rank of what they re-export, and every module must have a rank (a new file gets one here).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_peft"

RANKS: dict[str, int] = {
    "validation": 0,
    "safe_load": 0,
    "lazy_exports": 0,
    "allocation": 1,
    "lti": 1,
    "adapters": 2,
    **dict.fromkeys(
        [
            "targeting",
            "report",
            "weight_readers",
            "trained_buffers",
            "state_swap",
            "gradient_check",
            "hyperparameters",
            "io",
            "io_checks",
            "shard_record",
            "memory",
            "checkpointing",
            "metrics",
            "hrm_calibration",
            "hrm_budget",
            "nalora_diagnostic",
            "library",
            "continual",
        ],
        3,
    ),
    **dict.fromkeys(["callbacks", "strategies", "modules", "datamodules"], 4),
    **dict.fromkeys(["cli", "cli_errors", "cli_handoff", "cli_merge", "cli_inspect"], 5),
    **dict.fromkeys(["rl", "rl_tasks", "policy_library"], 6),
}
# re-export shims of moved RL modules, ranked as what they point to
SHIMS = {"modules.ppo": 6, "datamodules.rl": 6}
LIGHTNING = ("lightning", "pytorch_lightning")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def rank_of(name: str) -> int | None:
    for shim, rank in SHIMS.items():
        if name == shim or name.startswith(shim + "."):
            return rank
    return RANKS.get(name.split(".")[0])


def imports(path: Path, module: str | None = None) -> set[str]:
    """Absolute names of everything ``path`` (the package module ``module``) imports, relative
    imports resolved."""
    tree = ast.parse(path.read_text())
    package = (module or module_name(path)).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(["lightning_peft", *package[: len(package) - node.level + 1], *([base] if base else [])])
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def test_every_module_has_a_rank() -> None:
    missing = [module_name(p) for p in MODULES if rank_of(module_name(p)) is None]
    assert not missing, f"give these modules a rank in tests/test_layers.py: {missing}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_only_go_down(path: Path) -> None:
    own = rank_of(module_name(path))
    assert own is not None
    upward = upward_imports(imports(path), own)
    assert not upward, f"{module_name(path)} (rank {own}) imports upwards: {sorted(upward)}"


def upward_imports(names: set[str], own: int) -> list[str]:
    upward = []
    for name in names:
        if name.startswith("lightning_peft."):
            target = name.removeprefix("lightning_peft.")
            rank = rank_of(target)
            if rank is not None and rank > own:
                upward.append(f"{name} (rank {rank})")
        elif own <= 3 and name.split(".")[0] in LIGHTNING:
            upward.append(f"{name} (Lightning)")
    return upward


def test_the_rule_catches_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: a pure-torch file importing Lightning or a callback is caught."""
    bad = PACKAGE / "adapters" / "lora.py"
    text = bad.read_text() + "\nfrom lightning_peft.callbacks.adapter import AdapterCallback\nimport lightning\n"
    fake = tmp_path / "lora.py"
    fake.write_text(text)
    found = upward_imports(imports(fake, "adapters.lora"), rank_of("adapters.lora"))
    assert "lightning (Lightning)" in found and any(f.startswith("lightning_peft.callbacks.adapter ") for f in found)
