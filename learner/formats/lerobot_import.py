"""A LeRobotDataset v3.0 directory into a new replay directory (npz chunk files), decoding each video
file once, in one forward pass (`video_files.FrameReader`).

Frames map back onto replay steps as `lerobot_layout` describes: step t holds frame t's observation and
action, the reward and flags of arriving there (`next.reward` and `next.done` of frame t-1), and is_first
/ is_last at the episode's ends. A dataset this tool exported carries `meta/reverie.json`, and comes back
exactly (keys, streams, wall-clock times, policy versions, descriptions). Any other v3.0 dataset maps by
name: `observation.images.<cam>` -> `<cam>`, `observation.state` -> `state`, `observation.<x>` -> `<x>`,
`action` -> `action`; it has no reward where it has no `next.reward`, and ends terminal only where its
last frame says `next.done` without `next.truncated`. The output appears whole or not at all.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.describe import FORMAT as DESCRIBE_FORMAT
from core.layout import ACTION_KEY
from learner.formats import FormatError, require
from learner.formats.lerobot_layout import (
    CODEBASE_VERSION,
    DONE,
    IMAGES,
    INFO,
    POLICY_VERSION,
    REWARD,
    SIDECAR,
    SIDECAR_FORMAT,
    STATE,
    TASKS,
    TRUNCATED,
    WALL_TIME,
    FeatureMap,
    read_json,
)
from learner.formats.video_files import FrameReader
from learner.replay import Replay
from learner.replay.describe import write_descriptions

DEFAULT_STREAM = "lerobot"


@dataclass
class ImportReport:
    out: Path
    episodes: int = 0
    steps: int = 0
    streams: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class _Dataset:
    root: Path
    info: dict[str, Any]
    features: dict[str, dict[str, Any]]
    fps: int
    tasks: dict[int, str]
    episodes: list[dict[str, Any]]
    sidecar: dict[str, Any] | None


def _open(root: Path) -> _Dataset:
    pq = require("pyarrow.parquet", "LeRobotDataset import")
    if not root.is_dir():
        raise FormatError(f"{root}: no such directory")
    info = read_json(root / INFO, "LeRobotDataset info")
    version = info.get("codebase_version")
    if version != CODEBASE_VERSION:
        raise FormatError(f"{root / INFO}: codebase_version {version!r}; only LeRobotDataset {CODEBASE_VERSION} is "
                          "read (lerobot's convert_dataset_v21_to_v30 converts a v2.1 dataset)")
    for key in ("fps", "features", "data_path"):
        if key not in info:
            raise FormatError(f"{root / INFO}: missing {key!r}")
    fps = info["fps"]
    if not isinstance(fps, int | float) or fps <= 0:
        raise FormatError(f"{root / INFO}: fps must be a number > 0, got {fps!r}")
    tasks: dict[int, str] = {}
    if (root / TASKS).exists():
        table = _read(pq, root / TASKS)
        if "task_index" not in table.column_names or "task" not in table.column_names:
            raise FormatError(f"{root / TASKS}: expected columns 'task' and 'task_index', got {table.column_names}")
        tasks = dict(zip(table.column("task_index").to_pylist(), table.column("task").to_pylist()))
    files = sorted((root / "meta/episodes").glob("chunk-*/file-*.parquet"))
    if not files:
        raise FormatError(f"{root}: no meta/episodes/chunk-*/file-*.parquet (not a LeRobotDataset v3.0, or empty)")
    episodes = [row for path in files for row in _read(pq, path).to_pylist()]
    for row in episodes:
        missing = [k for k in ("episode_index", "length", "data/chunk_index", "data/file_index") if k not in row]
        if missing:
            raise FormatError(f"{root}/meta/episodes: episode rows lack {missing}")
    episodes.sort(key=lambda r: r["episode_index"])
    sidecar = read_json(root / SIDECAR, "Reverie sidecar") if (root / SIDECAR).exists() else None
    if sidecar is not None and sidecar.get("format") != SIDECAR_FORMAT:
        raise FormatError(f"{root / SIDECAR}: unknown format {sidecar.get('format')!r}")
    return _Dataset(root, info, info["features"], round(fps), tasks, episodes, sidecar)


def _read(pq: Any, path: Path) -> Any:
    try:
        return pq.read_table(str(path))
    except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
        raise FormatError(f"{path}: unreadable parquet file ({exc})") from None


def _key_map(ds: _Dataset) -> FeatureMap:
    """Which feature becomes which replay key: the sidecar's map, else one by feature names."""
    if ds.sidecar is not None:
        return FeatureMap.from_json(ds.sidecar["features"])
    images, others, state = {}, {}, []
    for name, ft in ds.features.items():
        if ft.get("dtype") in ("video", "image"):
            images[name] = _clean(name.removeprefix(IMAGES).removeprefix("observation."))
        elif name == STATE:
            state = [("state", 0, int(np.prod(ft["shape"])))]
        elif name.startswith("observation."):
            others[name] = _clean(name.removeprefix("observation."))
    if "action" not in ds.features:
        raise FormatError(f"{ds.root / INFO}: the dataset has no 'action' feature")
    return FeatureMap(None, state, images, others)  # type: ignore[arg-type]


def _clean(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name) or "obs"


def _episode_rows(pq: Any, ds: _Dataset) -> Iterator[tuple[dict[str, Any], dict[str, np.ndarray]]]:
    """(episode row, its frames' columns as arrays), reading each data file once."""
    cached: tuple[str, dict[str, np.ndarray]] | None = None
    for ep in ds.episodes:
        rel = ds.info["data_path"].format(chunk_index=ep["data/chunk_index"], file_index=ep["data/file_index"])
        if cached is None or cached[0] != rel:
            path = ds.root / rel
            if not path.exists():
                raise FormatError(f"{path}: missing (episode {ep['episode_index']}'s data file)")
            table = _read(pq, path)
            cached = (rel, {name: _as_array(table.column(name)) for name in table.column_names
                            if ds.features.get(name, {}).get("dtype") != "video"})
        cols = cached[1]
        if "episode_index" not in cols:
            raise FormatError(f"{ds.root / rel}: no episode_index column")
        rows = np.flatnonzero(cols["episode_index"] == ep["episode_index"])
        if len(rows) != ep["length"]:
            raise FormatError(f"{ds.root / rel}: episode {ep['episode_index']} has {len(rows)} frames, "
                              f"meta/episodes says {ep['length']}")
        if "frame_index" in cols:
            rows = rows[np.argsort(cols["frame_index"][rows], kind="stable")]
        yield ep, {name: v[rows] for name, v in cols.items()}


def _as_array(column: Any) -> np.ndarray:
    """A parquet column as numpy: scalars as (n,), fixed-size or variable lists stacked as (n, ...),
    image structs as an object array of their PNG/JPEG bytes."""
    import pyarrow as pa

    column = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    if pa.types.is_struct(column.type):
        return np.array(column.field("bytes").to_pylist(), dtype=object)
    if pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type) or \
            pa.types.is_large_list(column.type):
        return np.array(column.to_pylist())
    return column.to_numpy(zero_copy_only=False)


def _decode_image(blob: bytes) -> np.ndarray:
    import imageio.v3 as iio

    image = iio.imread(blob)
    return image[..., :3] if image.ndim == 3 else np.repeat(image[..., None], 3, axis=-1)


def import_lerobot(src: Path, out: Path, *, chunk_length: int = 1024) -> ImportReport:
    """Read the LeRobotDataset v3.0 at `src` into a new replay directory `out` (which must not exist)."""
    pq = require("pyarrow.parquet", "LeRobotDataset import")
    src, out = Path(src), Path(out)
    if out.exists():
        raise FormatError(f"{out}: already exists (the import writes a new replay directory)")
    ds = _open(src)
    fmap = _key_map(ds)
    report = ImportReport(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with Replay(tmp, chunk_length=chunk_length, ram_steps=2 * chunk_length) as replay:
            _fill(pq, ds, fmap, replay, report)
        descriptions = _descriptions(ds, fmap, report.streams)
        if descriptions:
            write_descriptions(tmp, descriptions)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _fill(pq: Any, ds: _Dataset, fmap: FeatureMap, replay: Replay, report: ImportReport) -> None:
    readers: dict[str, FrameReader] = {}
    sidecar_eps = (ds.sidecar or {}).get("episodes") or []
    dropped_rewards = 0
    for n, (ep, cols) in enumerate(_episode_rows(pq, ds)):
        length = int(ep["length"])
        if length == 0:
            continue
        where = f"{ds.root}: episode {ep['episode_index']}"
        steps: dict[str, np.ndarray] = {}
        for feature, key in fmap.images.items():
            if ds.features[feature]["dtype"] == "video":
                steps[key] = _video_frames(ds, ep, feature, length, readers, where)
            else:
                steps[key] = np.stack([_decode_image(b) for b in cols[feature]])
        for key, lo, hi in fmap.state:
            steps[key] = _need(cols, STATE, where)[:, lo:hi].astype(np.float32)
        for feature, key in fmap.others.items():
            steps[key] = _need(cols, feature, where)
        steps[ACTION_KEY] = _need(cols, "action", where)
        if steps[ACTION_KEY].ndim == 1:  # a one-element action is a plain column
            steps[ACTION_KEY] = steps[ACTION_KEY].reshape(length, 1)
        reward = np.zeros(length, np.float32)
        if REWARD in cols:
            reward[1:] = cols[REWARD][:-1].reshape(-1)
            dropped_rewards += bool(fmap.layout is None and cols[REWARD][-1] != 0)
        done = cols[DONE].reshape(-1).astype(bool) if DONE in cols else np.zeros(length, bool)
        truncated = cols[TRUNCATED].reshape(-1).astype(bool) if TRUNCATED in cols else np.zeros(length, bool)
        ends = np.flatnonzero(done)
        terminal = bool(len(ends)) and not truncated[ends[0]]
        steps["reward"] = reward
        steps["is_first"] = np.arange(length) == 0
        steps["is_last"] = np.arange(length) == length - 1
        steps["is_terminal"] = steps["is_last"] & terminal
        if fmap.layout is not None:  # our own export: the exact keys, shapes and dtypes back
            steps = {key: np.asarray(steps[key]).reshape(length, *shape).astype(dtype, copy=False)
                     for key, (shape, dtype) in fmap.layout.items()}
        stream = str(sidecar_eps[n]["stream"]) if n < len(sidecar_eps) else DEFAULT_STREAM
        tasks = ep.get("tasks") or []
        task = tasks[0] if tasks else ds.tasks.get(int(cols["task_index"][0]), "") if "task_index" in cols else ""
        if WALL_TIME in cols:
            times = cols[WALL_TIME].reshape(-1).astype(np.float64)
        else:
            times = cols["index"].reshape(-1).astype(np.float64) / ds.fps if "index" in cols else None
        versions = cols[POLICY_VERSION].reshape(-1) if POLICY_VERSION in cols else 0
        replay.add_steps(steps, stream, task=task, policy_version=versions, time=times)
        report.episodes += 1
        report.steps += length
        if stream not in report.streams:
            report.streams.append(stream)
    if dropped_rewards:
        report.notes.append(f"{dropped_rewards} episode(s) ended with a non-zero next.reward on their last frame: "
                            "a replay step holds the reward of arriving there, and no observation follows it")


def _need(cols: dict[str, np.ndarray], name: str, where: str) -> np.ndarray:
    if name not in cols:
        raise FormatError(f"{where}: its data file has no column {name!r}")
    return cols[name]


def _video_frames(ds: _Dataset, ep: dict[str, Any], feature: str, length: int, readers: dict[str, FrameReader],
                  where: str) -> np.ndarray:
    prefix = f"videos/{feature}/"
    missing = [k for k in ("chunk_index", "file_index", "from_timestamp") if prefix + k not in ep]
    if missing or not ds.info.get("video_path"):
        raise FormatError(f"{where}: no video location for {feature!r} (meta/episodes lacks "
                          f"{[prefix + k for k in missing]} or info.json has no video_path)")
    rel = ds.info["video_path"].format(video_key=feature, chunk_index=ep[prefix + "chunk_index"],
                                       file_index=ep[prefix + "file_index"])
    path = ds.root / rel
    if not path.exists():
        raise FormatError(f"{path}: missing ({where}'s {feature} video)")
    if rel not in readers:
        readers.clear()  # files are read in episode order: one open at a time per feature is enough
        readers[rel] = FrameReader(path, ds.fps)
    first = round(float(ep[prefix + "from_timestamp"]) * ds.fps)
    return readers[rel].read(first, length)


def _descriptions(ds: _Dataset, fmap: FeatureMap, streams: list[str]) -> dict[str, dict[str, Any]]:
    """The streams' descriptions: the sidecar's (our own export), else what the dataset's features say."""
    if ds.sidecar is not None and ds.sidecar.get("descriptions"):
        return {s: d for s, d in ds.sidecar["descriptions"].items() if s in streams}
    observations = {}
    for feature, key in fmap.images.items():
        observations[key] = {"shape": ds.features[feature]["shape"], "dtype": "uint8", "unit": "", "names": [],
                             "low": 0, "high": 255, "description": f"LeRobot feature {feature}"}
    for key, lo, hi in fmap.state:
        names = ds.features[STATE].get("names")
        observations[key] = {"shape": [hi - lo], "dtype": "float32", "unit": "",
                             "names": [str(n) for n in names] if isinstance(names, list) else [],
                             "low": None, "high": None, "description": f"LeRobot feature {STATE}"}
    names = ds.features["action"].get("names")
    action = {"discrete": False, "shape": ds.features["action"].get("shape"), "dtype": "float32", "unit": "",
              "names": [str(n) for n in names] if isinstance(names, list) else [], "low": None, "high": None,
              "description": "LeRobot feature action", "form": "as recorded in the LeRobot dataset"}
    return {s: {"format": DESCRIBE_FORMAT, "task": "", "control_hz": float(ds.fps),
                "source": f"LeRobotDataset {ds.root}", "observations": observations, "action": action,
                "success": None} for s in streams}
