"""Writing episodes to MP4 (ffmpeg via imageio) or GIF, with no display attached."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

import imageio.v2 as imageio
import numpy as np

FORMATS = (".mp4", ".gif")


class VideoWriter:
    """Append RGB uint8 frames; the format follows the file suffix (.mp4 or .gif)."""

    def __init__(self, path: str | Path, fps: float) -> None:
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in FORMATS:
            raise ValueError(f"video path {self.path}: expected a name ending in .mp4 or .gif")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".mp4":
            # macro_block_size=1 keeps odd sizes; yuv420p plays everywhere
            self._writer = imageio.get_writer(
                self.path, fps=fps, codec="libx264", quality=7, macro_block_size=1, pixelformat="yuv420p"
            )
        else:
            self._writer = imageio.get_writer(self.path, mode="I", duration=1000.0 / fps, loop=0)
        self.frames = 0

    def append(self, frame: np.ndarray) -> None:
        self._writer.append_data(np.ascontiguousarray(frame, dtype=np.uint8))
        self.frames += 1

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def side_by_side(view: np.ndarray, observation: np.ndarray | None) -> np.ndarray:
    """The scene view, and beside it the policy's own image scaled up to the same height."""
    if observation is None:
        return view
    h = view.shape[0]
    scale = max(1, h // observation.shape[0])
    big = observation.repeat(scale, axis=0).repeat(scale, axis=1)
    pad = np.full((h, big.shape[1], 3), 255, np.uint8)
    pad[: big.shape[0]] = big[:h]
    return np.concatenate([view, pad], axis=1)
