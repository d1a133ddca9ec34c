"""A replay's episodes in rerun: each episode under `<stream>/episode_<n>/`, its camera images
(`image/<key>`), proprioception (`obs/<key>`, one series per element, named from the stream's
description), actions and rewards on the `step` timeline (the step within the episode: every episode
starts at 0, so episodes line up) and on `time` (the recorded wall clock).

Numbers go in as columns (`send_columns`, one call per entity), images one per step. A saved `.rrd`
appears whole (written under a temporary name, renamed when the recording is closed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.layout import ACTION_KEY, FLAG_KEYS
from learner.formats import FormatError, require
from learner.offline.plot import element_names
from learner.offline.reader import Episode, ReplayDir
from learner.replay.chunk_file import TIME, VERSION

APP_ID = "reverie-replay"
STEP, WALL = "step", "time"


@dataclass
class ViewReport:
    episodes: int = 0
    steps: int = 0
    images: int = 0


def episode_path(rr: Any, ep: Episode) -> str:
    return f"{rr.escape_entity_path_part(ep.stream)}/episode_{ep.index:05d}"


def log_replay(rec: Any, replay: ReplayDir, episodes: list[Episode], jpeg_quality: int | None = None) -> ViewReport:
    """Log `episodes` of `replay` to the recording stream `rec`."""
    rr = require("rerun", "the rerun viewer")
    report = ViewReport()
    images = replay.image_keys()
    vectors = [k for k in replay.observation_keys() if k not in images]
    for ep in episodes:
        s = replay.steps(ep)
        base = episode_path(rr, ep)
        n = ep.length
        times = [rr.TimeColumn(STEP, sequence=np.arange(n)), rr.TimeColumn(WALL, timestamp=s[TIME])]
        rec.log(base, rr.TextDocument(f"stream {ep.stream!r}, episode {ep.index}, task {ep.task!r}: {n} steps, "
                                      f"return {ep.ret:.4g}, ended {ep.end}, policy versions "
                                      f"{ep.versions[0]}..{ep.versions[1]}"), static=True)
        for key in [*vectors, ACTION_KEY]:
            values = s[key].reshape(n, -1).astype(np.float64)
            path = f"{base}/{'action' if key == ACTION_KEY else 'obs/' + rr.escape_entity_path_part(key)}"
            rec.log(path, rr.SeriesLines(names=element_names(replay, ep.stream, key, values.shape[1])), static=True)
            rec.send_columns(path, indexes=times, columns=rr.Scalars.columns(scalars=values))
        for key in ("reward", *FLAG_KEYS[1:]):
            rec.send_columns(f"{base}/{key}", indexes=times,
                             columns=rr.Scalars.columns(scalars=s[key].astype(np.float64)))
        rec.send_columns(f"{base}/policy_version", indexes=times,
                         columns=rr.Scalars.columns(scalars=s[VERSION].astype(np.float64)))
        for key in images:
            for t in range(n):
                rec.set_time(STEP, sequence=t)
                rec.set_time(WALL, timestamp=float(s[TIME][t]))
                image = rr.Image(s[key][t])
                rec.log(f"{base}/image/{rr.escape_entity_path_part(key)}",
                        image.compress(jpeg_quality=jpeg_quality) if jpeg_quality else image)
                report.images += 1
        rec.reset_time()
        report.episodes += 1
        report.steps += n
    return report


def view(replay: ReplayDir, episodes: list[Episode], *, save: Path | None = None, connect: str | None = None,
         spawn: bool = False, jpeg_quality: int | None = None) -> ViewReport:
    """Write the episodes to `save` (.rrd), or stream them to a viewer at `connect` or a spawned one."""
    rr = require("rerun", "the rerun viewer")
    rec = rr.RecordingStream(APP_ID, recording_id=f"{replay.directory.resolve()}")
    tmp = None
    if save is not None:
        if save.suffix != ".rrd":
            raise FormatError(f"--save {save}: expected a .rrd file")
        save.parent.mkdir(parents=True, exist_ok=True)
        tmp = save.parent / f".{save.name}.tmp-{os.getpid()}"
        rec.save(str(tmp))
    elif connect is not None:
        rec.connect_grpc(connect) if connect else rec.connect_grpc()
    elif spawn:
        rec.spawn()
    try:
        report = log_replay(rec, replay, episodes, jpeg_quality)
        rec.flush()
        rec.disconnect()
        if tmp is not None:
            os.replace(tmp, save)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return report
