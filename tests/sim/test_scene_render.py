"""The emulated scene of the real-robot tasks, seen as the robot sees it: the rig's MJPEG stream read by
`robot.camera.Camera` (OpenCV's FFmpeg backend), ArUco markers tracked by `robot.markers.MarkerTracker` in the
table frame of the table marker, and the BNO055 read by `robot.imu.BNO055` on its pseudo-terminal."""

from __future__ import annotations

import http.client
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from core.config import Config, load_config
from robot.sensors.camera import Camera
from robot.sensors.imu import BNO055
from robot.sensors.markers import CameraModel, MarkerTracker
from sim.emulation.camera_server import MjpegServer
from sim.emulation.rig import EmulatedRig

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ("so101_arm", "koch_arm", "servo_quadruped")
TOLERANCE_M = 0.01
SETTLE_S = 30.0  # generous: the physics runs in real time on a busy machine
# Joint goals that bring the effector marker within success_distance of the target marker (found offline).
REACH = {"so101_arm": {"shoulder_lift": 0.4, "elbow_flex": -0.1, "wrist_flex": 1.4},
         "koch_arm": {"shoulder_lift": 0.6, "elbow_flex": -0.2, "wrist_flex": 1.3}}


def config(name: str) -> Config:
    # supersampled renders: the accuracy a real lens gives (the live default renders plainly, for speed)
    return load_config(ROOT / "hardware_configs" / f"{name}.yaml", ["emulator.camera.supersample=2"])


@pytest.fixture(scope="module", params=CONFIGS)
def rig(request: pytest.FixtureRequest) -> Iterator[EmulatedRig]:
    with EmulatedRig(config(request.param), timing=False) as rig:
        yield rig


def drive(rig: EmulatedRig, goals: dict[str, float], tolerance: float = 0.05) -> None:
    """Torque on every servo and move to `goals` (others home); wait until the joints get there."""
    servos = rig.cfg.motors.servos
    target = np.array([goals.get(s.name, s.home) for s in servos])
    for i, angle in enumerate(target):
        rig.plant.set_torque(i, True)
        rig.plant.set_goal(i, float(angle))
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        pos, vel, _ = rig.plant.state()
        if np.max(np.abs(pos - target)) < tolerance and np.max(np.abs(vel)) < 0.05:
            return
        time.sleep(0.05)
    raise AssertionError(f"joints did not reach {target.round(2)}: at {rig.plant.state()[0].round(2)}")


def camera_for(rig: EmulatedRig) -> Camera:
    cam = rig.cfg.emulator.camera
    return Camera(rig.camera_url, cam.width, cam.height, fps=None, pixel_format=None, keep_full=True,
                  max_age_s=5.0, dead_after_s=30.0)


def fresh_image(camera: Camera, after: float) -> np.ndarray:
    """A full frame that arrived well after `after` (the stream has a few frames in flight)."""
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        frame = camera.latest()
        if frame.time > after + 1.0:
            return np.asarray(frame.full)
        time.sleep(0.05)
    raise AssertionError("no fresh frame from the stream within 30 s")


def table_tracker(rig: EmulatedRig, image: np.ndarray) -> MarkerTracker:
    """What the robot does: the table frame from the pose of the table marker (table_from_camera = its
    inverse), then every marker in that frame."""
    cam, markers = rig.cfg.emulator.camera, rig.cfg.markers
    model = CameraModel.from_fov(cam.width, cam.height, cam.fov_deg)
    seen = MarkerTracker(model, markers.size_m, markers.dictionary).detect(image)
    assert markers.table_id in seen, f"the table marker is not in view (seen: {sorted(seen)})"
    h = markers.size_m / 2
    square = np.array([[-h, h, 0], [h, h, 0], [h, -h, 0], [-h, -h, 0]])
    ok, rvec, tvec = cv2.solvePnP(square, seen[markers.table_id].corners, model.matrix, model.distortion,
                                  flags=cv2.SOLVEPNP_IPPE_SQUARE)
    assert ok
    camera_from_table = np.eye(4)
    camera_from_table[:3, :3] = cv2.Rodrigues(rvec)[0]
    camera_from_table[:3, 3] = tvec.reshape(3)
    return MarkerTracker(model, markers.size_m, markers.dictionary, table_from_camera=np.linalg.inv(camera_from_table))


def errors(rig: EmulatedRig, image: np.ndarray) -> dict[int, float]:
    truth = rig.scene.truth()
    seen = table_tracker(rig, image).detect(image)
    return {i: float(np.linalg.norm(seen[i].position - truth[i])) for i in seen if i in truth}


def home(rig: EmulatedRig) -> None:
    drive(rig, {})
    if not rig.plant.model.fixed_base:
        rig.plant.reset_pose([s.home for s in rig.cfg.motors.servos])  # upright, standing at the start


def test_the_render_worker_runs_in_a_session_of_its_own(rig: EmulatedRig) -> None:
    """Linux shares CPU time between sessions (autogroups): drawing, the emulator's heaviest work, must not be
    charged to the session of the servo emulator's serial thread and of a robot started from the same shell, whose
    replies were late behind it (issue 23)."""
    assert rig.scene is not None and rig.scene._process is not None
    assert os.getsid(rig.scene._process.pid) != os.getsid(0)


def test_stream_frames_and_markers_at_home(rig: EmulatedRig) -> None:
    home(rig)
    cam = rig.cfg.emulator.camera
    with camera_for(rig) as camera:
        moved_at = time.monotonic()
        image = fresh_image(camera, moved_at)
        assert image.shape == (cam.height, cam.width, 3)
        assert camera.latest().image.shape == (64, 64, 3)
        err = errors(rig, image)
    expected = {m.id for m in rig.cfg.emulator.markers} | ({3} if rig.cfg.emulator.object else set())
    print(f"\n[{rig.cfg.name}] marker errors (mm): { {i: round(e * 1000, 1) for i, e in err.items()} }")
    assert set(err) == expected  # every marker is in view at home
    assert max(err.values()) < TOLERANCE_M


def test_effector_marker_follows_a_reach(rig: EmulatedRig) -> None:
    if rig.cfg.name == "servo_quadruped":
        pytest.skip("the quadruped has no effector marker")
    reach = rig.cfg.marker_reach
    home(rig)
    start = rig.scene.truth()[reach.effector_id]
    target = rig.scene.truth()[reach.target_id]
    reached = REACH[rig.cfg.name]
    homes = {s.name: s.home for s in rig.cfg.motors.servos}
    distances = []
    with camera_for(rig) as camera:
        for fraction in (0.0, 0.5, 1.0):
            drive(rig, {name: homes[name] + fraction * (angle - homes[name]) for name, angle in reached.items()})
            image = fresh_image(camera, time.monotonic())
            err = errors(rig, image)
            assert reach.effector_id in err, f"effector marker lost at {fraction:.0%} of the reach"
            assert err[reach.effector_id] < TOLERANCE_M
            truth = rig.scene.truth()
            distances.append(float(np.linalg.norm(truth[reach.effector_id] - target)))
    end = rig.scene.truth()[reach.effector_id]
    print(f"\n[{rig.cfg.name}] effector to target along the reach (m): {np.round(distances, 3).tolist()}")
    assert np.linalg.norm(end - start) > 0.05  # the marker moved with the joints
    assert distances[-1] < reach.success_distance < distances[0]


def test_cube_marker_follows_the_cube(rig: EmulatedRig) -> None:
    if rig.cfg.emulator.object is None:
        pytest.skip("no cube in this scene")
    pick = rig.cfg.pick_place
    home(rig)
    a, b = (np.add(r.low, r.high) / 2 for r in pick.regions)
    top = rig.scene.object_position()
    assert pick.regions[0].low[0] <= top[0] <= pick.regions[0].high[0]  # it starts in region A
    assert pick.regions[0].low[1] <= top[1] <= pick.regions[0].high[1]
    with camera_for(rig) as camera:
        for xy in (b, a):
            rig.scene.set_object([xy[0], xy[1], rig.cfg.emulator.object.size])
            image = fresh_image(camera, time.monotonic())
            seen = table_tracker(rig, image).detect(image)
            assert pick.object_id in seen
            assert np.linalg.norm(seen[pick.object_id].position[:2] - xy) < TOLERANCE_M
            assert np.linalg.norm(seen[pick.object_id].position - rig.scene.truth()[pick.object_id]) < TOLERANCE_M


def test_imu_reads_the_base(rig: EmulatedRig) -> None:
    if rig.imu_port is None:
        pytest.skip("no IMU in this scene")
    home(rig)
    with BNO055(rig.imu_port) as imu:
        q = imu.read().quaternion
        assert 1 - 2 * (q[1] ** 2 + q[2] ** 2) > 0.98  # upright: the chip's z axis is world up
        tilt = 0.5  # rad about x
        rig.plant.set_base([0, 0, 0.5], [np.sin(tilt / 2), 0, 0, np.cos(tilt / 2)])
        q = imu.read().quaternion
        up_z = 1 - 2 * (q[1] ** 2 + q[2] ** 2)
        assert up_z == pytest.approx(np.cos(tilt), abs=0.1)
    rig.plant.reset_pose([s.home for s in rig.cfg.motors.servos])


def test_overrides_make_a_valid_config(rig: EmulatedRig) -> None:
    sets = rig.overrides()
    cfg = load_config(ROOT / "hardware_configs" / f"{rig.cfg.name}.yaml", sets)
    assert cfg.motors.port == rig.port
    assert cfg.sensors.camera.device == rig.camera_url
    assert rig.camera_url.startswith("http://127.0.0.1:")
    if rig.cfg.emulator.imu:
        assert cfg.sensors.imu.port == rig.imu_port
    else:
        assert not any(s.startswith("sensors.imu") for s in sets)


def test_mjpeg_server_survives_clients_and_404s() -> None:
    frame = np.zeros((48, 64, 3), np.uint8)
    with MjpegServer(lambda: frame, fps=20) as server:
        host, port = server.url.split("/")[2].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", "/other")
        assert conn.getresponse().status == 404
        conn.close()
        for _ in range(3):  # clients that leave mid-stream
            with socket.create_connection((host, int(port)), timeout=10) as s:
                s.sendall(b"GET /camera.mjpg HTTP/1.0\r\n\r\n")
                assert b"multipart/x-mixed-replace" in s.recv(4096)
        capture = cv2.VideoCapture(server.url, cv2.CAP_FFMPEG)
        try:
            ok, image = capture.read()
        finally:
            capture.release()
        assert ok and image.shape == frame.shape
        assert server.errors == 0


def test_rig_without_a_model_refuses_camera_and_imu() -> None:
    cfg = load_config(ROOT / "hardware_configs" / "servo_quadruped.yaml", ["emulator.model=null"])
    with pytest.raises(RuntimeError, match="emulator.camera and emulator.imu: need the PyBullet world"):
        EmulatedRig(cfg)


def test_render_worker_reports_a_bad_snapshot_and_keeps_rendering(rig: EmulatedRig, monkeypatch) -> None:
    """A snapshot the worker cannot draw comes back as a SceneError naming the failure; the worker lives on."""
    from sim.emulation.scene_render import SceneError

    scene = rig.scene
    assert scene is not None
    good = scene.render()
    monkeypatch.setattr(scene, "_snapshot", lambda: {"base": "not a pose"})
    with pytest.raises(SceneError, match="failed while rendering: .*Error"):
        scene.render()
    monkeypatch.undo()
    assert scene.render().shape == good.shape
