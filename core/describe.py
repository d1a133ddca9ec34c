"""What a stream's arrays mean, as plain JSON: each observation's and the action's names, units and
bounds (from the robot's `ArraySpec`s), the control rate, the task and how its success shows in the
recorded data. The robot sends it in its hello; the learner's replay keeps one per stream
(`learner/replay/describe.py`), so a replay read years later needs no code to explain it.

Both processes use it, so it lives in `core/` (a robot imports nothing from `learner/`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from core.interface import ActionSpec, ArraySpec, DiscreteSpec

FORMAT = 1
MAX_NAMES = 4096  # names per entry a peer may send (a sane upper bound, not a layout limit)
SUCCESS_KINDS = ("terminal", "last_reward_above")
# How actions are stored: the model's form, whatever the robot's own units are.
ACTION_FORM = {
    False: "model form: each value in [-1, 1], mapped linearly onto [low, high] of the robot's action",
    True: "model form: one-hot over the n choices (the index is the robot's action)",
}


def _bound(value: float | np.ndarray, shape: tuple[int, ...]) -> Any:
    """A bound as JSON: one number, or a list per element; +-inf (unbounded) as null."""
    arr = np.asarray(value, np.float64)
    out = [None if not math.isfinite(x) else float(x) for x in np.broadcast_to(arr, shape).reshape(-1)]
    if arr.ndim == 0:
        return out[0] if out else (None if not math.isfinite(float(arr)) else float(arr))
    return out


def array_entry(spec: ArraySpec) -> dict[str, Any]:
    """One observation entry (or a continuous action) as JSON."""
    return {"shape": list(spec.shape), "dtype": spec.dtype.name, "unit": spec.unit, "names": list(spec.names),
            "low": _bound(spec.low, spec.shape), "high": _bound(spec.high, spec.shape),
            "description": spec.description}


def action_entry(spec: ActionSpec) -> dict[str, Any]:
    """The robot's action as JSON, and how the replay stores it (`form`)."""
    if isinstance(spec, DiscreteSpec):
        return {"discrete": True, "n": spec.n, "names": list(spec.names), "form": ACTION_FORM[True]}
    return {"discrete": False, **array_entry(spec), "form": ACTION_FORM[False]}


def describe_specs(observation_spec: Mapping[str, ArraySpec], action_spec: ActionSpec, *, hz: float, task: str,
                   success: dict[str, Any] | None = None, source: str = "") -> dict[str, Any]:
    """A stream's description from the robot's specs (see the module docstring)."""
    return {"format": FORMAT, "task": task, "control_hz": float(hz), "source": source,
            "observations": {key: array_entry(spec) for key, spec in observation_spec.items()},
            "action": action_entry(action_spec), "success": success}


def success_rule(task: str, cfg: Any) -> dict[str, Any] | None:
    """How a task's success shows in recorded steps, where it can (None otherwise): ArmReach succeeds when
    the tool ends within `success_distance` of the marker (its reward is minus that distance); ArmPick when
    the episode ends terminal (every object placed)."""
    if task == "arm_reach":
        d = float(cfg.arm_reach.success_distance)
        return {"kind": "last_reward_above", "threshold": -d,
                "why": f"reward is minus the tool-marker distance (m): success when it ends within {d} m"}
    if task == "arm_pick":
        return {"kind": "terminal", "why": "the episode ends terminal when every object rests in the target bin"}
    return None


def check_description(value: Any, where: str) -> dict[str, Any]:
    """A description received from a peer, checked for the structure readers rely on; ValueError naming
    the field otherwise. Unknown extra fields are kept (a newer robot may send more)."""
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected an object, got {type(value).__name__}")
    obs = value.get("observations", {})
    if not isinstance(obs, dict) or not all(isinstance(k, str) and isinstance(v, dict) for k, v in obs.items()):
        raise ValueError(f"{where}: 'observations' must map names to objects")
    entries = {f"observations.{k}": v for k, v in obs.items()}
    if "action" in value:
        if not isinstance(value["action"], dict):
            raise ValueError(f"{where}: 'action' must be an object")
        entries["action"] = value["action"]
    for name, entry in entries.items():
        names = entry.get("names", [])
        if not isinstance(names, list) or len(names) > MAX_NAMES or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{where}: {name}.names must be a list of at most {MAX_NAMES} strings")
        for key in ("unit", "description"):
            if not isinstance(entry.get(key, ""), str):
                raise ValueError(f"{where}: {name}.{key} must be a string")
    hz = value.get("control_hz")
    if hz is not None and not (isinstance(hz, int | float) and math.isfinite(hz) and hz > 0):
        raise ValueError(f"{where}: control_hz must be a number > 0, got {hz!r}")
    success = value.get("success")
    if success is not None and (not isinstance(success, dict) or success.get("kind") not in SUCCESS_KINDS):
        raise ValueError(f"{where}: success must be null or an object with kind one of {SUCCESS_KINDS}")
    return value
