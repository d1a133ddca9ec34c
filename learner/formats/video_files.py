"""MP4 files that hold many episodes of one camera, through PyAV: written frame by frame (an episode's
place in its file is its first frame's timestamp), read in one forward pass (`FrameReader`).

Codecs: `h264` (yuv420p, no B-frames, a keyframe every 2 frames so that a reader can seek to any frame
cheaply, as LeRobot's encoder does; lossy), `lossless` (H.264 in RGB at crf 0: the exact pixels) and
`av1` (SVT-AV1, LeRobot's default; lossy).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from learner.formats import FormatError, require

CODECS: dict[str, tuple[str, str, dict[str, str]]] = {  # name -> (encoder, pix_fmt, options)
    "h264": ("libx264", "yuv420p", {"crf": "18", "g": "2", "bf": "0", "preset": "medium"}),
    "lossless": ("libx264rgb", "rgb24", {"crf": "0", "g": "2", "bf": "0", "preset": "medium"}),
    "av1": ("libsvtav1", "yuv420p", {"crf": "30", "g": "2", "preset": "8", "svtav1-params": "log-level=1"}),
}


class VideoWriter:
    """One camera's current MP4 file; frames get consecutive presentation times at `fps`."""

    def __init__(self, path: Path, fps: int, height: int, width: int, codec: str) -> None:
        av = require("av", "writing videos")
        logging.getLogger("libav").setLevel(logging.ERROR)
        encoder, pix_fmt, options = CODECS[codec]
        if pix_fmt == "yuv420p" and (height % 2 or width % 2):
            raise FormatError(f"{path}: codec {codec} needs even image sizes, got {width}x{height}; "
                              "use --images lossless or png")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.frames = 0
        self._av = av
        self._out = av.open(str(path), "w")
        self._stream = self._out.add_stream(encoder, rate=fps, options=options)
        self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, pix_fmt

    def write(self, images: np.ndarray) -> None:
        for image in images:
            frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = self.frames
            self.frames += 1
            for packet in self._stream.encode(frame):
                self._out.mux(packet)

    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def close(self) -> dict[str, Any]:
        """Flush and close; returns the file's `video.*` info as LeRobot's info.json records it."""
        for packet in self._stream.encode():
            self._out.mux(packet)
        self._out.close()
        return video_info(self.path)


def video_info(path: Path) -> dict[str, Any]:
    av = require("av", "reading videos")
    with av.open(str(path)) as f:
        s = f.streams.video[0]
        return {"video.height": s.height, "video.width": s.width, "video.codec": s.codec_context.name,
                "video.pix_fmt": s.pix_fmt, "video.is_depth_map": False, "video.fps": int(s.base_rate),
                "video.channels": 3, "has_audio": bool(f.streams.audio)}


class FrameReader:
    """Frames of one MP4 by index (presentation time x fps, rounded), decoded once in a forward pass:
    ask for ranges in increasing order (episodes in file order); an earlier range reopens the file."""

    def __init__(self, path: Path, fps: int) -> None:
        self.path, self.fps = path, fps
        self._frames: Iterator[tuple[int, np.ndarray]] | None = None
        self._pending: tuple[int, np.ndarray] | None = None
        self._next = 0  # the index the reader stands before

    def _decode(self) -> Iterator[tuple[int, np.ndarray]]:
        av = require("av", "reading videos")
        try:
            with av.open(str(self.path)) as f:
                for frame in f.decode(video=0):
                    yield round(float(frame.time) * self.fps), frame.to_ndarray(format="rgb24")
        except (OSError, av.FFmpegError) as exc:
            raise FormatError(f"{self.path}: unreadable video ({exc})") from None

    def read(self, first: int, count: int) -> np.ndarray:
        """Frames first..first+count-1 as (count, H, W, 3) uint8; FormatError naming the missing frame."""
        if self._frames is None or first < self._next:
            self._frames, self._pending = self._decode(), None
        out: list[np.ndarray] = []
        want = first
        while len(out) < count:
            item = self._pending if self._pending is not None else next(self._frames, None)
            self._pending = None
            if item is None or item[0] > want:
                self._pending = item
                raise FormatError(f"{self.path}: no frame at {want / self.fps:.4f} s (frame {want}); "
                                  f"the episode needs frames {first}..{first + count - 1}")
            if item[0] == want:
                out.append(item[1])
                want += 1
        self._next = want
        return np.stack(out)
