"""A camera read in a background thread: the control loop takes the latest frame, never one too old.

Why a thread: a camera delivers frames at its own pace and buffers them; reading in the control loop
would hand the policy old, queued frames and tie the loop rate to the camera. The thread keeps only
the newest frame; `latest()` refuses one older than `max_age_s` (stale) and declares the camera dead
when nothing arrived for `dead_after_s` or the thread died (its error is kept and raised, never lost).

Sources, so the same code path runs on the robot, in tests and in simulation:
- a V4L2 device: an index or a path (stable names like /dev/v4l/by-id/... are resolved in messages).
  Pixel format, size and fps are set, then read back: a camera that does not honour them fails loudly;
- a video file, paced at its own fps so it behaves like a live camera; at its end it loops or goes dead;
- a network stream (http(s):// MJPEG as IP cameras and the emulator serve it, rtsp://), read as fast as it
  comes; only its frame size is checked (a stream's reported fps and format are FFmpeg's guesses);
- an object like cv2.VideoCapture (`read() -> (ok, bgr)`, optional `get`/`set`), read as fast as it gives;
- a callable `render() -> HxWx3 RGB uint8` (the simulator's renderer), paced at `fps`.

Every frame is cropped to `crop` (x, y, w, h), resized (INTER_AREA) to `out_size` (width, height) and
converted to RGB. With `keep_full`, each frame also carries the cropped image at full resolution, for
marker tracking (a 64x64 model image is far too coarse to find a marker's corners in).
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import cv2
import numpy as np

from core.config.sensors import DEAD_AFTER_S
from core.interface import RobotError

log = logging.getLogger(__name__)

JOIN_S = 1.0  # longest close() waits for the reader thread (a blocked driver must not hang shutdown)
RETRY_S = 0.005  # pause after a failed read before the next try (intermittent USB hiccups)
FPS_TOLERANCE = 0.01  # relative fps difference accepted as "honoured" (29.97 for 30)
STREAM_URL = re.compile(r"^(https?|rtsp)://", re.IGNORECASE)


@dataclass(frozen=True)
class Frame:
    """One processed frame; `index` counts frames captured before it (0 for the first)."""

    image: np.ndarray  # HxWx3 uint8 RGB, already cropped/resized to the model's size
    time: float  # time.monotonic() when it was captured
    index: int
    full: np.ndarray | None = None  # the cropped RGB image before resizing (keep_full=True)


class CameraError(RobotError):
    """A camera could not be opened, does not honour its settings, or gives no fresh frames."""


@dataclass
class _Source:
    """An opened source: something with read(), how to name it, how to pace and convert it."""

    capture: Any
    name: str
    kind: str  # "device", "file", "stream", "reader" or "render"
    pace_fps: float | None = None  # frames are spaced at this rate by the thread (files, render callables)
    owned: bool = True  # release() it on close (not for an object the caller passed in)


class _RenderCapture:
    """Makes a `render()` callable look like a cv2.VideoCapture that already gives RGB."""

    def __init__(self, render: Callable[[], np.ndarray], name: str, fps: float) -> None:
        self._render, self._name, self._fps = render, name, fps
        self._pending: np.ndarray | None = None  # rendered to learn the size; handed out by the next read

    def read(self) -> tuple[bool, np.ndarray]:
        image, self._pending = self._pending, None
        return True, image if image is not None else self._checked(self._render())

    def get(self, prop: int) -> float:
        if prop == cv2.CAP_PROP_FPS:
            return self._fps
        if self._pending is None:
            self._pending = self._checked(self._render())
        height, width = self._pending.shape[:2]
        return {cv2.CAP_PROP_FRAME_WIDTH: width, cv2.CAP_PROP_FRAME_HEIGHT: height}.get(prop, 0.0)

    def _checked(self, image: Any) -> np.ndarray:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise CameraError(f"{self._name} returned {image.dtype} {image.shape}; expected HxWx3 uint8 RGB")
        return image


def fourcc_text(code: float) -> str:
    value = int(code) if math.isfinite(code) else 0
    return "".join(chr((value >> (8 * i)) & 0xFF) for i in range(4)).strip("\0 ") if value > 0 else ""


def _describe(width: int, height: int, fps: float | None, fourcc: str | None) -> str:
    text = f"{width}x{height}"
    if fps:
        text += f" @ {fps:g} fps"
    return f"{text} {fourcc}" if fourcc else text


def _open_device(source: str | int) -> _Source:
    if isinstance(source, int):
        name, target = f"camera {source} (/dev/video{source})", source
    else:
        real = os.path.realpath(source)
        name = source if real == source else f"{source} (-> {real})"
        if not os.path.exists(real):
            raise CameraError(f"no camera at {name}: the device does not exist (unplugged, or another path?)")
        target = real
    capture = cv2.VideoCapture(target, cv2.CAP_V4L2)
    if not capture.isOpened():
        raise CameraError(f"could not open {name}: busy, no permission (video group?) or not a capture device")
    return _Source(capture, name, "device")


def _open_file(path: str, fps: float | None) -> _Source:
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise CameraError(f"could not open video file {path}: not a video OpenCV can decode")
    file_fps = capture.get(cv2.CAP_PROP_FPS)
    if not (math.isfinite(file_fps) and file_fps > 0):
        capture.release()
        raise CameraError(f"video file {path} reports no frame rate; it cannot be paced like a camera")
    return _Source(capture, f"video file {path}", "file", pace_fps=file_fps)


def _open_stream(url: str) -> _Source:
    capture = cv2.VideoCapture(url, cv2.CAP_FFMPEG)
    if not capture.isOpened():
        raise CameraError(f"could not open the stream {url}: nothing serves it, or not a video stream")
    return _Source(capture, f"stream {url}", "stream")


def _open(source: Any, fps: float | None) -> _Source:
    """Open `source` as one of the four kinds (see the module docstring)."""
    if hasattr(source, "read"):
        return _Source(source, f"{type(source).__name__} source", "reader", owned=False)
    if callable(source):
        name = f"{getattr(source, '__qualname__', type(source).__name__)}()"
        if not fps:
            raise CameraError(f"render source {name} needs fps: the rate its frames are produced at")
        return _Source(_RenderCapture(source, name, fps), name, "render", pace_fps=fps)
    if isinstance(source, str) and STREAM_URL.match(source):
        return _open_stream(source)
    if isinstance(source, int) or os.path.realpath(str(source)).startswith("/dev/"):
        return _open_device(source)
    if os.path.isfile(source):
        return _open_file(str(source), fps)
    raise CameraError(f"camera source {source!r} is neither a device (/dev/...), a video file, a stream URL "
                      "(http://, https://, rtsp://) nor a reader")


class Camera:
    """Reads frames in a background thread; the control loop takes the latest one with a maximum age."""

    def __init__(
        self,
        source: Any,
        width: int,
        height: int,
        fps: float | None = None,
        pixel_format: str | None = None,
        out_size: tuple[int, int] = (64, 64),
        crop: tuple[int, int, int, int] | None = None,
        max_age_s: float = 0.2,
        dead_after_s: float = DEAD_AFTER_S,
        loop: bool = False,
        keep_full: bool = False,
    ) -> None:
        self.source, self.width, self.height, self.fps = source, int(width), int(height), fps
        self.pixel_format = pixel_format.upper() if pixel_format else None
        self.out_size = (int(out_size[0]), int(out_size[1]))
        self.crop = crop or (0, 0, self.width, self.height)
        self.max_age_s, self.dead_after_s, self.loop = max_age_s, dead_after_s, loop
        self.keep_full = keep_full
        self.settings: dict[str, Any] = {}  # what the source reported back after setting: width, height, fps, fourcc
        self.name = str(source)
        self._check_crop()
        self._src: _Source | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._first = threading.Event()  # set by the first frame or by the thread ending
        self._lock = threading.Lock()
        self._latest: Frame | None = None
        self._error: BaseException | None = None
        self._ended = False
        self._started_at = 0.0

    def _check_crop(self) -> None:
        x, y, w, h = self.crop
        if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > self.width or y + h > self.height:
            raise CameraError(f"camera {self.name}: crop (x, y, w, h)={self.crop} is outside the "
                              f"{self.width}x{self.height} image")
        if min(self.out_size) <= 0:
            raise CameraError(f"camera {self.name}: out_size={self.out_size} must be positive (width, height)")

    # --- lifecycle

    def start(self) -> Camera:
        """Open the source, check its settings and wait (up to dead_after_s) for the first frame."""
        if self._thread is not None:
            raise CameraError(f"{self.name}: already started")
        self._src = _open(self.source, self.fps)
        self.name = self._src.name
        try:
            self._apply_settings()
        except BaseException:
            self._release()
            raise
        self._stop.clear()
        self._first.clear()
        self._latest, self._error, self._ended = None, None, False  # a camera can be started again after close()
        self._started_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"camera {self.name}", daemon=True)
        self._thread.start()
        if not self._first.wait(self.dead_after_s):
            self.close()
            raise CameraError(f"{self.name} gave no frame within dead_after_s={self.dead_after_s} s of starting")
        if self._latest is None:
            error = self._error
            why = f"its reader failed: {error!r}" if error else "the file has no frames"
            self.close()
            raise CameraError(f"{self.name} is dead before its first frame: {why}") from error
        return self

    def close(self) -> None:
        """Stop the reader and release the device; returns within about JOIN_S even if a read blocks."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(JOIN_S)
            if thread.is_alive():  # it releases the source itself when its read returns
                log.warning("%s: reader still blocked in read() after %.1f s; left to finish alone", self.name, JOIN_S)

    def __enter__(self) -> Camera:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # --- the frame the control loop uses

    def latest(self, max_age_s: float | None = None) -> Frame:
        """The newest frame; CameraError if it is older than max_age_s (stale) or the camera is dead."""
        if self._thread is None:
            raise CameraError(f"{self.name} is not running: call start() (or use it as a context manager)")
        max_age = self.max_age_s if max_age_s is None else max_age_s
        with self._lock:
            frame, error, ended = self._latest, self._error, self._ended
        if error is not None:
            raise CameraError(f"{self.name} is dead: its reader failed: {error!r}") from error
        age = time.monotonic() - (frame.time if frame else self._started_at)
        if age > self.dead_after_s:
            why = "the video file ended" if ended else "the camera stopped delivering"
            limit = f"dead_after_s={self.dead_after_s}"
            raise CameraError(f"{self.name} is dead: no frame for {age:.2f} s ({limit}); {why}")
        if frame is None or age > max_age:
            raise CameraError(f"{self.name}: latest frame is stale: {age * 1000:.0f} ms old (max_age_s={max_age})")
        return frame

    # --- settings

    def _apply_settings(self) -> None:
        """Ask for the settings where the source takes them, read them back and fail on a mismatch."""
        cap = self._src.capture
        if self._src.kind in ("device", "reader") and hasattr(cap, "set"):
            if self._src.kind == "device":
                cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # fewer queued frames: less latency if the thread falls behind
            if self.pixel_format:
                cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter.fourcc(*self.pixel_format.ljust(4)[:4]))
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
            if self.fps:
                cap.set(cv2.CAP_PROP_FPS, self.fps)
        if hasattr(cap, "get"):
            self.settings = {
                "width": int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
                "height": int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                "fps": float(cap.get(cv2.CAP_PROP_FPS)),
                "fourcc": fourcc_text(cap.get(cv2.CAP_PROP_FOURCC)) if self._src.kind != "render" else "RGB",
            }
            self._check_settings()

    def _check_settings(self) -> None:
        got = self.settings
        size_known = got["width"] > 0 and got["height"] > 0  # 0: a reader that does not report its size
        bad_size = size_known and (got["width"], got["height"]) != (self.width, self.height)
        stream = self._src.kind == "stream"  # FFmpeg guesses a stream's fps (25) and reports no fourcc
        bad_fps = bool(self.fps) and not stream and abs(got["fps"] - self.fps) > FPS_TOLERANCE * self.fps
        bad_format = bool(self.pixel_format) and not stream and got["fourcc"] != self.pixel_format
        if bad_size or bad_fps or bad_format:
            asked = _describe(self.width, self.height, self.fps, self.pixel_format)
            offered = _describe(got["width"], got["height"], got["fps"], got["fourcc"])
            raise CameraError(f"asked {asked}, {self.name} offers {offered}")

    # --- the reader thread

    def _run(self) -> None:
        index = 0
        period = 1.0 / self._src.pace_fps if self._src.pace_fps else 0.0
        due = time.monotonic()
        try:
            while not self._stop.is_set():
                if period:
                    if self._stop.wait(max(0.0, due - time.monotonic())):
                        break
                    due = max(due + period, time.monotonic() - period)  # after a stall: no burst to catch up
                ok, image = self._src.capture.read()
                if not ok:
                    if self._src.kind == "file" and not self._rewind():
                        return
                    self._stop.wait(RETRY_S)  # intermittent failure: retry; a lasting one shows as a dead camera
                    continue
                frame = self._frame(image, time.monotonic(), index)
                with self._lock:
                    self._latest = frame
                self._first.set()
                index += 1
        except BaseException as exc:  # kept for latest(): the thread never dies silently
            with self._lock:
                self._error = exc
        finally:
            self._first.set()
            self._release()  # the thread owns the source once started, so a blocked read never races a release

    def _rewind(self) -> bool:
        """At the end of a file: reopen it when looping (True), else mark it ended (False)."""
        if not self.loop:
            with self._lock:
                self._ended = True
            return False
        self._src.capture.release()
        self._src.capture = cv2.VideoCapture(str(self.source))
        return True

    def _frame(self, image: np.ndarray, at: float, index: int) -> Frame:
        """Crop, convert to RGB, resize to out_size; a frame of the wrong size is an error."""
        if image.shape[:2] != (self.height, self.width):
            height, width = image.shape[:2]
            raise CameraError(f"{self.name} gave a {width}x{height} frame; expected {self.width}x{self.height}")
        x, y, w, h = self.crop
        image = image[y : y + h, x : x + w]
        # A render source already gives RGB: copy it, never hand out (and freeze) the renderer's own buffer.
        rgb = image.copy() if self._src.kind == "render" else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        small = rgb if (w, h) == self.out_size else cv2.resize(rgb, self.out_size, interpolation=cv2.INTER_AREA)
        # Both are frozen (shared with every caller of latest()), so they may be the same array.
        rgb.setflags(write=False)
        small.setflags(write=False)
        return Frame(small, at, index, rgb if self.keep_full else None)

    def _release(self) -> None:
        src = self._src
        if src is not None and src.owned and hasattr(src.capture, "release"):
            src.capture.release()
