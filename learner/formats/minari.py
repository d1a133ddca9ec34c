"""A replay's episodes as a Minari dataset (Gymnasium's offline-RL standard), written with Minari's own
`create_dataset_from_buffers` in its arrow format.

How a replay episode of n steps maps onto a Minari episode of n - 1 transitions: `observations` are the n
recorded observations (the first is the reset's); `actions[t]` is the action chosen at step t (the last
step's never ran, so it is not there); `rewards[t]`, `terminations[t]` and `truncations[t]` are step
t + 1's reward, is_terminal and is_last-without-is_terminal. `infos` carry each step's wall-clock time and
acting policy version (`wall_time`, `policy_version`, n entries like the observations).

Spaces: each observation entry is a Box with the stream's recorded bounds (unbounded where it records none),
in a Dict, except a Gymnasium env's single `vector` entry, which is the plain Box the env has. Actions are
in the environment's form: the index of a one-hot choice (Discrete), or the recorded [-1, 1] vector mapped
onto the action's bounds as the learner maps it when it acts (the vector itself where the bounds are
[-1, 1], as for every simulated task). Images are stored as arrays (exact) unless `jpeg`.

The dataset names its environment (so `dataset.recover_environment()` works) when the recorded task is a
registered Gymnasium id (a simulated task's `sim:reverie/...` or a Gymnasium env's) whose default spaces
are the recorded ones; a replay recorded with other settings (another camera size, no camera) names none,
and the export says so. Only complete episodes are exported, as for LeRobot.
"""

from __future__ import annotations

import os
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.config.tasks import TASKS
from core.layout import ACTION_KEY
from learner.formats import FormatError, require
from learner.formats.lerobot_export import ExportReport, complete_episodes, unrepresentable
from learner.offline.reader import Episode, ReplayDir
from learner.replay.chunk_file import TIME, VERSION

VECTOR = "vector"  # a Gymnasium env's plain Box observation, as learner/envs.py names it
DATASETS_ENV = "MINARI_DATASETS_PATH"
NAMESPACE_FILE = "namespace_metadata.json"  # minari.namespace's


@dataclass
class MinariReport(ExportReport):
    dataset_id: str = ""
    env_id: str | None = None


def default_dataset_id(replay: ReplayDir, episodes: list[Episode]) -> str:
    """`reverie/<env name>/<replay name>-v0`: a run's replay (LOGDIR/replay) is named after its run."""
    directory = replay.directory.resolve()
    name = directory.parent.name if directory.name == "replay" else directory.name
    task = episodes[0].task.split(":")[-1].split("/")[-1]
    env_name = task.rsplit("-v", 1)[0] if "-v" in task else task
    return f"reverie/{_slug(env_name)}/{_slug(name)}-v0"


def _slug(text: str) -> str:
    out = "".join(c if c.isalnum() or c in "_-" else "_" for c in text).strip("_-")
    return out.replace("-v", "_v") or "replay"


def env_id_of(task: str, description: dict[str, Any]) -> str:
    """The Gymnasium id a recorded task names: a robot's task from the task table (a simulated robot
    streaming to serve), else the recorded id itself (train records `sim:reverie/...` or a Gymnasium id)."""
    for name in (task, description.get("task")):
        if name in TASKS and TASKS[name].gym_id:
            return "sim:" + str(TASKS[name].gym_id)
    return task


def _bound(value: Any, default: float, shape: tuple[int, ...]) -> np.ndarray:
    """A recorded bound (`core.describe`: one number or one per element, null where unbounded) as an array."""
    if value is None:
        return np.full(shape, default)
    values = [default if v is None else v for v in (value if isinstance(value, list) else [value])]
    arr = np.asarray(values, np.float64)
    return np.broadcast_to(arr.reshape(shape) if arr.size == int(np.prod(shape)) else arr[:1], shape)


def _box(gym: Any, entry: dict[str, Any] | None, shape: tuple[int, ...], dtype: np.dtype) -> Any:
    """An observation entry's space: images 0..255, anything else within its recorded bounds."""
    if dtype == np.uint8:
        return gym.spaces.Box(0, 255, shape, np.uint8)
    entry = entry or {}
    low, high = _bound(entry.get("low"), -np.inf, shape), _bound(entry.get("high"), np.inf, shape)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        low, high = np.where(np.isfinite(low), low, info.min), np.where(np.isfinite(high), high, info.max)
    return gym.spaces.Box(low.astype(dtype), high.astype(dtype), shape, dtype)


class _Spaces:
    """The dataset's observation and action spaces and the mapping of recorded arrays onto them."""

    def __init__(self, gym: Any, replay: ReplayDir, stream: str) -> None:
        layout = replay.layout
        desc = replay.descriptions.get(stream, {})
        obs_desc = desc.get("observations", {})
        self.keys = replay.observation_keys()
        boxes = {k: _box(gym, obs_desc.get(k), tuple(layout[k].shape), np.dtype(layout[k].dtype)) for k in self.keys}
        self.plain = self.keys == [VECTOR]
        self.observation_space = boxes[VECTOR] if self.plain else gym.spaces.Dict(boxes)
        shape = tuple(layout[ACTION_KEY].shape)
        self.discrete = replay.discrete_actions()
        act = desc.get("action", {})
        if self.discrete:
            self.action_space = gym.spaces.Discrete(shape[0])
            self.low = self.high = None
        else:
            self.low = np.broadcast_to(np.asarray(-1.0 if act.get("low") is None else act["low"], np.float32), shape)
            self.high = np.broadcast_to(np.asarray(1.0 if act.get("high") is None else act["high"], np.float32), shape)
            self.action_space = gym.spaces.Box(self.low, self.high, shape, np.float32)
        self.identity = self.discrete or bool(np.all(self.low == -1.0) and np.all(self.high == 1.0))

    def observations(self, s: dict[str, np.ndarray]) -> Any:
        return s[VECTOR] if self.plain else {k: s[k] for k in self.keys}

    def actions(self, recorded: np.ndarray) -> np.ndarray:
        """Model-form actions in the env's form (the learner's mapping, `core.agents.spaces.ActSpace.to_env`)."""
        if self.discrete:
            return recorded.argmax(-1).astype(np.int64)
        if self.identity:
            return recorded.astype(np.float32)
        a = np.clip(recorded.astype(np.float32), -1.0, 1.0)
        return np.asarray(self.low + (a + 1.0) * 0.5 * (self.high - self.low), np.float32)


def _same_space(a: Any, b: Any) -> bool:
    """Same structure, shapes and dtypes (bounds aside: a recording's are the robot's, an env's its own)."""
    sa, sb = getattr(a, "spaces", None), getattr(b, "spaces", None)
    if sa is not None or sb is not None:
        return sa is not None and sb is not None and set(sa) == set(sb) and all(_same_space(sa[k], sb[k]) for k in sa)
    if type(a) is not type(b):
        return False
    if hasattr(a, "n"):
        return int(a.n) == int(b.n)
    return a.shape == b.shape and a.dtype == b.dtype


def _environment(gym: Any, env_id: str, spaces: _Spaces, report: MinariReport) -> Any:
    """The env the dataset names, made once to compare its spaces with the recorded ones; None (said in the
    report) when it cannot be made or differs."""
    try:
        env = gym.make(env_id)
    except Exception as exc:  # noqa: BLE001 - any reason: the dataset just names no env
        report.notes.append(f"{env_id}: cannot make it ({type(exc).__name__}: {exc}); the dataset names no "
                            "environment")
        return None
    if _same_space(env.observation_space, spaces.observation_space) and _same_space(env.action_space,
                                                                                     spaces.action_space):
        return env
    env.close()
    report.notes.append(f"{env_id}: its default observation or action spaces differ from the recorded ones "
                        "(recorded with other settings); the dataset names no environment")
    return None


@contextmanager
def _datasets_root(path: Path):
    """Minari writes under MINARI_DATASETS_PATH: point it at `path` for the call."""
    old = os.environ.get(DATASETS_ENV)
    os.environ[DATASETS_ENV] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(DATASETS_ENV, None)
        else:
            os.environ[DATASETS_ENV] = old


def export_minari(replay: ReplayDir, episodes: list[Episode], root: Path, *, dataset_id: str | None = None,
                  jpeg: bool = False) -> MinariReport:
    """Write the complete ones of `episodes` as the Minari dataset `dataset_id` under the datasets root `root`
    (what MINARI_DATASETS_PATH names; `minari.load_dataset(dataset_id)` reads it there). The dataset
    directory appears whole or not at all; an existing one is refused."""
    minari = require("minari", "Minari export")
    require("pyarrow", "Minari export")
    import gymnasium as gym
    from minari.data_collector import EpisodeBuffer
    from minari.dataset.minari_dataset import parse_dataset_id

    root = Path(root)
    report = MinariReport(root)
    chosen = complete_episodes(replay, episodes, report)
    short = [ep for ep in chosen if ep.length < 2]
    if short:
        report.skipped["a single step (no transition)"] = len(short)
        chosen = [ep for ep in chosen if ep.length >= 2]
    if not chosen:
        raise FormatError(f"{replay.directory}: no complete episode of two steps or more to export")
    tasks = sorted({ep.task for ep in chosen})
    if len(tasks) > 1:
        raise FormatError(f"{replay.directory}: the episodes are of {len(tasks)} tasks ({', '.join(tasks)}); a Minari "
                          "dataset holds one environment's: export one at a time (--task)")
    dataset_id = dataset_id or default_dataset_id(replay, chosen)
    try:
        namespace = parse_dataset_id(dataset_id)[0]
    except ValueError:
        raise FormatError(f"--dataset-id {dataset_id!r}: expected (namespace/)name-vN, for example "
                          "reverie/ArmReach/reach-v0") from None
    target = root / dataset_id
    if target.exists():
        raise FormatError(f"{target}: the dataset {dataset_id!r} already exists under {root}")
    report.dataset_id = dataset_id
    stream = chosen[0].stream
    spaces = _Spaces(gym, replay, stream)
    env_id = env_id_of(chosen[0].task, replay.descriptions.get(stream, {}))
    env = _environment(gym, env_id, spaces, report)
    report.env_id = env_id if env is not None else None

    buffers, lossy = [], {}
    for number, ep in enumerate(chosen):
        s = replay.steps(ep)
        for why in unrepresentable(s):
            lossy[why] = lossy.get(why, 0) + 1
        terminal, last = s["is_terminal"][1:].astype(bool), s["is_last"][1:].astype(bool)
        buffers.append(EpisodeBuffer(
            id=number, observations=spaces.observations(s), actions=spaces.actions(s[ACTION_KEY][:-1]),
            rewards=s["reward"][1:].astype(np.float64), terminations=terminal, truncations=last & ~terminal,
            infos={"wall_time": s[TIME].astype(np.float64).tolist(),
                   "policy_version": s[VERSION].astype(np.int64).tolist()}))
        report.frames += ep.length - 1
    report.notes += [f"{n} episode(s) had {why}: not representable in Minari transitions (dropped)"
                     for why, n in lossy.items()]
    streams = list(dict.fromkeys(ep.stream for ep in chosen))
    sources = sorted({str(replay.descriptions.get(s, {}).get("source", "")) for s in streams} - {""})
    description = (f"Exported by reverie-replay from {replay.directory.resolve()}: stream(s) {', '.join(streams)}"
                   + (f" ({'; '.join(sources)})" if sources else "") + ". Infos: wall_time (s since the epoch), "
                   "policy_version (the weights version that acted).")

    tmp = root / f".minari-export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with _datasets_root(tmp), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # author, e-mail, permalink: not ours to invent
            minari.create_dataset_from_buffers(
                dataset_id, buffers, env=env, eval_env=None, algorithm_name="reverie-replay export",
                description=description, action_space=spaces.action_space,
                observation_space=spaces.observation_space, data_format="arrow", jpeg_encoding=jpeg)
        parts = [] if namespace is None else namespace.split("/")
        for depth in range(1, len(parts) + 1):  # each namespace level is marked by its metadata file
            level = "/".join(parts[:depth])
            (root / level).mkdir(parents=True, exist_ok=True)
            if not (root / level / NAMESPACE_FILE).exists() and (tmp / level / NAMESPACE_FILE).exists():
                shutil.copy2(tmp / level / NAMESPACE_FILE, root / level / NAMESPACE_FILE)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / dataset_id, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if env is not None:
            env.close()
    report.episodes = len(chosen)
    return report
