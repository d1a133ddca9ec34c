"""The threaded camera against real OpenCV: an MJPG video file whose frames encode their index, a real
cv2.VideoCapture as a reader, and the PyBullet renderer as a render() source."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pybullet as p
import pytest

from core.config import CameraConfig
from robot.sensors.camera import Camera, CameraError, Frame
from sim.camera import Camera as SimCamera

W, H, FPS = 96, 64, 30.0
STEP = 2  # the square of frame i starts at x = STEP * i
SQUARE = 8  # edge of the square, at rows 8..15
BAND = 48  # rows BAND..H: red (left half) and blue (right half), to check colour order and crops
WAIT_S = 5.0  # generous: how long a condition that should hold within a few frames is waited for


def _draw(index: int) -> np.ndarray:
    """Frame `index` in BGR, as written to the file."""
    image = np.zeros((H, W, 3), np.uint8)
    image[8 : 8 + SQUARE, STEP * index : STEP * index + SQUARE] = 255
    image[BAND:, : W // 2] = (0, 0, 255)
    image[BAND:, W // 2 :] = (255, 0, 0)
    return image


def _decode(image: np.ndarray) -> int:
    """The index a full-size RGB frame encodes: where its square is."""
    columns = image[8 : 8 + SQUARE].astype(float).mean(axis=(0, 2))
    centre = float((columns * np.arange(W)).sum() / columns.sum())
    return round((centre - (SQUARE - 1) / 2) / STEP)


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("camera")


def _video(directory: Path, frames: int) -> str:
    path = directory / f"count_{frames}.avi"
    if not path.exists():
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), FPS, (W, H))
        assert writer.isOpened(), "OpenCV cannot write MJPG .avi here"
        for i in range(frames):
            writer.write(_draw(i))
        writer.release()
    return str(path)


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _error(camera: Camera, **kwargs: float) -> str:
    with pytest.raises(CameraError) as info:
        camera.latest(**kwargs)
    return str(info.value)


def test_file_frames_are_fresh_in_order_and_loop(video_dir: Path) -> None:
    frames = 12
    with Camera(_video(video_dir, frames), W, H, out_size=(W, H), loop=True) as camera:
        assert camera.settings == {"width": W, "height": H, "fps": FPS, "fourcc": "MJPG"}
        seen: list[Frame] = []
        _wait_for(lambda: seen.append(camera.latest(max_age_s=1.0)) or seen[-1].index > frames + 3, "a loop")
        for frame in seen:
            assert frame.image.shape == (H, W, 3) and frame.image.dtype == np.uint8
            assert _decode(frame.image) == frame.index % frames  # content follows the index across the loop
            assert not frame.image.flags.writeable
        indices = [f.index for f in seen]
        assert indices == sorted(indices) and len(set(indices)) > frames
        distinct = {f.index: f.time for f in seen}
        ordered = [distinct[i] for i in sorted(distinct)]
        assert all(b > a for a, b in zip(ordered[:-1], ordered[1:], strict=True))
        latest = camera.latest()
        assert time.monotonic() - latest.time <= camera.max_age_s


def test_file_is_paced_like_a_camera(video_dir: Path) -> None:
    """A 30-fps file is not read in a burst: after its first frame the latest one is not its last."""
    frames = 30
    with Camera(_video(video_dir, frames), W, H, out_size=(W, H)) as camera:
        first = camera.latest()
        assert first.index < frames - 1
        _wait_for(lambda: camera.latest(max_age_s=1.0).index > first.index, "the next frame")


def test_colours_are_rgb_and_crop_then_resize(video_dir: Path) -> None:
    crop = (0, 32, W, 32)  # bottom half: 16 black rows, then the band
    with Camera(_video(video_dir, 30), W, H, out_size=(48, 16), crop=crop, loop=True) as camera:
        image = camera.latest().image
    assert image.shape == (16, 48, 3)  # out_size is (width, height)
    assert image[:6].max() < 40  # rows 32..43 of the frame: black
    red, blue = image[10:, 4:20].mean(axis=(0, 1)), image[10:, 28:44].mean(axis=(0, 1))
    assert red[0] > 200 and red[2] < 50, red
    assert blue[2] > 200 and blue[0] < 50, blue


def test_crop_and_resize_keep_the_content_in_place(video_dir: Path) -> None:
    """The strip the square moves along, at half size: the square is where the frame's index puts it."""
    crop = (0, 4, W, 16)  # rows 4..19: black, then the square at rows 8..15, then black
    with Camera(_video(video_dir, 30), W, H, out_size=(W // 2, 8), crop=crop, loop=True) as camera:
        seen = [camera.latest(max_age_s=1.0)]
        _wait_for(lambda: seen.append(camera.latest(max_age_s=1.0)) or seen[-1].index >= 6, "frame 6")
    for frame in seen:
        image = frame.image.astype(float)
        assert image.shape == (8, W // 2, 3) and image[:2].max() < 40 and image[6:].max() < 40
        columns = image[2:6].mean(axis=(0, 2))
        centre = 2 * float((columns * np.arange(W // 2)).sum() / columns.sum()) + 0.5  # in full-size pixels
        assert abs(centre - (STEP * frame.index + (SQUARE - 1) / 2)) < 1.0, (frame.index, centre)


def test_crop_outside_the_image_is_refused() -> None:
    with pytest.raises(CameraError, match=r"crop .*\(90, 0, 10, 10\).* 96x64"):
        Camera("unused", W, H, crop=(90, 0, 10, 10))


@pytest.mark.parametrize(
    ("asked", "words"),
    [
        ({"width": 640, "height": 480}, ["asked 640x480", "offers 96x64 @ 30 fps MJPG"]),
        ({"width": W, "height": H, "fps": 15.0}, ["asked 96x64 @ 15 fps", "offers 96x64 @ 30 fps"]),
        ({"width": W, "height": H, "pixel_format": "yuyv"}, ["asked 96x64 YUYV", "offers 96x64 @ 30 fps MJPG"]),
    ],
)
def test_file_settings_mismatch_names_both(video_dir: Path, asked: dict, words: list[str]) -> None:
    path = _video(video_dir, 30)
    with pytest.raises(CameraError) as info:
        Camera(path, **asked).start()
    assert path in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_reader_that_ignores_settings_is_refused(video_dir: Path) -> None:
    """A cv2.VideoCapture is asked for 640x480 like a device; it keeps 96x64 and the camera says so."""
    capture = cv2.VideoCapture(_video(video_dir, 30))
    try:
        with pytest.raises(CameraError, match=r"asked 640x480 @ 30 fps MJPG, VideoCapture source offers 96x64"):
            Camera(capture, 640, 480, fps=30, pixel_format="MJPG").start()
        assert capture.isOpened()  # the caller's capture is not released for them
    finally:
        capture.release()


def test_reader_object_gives_frames(video_dir: Path) -> None:
    capture = cv2.VideoCapture(_video(video_dir, 30))
    try:
        with Camera(capture, W, H, out_size=(W, H), dead_after_s=WAIT_S) as camera:
            frame = camera.latest(max_age_s=WAIT_S)
            assert _decode(frame.image) == frame.index
    finally:
        capture.release()


def test_end_of_file_is_stale_then_dead(video_dir: Path) -> None:
    dead_after = 0.5
    with Camera(_video(video_dir, 6), W, H, max_age_s=0.1, dead_after_s=dead_after) as camera:
        last = camera.latest(max_age_s=1.0)
        messages: list[tuple[float, str]] = []
        while not messages or "dead" not in messages[-1][1]:
            assert time.monotonic() - last.time < WAIT_S, "the ended file never went dead"
            try:
                last = camera.latest(max_age_s=1.0)
            except CameraError as exc:
                messages.append((time.monotonic(), str(exc)))
            time.sleep(0.01)
        assert last.index == 5
        died_at, dead = messages[-1]
        assert died_at - last.time > dead_after and "video file ended" in dead and "dead_after_s=0.5" in dead
        before = [m for t, m in messages if t - last.time < dead_after - 0.05]
        assert all("stale" in m for m in before)


class _Gated:
    """A render() source whose frames can be held back (a stalled camera driver) or made to fail."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.calls = 0
        self.fail_at: int | None = None

    def __call__(self) -> np.ndarray:
        self.gate.wait()
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise OSError("cable pulled")
        image = np.zeros((H, W, 3), np.uint8)
        image[:, :, 0] = self.calls % 256
        return image


def test_blocked_source_is_stale_then_dead_and_close_does_not_hang() -> None:
    render = _Gated()
    camera = Camera(render, W, H, fps=50, max_age_s=0.1, dead_after_s=0.6).start()
    try:
        _wait_for(lambda: camera.latest().index >= 3, "a few frames")
        render.gate.clear()
        messages: list[str] = []
        _wait_for(lambda: messages.append(_message(camera)) or "dead" in messages[-1], "a dead camera")
        stale = [m for m in messages if "stale" in m]
        assert stale and all("ms old" in m and "max_age_s=0.1" in m for m in stale)
        assert "no frame for" in messages[-1] and "stopped delivering" in messages[-1]
        closer = threading.Thread(target=camera.close)
        closer.start()
        closer.join(WAIT_S)
        assert not closer.is_alive(), "close() hung on a blocked read"
    finally:
        render.gate.set()
        camera.close()
    with pytest.raises(CameraError, match="not running"):
        camera.latest()


def _message(camera: Camera) -> str:
    """The error latest() raises now, or "" when it gives a frame."""
    try:
        camera.latest()
    except CameraError as exc:
        return str(exc)
    return ""


def test_reader_error_is_raised_by_latest_not_lost() -> None:
    render = _Gated()
    render.fail_at = 4
    with Camera(render, W, H, fps=100, max_age_s=1.0) as camera:
        _wait_for(lambda: _message(camera) != "", "the failure")
        with pytest.raises(CameraError, match=r"dead: its reader failed: OSError\('cable pulled'\)") as info:
            camera.latest()
        assert isinstance(info.value.__cause__, OSError)


def test_render_source_of_the_wrong_shape_is_named() -> None:
    def flat() -> np.ndarray:
        return np.zeros((H, W), np.uint8)

    with pytest.raises(CameraError, match=r"flat\(\) returned uint8 \(64, 96\); expected HxWx3 uint8 RGB"):
        Camera(flat, W, H, fps=10).start()


def test_render_source_needs_fps() -> None:
    with pytest.raises(CameraError, match="needs fps"):
        Camera(_Gated(), W, H).start()


def test_missing_device_names_the_stable_path_and_its_target(tmp_path: Path) -> None:
    link = tmp_path / "usb-Reverie_Cam-video-index0"
    link.symlink_to("/dev/video97")
    with pytest.raises(CameraError, match=rf"no camera at {link} \(-> /dev/video97\)"):
        Camera(str(link), 640, 480).start()


def test_unknown_source_is_named(tmp_path: Path) -> None:
    with pytest.raises(CameraError, match="neither a device"):
        Camera(str(tmp_path / "nothing.avi"), W, H).start()


def test_pybullet_renderer_stands_in_for_a_camera() -> None:
    client = p.connect(p.DIRECT)
    try:
        box = p.createMultiBody(
            1.0,
            p.createCollisionShape(p.GEOM_BOX, halfExtents=[0.1, 0.1, 0.1], physicsClientId=client),
            p.createVisualShape(p.GEOM_BOX, halfExtents=[0.1, 0.1, 0.1], rgbaColor=[1, 0, 0, 1],
                                physicsClientId=client),
            basePosition=[0.3, 0.0, 0.2],
            physicsClientId=client,
        )
        assert box >= 0
        sim = SimCamera(CameraConfig(width=80, height=60), client)
        with Camera(sim.render, 80, 60, fps=20, out_size=(40, 30), max_age_s=0.5) as camera:
            assert camera.settings["width"] == 80 and camera.settings["height"] == 60
            first = camera.latest()
            _wait_for(lambda: camera.latest().index > first.index, "a second render")
            image = camera.latest().image
        assert image.shape == (30, 40, 3) and image.dtype == np.uint8
        centre = image[10:20, 15:25].astype(int).mean(axis=(0, 1))
        assert centre[0] > centre[1] + 40 and centre[0] > centre[2] + 40, centre  # the red box, still RGB
    finally:
        p.disconnect(client)
