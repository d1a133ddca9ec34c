"""A running `train` or `serve` in rerun: every metrics row's scalars (`metrics/<name>` on the `step`
timeline, the run's own step count), and the pictures the run writes as they appear (evaluation
episodes, the world model's open-loop truth / prediction / error, learning curves: `media.MediaWatch`),
each video's frames on its own `frame` timeline at the step it was made.

Where it goes (`--rerun [TARGET]` of reverie-learner train|serve; the flag sets REVERIE_RERUN so that
every process of the run sees it): nothing or `save` -> LOGDIR/rerun.rrd; a path ending in .rrd ->
that file; `spawn` -> a new viewer; a URL (rerun+http://...) -> a running viewer.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from learner.formats import FormatError, require
from learner.viewers.media import Media

RERUN_ENV = "REVERIE_RERUN"
APP_ID = "reverie-learner"
DEFAULT_FILE = "rerun.rrd"


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
