"""What the fixed camera of an emulated real-robot scene sees: the robot, printed ArUco markers and a cube.

The scene lives beside a `PyBulletPlant` (`reverie-sim emulate`): the cube of `emulator.object` is a dynamic
body of the plant's world (it collides with the robot and the floor, so an arm can push or carry it); the
markers of `emulator.markers` are prints without mass or collision. The floor (z = 0) is the table.

Markers on a robot link (`link` set) behave like a sticker on a small plate that stays level: the print
faces up (world +z) whatever the link's tilt, its centre is the link frame's origin plus `position` given in
the link frame, and it is turned about the vertical by the link's yaw plus `heading`. The link's yaw is the
twist of its orientation about world z (2·atan2(q_z, q_w)), which stays defined when the link points
straight down, as a reaching hand does. A real sticker would tilt with the link and hide when it faces away;
the level plate keeps the tasks' markers trackable over the whole workspace. The cube's marker is printed
on its top face and tilts with the cube.

Rendering costs tens of milliseconds and PyBullet holds the interpreter lock while it draws, which would
stall the physics thread and the serial emulator of the same process. So images are drawn in a worker
process holding a copy of the scene: `render()` only reads the poses under the plant's lock (microseconds),
then waits for the worker's image with the interpreter lock free.

The table frame is the frame of marker `markers.table_id` (it must lie on the table): origin at its
centre on the print, x to the right of the printed image, y up it, z up. `truth()` gives every marker's
table-frame position, the ground truth a tracker's estimate is checked against.
"""

from __future__ import annotations

import math
import os
import select
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import msgpack
import numpy as np
import pybullet as p

from core.config import Config
from robot.sensors.markers import CameraModel, aruco_dictionary
from sim.emulation.marker_scene import LIFT_M, NEAR_M, PAPER, print_quad, render_view, table_from_camera, view_up
from sim.emulation.servo_models import urdf_path
from sim.emulation.servo_plant import PyBulletPlant

SUPERSAMPLE = 2  # rendered at this many times the camera's size, then averaged (soft edges for sub-pixel corners)
FAR_M = 10.0
START_S = 60.0  # the worker process must be ready within this (a busy machine imports slowly)
FRAME_S = 30.0  # one frame must come back within this
TABLE_RGBA = (0.55, 0.5, 0.45, 1.0)
CUBE_RGBA = (0.96, 0.96, 0.94, 1.0)  # white card, so the print's white margin is the cube's face

Pose = tuple[tuple[float, float, float], tuple[float, float, float, float]]  # position, quaternion x, y, z, w


class SceneError(RuntimeError):
    """The scene cannot be built from the config or its renderer failed; the message names the key."""


@dataclass(frozen=True)
class _Print:
    """One marker to draw: its id and how much white paper surrounds the black square."""

    id: int
    paper: float


def _yaw_quat(yaw: float) -> tuple[float, float, float, float]:
    return (0.0, 0.0, math.sin(yaw / 2), math.cos(yaw / 2))


def _matrix(position: Sequence[float], quat_xyzw: Sequence[float]) -> np.ndarray:
    pose = np.eye(4)
    pose[:3, :3] = np.asarray(p.getMatrixFromQuaternion(list(quat_xyzw))).reshape(3, 3)
    pose[:3, 3] = position
    return pose


def link_yaw(quat_xyzw: Sequence[float]) -> float:
    """The twist of an orientation about world z, rad: a level plate on the link turns by this much."""
    x, y, z, w = quat_xyzw
    return 2.0 * math.atan2(z, w)


class SceneRenderer:
    """The markers and cube of `cfg.emulator` in the plant's world, and the camera `cfg.emulator.camera` on them.

    A context manager: `close()` stops the render worker (the plant is the caller's to close).
    """

    def __init__(self, plant: PyBulletPlant, cfg: Config, supersample: int = SUPERSAMPLE) -> None:
        cam = cfg.emulator.camera
        if cam is None:
            raise SceneError("emulator.camera: null; the scene needs a camera (eye, target, fov_deg, width, height)")
        if supersample < 1:
            raise SceneError(f"SceneRenderer: supersample must be >= 1, got {supersample}")
        aruco_dictionary(cfg.markers.dictionary)  # an unknown dictionary fails here, naming the valid ones
        self.plant, self.cfg, self.size_m = plant, cfg, cfg.markers.size_m
        self.width, self.height, self.fov_deg = cam.width, cam.height, cam.fov_deg
        self.camera = CameraModel.from_fov(cam.width, cam.height, cam.fov_deg)
        self.world_from_camera = table_from_camera(cam.eye, cam.target)  # OpenCV axes, world frame
        self.table_from_world = self._table_frame(cfg)
        self._links = self._marker_links(cfg)
        self._object = cfg.emulator.object
        self.cube: int | None = None
        self._lock = threading.Lock()  # one frame in flight on the pipe at a time
        self._down = self._up = -1  # pipes to and from the render worker
        self._process: subprocess.Popen[bytes] | None = None
        if self._object is not None:
            self._add_cube()
        self._start_worker(supersample)

    # ----- setup --------------------------------------------------------------------------------
    def _table_frame(self, cfg: Config) -> np.ndarray:
        table_id = cfg.markers.table_id
        ids = [m.id for m in cfg.emulator.markers] + ([cfg.emulator.object.marker_id] if cfg.emulator.object else [])
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise SceneError(f"emulator.markers / emulator.object.marker_id: marker id(s) {dupes} appear twice; "
                             "the tracker ignores a marker seen twice")
        count = aruco_dictionary(cfg.markers.dictionary).bytesList.shape[0]
        if any(not 0 <= i < count for i in ids):
            raise SceneError(f"emulator.markers: ids {ids} must lie in 0..{count - 1} ({cfg.markers.dictionary})")
        table = [m for m in cfg.emulator.markers if m.id == table_id]
        if not table or table[0].link is not None:
            raise SceneError(f"emulator.markers: no marker with id {table_id} (markers.table_id) lying on the table "
                             "(link: null); the table frame is that marker's frame")
        x, y, z = table[0].position
        return np.linalg.inv(_matrix((x, y, z + LIFT_M), _yaw_quat(table[0].heading)))

    def _marker_links(self, cfg: Config) -> list[int | None]:
        """PyBullet link index of each marker's carrier (-1: the base, None: the table)."""
        with self.plant.locked() as c:
            body = self.plant.body
            names = {p.getBodyInfo(body, physicsClientId=c)[0].decode(): -1}
            for j in range(p.getNumJoints(body, physicsClientId=c)):
                names[p.getJointInfo(body, j, physicsClientId=c)[12].decode()] = j
        links: list[int | None] = []
        for i, marker in enumerate(cfg.emulator.markers):
            if marker.link is not None and marker.link not in names:
                raise SceneError(f"emulator.markers.{i}.link: {marker.link!r} is not a link of the "
                                 f"{self.plant.model.name} model; its links are {sorted(names)}")
            links.append(None if marker.link is None else names[marker.link])
        return links

    def _add_cube(self) -> None:
        obj = self._object
        assert obj is not None
        cells = aruco_dictionary(self.cfg.markers.dictionary).markerSize + 2
        least = self.size_m * (1 + 2 / cells)
        if obj.size < least:
            raise SceneError(f"emulator.object.size: {obj.size} m leaves no white quiet zone (one cell) around a "
                             f"{self.size_m} m marker (markers.size_m); use at least {least:.3f}")
        half = obj.size / 2
        with self.plant.locked() as c:
            shape = p.createCollisionShape(p.GEOM_BOX, halfExtents=[half] * 3, physicsClientId=c)
            look = p.createVisualShape(p.GEOM_BOX, halfExtents=[half] * 3, rgbaColor=CUBE_RGBA, physicsClientId=c)
            x, y, z = obj.position
            self.cube = p.createMultiBody(obj.mass, shape, look, [x, y, z + half], physicsClientId=c)
            p.changeDynamics(self.cube, -1, lateralFriction=1.0, physicsClientId=c)

    def _prints(self) -> list[_Print]:
        prints = [_Print(m.id, PAPER) for m in self.cfg.emulator.markers]
        if self._object is not None:  # the print covers the cube's whole top face
            prints.append(_Print(self._object.marker_id, (self._object.size / self.size_m - 1) / 2))
        return prints

    def _start_worker(self, supersample: int) -> None:
        cam = self.cfg.emulator.camera
        assert cam is not None
        spec = {
            "model": self.plant.model.name, "fixed_base": self.plant.model.fixed_base,
            "width": cam.width, "height": cam.height, "fov_deg": cam.fov_deg, "eye": list(cam.eye),
            "target": list(cam.target), "supersample": supersample, "size_m": self.size_m,
            "dictionary": self.cfg.markers.dictionary, "prints": [(m.id, m.paper) for m in self._prints()],
            "cube": self._object.size if self._object else None,
        }
        # A fresh interpreter (not fork: the parent runs threads whose locks a fork would copy held), talking
        # over its own pipes: pybullet prints to stdout, which is sent to /dev/null. In a session of its own: Linux
        # shares CPU time fairly between sessions (autogroups), so drawing (a third of a core at 10 fps) is not
        # charged to the session of the emulator, whose serial thread must wake within milliseconds, and of a
        # robot started from the same shell. Measured on a busy 2-core machine, a robot at 20 Hz for a minute: with the
        # worker in their session 24 of 766 bus requests were incomplete at the robot's deadline, nearly all read by
        # the emulator too late; in a session of its own 0, 0 and 5 of 800 to 1000 in three runs.
        # The worker needs no signals: it ends when the pipe closes.
        down_r, down_w = os.pipe()
        up_r, up_w = os.pipe()
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "sim.emulation.scene_render", str(down_r), str(up_w)], pass_fds=(down_r, up_w),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, cwd=_ROOT, start_new_session=True,
            )
        except BaseException:
            for fd in (down_r, down_w, up_r, up_w):
                os.close(fd)
            raise
        os.close(down_r)
        os.close(up_w)
        self._down, self._up = down_w, up_r
        try:
            _send(self._down, spec)
            self._receive(START_S, "starting")
        except BaseException:
            self.close()
            raise

    # ----- poses --------------------------------------------------------------------------------
    def _snapshot(self) -> dict[str, Any]:
        """Joint angles, base pose, marker and cube poses (world), read at one instant under the lock."""
        body = self.plant.body
        with self.plant.locked() as c:
            n = p.getNumJoints(body, physicsClientId=c)
            joints = [s[0] for s in p.getJointStates(body, list(range(n)), physicsClientId=c)]
            base = p.getBasePositionAndOrientation(body, physicsClientId=c)
            frames: dict[int, Pose] = {}
            for link in {k for k in self._links if k is not None}:
                frames[link] = self._link_frame(c, body, link)
            cube = p.getBasePositionAndOrientation(self.cube, physicsClientId=c) if self.cube is not None else None
        markers: list[Pose] = []
        for marker, link in zip(self.cfg.emulator.markers, self._links):
            if link is None:
                x, y, z = marker.position
                markers.append(((x, y, z + LIFT_M), _yaw_quat(marker.heading)))
            else:
                origin, quat = frames[link]
                at = np.asarray(origin) + _matrix(origin, quat)[:3, :3] @ np.asarray(marker.position)
                markers.append((tuple(at.tolist()), _yaw_quat(link_yaw(quat) + marker.heading)))
        if cube is not None:
            assert self._object is not None
            top = _matrix(*cube) @ np.array([0.0, 0.0, self._object.size / 2 + LIFT_M, 1.0])
            markers.append((tuple(top[:3].tolist()), tuple(cube[1])))
        return {"joints": joints, "base": base, "markers": markers, "cube": cube}

    @staticmethod
    def _link_frame(c: int, body: int, link: int) -> Pose:
        """The URDF frame of a link (PyBullet reports the base's centre of mass, not its frame)."""
        if link >= 0:
            state = p.getLinkState(body, link, computeForwardKinematics=True, physicsClientId=c)
            return state[4], state[5]
        com = p.getBasePositionAndOrientation(body, physicsClientId=c)
        local = p.getDynamicsInfo(body, -1, physicsClientId=c)[3:5]
        return p.multiplyTransforms(*com, *p.invertTransform(*local))

    def _ids(self) -> list[int]:
        return [m.id for m in self._prints()]

    def truth(self) -> dict[int, np.ndarray]:
        """Table-frame position of every marker's centre (on the print), m: the ground truth of a tracker."""
        snap = self._snapshot()
        return {i: (self.table_from_world @ np.array([*pose[0], 1.0]))[:3]
                for i, pose in zip(self._ids(), snap["markers"])}

    def object_position(self) -> np.ndarray:
        """Table-frame position of the centre of the cube's top face, m."""
        if self.cube is None:
            raise SceneError("emulator.object: null; this scene has no cube")
        with self.plant.locked() as c:
            pos, quat = p.getBasePositionAndOrientation(self.cube, physicsClientId=c)
        top = _matrix(pos, quat) @ np.array([0.0, 0.0, self._object.size / 2, 1.0])  # type: ignore[union-attr]
        return (self.table_from_world @ top)[:3]

    def set_object(self, position: Sequence[float], heading: float = 0.0) -> None:
        """Put the cube, upright and at rest, with its top-face centre at table-frame `position` (a person or a
        grasp moving it); it falls if that leaves it in the air."""
        if self.cube is None:
            raise SceneError("emulator.object: null; this scene has no cube")
        x, y, z = (float(v) for v in position)
        world_from_table = np.linalg.inv(self.table_from_world)
        centre = world_from_table @ np.array([x, y, z - self._object.size / 2, 1.0])  # type: ignore[union-attr]
        yaw = math.atan2(world_from_table[1, 0], world_from_table[0, 0]) + heading
        with self.plant.locked() as c:
            p.resetBasePositionAndOrientation(self.cube, centre[:3].tolist(), _yaw_quat(yaw), physicsClientId=c)
            p.resetBaseVelocity(self.cube, (0, 0, 0), (0, 0, 0), physicsClientId=c)

    # ----- images -------------------------------------------------------------------------------
    def render(self) -> np.ndarray:
        """The camera's view now: HxWx3 uint8 RGB at `emulator.camera` width x height."""
        snap = self._snapshot()
        with self._lock:
            if self._process is None:
                raise SceneError("SceneRenderer is closed")
            try:
                _send(self._down, snap)
            except OSError as exc:
                raise SceneError(f"scene render worker is gone (exit code {self._process.poll()}): {exc}") from None
            return self._receive(FRAME_S, "rendering")

    def _receive(self, timeout: float, doing: str) -> Any:
        assert self._process is not None
        ready, _, _ = select.select([self._up], [], [], timeout)
        if not ready:
            raise SceneError(f"scene render worker is stuck: nothing back within {timeout:g} s of {doing}")
        try:
            (kind, value), payload = _receive(self._up)
        except EOFError:
            code = self._process.wait(timeout=5)
            raise SceneError(f"scene render worker died while {doing} (exit code {code}; its error is above "
                             "on stderr)") from None
        if kind == "error":
            raise SceneError(f"scene render worker failed while {doing}: {value}")
        return np.frombuffer(payload, np.uint8).reshape(value) if kind == "image" else value

    def close(self) -> None:
        """Stop the render worker. Safe to call repeatedly."""
        process, self._process = self._process, None
        for fd in (self._down, self._up):
            if fd >= 0:
                os.close(fd)  # the worker reads end-of-file and exits
        self._down = self._up = -1
        if process is not None:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)

    def __enter__(self) -> SceneRenderer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class _RenderWorld:
    """The copy of the scene the worker draws: a table, the robot, the prints and the cube (no physics)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self._textures = tempfile.TemporaryDirectory(prefix="reverie-scene-")
        self.client = c = p.connect(p.DIRECT)
        width, height = spec["width"], spec["height"]
        forward = np.asarray(spec["target"], float) - np.asarray(spec["eye"], float)
        self._view = p.computeViewMatrix(spec["eye"], spec["target"], view_up(forward).tolist())
        self._proj = p.computeProjectionMatrixFOV(spec["fov_deg"], width / height, NEAR_M, FAR_M)
        table = p.createVisualShape(p.GEOM_BOX, halfExtents=[3.0, 3.0, 0.01], rgbaColor=TABLE_RGBA, physicsClientId=c)
        p.createMultiBody(baseMass=0, baseVisualShapeIndex=table, basePosition=[0, 0, -0.01], physicsClientId=c)
        self.robot = p.loadURDF(urdf_path(spec["model"]), useFixedBase=True, physicsClientId=c)
        self.joints = p.getNumJoints(self.robot, physicsClientId=c)
        self.prints = [print_quad(c, self._textures.name, i, spec["size_m"], spec["dictionary"], paper)
                       for i, paper in spec["prints"]]
        self.cube = None
        if spec["cube"] is not None:
            half = spec["cube"] / 2
            look = p.createVisualShape(p.GEOM_BOX, halfExtents=[half] * 3, rgbaColor=CUBE_RGBA, physicsClientId=c)
            self.cube = p.createMultiBody(baseMass=0, baseVisualShapeIndex=look, physicsClientId=c)

    def draw(self, snap: dict[str, Any]) -> np.ndarray:
        c = self.client
        p.resetBasePositionAndOrientation(self.robot, *snap["base"], physicsClientId=c)
        for j, angle in enumerate(snap["joints"]):
            p.resetJointState(self.robot, j, angle, physicsClientId=c)
        for body, pose in zip(self.prints, snap["markers"]):
            p.resetBasePositionAndOrientation(body, *pose, physicsClientId=c)
        if self.cube is not None:
            p.resetBasePositionAndOrientation(self.cube, *snap["cube"], physicsClientId=c)
        s = self.spec
        return render_view(c, s["width"], s["height"], s["supersample"], self._view, self._proj)

    def close(self) -> None:
        p.disconnect(self.client)
        self._textures.cleanup()


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # so the worker imports this checkout


def _send(fd: int, message: Any, payload: bytes | memoryview = b"") -> None:
    """One message on a pipe: sizes, a msgpack header, then raw bytes (an image); nothing pickled."""
    header = msgpack.packb(message)
    body = memoryview(payload).cast("B")
    for part in (struct.pack("<QQ", len(header), body.nbytes) + header, body):
        view = memoryview(part)
        while view:
            view = view[os.write(fd, view):]


def _read_exact(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError("pipe closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _receive(fd: int) -> tuple[Any, bytes]:
    """The header and the raw bytes of one message."""
    header_size, payload_size = struct.unpack("<QQ", _read_exact(fd, 16))
    return msgpack.unpackb(_read_exact(fd, header_size)), _read_exact(fd, payload_size)


def _error(exc: Exception) -> list[Any]:
    return ["error", f"{type(exc).__name__}: {exc}"]


def _draw_reply(world: _RenderWorld, snap: Any) -> tuple[list[Any], bytes | memoryview]:
    """The answer to one snapshot: its image (shape in the header, raw pixels after), or the error."""
    try:
        image = np.ascontiguousarray(world.draw(snap), dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it with context
        return _error(exc), b""
    return ["image", list(image.shape)], image.data


def _worker(down: int, up: int) -> None:
    """The render process: build the scene copy from the first message, then answer each snapshot with an
    image until the parent closes the pipe."""
    try:
        world = _RenderWorld(_receive(down)[0])
    except EOFError:
        return
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it with context
        _send(up, _error(exc))
        return
    try:
        _send(up, ["ready", None])
        while True:
            try:
                snap = _receive(down)[0]
            except EOFError:
                return
            try:
                _send(up, *_draw_reply(world, snap))
            except BrokenPipeError:
                return
    finally:
        world.close()


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]))
