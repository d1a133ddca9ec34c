"""A running `train` or `serve` in rerun: every metrics row's scalars (`metrics/<name>` on the `step`
timeline, the run's own step count), and the pictures the run writes as they appear (evaluation
episodes, the world model's open-loop truth / prediction / error, learning curves: `media.MediaWatch`),
each video's frames on its own `frame` timeline at the step it was made.

`serve` also shows the robots' camera images as their chunks arrive (`RobotCameras`, hooked on the replay's
ingest: `robots/<robot>/<camera>` on the `time` timeline, the robot's clock), at most one image per camera
every IMAGE_EVERY_S seconds of it: a chunk holds many, and the replay keeps every one.

Where it goes (`--rerun [TARGET]` of reverie-learner train|serve; the flag sets REVERIE_RERUN so that
every process of the run sees it): nothing or `save` -> LOGDIR/rerun.rrd; a path ending in .rrd ->
that file; `spawn` -> a new viewer; a URL (rerun+http://...) -> a running viewer.
"""

from __future__ import annotations

import math
import time as _time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from core.layout import ACTION_KEY
from learner.formats import FormatError, require
from learner.viewers.media import Media

RERUN_ENV = "REVERIE_RERUN"
APP_ID = "reverie-learner"
DEFAULT_FILE = "rerun.rrd"
IMAGE_EVERY_S = 0.5  # robot clock between two images of one camera in the viewer (a live view, not the record)


def target_problem(target: str) -> str | None:
    """Why `target` is not a place rerun logging can go, else None."""
    if target in ("", "save", "spawn") or "://" in target or target.endswith(".rrd"):
        return None
    return f"--rerun {target!r}: expected nothing, 'save', 'spawn', a FILE.rrd or a viewer URL (rerun+http://...)"


class RerunSink:
    def __init__(self, target: str, logdir: Path) -> None:
        problem = target_problem(target)
        if problem:
            raise FormatError(problem)
        rr = require("rerun", "--rerun")
        self._rr = rr
        self.rec = rr.RecordingStream(APP_ID, recording_id=str(Path(logdir).resolve()))
        if target == "spawn":
            self.rec.spawn()
        elif "://" in target:
            self.rec.connect_grpc(target)
        else:
            self.path = Path(target) if target.endswith(".rrd") else Path(logdir) / DEFAULT_FILE
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.rec.save(str(self.path))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self.rec.set_time("step", sequence=step)
        for key, value in values.items():
            self.rec.log(f"metrics/{key}", self._rr.Scalars(value))

    def media(self, step: int, media: Media) -> None:
        self.rec.set_time("step", sequence=step)
        for i, frame in enumerate(media.frames):
            if len(media.frames) > 1:
                self.rec.set_time("frame", sequence=i)
            self.rec.log(media.tag, self._rr.Image(frame))
        self.rec.reset_time()

    def close(self) -> None:
        self.rec.flush()
        self.rec.disconnect()


class RobotCameras:
    """The replay ingest's `on_steps_added` hook of `serve --rerun`: each robot's camera images (uint8 H x W x 3
    entries) in rerun as its chunks arrive, rate-limited per robot by the steps' recorded times. Steps older
    than the last one shown (a robot's spool resent after a restart) are not shown again. Runs in the link
    server's thread; rerun's timelines are per thread, so the trainer's `step` timeline is untouched."""

    def __init__(self, sink: RerunSink, every_s: float = IMAGE_EVERY_S) -> None:
        self.sink, self.every_s = sink, every_s
        self.shown: dict[str, float] = {}  # robot -> the recorded time of the last image shown
        self.images = 0

    def __call__(self, robot: str, steps: Mapping[str, np.ndarray], time: np.ndarray | float | None) -> None:
        keys = [k for k, v in steps.items()
                if k != ACTION_KEY and v.ndim == 4 and v.dtype == np.uint8 and v.shape[-1] == 3]
        if not keys:
            return
        n = len(steps[keys[0]])
        times = np.broadcast_to(np.asarray(_time.time() if time is None else time, np.float64), (n,))
        last = self.shown.get(robot, -math.inf)
        rr, rec = self.sink._rr, self.sink.rec
        base = f"robots/{rr.escape_entity_path_part(robot)}"
        for i in range(n):
            if times[i] < last + self.every_s:
                continue
            last = float(times[i])
            rec.set_time("time", timestamp=last)
            for key in keys:
                rec.log(f"{base}/{key}", rr.Image(steps[key][i]))
                self.images += 1
        self.shown[robot] = last
