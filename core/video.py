"""Writing episodes to MP4 (ffmpeg via imageio) or GIF, with no display attached, and laying out
world-model open-loop predictions as a truth / prediction / error grid. Needs imageio, which the
learner and sim extras install; a robot writes no video."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
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
        self._mp4 = suffix == ".mp4"
        self.frames = 0

    def append(self, frame: np.ndarray) -> None:
        frame = np.asarray(frame, dtype=np.uint8)
        if self._mp4 and (frame.shape[0] % 2 or frame.shape[1] % 2):
            # yuv420p needs even sizes; ffmpeg otherwise writes a broken file without raising
            frame = np.pad(frame, ((0, frame.shape[0] % 2), (0, frame.shape[1] % 2), (0, 0)), mode="edge")
        self._writer.append_data(np.ascontiguousarray(frame))
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


CONTEXT_COLOUR = (40, 200, 40)  # bar over predictions made while the model still sees real frames
IMAGINED_COLOUR = (230, 30, 30)  # bar over predictions imagined from actions alone


def openloop_grid(truth: np.ndarray, pred: np.ndarray, context: int, error_gain: float = 4.0) -> np.ndarray:
    """Frames (T, 3*H, B*W, 3) showing truth, prediction and |truth - pred| * error_gain as rows and
    the B sequences as columns, so a glance shows where and when the world model drifts.

    truth and pred are uint8 (B, T, H, W, 3). A bar along the top of the prediction row is green for
    frames t < context (reconstructions) and red from t = context on (imagination). Truth and error
    rows are left untouched, so the error is exactly zero wherever the prediction is exact.
    """
    truth, pred = np.asarray(truth), np.asarray(pred)
    if truth.shape != pred.shape or truth.ndim != 5 or truth.shape[-1] != 3:
        raise ValueError(f"expected truth and pred of equal shape (B, T, H, W, 3), got {truth.shape} and {pred.shape}")
    if truth.dtype != np.uint8 or pred.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {truth.dtype} and {pred.dtype}")
    b, t, h, w, _ = truth.shape
    if not 0 <= context <= t:
        raise ValueError(f"context {context} outside 0..{t}")
    error = np.abs(truth.astype(np.int16) - pred.astype(np.int16)).astype(np.float32) * error_gain
    rows = [truth, pred, np.clip(error, 0, 255).astype(np.uint8)]
    # (B, T, H, W, 3) -> (T, H, B*W, 3): sequences side by side
    grid = np.concatenate([r.transpose(1, 2, 0, 3, 4).reshape(t, h, b * w, 3) for r in rows], axis=1)
    bar = max(1, h // 32)
    grid[:context, h : h + bar] = CONTEXT_COLOUR
    grid[context:, h : h + bar] = IMAGINED_COLOUR
    return grid


def episode_frames(images: np.ndarray, scale: int = 1) -> np.ndarray:
    """Policy observations as video frames: uint8 (T, H*scale, W*scale, 3) from uint8 or [0, 1] float
    images, channel-last or channel-first, grey or RGB."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(f"expected images (T, H, W[, C]) or (T, C, H, W), got shape {images.shape}")
    if images.shape[-1] not in (1, 3) and images.shape[1] in (1, 3):
        images = images.transpose(0, 2, 3, 1)
    if images.shape[-1] == 1:
        images = images.repeat(3, axis=-1)
    if images.shape[-1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got shape {images.shape}")
    if images.dtype != np.uint8:
        images = (np.clip(images.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    return images


def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: float) -> Path:
    """Write RGB uint8 frames to .mp4 or .gif; written beside the target and renamed into place, so
    nobody opens a half-written video. (GIF merges identical consecutive frames, keeping the timing.)"""
    path = Path(path)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        with VideoWriter(tmp, fps) as writer:
            for frame in frames:
                writer.append(frame)
        if writer.frames == 0:
            raise ValueError(f"{path}: no frames to write")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
