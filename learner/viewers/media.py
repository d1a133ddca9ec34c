"""A run's pictures for the metrics writer's sinks: the videos it writes under LOGDIR/videos (evaluation
episodes, the world model's open-loop predictions, dreams) and its learning-curve PNGs, each picked up
once when it appears or changes (`MediaWatch.new`), and TensorBoard's form of a video (an animated GIF in
an image summary, which TensorBoard's Images tab plays; torch's add_video would need moviepy).

Watching the files keeps the producers unchanged: whatever writes a video or a curve shows up in
TensorBoard and rerun without knowing of either.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

VIDEO_SUFFIXES = (".mp4", ".gif")
CURVES = "learning_curve*.png"
MAX_FRAMES = 300  # a longer video is subsampled for TensorBoard and rerun


@dataclass
class Media:
    tag: str  # e.g. "videos/eval", "videos/openloop", "curves/learning_curve"
    frames: np.ndarray  # (T, H, W, 3) uint8; T == 1 for a picture
    fps: float
    path: Path


class MediaWatch:
    """The media files of a log directory not yet handed out. What exists when it is created counts as
    seen (a resumed run does not log its old videos again)."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self._seen: dict[Path, int] = {path: self._stamp(path) for path in self._files()}

    def _files(self) -> list[Path]:
        videos = self.logdir / "videos"
        found = sorted(p for p in videos.iterdir() if p.suffix in VIDEO_SUFFIXES) if videos.is_dir() else []
        return found + sorted(self.logdir.glob(CURVES))

    @staticmethod
    def _stamp(path: Path) -> int:
        try:
            return path.stat().st_mtime_ns
        except OSError:
            return -1

    def new(self) -> Iterator[Media]:
        for path in self._files():
            stamp = self._stamp(path)
            if self._seen.get(path) == stamp or path.name.startswith("."):
                continue
            self._seen[path] = stamp
            try:
                frames, fps = _read(path)
            except (OSError, ValueError, RuntimeError) as exc:  # a file being replaced, an unknown codec
                warnings.warn(f"metrics: cannot read {path} for the viewers ({exc})", stacklevel=2)
                continue
            if path.suffix == ".png":
                yield Media(f"curves/{path.stem}", frames, fps, path)
            else:
                yield Media(f"videos/{path.stem.split('_')[0]}", frames, fps, path)


def _read(path: Path) -> tuple[np.ndarray, float]:
    import imageio.v3 as iio

    if path.suffix == ".png":
        image = iio.imread(path)
        return image[None, ..., :3], 1.0
    fps = float(iio.immeta(path).get("fps") or 10.0)
    frames = iio.imread(path)[..., :3]
    if len(frames) > MAX_FRAMES:
        step = -(-len(frames) // MAX_FRAMES)
        frames, fps = frames[::step], fps / step
    return frames, fps


def tb_media(writer: Any, media: Media, step: int, walltime: float | None = None) -> None:
    """A picture as a TensorBoard image; a video as an animated GIF image summary (same as add_video's)."""
    if len(media.frames) == 1:
        writer.add_image(media.tag, media.frames[0], step, walltime=walltime, dataformats="HWC")
        return
    import imageio.v3 as iio
    from tensorboard.compat.proto.summary_pb2 import Summary

    t, h, w, c = media.frames.shape
    gif = iio.imwrite("<bytes>", media.frames, extension=".gif", duration=1000 / media.fps, loop=0)
    image = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=gif)
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=media.tag, image=image)]), step, walltime)
