"""A replay's episodes as a LeRobotDataset v3.0 directory (layout and frame semantics: `lerobot_layout`).

Only complete episodes (seen from their first step to their last) are exported: a LeRobot episode has
no notion of "the data starts mid-way". The output appears whole or not at all (written under a
temporary name, renamed at the end); an existing output is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.layout import ACTION_KEY
from learner.formats import FormatError, require
from learner.formats.lerobot_layout import (
    CHUNKS_SIZE,
    CODEBASE_VERSION,
    DATA_FILE_MB,
    DATA_PATH,
    DONE,
    EPISODES_PATH,
    INDEX_FEATURES,
    INFO,
    POLICY_VERSION,
    REWARD,
    SIDECAR,
    SIDECAR_FORMAT,
    STATE,
    STATS,
    TASKS,
    TRUNCATED,
    VIDEO_FILE_MB,
    VIDEO_PATH,
    WALL_TIME,
    FeatureMap,
    chunk_file,
    feature_stats,
)
from learner.formats.video_files import CODECS, VideoWriter
from learner.offline.reader import Episode, ReplayDir
from learner.replay.chunk_file import TIME, VERSION

IMAGE_MODES = (*CODECS, "png")  # a video codec, or PNG images inside the data files (exact, larger)
STAT_FRAMES = 12  # frames per episode that image statistics are computed from (LeRobot samples too)


@dataclass
class ExportReport:
    out: Path
    episodes: int = 0
    frames: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # why -> episodes not exported
    notes: list[str] = field(default_factory=list)


def control_rate(replay: ReplayDir, episodes: list[Episode], fps: float | None) -> int:
    """The dataset's fps: the one given, else the streams' recorded control rate, else the run's config
    (a run's replay is LOGDIR/replay). LeRobot's fps is an integer: a fractional rate is refused."""
    where = "--fps"
    if fps is None:
        rates = {float(d["control_hz"]) for s, d in replay.descriptions.items()
                 if d.get("control_hz") and any(ep.stream == s for ep in episodes)}
        if len(rates) > 1:
            raise FormatError(f"{replay.directory}: the streams record different control rates {sorted(rates)}; "
                              "export one rate at a time (--stream) or give --fps")
        where = "the streams' control_hz"
        fps = rates.pop() if rates else _config_rate(replay.directory)
        if fps is None:
            raise FormatError(f"{replay.directory}: no control rate is recorded (no streams.json, no run config "
                              "beside it); give --fps")
    if fps <= 0 or abs(fps - round(fps)) > 1e-9:
        raise FormatError(f"{where} {fps}: LeRobotDataset needs a whole number of frames per second")
    return round(fps)


def _config_rate(directory: Path) -> float | None:
    config = directory.parent / "config.yaml"
    if not config.is_file():
        return None
    import yaml

    try:
        return float(yaml.safe_load(config.read_text())["control"]["hz"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


def _column(pa: Any, values: np.ndarray, dims: tuple[int, ...]) -> Any:
    """A per-frame column: scalars for shape (1,) (LeRobot stores those as plain values), fixed-size
    lists (nested for more dimensions) otherwise."""
    arr = pa.array(np.ascontiguousarray(values).reshape(-1))
    for size in reversed(dims if dims != (1,) else ()):
        arr = pa.FixedSizeListArray.from_arrays(arr, size)
    return arr


def _png(image: np.ndarray) -> bytes:
    import imageio.v3 as iio

    return iio.imwrite("<bytes>", image, extension=".png")


class _Files:
    """Files of one kind that roll over to the next file number at `limit_mb` (checked between episodes)."""

    def __init__(self, limit_mb: int, open_file: Callable[[int], Any], size: Callable[[Any], int]) -> None:
        self.limit, self.open_file, self.size = limit_mb * 1_000_000, open_file, size
        self.number, self.current, self.closed = 0, None, []

    def get(self) -> Any:
        if self.current is not None and self.size(self.current) >= self.limit:
            self.closed.append(self.current.close())
            self.current, self.number = None, self.number + 1
        if self.current is None:
            self.current = self.open_file(self.number)
        return self.current

    def close(self) -> list[Any]:
        if self.current is not None:
            self.closed.append(self.current.close())
            self.current = None
        return self.closed


class _DataFile:
    def __init__(self, pq: Any, path: Path, schema: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.writer, self.rows, self.bytes = pq.ParquetWriter(str(path), schema), 0, 0

    def close(self) -> None:
        self.writer.close()


def complete_episodes(replay: ReplayDir, episodes: list[Episode], report: ExportReport) -> list[Episode]:
    """The complete ones of `episodes` (a dataset episode starts at a reset and ends), the others counted in
    `report.skipped` by reason; FormatError when none is."""
    chosen = []
    for ep in episodes:
        if ep.complete:
            chosen.append(ep)
        else:
            why = "abandoned (robot vanished)" if ep.end == "abandoned" else "incomplete (data starts or ends mid-way)"
            report.skipped[why] = report.skipped.get(why, 0) + 1
    if not chosen:
        raise FormatError(f"{replay.directory}: no complete episode to export ({len(episodes)} selected, "
                          f"{sum(report.skipped.values())} incomplete or abandoned)")
    return chosen


def export_lerobot(replay: ReplayDir, episodes: list[Episode], out: Path, *, fps: float | None = None,
                   images: str = "h264") -> ExportReport:
    """Write `episodes` of `replay` as a LeRobotDataset v3.0 directory at `out` (which must not exist)."""
    pa = require("pyarrow", "LeRobotDataset export")
    if images not in IMAGE_MODES:
        raise FormatError(f"--images {images!r}: expected one of {', '.join(IMAGE_MODES)}")
    out = Path(out)
    if out.exists():
        raise FormatError(f"{out}: already exists (the export writes a new directory)")
    report = ExportReport(out)
    chosen = complete_episodes(replay, episodes, report)
    rate = control_rate(replay, chosen, fps)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write(pa, replay, chosen, tmp, rate, images, report)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _features(fmap: FeatureMap, replay: ReplayDir, stream: str, images: str) -> dict[str, dict[str, Any]]:
    from learner.offline.plot import element_names

    layout = fmap.layout
    features: dict[str, dict[str, Any]] = {}
    for feature, key in fmap.images.items():
        h, w, c = layout[key].shape
        features[feature] = {"dtype": "image" if images == "png" else "video", "shape": [h, w, c],
                             "names": ["height", "width", "channels"]}
    if fmap.state:
        names = [name if name.startswith(f"{key}[") else f"{key}.{name}" for key, lo, hi in fmap.state
                 for name in element_names(replay, stream, key, hi - lo)]
        features[STATE] = {"dtype": "float32", "shape": [fmap.state[-1][2]], "names": names}
    for feature, key in fmap.others.items():
        shape, dtype = layout[key]
        features[feature] = {"dtype": dtype.name, "shape": list(shape) or [1], "names": None}
    shape, dtype = layout[ACTION_KEY]
    names = element_names(replay, stream, ACTION_KEY, shape[0]) if len(shape) == 1 else None
    features["action"] = {"dtype": dtype.name, "shape": list(shape) or [1], "names": names}
    features[REWARD] = {"dtype": "float32", "shape": [1], "names": None}
    features[DONE] = {"dtype": "bool", "shape": [1], "names": None}
    features[TRUNCATED] = {"dtype": "bool", "shape": [1], "names": None}
    features[WALL_TIME] = {"dtype": "float64", "shape": [1], "names": None}
    features[POLICY_VERSION] = {"dtype": "int64", "shape": [1], "names": None}
    return {**features, **INDEX_FEATURES}


def _frames(fmap: FeatureMap, s: dict[str, np.ndarray], fps: int, ep_index: int, first: int,
            task_index: int) -> dict[str, np.ndarray]:
    """An episode's per-frame values by feature (images excluded), from its replay steps."""
    n = len(s["reward"])
    nxt = np.arange(1, n + 1).clip(max=n - 1)  # the step each frame's action leads to (the last: itself)
    final = np.arange(n) == n - 1
    done = np.where(final, True, s["is_last"][nxt])
    cols: dict[str, np.ndarray] = {}
    if fmap.state:
        cols[STATE] = np.concatenate([s[key] for key, _, _ in fmap.state], axis=1)
    for feature, key in fmap.others.items():
        cols[feature] = s[key]
    cols["action"] = s[ACTION_KEY]
    cols[REWARD] = np.where(final, 0.0, s["reward"][nxt]).astype(np.float32)
    cols[DONE] = done
    cols[TRUNCATED] = done & ~s["is_terminal"][nxt]  # ended, but not by the task
    cols[WALL_TIME] = s[TIME].astype(np.float64)
    cols[POLICY_VERSION] = s[VERSION].astype(np.int64)
    cols["timestamp"] = (np.arange(n) / fps).astype(np.float32)
    cols["frame_index"] = np.arange(n, dtype=np.int64)
    cols["episode_index"] = np.full(n, ep_index, np.int64)
    cols["index"] = np.arange(first, first + n, dtype=np.int64)
    cols["task_index"] = np.full(n, task_index, np.int64)
    return cols


def unrepresentable(s: dict[str, np.ndarray]) -> list[str]:
    """What of a replay episode a dataset's transitions cannot carry (reward before the first action, a
    terminal flag before the end): said, not silently lost."""
    out = []
    if float(s["reward"][0]) != 0.0:
        out.append("a non-zero reward on the first step")
    if s["is_terminal"][:-1].any():
        out.append("is_terminal before the last step")
    return out


def _write(pa: Any, replay: ReplayDir, episodes: list[Episode], root: Path, fps: int, images: str,
           report: ExportReport) -> None:
    pq = require("pyarrow.parquet", "LeRobotDataset export")
    fmap = FeatureMap.of(replay.layout)
    features = _features(fmap, replay, episodes[0].stream, images)
    tasks = list(dict.fromkeys(ep.task for ep in episodes))
    # Build the data files' schema from the first episode's columns (every episode has the same).
    schema = None
    data = _Files(DATA_FILE_MB, lambda k: _DataFile(pq, root / DATA_PATH.format(**chunk_file(k)), schema),
                  lambda f: f.bytes)
    videos = {} if images == "png" else {
        feature: _Files(VIDEO_FILE_MB, lambda k, feature=feature, key=key: VideoWriter(
            root / VIDEO_PATH.format(video_key=feature, **chunk_file(k)), fps, *replay.layout[key].shape[:2], images),
            lambda w: w.size())
        for feature, key in fmap.images.items()}
    rows: list[dict[str, Any]] = []
    values: dict[str, list[np.ndarray]] = {}
    lossy: dict[str, int] = {}
    total = 0
    for index, ep in enumerate(episodes):
        s = replay.steps(ep)
        for why in unrepresentable(s):
            lossy[why] = lossy.get(why, 0) + 1
        cols = _frames(fmap, s, fps, index, total, tasks.index(ep.task))
        arrays = {name: _column(pa, v, tuple(features[name]["shape"])) for name, v in cols.items()}
        for feature, key in fmap.images.items():
            if images == "png":
                blobs = pa.array([_png(im) for im in s[key]], pa.binary())
                arrays[feature] = pa.StructArray.from_arrays([blobs, pa.nulls(len(blobs), pa.string())],
                                                             ["bytes", "path"])
        order = [name for name in features if name in arrays]
        table = pa.table({name: arrays[name] for name in order})
        if schema is None:
            schema = table.schema
        writer = data.get()
        row: dict[str, Any] = {"episode_index": index, "tasks": [ep.task], "length": ep.length,
                               "data/chunk_index": chunk_file(data.number)["chunk_index"],
                               "data/file_index": chunk_file(data.number)["file_index"],
                               "dataset_from_index": total, "dataset_to_index": total + ep.length}
        writer.writer.write_table(table)  # one row group per episode, as LeRobot writes them
        writer.rows += ep.length
        writer.bytes += table.nbytes
        for feature, key in fmap.images.items():
            if feature in videos:
                video = videos[feature].get()
                start = video.frames
                video.write(s[key])
                place = chunk_file(videos[feature].number)
                row.update({f"videos/{feature}/chunk_index": place["chunk_index"],
                            f"videos/{feature}/file_index": place["file_index"],
                            f"videos/{feature}/from_timestamp": start / fps,
                            f"videos/{feature}/to_timestamp": (start + ep.length) / fps})
        ep_stats = {name: feature_stats(v) for name, v in cols.items()}
        for feature, key in fmap.images.items():
            sample = s[key][np.linspace(0, ep.length - 1, min(STAT_FRAMES, ep.length)).astype(int)]
            ep_stats[feature] = feature_stats(sample, image=True)
            values.setdefault(feature, []).append(sample)
        for name, v in cols.items():
            values.setdefault(name, []).append(v)
        for name, stats in ep_stats.items():
            for stat, v in stats.items():
                row[f"stats/{name}/{stat}"] = v
        row["meta/episodes/chunk_index"], row["meta/episodes/file_index"] = 0, 0
        rows.append(row)
        total += ep.length
    data.close()
    video_info = {feature: files.close()[0] for feature, files in videos.items()}
    for feature, info in video_info.items():
        features[feature]["info"] = info
    stats = {name: feature_stats(np.concatenate(parts), image=name in fmap.images)
             for name, parts in values.items()}
    _write_meta(pa, pq, root, features, tasks, rows, stats, fps, total, fmap, replay, episodes,
                with_videos=bool(videos))
    report.episodes, report.frames = len(episodes), total
    report.notes += [f"{n} episode(s) had {why}: not representable in LeRobot frames (dropped)"
                     for why, n in lossy.items()]


def _write_meta(pa: Any, pq: Any, root: Path, features: dict[str, Any], tasks: list[str],
                rows: list[dict[str, Any]], stats: dict[str, Any], fps: int, total: int, fmap: FeatureMap,
                replay: ReplayDir, episodes: list[Episode], with_videos: bool) -> None:
    meta = root / "meta"
    (meta / "episodes/chunk-000").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), str(root / EPISODES_PATH.format(chunk_index=0, file_index=0)))
    # tasks.parquet is a pandas frame indexed by the task text; the pandas metadata makes it read back so.
    pandas_meta = {
        "index_columns": ["task"], "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode",
                                                        "numpy_type": "object", "metadata": {"encoding": "UTF-8"}}],
        "columns": [{"name": "task_index", "field_name": "task_index", "pandas_type": "int64",
                     "numpy_type": "int64", "metadata": None},
                    {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object",
                     "metadata": None}],
        "creator": {"library": "pyarrow", "version": pa.__version__}, "pandas_version": "2.2.3"}
    task_table = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()), "task": pa.array(tasks)})
    pq.write_table(task_table.replace_schema_metadata({"pandas": json.dumps(pandas_meta)}), str(root / TASKS))
    info = {
        "codebase_version": CODEBASE_VERSION, "robot_type": None, "total_episodes": len(rows),
        "total_frames": total, "total_tasks": len(tasks), "chunks_size": CHUNKS_SIZE,
        "data_files_size_in_mb": DATA_FILE_MB, "video_files_size_in_mb": VIDEO_FILE_MB, "fps": fps,
        "splits": {"train": f"0:{len(rows)}"}, "data_path": DATA_PATH,
        "video_path": VIDEO_PATH if with_videos else None, "features": features,
    }
    (root / INFO).write_text(json.dumps(info, indent=4))
    (root / STATS).write_text(json.dumps(stats, indent=4))
    streams = list(dict.fromkeys(ep.stream for ep in episodes))
    sidecar = {"format": SIDECAR_FORMAT, "source": str(replay.directory.resolve()), "features": fmap.to_json(),
               "episodes": [{"stream": ep.stream, "index": ep.index} for ep in episodes],
               "descriptions": {s: replay.descriptions[s] for s in streams if s in replay.descriptions}}
    (root / SIDECAR).write_text(json.dumps(sidecar, indent=1))
