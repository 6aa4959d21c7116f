"""RL tasks: environment ids, physics variants and a registry of named tasks.

A *task* is a name that resolves to a :class:`TaskSpec`: a gymnasium environment id plus
physics overrides applied to the unwrapped environment after ``gym.make``. Tasks made from the
same environment id with different physics form a *family* of related tasks (same observation
and action spaces, different dynamics) -- the setting in which one base policy plus one small
adapter per task pays off.

Names::

    "CartPole-v1"                       a registered task (the plain gymnasium environment)
    "CartPole-v1/long-pole"             a registered physics variant
    "CartPole-v1?length=1.0&gravity=12" any registered task plus inline physics overrides
    "metaworld/reach-v3"                a Meta-World MT10 task (needs the optional ``metaworld``)

``gymnasium`` and ``metaworld`` are imported lazily: importing this module costs nothing.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = [
    "PHYSICS_PARAMETERS",
    "METAWORLD_MT10",
    "TaskSpec",
    "get_task",
    "make_env",
    "make_vector_env",
    "register_task",
    "registered_tasks",
    "task_family",
    "task_spaces",
]


# --------------------------------------------------------------------------------------------
# Physics parameters per environment: friendly name -> attribute of the unwrapped env.
# Derived quantities (CartPole's total_mass, polemass_length) are recomputed after setting.
# --------------------------------------------------------------------------------------------
PHYSICS_PARAMETERS: dict[str, dict[str, str]] = {
    "CartPole-v1": {
        "gravity": "gravity",
        "masscart": "masscart",
        "masspole": "masspole",
        "length": "length",  # half the pole's length, in metres (gymnasium's convention)
        "force_mag": "force_mag",
    },
    "Pendulum-v1": {"gravity": "g", "mass": "m", "length": "l", "max_speed": "max_speed"},
    "Acrobot-v1": {
        "link_length_1": "LINK_LENGTH_1",
        "link_length_2": "LINK_LENGTH_2",
        "link_mass_1": "LINK_MASS_1",
        "link_mass_2": "LINK_MASS_2",
        "link_com_pos_1": "LINK_COM_POS_1",
        "link_com_pos_2": "LINK_COM_POS_2",
        "link_moi": "LINK_MOI",
    },
    "MountainCarContinuous-v0": {"power": "power"},
}


def _recompute_derived(env_id: str, env: Any) -> None:
    if env_id == "CartPole-v1":
        env.total_mass = env.masspole + env.masscart
        env.polemass_length = env.masspole * env.length


# The ten Meta-World MT10 tasks (Meta-World 3.x names).
METAWORLD_MT10: tuple[str, ...] = (
    "reach-v3",
    "push-v3",
    "pick-place-v3",
    "door-open-v3",
    "drawer-open-v3",
    "drawer-close-v3",
    "button-press-topdown-v3",
    "peg-insert-side-v3",
    "window-open-v3",
    "window-close-v3",
)
_METAWORLD_PREFIX = "metaworld/"


@dataclass(frozen=True)
class TaskSpec:
    """What a task name resolves to.

    Attributes:
        name: the task's name (inline overrides included, in canonical order).
        env_id: the gymnasium id (or the Meta-World environment name for ``suite="metaworld"``).
        physics: overrides, friendly name -> value, applied after ``gym.make``.
        make_kwargs: extra keyword arguments for ``gym.make``.
        description: one line for listings.
        suite: ``"gymnasium"`` or ``"metaworld"``.
    """

    name: str
    env_id: str
    physics: Mapping[str, float] = field(default_factory=dict)
    make_kwargs: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    suite: str = "gymnasium"

    @property
    def family(self) -> str:
        """Tasks of one family share spaces; the family is the environment id."""
        return self.env_id


_REGISTRY: dict[str, TaskSpec] = {}


def _validate_physics(env_id: str, physics: Mapping[str, float], task: str) -> dict[str, float]:
    if not physics:
        return {}
    allowed = PHYSICS_PARAMETERS.get(env_id)
    if allowed is None:
        raise ValueError(
            f"task {task!r}: environment {env_id!r} has no known physics parameters; physics "
            f"variants are supported for {sorted(PHYSICS_PARAMETERS)}"
        )
    out: dict[str, float] = {}
    for key, value in physics.items():
        if key not in allowed:
            raise ValueError(f"task {task!r}: unknown physics parameter {key!r} for {env_id}; known: {sorted(allowed)}")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"task {task!r}: physics parameter {key}={value!r} is not a number") from None
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"task {task!r}: physics parameter {key}={value} must be a positive finite number")
        out[key] = value
    return out


def register_task(
    name: str,
    env_id: str,
    physics: Mapping[str, float] | None = None,
    make_kwargs: Mapping[str, Any] | None = None,
    description: str = "",
    overwrite: bool = False,
) -> TaskSpec:
    """Register a named task (a gymnasium id plus physics overrides).

    Raises ``ValueError`` for a name already taken (unless ``overwrite``), a name containing
    ``?`` (reserved for inline overrides) or an unknown physics parameter.
    """
    if not name or "?" in name:
        raise ValueError(f"task name {name!r} must be non-empty and must not contain '?'")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"task {name!r} is already registered; pass overwrite=True to replace it")
    suite = "metaworld" if name.startswith(_METAWORLD_PREFIX) else "gymnasium"
    spec = TaskSpec(
        name=name,
        env_id=env_id,
        physics=_validate_physics(env_id, physics or {}, name),
        make_kwargs=dict(make_kwargs or {}),
        description=description,
        suite=suite,
    )
    _REGISTRY[name] = spec
    return spec


def registered_tasks(family: str | None = None) -> list[str]:
    """Names of the registered tasks, optionally only those of one environment id."""
    return sorted(n for n, s in _REGISTRY.items() if family is None or s.family == family)


def _unknown_task_error(name: str) -> ValueError:
    names = registered_tasks()
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return ValueError(
        f"unknown RL task {name!r}.{hint} Registered tasks: {', '.join(names)}. "
        "Register a new one with lightning_peft.rl.tasks.register_task(name, env_id, physics), "
        "or add physics overrides inline: 'CartPole-v1?length=1.0'."
    )


def _parse_overrides(name: str, query: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in query.split("&"):
        if not part:
            continue
        if "=" not in part:
            raise ValueError(f"task {name!r}: inline override {part!r} must be 'parameter=value'")
        key, value = part.split("=", 1)
        out[key.strip()] = value.strip()  # type: ignore[assignment]
    return out


def get_task(name: str) -> TaskSpec:
    """Resolve a task name (registered, optionally with ``?param=value&...`` overrides).

    Raises ``ValueError`` listing the registered tasks when the name is unknown.
    """
    if not isinstance(name, str):
        raise TypeError(f"task must be a string, got {type(name).__name__}")
    base, _, query = name.partition("?")
    if base not in _REGISTRY:
        raise _unknown_task_error(base)
    spec = _REGISTRY[base]
    if not query:
        return spec
    overrides = _validate_physics(spec.env_id, _parse_overrides(name, query), name)
    physics = {**spec.physics, **overrides}
    canonical = base + "?" + "&".join(f"{k}={overrides[k]:g}" for k in sorted(overrides))
    return replace(spec, name=canonical, physics=physics)


def task_family(base: str, parameter: str, values: Sequence[float]) -> list[str]:
    """Names of tasks that vary one physics parameter of ``base``: a family of related tasks.

    ``task_family("CartPole-v1", "length", [0.25, 0.5, 1.0])`` ->
    ``["CartPole-v1?length=0.25", "CartPole-v1?length=0.5", "CartPole-v1?length=1"]`` (each
    validated).
    """
    return [get_task(f"{base}?{parameter}={float(v)!r}").name for v in values]


def _make_metaworld(spec: TaskSpec, seed: int | None) -> Any:
    try:
        import metaworld  # noqa: F401  (registers the "Meta-World/..." ids with gymnasium)
    except ImportError:
        raise ImportError(
            f"task {spec.name!r} needs the optional package 'metaworld'; install it with pip install 'lightning-peft[rl]'"
        ) from None
    import gymnasium as gym

    kwargs: dict[str, Any] = {"env_name": spec.env_id, **spec.make_kwargs}
    if seed is not None:
        kwargs["seed"] = int(seed)
    return gym.make("Meta-World/MT1", **kwargs)


def make_env(task: str | TaskSpec, seed: int | None = None) -> Any:
    """Build one gymnasium environment for ``task`` with its physics applied."""
    spec = task if isinstance(task, TaskSpec) else get_task(task)
    if spec.suite == "metaworld":
        return _make_metaworld(spec, seed)
    import gymnasium as gym

    env = gym.make(spec.env_id, **spec.make_kwargs)
    unwrapped = env.unwrapped
    for key, value in spec.physics.items():
        setattr(unwrapped, PHYSICS_PARAMETERS[spec.env_id][key], value)
    _recompute_derived(spec.env_id, unwrapped)
    if seed is not None:
        env.action_space.seed(int(seed))
    return env


def make_vector_env(task: str | TaskSpec, num_envs: int, seed: int | None = None) -> Any:
    """A ``gymnasium.vector.SyncVectorEnv`` of ``num_envs`` copies of ``task``.

    Uses ``AutoresetMode.SAME_STEP``: when a sub-environment finishes, ``step`` returns the
    first observation of the next episode and puts the last one in ``info["final_obs"]``, so a
    truncated episode's final state can be bootstrapped from in GAE.
    """
    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}")
    spec = task if isinstance(task, TaskSpec) else get_task(task)
    import gymnasium as gym

    def factory(i: int) -> Callable[[], Any]:
        return lambda: make_env(spec, None if seed is None else seed + i)

    return gym.vector.SyncVectorEnv(
        [factory(i) for i in range(num_envs)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )


def task_spaces(task: str | TaskSpec) -> tuple[Any, Any]:
    """``(observation_space, action_space)`` of one environment of ``task``."""
    env = make_env(task)
    try:
        return env.observation_space, env.action_space
    finally:
        env.close()


# --------------------------------------------------------------------------------------------
# Built-in registry: the four classic-control environments, physics variants of each (families
# of related tasks), and Meta-World MT10.
# --------------------------------------------------------------------------------------------
def _register_builtins() -> None:
    classic = {
        "CartPole-v1": "balance a pole on a cart (discrete, solved at 475)",
        "Pendulum-v1": "swing up and hold a pendulum (continuous torque)",
        "Acrobot-v1": "swing a two-link arm above a line (discrete torque)",
        "MountainCarContinuous-v0": "drive an underpowered car up a hill (continuous)",
    }
    for env_id, desc in classic.items():
        register_task(env_id, env_id, description=desc)
    variants = [
        ("CartPole-v1/long-pole", "CartPole-v1", {"length": 1.0}, "pole twice as long"),
        ("CartPole-v1/short-pole", "CartPole-v1", {"length": 0.25}, "pole half as long"),
        ("CartPole-v1/heavy-pole", "CartPole-v1", {"masspole": 0.5}, "pole 5x heavier"),
        ("CartPole-v1/heavy-cart", "CartPole-v1", {"masscart": 3.0}, "cart 3x heavier"),
        ("CartPole-v1/weak-push", "CartPole-v1", {"force_mag": 4.0}, "40% of the push force"),
        ("CartPole-v1/high-gravity", "CartPole-v1", {"gravity": 19.6}, "twice Earth's gravity"),
        ("CartPole-v1/moon", "CartPole-v1", {"gravity": 1.62}, "lunar gravity"),
        ("Pendulum-v1/heavy", "Pendulum-v1", {"mass": 1.5}, "pendulum 1.5x heavier"),
        ("Pendulum-v1/long", "Pendulum-v1", {"length": 1.5}, "pendulum 1.5x longer"),
        ("Pendulum-v1/high-gravity", "Pendulum-v1", {"gravity": 14.0}, "gravity 14 m/s^2"),
        ("Pendulum-v1/mars", "Pendulum-v1", {"gravity": 3.7}, "Martian gravity"),
        ("Acrobot-v1/heavy-link", "Acrobot-v1", {"link_mass_2": 2.0}, "second link 2x heavier"),
        ("Acrobot-v1/long-link", "Acrobot-v1", {"link_length_2": 1.5}, "second link 1.5x longer"),
        ("Acrobot-v1/light-link", "Acrobot-v1", {"link_mass_1": 0.5}, "first link half as heavy"),
        ("MountainCarContinuous-v0/strong", "MountainCarContinuous-v0", {"power": 0.003}, "twice the engine power"),
        ("MountainCarContinuous-v0/weak", "MountainCarContinuous-v0", {"power": 0.0012}, "80% of the engine power"),
    ]
    for name, env_id, physics, desc in variants:
        register_task(name, env_id, physics, description=desc)
    for env_name in METAWORLD_MT10:
        register_task(
            _METAWORLD_PREFIX + env_name,
            env_name,
            description=f"Meta-World MT10 task {env_name} (optional dependency metaworld)",
        )


_register_builtins()
