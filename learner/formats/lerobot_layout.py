"""The LeRobotDataset v3.0 layout as both directions use it: paths, path templates, default sizes, the
per-frame index columns, and how a replay's keys map onto LeRobot features (`FeatureMap`).

A v3.0 dataset (lerobot's `docs/source/lerobot-dataset-v3.mdx`, `src/lerobot/datasets/utils.py`):

    meta/info.json                              codebase_version "v3.0", fps, features, sizes, path templates
    meta/stats.json                             per feature: min, max, mean, std, count (+ quantiles)
    meta/tasks.parquet                          task (the pandas index) -> task_index
    meta/episodes/chunk-000/file-000.parquet    one row per episode: its rows and video timestamps
    data/chunk-000/file-000.parquet             one row per frame, many episodes per file
    videos/<feature>/chunk-000/file-000.mp4     one camera's frames, many episodes per file

Semantics of a frame (LeRobot's, as `lerobot_eval` records them): the observation, the `action` taken
on it, and its outcome `next.reward`, `next.done`. A replay step holds the observation, the action
chosen on it, and the reward and flags of arriving there; so frame t of an episode takes step t's
observation and action and step t+1's reward and is_last. The episode's last frame (its final
observation, whose action never ran) has `next.reward` 0 and `next.done` true. `next.truncated` says
the episode was cut (a time limit, a vanished robot), not ended by the task, which keeps is_terminal.
`meta/reverie.json` (ignored by LeRobot) records the replay's own layout, streams and descriptions, so
that importing our own export gives back the replay exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.layout import ACTION_KEY, FLAG_KEYS, StepLayout
from learner.formats import FormatError

CODEBASE_VERSION = "v3.0"
CHUNKS_SIZE = 1000  # files per chunk directory
DATA_FILE_MB = 100
VIDEO_FILE_MB = 200
INFO = "meta/info.json"
STATS = "meta/stats.json"
TASKS = "meta/tasks.parquet"
SIDECAR = "meta/reverie.json"
CHUNK_FILE = "chunk-{chunk_index:03d}/file-{file_index:03d}"
EPISODES_PATH = "meta/episodes/" + CHUNK_FILE + ".parquet"
DATA_PATH = "data/" + CHUNK_FILE + ".parquet"
VIDEO_PATH = "videos/{video_key}/" + CHUNK_FILE + ".mp4"
INDEX_FEATURES = {  # every frame's bookkeeping, as lerobot's DEFAULT_FEATURES declares it
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}
REWARD, DONE, TRUNCATED = "next.reward", "next.done", "next.truncated"
WALL_TIME, POLICY_VERSION = "reverie.wall_time", "reverie.policy_version"  # per-step extras of a replay
STATE = "observation.state"
IMAGES = "observation.images."
QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}
SIDECAR_FORMAT = 1


def chunk_file(file_number: int) -> dict[str, int]:
    """The chunk and file index of the n-th file of a kind (CHUNKS_SIZE files per chunk directory)."""
    return {"chunk_index": file_number // CHUNKS_SIZE, "file_index": file_number % CHUNKS_SIZE}


def is_image(shape: tuple[int, ...], dtype: np.dtype) -> bool:
    return len(shape) == 3 and shape[2] == 3 and dtype == np.uint8


@dataclass
class FeatureMap:
    """Which replay key is which LeRobot feature. Float32 vectors join `observation.state` (what LeRobot's
    policies read), in `state` order, as [key, start, stop]; RGB images become `observation.images.<key>`;
    every other observation is `observation.<key>`."""

    layout: StepLayout
    state: list[tuple[str, int, int]] = field(default_factory=list)
    images: dict[str, str] = field(default_factory=dict)  # feature -> key
    others: dict[str, str] = field(default_factory=dict)  # feature -> key

    @staticmethod
    def of(layout: StepLayout) -> FeatureMap:
        fmap = FeatureMap(layout)
        start = 0
        for key, (shape, dtype) in layout.items():
            if key in FLAG_KEYS or key == ACTION_KEY:
                continue
            if is_image(shape, dtype):
                fmap.images[IMAGES + key] = key
            elif len(shape) == 1 and dtype == np.float32:
                fmap.state.append((key, start, start + shape[0]))
                start += shape[0]
            else:
                fmap.others["observation." + key] = key
        return fmap

    def to_json(self) -> dict[str, Any]:
        return {"layout": self.layout.to_wire(), "state": [list(s) for s in self.state], "images": self.images,
                "others": self.others}

    @staticmethod
    def from_json(data: dict[str, Any]) -> FeatureMap:
        return FeatureMap(StepLayout.from_wire(data["layout"]), [tuple(s) for s in data["state"]],  # type: ignore[misc]
                          dict(data["images"]), dict(data["others"]))


def feature_stats(values: np.ndarray, image: bool = False) -> dict[str, Any]:
    """LeRobot's statistics of one feature over frames (axis 0): min, max, mean, std, count and quantiles.
    Images: per channel over every pixel, scaled to [0, 1], shaped (3, 1, 1) as LeRobot stores them."""
    if image:
        x = values.reshape(-1, values.shape[-1]).astype(np.float64) / 255.0
        shape: tuple[int, ...] = (values.shape[-1], 1, 1)
    else:
        x = values.reshape(len(values), -1).astype(np.float64)
        shape = values.shape[1:] or (1,)
    out: dict[str, Any] = {
        "min": x.min(0), "max": x.max(0), "mean": x.mean(0), "std": x.std(0), "count": [int(len(values))]}
    for name, q in QUANTILES.items():
        out[name] = np.quantile(x, q, axis=0)
    return {k: v if k == "count" else np.asarray(v).reshape(shape).tolist() for k, v in out.items()}


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FormatError(f"{path}: missing ({what})") from None
    except (OSError, ValueError) as exc:
        raise FormatError(f"{path}: unreadable {what} ({exc})") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: {what} is not a JSON object")
    return data
