"""`reverie-robot latency / cameras / camera / imu`, each command as the bring-up guide runs it, against
emulated hardware: a sysfs tree laid out as the kernel lays it out (with a /dev/serial/by-id symlink), a
generated video file, an MJPEG stream from a local HTTP server read by OpenCV's FFmpeg, and the emulated
BNO055 on a pseudo-terminal."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest

from robot.cli import main
from robot.emulated.imu import EmulatedBNO055
from robot.servo import usb_latency
from robot.tools.devices import V4L_BY_ID, tilt_deg

ROOT = Path(__file__).resolve().parents[2]
BY_ID = "usb-FTDI_FT232R_USB_UART_A50285BI-if00-port0"
W, H, FPS = 96, 64, 30.0
RED_BGR, BLUE_BGR = (0, 0, 255), (255, 0, 0)
NOBODY = 65534


# ----- helpers ------------------------------------------------------------------------------------


def fake_sysfs(root: Path, tty: str = "ttyUSB0", latency: str | None = "16\n") -> tuple[str, Path]:
    """A /dev node, its /dev/serial/by-id symlink (relative, as udev makes it) and the sysfs entry of
    the adapter under `root`; `latency` None: an adapter without a latency timer. -> (by-id path, sysfs root)."""
    dev = root / "dev"
    (dev / "serial" / "by-id").mkdir(parents=True)
    (dev / tty).touch()
    link = dev / "serial" / "by-id" / BY_ID
    link.symlink_to(Path("..") / ".." / tty)
    sysfs = root / "sys"
    device = sysfs / "bus" / "usb-serial" / "devices" / tty
    device.mkdir(parents=True)
    if latency is not None:
        (device / "latency_timer").write_text(latency)
    return str(link), sysfs


@contextlib.contextmanager
def without_root() -> Iterator[None]:
    """Permission checks as an ordinary user: root writes read-only files, so drop to nobody meanwhile."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(NOBODY)
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def draw(index: int, width: int = W, height: int = H) -> np.ndarray:
    """A BGR frame: a white square that moves with `index`, a red (left) and blue (right) band below."""
    image = np.zeros((height, width, 3), np.uint8)
    image[4:12, 2 * index % (width - 8): 2 * index % (width - 8) + 8] = 255
    image[height * 3 // 4:, : width // 2] = RED_BGR
    image[height * 3 // 4:, width // 2:] = BLUE_BGR
    return image


def assert_bands(png: Path, width: int, height: int) -> None:
    """The snapshot is the full-resolution frame with its colours in the right order."""
    image = cv2.imread(str(png))
    assert image is not None, f"{png} is not a readable image"
    assert image.shape == (height, width, 3)
    left, right = image[-2, width // 4].astype(int), image[-2, 3 * width // 4].astype(int)
    assert np.abs(left - RED_BGR).max() < 40 and np.abs(right - BLUE_BGR).max() < 40, (left, right)


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("video") / "count.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), FPS, (W, H))
    assert writer.isOpened(), "OpenCV cannot write MJPG .avi here"
    for i in range(20):
        writer.write(draw(i))
    writer.release()
    return str(path)


class MjpegServer:
    """multipart/x-mixed-replace JPEG frames over HTTP, as IP cameras (and the emulator) serve them."""

    def __init__(self, width: int, height: int, fps: float, stall_after: int | None = None) -> None:
        """`stall_after`: send that many frames, then none, holding the connection open (a camera that hangs)."""
        self.stop = threading.Event()
        frames = [cv2.imencode(".jpg", draw(i, width, height))[1].tobytes() for i in range(30)]
        stop = self.stop

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                i = 0
                with contextlib.suppress(OSError):
                    while not stop.is_set():
                        if stall_after is not None and i >= stall_after:
                            stop.wait()
                            break
                        jpeg = frames[i % len(frames)]
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                         + str(len(jpeg)).encode() + b"\r\n\r\n" + jpeg + b"\r\n")
                        self.wfile.flush()
                        i += 1
                        stop.wait(1 / fps)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/stream.mjpg"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> MjpegServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class Held:
    """The emulated chip's source: held at one orientation, turning at one rate."""

    def __init__(self, roll_deg: float = 0.0, gyro: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> None:
        half = math.radians(roll_deg) / 2
        self.quat = np.array([math.cos(half), math.sin(half), 0.0, 0.0])
        self.gyro = np.array(gyro)

    def __call__(self) -> tuple[np.ndarray, np.ndarray]:
        return self.quat, self.gyro


# ----- latency ------------------------------------------------------------------------------------


def test_latency_flags_the_ftdi_default_of_16_ms(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port, sysfs = fake_sysfs(tmp_path)
    assert main(["latency", "--port", port, "--sysfs", str(sysfs)]) == 1
    out = capsys.readouterr().out
    assert "ttyUSB0" in out and "16 ms" in out and "TOO HIGH" in out and "--set-ms 1" in out
    assert main(["latency", "--port", port, "--sysfs", str(sysfs), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report == {"port": port, "tty": "ttyUSB0",
                      "path": str(sysfs / "bus/usb-serial/devices/ttyUSB0/latency_timer"), "ftdi": True,
                      "latency_ms": 16, "recommended_ms": 1, "ok": False, "set": False}


def test_latency_set_ms_writes_the_timer_and_reads_it_back(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    port, sysfs = fake_sysfs(tmp_path)
    assert main(["latency", "--port", port, "--sysfs", str(sysfs), "--set-ms", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["before_ms"], report["latency_ms"], report["ok"], report["set"]) == (16, 1, True, True)
    assert (sysfs / "bus/usb-serial/devices/ttyUSB0/latency_timer").read_text().strip() == "1"
    assert main(["latency", "--port", port, "--sysfs", str(sysfs)]) == 0
    assert "latency timer 1 ms  OK" in capsys.readouterr().out


def test_latency_without_permission_prints_the_commands_and_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    root = Path(tempfile.mkdtemp(prefix="devtools_", dir="/tmp"))
    try:
        root.chmod(0o755)  # an ordinary user can reach the file, not write it
        port, sysfs = fake_sysfs(root)
        timer = sysfs / "bus/usb-serial/devices/ttyUSB0/latency_timer"
        timer.chmod(0o444)
        with without_root():
            code = main(["latency", "--port", port, "--sysfs", str(sysfs), "--set-ms", "1"])
        err = capsys.readouterr().err
        assert code == 3, err
        assert timer.read_text() == "16\n"
        assert f"no permission to write {timer}" in err and port in err
        assert f"echo 1 | sudo tee {timer}" in err
        assert usb_latency.UDEV_RULE in err and usb_latency.UDEV_FILE in err and "udevadm trigger" in err
        assert "Traceback" not in err
    finally:
        shutil.rmtree(root)


def test_adapter_without_a_timer_has_nothing_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port, sysfs = fake_sysfs(tmp_path, tty="ttyACM0", latency=None)
    assert main(["latency", "--port", port, "--sysfs", str(sysfs), "--set-ms", "1"]) == 0
    assert "no latency timer for this adapter (not FTDI): nothing to do" in capsys.readouterr().out
    assert usb_latency.latency_timer(port, sysfs) is None
    with pytest.raises(FileNotFoundError, match="not an FTDI adapter"):
        usb_latency.set_latency_timer(port, 1, sysfs)


def test_latency_errors_name_the_port_or_the_value(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "dev" / "serial" / "by-id" / "usb-gone")
    assert main(["latency", "--port", missing, "--sysfs", str(tmp_path)]) == 2
    assert f"port {missing} does not exist" in capsys.readouterr().err
    port, sysfs = fake_sysfs(tmp_path)
    assert main(["latency", "--port", port, "--sysfs", str(sysfs), "--set-ms", "0"]) == 2
    err = capsys.readouterr().err
    assert "1..255" in err and port in err
    (sysfs / "bus/usb-serial/devices/ttyUSB0/latency_timer").write_text("sixteen\n")
    assert main(["latency", "--port", port, "--sysfs", str(sysfs)]) == 2
    assert "'sixteen'" in capsys.readouterr().err


def test_startup_check_warns_above_1_ms_and_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    port, sysfs = fake_sysfs(tmp_path)
    with caplog.at_level(logging.WARNING, logger="robot.usb_latency"):
        assert usb_latency.warn_if_slow(port, sysfs) == 16
    assert port in caplog.text and "16 ms" in caplog.text and "--set-ms 1" in caplog.text
    caplog.clear()
    usb_latency.set_latency_timer(port, 1, sysfs)
    assert usb_latency.warn_if_slow(port, sysfs) == 1
    assert usb_latency.warn_if_slow("loop://", sysfs) is None
    assert caplog.text == ""
    (sysfs / "bus/usb-serial/devices/ttyUSB0/latency_timer").write_text("")
    with caplog.at_level(logging.WARNING, logger="robot.usb_latency"):
        assert usb_latency.warn_if_slow(port, sysfs) is None
    assert "could not read the latency timer" in caplog.text


# ----- cameras / camera ---------------------------------------------------------------------------


def test_cameras_lists_stable_names_and_the_mode_of_each(tmp_path: Path, video: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    by_id = tmp_path / "by-id"
    by_id.mkdir()
    (by_id / "usb-Test_Cam-video-index0").symlink_to(video)
    not_video = tmp_path / "metadata"
    not_video.write_text("not a capture node")
    (by_id / "usb-Test_Cam-video-index1").symlink_to(not_video)
    assert main(["cameras", "--by-id", str(by_id), "--json"]) == 0
    first, second = json.loads(capsys.readouterr().out)
    assert first == {"name": "usb-Test_Cam-video-index0", "path": str(by_id / "usb-Test_Cam-video-index0"),
                     "target": video, "width": W, "height": H, "fps": FPS, "fourcc": "MJPG", "frame": True}
    assert second["target"] == str(not_video) and "cannot open" in second["error"]
    assert main(["cameras", "--by-id", str(by_id)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"usb-Test_Cam-video-index0 -> {video}: {W}x{H} @ 30 fps MJPG"
    assert lines[1].startswith(f"usb-Test_Cam-video-index1 -> {not_video}: cannot open")


def test_no_cameras_is_said_plainly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cameras", "--by-id", str(tmp_path / "none")]) == 1
    assert f"no cameras found under {tmp_path / 'none'}" in capsys.readouterr().err
    if Path(V4L_BY_ID).exists():
        return  # a machine with cameras: the default directory is not empty
    result = subprocess.run([sys.executable, "-m", "robot.cli", "cameras"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1
    assert "no cameras found under /dev/v4l/by-id" in result.stderr and "Traceback" not in result.stderr


def test_camera_reads_a_video_file_and_writes_a_snapshot(tmp_path: Path, video: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "snap.png"
    args = ["camera", "--device", video, "--width", str(W), "--height", str(H), "--fps", "30",
            "--pixel-format", "mjpg", "--frames", "8", "--snapshot", str(png)]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"] == {"width": W, "height": H, "fps": FPS, "fourcc": "MJPG"}
    assert report["frames"] == 8 and report["snapshot"] == str(png) and video in report["name"]
    assert 0 < report["measured_fps"] < 1.5 * FPS  # paced at the file's rate, never faster
    assert 0 <= report["frame_age_ms"]["mean"] <= report["frame_age_ms"]["max"]
    assert_bands(png, W, H)
    png.unlink()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"{W}x{H} @ 30 fps MJPG (read back)" in out and "8 frames" in out and f"snapshot: {png}" in out
    assert png.exists()


def test_camera_that_does_not_honour_the_settings_is_exit_2(video: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["camera", "--device", video, "--width", "640", "--height", "480", "--frames", "1"]) == 2
    err = capsys.readouterr().err
    assert "asked 640x480" in err and f"offers {W}x{H}" in err and video in err
    missing = "/dev/v4l/by-id/usb-No_Such_Camera-video-index0"
    assert main(["camera", "--device", missing, "--width", "640", "--height", "480"]) == 2
    assert f"no camera at {missing}" in capsys.readouterr().err


def test_camera_reads_an_mjpeg_stream(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "stream.png"
    with MjpegServer(160, 120, 30.0) as server:
        code = main(["camera", "--device", server.url, "--width", "160", "--height", "120", "--frames", "5",
                     "--snapshot", str(png), "--json"])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        report = json.loads(captured.out)
        assert report["frames"] == 5 and server.url in report["name"]
        assert (report["settings"]["width"], report["settings"]["height"]) == (160, 120)
        assert_bands(png, 160, 120)
        assert main(["camera", "--device", server.url, "--width", "320", "--height", "240", "--frames", "1"]) == 2
        assert "asked 320x240" in capsys.readouterr().err


def test_a_camera_that_stops_is_dead_after_the_dead_time_given(capsys: pytest.CaptureFixture[str]) -> None:
    # A camera drawn in software on a busy machine needs a longer dead time than a webcam (the bring-up guide's
    # test runs the emulated one with --dead-after-s); a camera that stops is still caught, after that time.
    with MjpegServer(160, 120, 30.0, stall_after=3) as server:
        code = main(["camera", "--device", server.url, "--width", "160", "--height", "120", "--frames", "30",
                     "--dead-after-s", "0.5"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"stream {server.url} is dead: no frame for" in err and "(dead_after_s=0.5)" in err, err


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "61", "two"])
def test_a_dead_time_out_of_the_configs_range_is_refused(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["camera", "--device", "/dev/video0", "--width", "640", "--height", "480", "--dead-after-s", value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --dead-after-s: expected a number of seconds > 0 and <= 60, found {value!r}" in err, err


# ----- imu ----------------------------------------------------------------------------------------


def test_imu_upright_reports_readings_and_the_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    with EmulatedBNO055(Held(gyro=(0.0, 0.0, 0.5))) as chip:
        assert main(["imu", "--port", chip.port, "--samples", "3", "--interval", "0.01", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert main(["imu", "--port", chip.port, "--samples", "2", "--interval", "0.01"]) == 0
        lines = capsys.readouterr().out.splitlines()
    assert report["port"] == chip.port and len(report["readings"]) == 3
    assert report["upright"] is True and report["verdict"] == "upright within 5 deg (tilt 0.0 deg)"
    for row in report["readings"]:
        assert abs(row["roll_deg"]) < 0.1 and abs(row["pitch_deg"]) < 0.1
        assert row["gyro_dps"][2] == pytest.approx(math.degrees(0.5), abs=0.1)
        assert row["calibration"] == {"sys": 3, "gyr": 3, "acc": 3, "mag": 3}
    assert len(lines) == 3 and "calib sys 3 gyro 3 accel 3 mag 3" in lines[0] and "+28.6" in lines[0]
    assert lines[-1].startswith("upright within 5 deg")


def test_imu_tilted_and_uncalibrated_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    with EmulatedBNO055(Held(roll_deg=25.0)) as chip:
        chip.calibration = {"sys": 0, "gyr": 3, "acc": 1, "mag": 0}
        assert main(["imu", "--port", chip.port, "--samples", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["upright"] is False and report["tilt_deg"] == pytest.approx(25.0, abs=0.2)
    assert report["readings"][0]["roll_deg"] == pytest.approx(25.0, abs=0.2)
    assert report["verdict"].startswith("tilted 25.0 deg from upright (roll +25.0, pitch +0.0 deg)")
    assert "not fully calibrated" in report["verdict"] and "figure 8" in report["verdict"]
    assert tilt_deg([1.0, 0.0, 0.0, 0.0]) == 0.0 and tilt_deg([0.0, 1.0, 0.0, 0.0]) == pytest.approx(180.0)


def test_imu_errors_name_the_port_and_what_to_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with EmulatedBNO055() as chip:
        chip.faults.silent = True
        assert main(["imu", "--port", chip.port, "--samples", "1"]) == 2  # gives up after its retries
    err = capsys.readouterr().err
    assert chip.port in err and "no answer" in err and "PS1" in err and "Traceback" not in err
    missing = str(tmp_path / "ttyUSB9")
    assert main(["imu", "--port", missing]) == 2
    err = capsys.readouterr().err
    assert missing in err and "cannot open the port" in err
