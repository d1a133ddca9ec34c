"""Marker tracking on real OpenCV, against images rendered at known poses.

Views are synthesised: the printed marker (generate_marker, on white paper) is placed on a table at a known
position and heading, its paper corners are projected with a known pinhole camera and the print is warped
into a textured background (rendered at 2x and area-downsampled, so edges are anti-aliased as a lens would).
Run with `-s` to see the measured errors.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from robot.sensors.markers import CameraModel, MarkerTracker, generate_marker

W, H, FOV = 640, 480, 60.0
SIZE = 0.05  # marker side, m
PAPER = 0.2  # white margin around the print, fraction of the side
PRINT_PX = 240  # resolution of the printed marker image
SS = 2  # supersampling of the renderer


def look_at(eye: np.ndarray, target: np.ndarray) -> np.ndarray:
    """table_from_camera for a camera at `eye` looking at `target` (OpenCV axes: x right, y down, z forward)."""
    forward = (target - eye) / np.linalg.norm(target - eye)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    if np.linalg.norm(right) < 1e-9:  # straight down: image up is table +y
        right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    m = np.eye(4)
    m[:3, :3] = np.column_stack([right, down, forward])
    m[:3, 3] = eye
    return m


def rot_z(yaw: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def background(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Low-contrast wood-ish clutter, so the detector works on something other than a flat colour."""
    rng = np.random.default_rng(seed)
    noise = cv2.resize(rng.uniform(90, 170, (h // 16 + 1, w // 16 + 1, 3)), (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(noise + rng.normal(0, 4, (h, w, 3)), 0, 255).astype(np.uint8)


def project(k: np.ndarray, table_from_camera: np.ndarray, points_table: np.ndarray) -> np.ndarray:
    cam_from_table = np.linalg.inv(table_from_camera)
    p = points_table @ cam_from_table[:3, :3].T + cam_from_table[:3, 3]
    assert np.all(p[:, 2] > 0), "test scene: a marker is behind the camera"
    uv = p @ k.T
    return uv[:, :2] / uv[:, 2:]


def render(
    k: np.ndarray, size: tuple[int, int], table_from_camera: np.ndarray, markers: list[tuple[int, np.ndarray, float]]
) -> np.ndarray:
    """An RGB view of printed markers (id, table position, heading) lying flat on the table."""
    w, h = size
    k2 = k * SS
    k2[2, 2] = 1.0
    k2[:2, 2] += (SS - 1) / 2  # pixel centres at integers in both images
    canvas = background(w * SS, h * SS).astype(np.float32)
    for marker_id, position, yaw in markers:
        margin = round(PRINT_PX * PAPER)
        sheet = cv2.cvtColor(generate_marker(marker_id, PRINT_PX, margin_px=margin), cv2.COLOR_GRAY2RGB)
        n = sheet.shape[0]
        half = SIZE / 2 * (1 + 2 * PAPER)
        local = np.array([[-half, half, 0], [half, half, 0], [half, -half, 0], [-half, -half, 0]])
        dst = project(k2, table_from_camera, position + local @ rot_z(yaw).T)
        src = np.array([[-0.5, -0.5], [n - 0.5, -0.5], [n - 0.5, n - 0.5], [-0.5, n - 0.5]])
        hom = cv2.getPerspectiveTransform(src.astype(np.float32), dst.astype(np.float32))
        warped = cv2.warpPerspective(sheet.astype(np.float32), hom, (w * SS, h * SS), flags=cv2.INTER_LINEAR)
        cover = cv2.warpPerspective(np.ones((n, n), np.float32), hom, (w * SS, h * SS), flags=cv2.INTER_LINEAR)
        canvas = canvas * (1 - cover[..., None]) + warped * cover[..., None]
    small = cv2.resize(canvas, (w, h), interpolation=cv2.INTER_AREA)
    return np.clip(small + 0.5, 0, 255).astype(np.uint8)


def expected_heading(table_from_camera: np.ndarray | None, cam_from_table: np.ndarray, yaw: float) -> float:
    x_axis = rot_z(yaw)[:, 0]
    if table_from_camera is None:
        x_axis = cam_from_table[:3, :3] @ x_axis
    return math.atan2(x_axis[1], x_axis[0])


def angle_error(a: float, b: float) -> float:
    return abs((a - b + math.pi) % (2 * math.pi) - math.pi)


CAMERA = CameraModel.from_fov(W, H, FOV)
OBLIQUE = look_at(np.array([0.0, -0.32, 0.40]), np.array([0.0, 0.0, 0.0]))  # about 0.5 m from the table centre
POSES = [
    (np.array([x, y, 0.0]), yaw)
    for x, y in [(0.0, 0.0), (0.08, 0.05), (-0.1, -0.05), (0.12, -0.08), (-0.06, 0.1)]
    for yaw in (0.0, 0.7, -2.0)
]


@pytest.mark.parametrize("frame", ["table", "camera"])
def test_single_marker_pose_accuracy(frame: str) -> None:
    table = OBLIQUE if frame == "table" else None
    tracker = MarkerTracker(CAMERA, SIZE, table_from_camera=table)
    cam_from_table = np.linalg.inv(OBLIQUE)
    pos_err, head_err, dist = [], [], []
    for i, (position, yaw) in enumerate(POSES):
        image = render(CAMERA.matrix, (W, H), OBLIQUE, [(i % 50, position, yaw)])
        seen = tracker.detect(image, time=1.5)
        assert list(seen) == [i % 50], f"pose {i}: expected marker {i % 50}, saw {list(seen)}"
        pose = seen[i % 50]
        truth = position if table is not None else cam_from_table[:3, :3] @ position + cam_from_table[:3, 3]
        pos_err.append(float(np.linalg.norm(pose.position - truth)))
        head_err.append(angle_error(pose.heading, expected_heading(table, cam_from_table, yaw)))
        dist.append(float(np.linalg.norm(cam_from_table[:3, :3] @ position + cam_from_table[:3, 3])))
        assert pose.time == 1.5 and pose.corners.shape == (4, 2) and pose.id == i % 50
    print(f"\n[{frame} frame] {len(POSES)} poses at {min(dist):.2f}-{max(dist):.2f} m, 640x480, {SIZE * 100:.0f} cm "
          f"marker: position error mean {np.mean(pos_err) * 1000:.1f} mm, max {max(pos_err) * 1000:.1f} mm; "
          f"heading error mean {math.degrees(np.mean(head_err)):.2f} deg, max {math.degrees(max(head_err)):.2f} deg")
    assert max(pos_err) < 0.01
    assert math.degrees(max(head_err)) < 3.0


def test_top_down_camera_heading_is_about_the_optical_axis() -> None:
    top = look_at(np.array([0.02, 0.01, 0.5]), np.array([0.02, 0.01, 0.0]))
    tracker = MarkerTracker(CAMERA, SIZE)
    cam_from_table = np.linalg.inv(top)
    for yaw in (0.0, 1.0, 2.5, -1.2):
        pose = tracker.detect(render(CAMERA.matrix, (W, H), top, [(7, np.array([0.05, -0.03, 0.0]), yaw)]))[7]
        want = expected_heading(None, cam_from_table, yaw)
        assert angle_error(pose.heading, want) < math.radians(2), (yaw, pose.heading, want)
        assert abs(pose.position[2] - 0.5) < 0.01  # straight down: depth is the camera height


def test_several_markers_at_once() -> None:
    tracker = MarkerTracker(CAMERA, SIZE, table_from_camera=OBLIQUE)
    scene = [(3, np.array([-0.1, 0.0, 0.0]), 0.3), (11, np.array([0.1, 0.05, 0.0]), -1.0),
             (25, np.array([0.0, -0.08, 0.0]), 2.2), (42, np.array([0.05, 0.12, 0.0]), 1.4)]
    seen = tracker.detect(render(CAMERA.matrix, (W, H), OBLIQUE, scene))
    assert sorted(seen) == [3, 11, 25, 42]
    for marker_id, position, yaw in scene:
        assert np.linalg.norm(seen[marker_id].position - position) < 0.01, marker_id
        assert angle_error(seen[marker_id].heading, yaw) < math.radians(3), marker_id


def test_marker_partly_out_of_view_or_absent_is_not_reported() -> None:
    tracker = MarkerTracker(CAMERA, SIZE, table_from_camera=OBLIQUE)
    edge_x = None  # table x where the right image edge crosses the table's y=0 line
    for x in np.linspace(0.0, 0.5, 501):
        if project(CAMERA.matrix, OBLIQUE, np.array([[x, 0.0, 0.0]]))[0, 0] > W - 1:
            edge_x = float(x)
            break
    assert edge_x is not None
    scene = [(5, np.array([edge_x, 0.0, 0.0]), 0.0), (6, np.array([-0.05, 0.0, 0.0]), 0.0)]
    image = render(CAMERA.matrix, (W, H), OBLIQUE, scene)
    assert sorted(tracker.detect(image)) == [6]  # 5 is cut in half by the image edge
    inside = render(CAMERA.matrix, (W, H), OBLIQUE, [(5, np.array([edge_x - 0.1, 0.0, 0.0]), 0.0)])
    assert sorted(tracker.detect(inside)) == [5]  # the same marker fully in view is found
    assert tracker.detect(render(CAMERA.matrix, (W, H), OBLIQUE, [])) == {}


def test_an_id_seen_twice_is_ambiguous_and_left_out() -> None:
    tracker = MarkerTracker(CAMERA, SIZE, table_from_camera=OBLIQUE)
    scene = [(9, np.array([-0.08, 0.0, 0.0]), 0.0), (9, np.array([0.08, 0.0, 0.0]), 0.0),
             (10, np.array([0.0, 0.08, 0.0]), 0.0)]
    assert sorted(tracker.detect(render(CAMERA.matrix, (W, H), OBLIQUE, scene))) == [10]


def distort(ideal_padded: np.ndarray, k: np.ndarray, dist: np.ndarray, pad: int) -> np.ndarray:
    """What a lens with `dist` shows: each output pixel samples the ideal image where its ray lands."""
    u, v = np.meshgrid(np.arange(W, dtype=np.float64), np.arange(H, dtype=np.float64))
    pts = np.stack([u.ravel(), v.ravel()], axis=1).reshape(-1, 1, 2)
    ideal = cv2.undistortPoints(pts, k, dist, P=k).reshape(H, W, 2) + pad
    return cv2.remap(ideal_padded, ideal[..., 0].astype(np.float32), ideal[..., 1].astype(np.float32),
                     cv2.INTER_LINEAR)


def test_lens_distortion_is_corrected() -> None:
    dist = np.array([-0.28, 0.09, 0.0005, -0.0004, 0.0])  # a typical wide webcam (barrel)
    camera = CameraModel(CAMERA.fx, CAMERA.fy, CAMERA.cx, CAMERA.cy, dist)
    pad = 200
    k_pad = camera.matrix.copy()
    k_pad[:2, 2] += pad
    scene = [(1, np.array([0.17, 0.1, 0.0]), 0.4), (2, np.array([-0.17, -0.1, 0.0]), -0.4)]
    image = distort(render(k_pad, (W + 2 * pad, H + 2 * pad), OBLIQUE, scene), camera.matrix, dist, pad)
    with_model = MarkerTracker(camera, SIZE, table_from_camera=OBLIQUE).detect(image)
    without = MarkerTracker(CAMERA, SIZE, table_from_camera=OBLIQUE).detect(image)
    err = {m: max(np.linalg.norm(s[i].position - p) for i, p, _ in scene) for m, s in
           (("with", with_model), ("without", without))}
    print(f"\nbarrel lens, markers near the image corners: position error with the distortion model "
          f"{err['with'] * 1000:.1f} mm, ignoring it {err['without'] * 1000:.1f} mm")
    assert err["with"] < 0.01
    assert err["without"] > 3 * err["with"]


def test_camera_model_matches_pybullet_projection() -> None:
    pybullet = pytest.importorskip("pybullet")
    eye, target = [0.3, -0.4, 0.5], [0.0, 0.05, 0.0]
    view = np.array(pybullet.computeViewMatrix(eye, target, [0, 0, 1])).reshape(4, 4).T
    proj = np.array(pybullet.computeProjectionMatrixFOV(FOV, W / H, 0.01, 5.0)).reshape(4, 4).T
    points = np.array([[0.0, 0.0, 0.0], [0.1, 0.05, 0.02], [-0.08, 0.12, 0.0]])
    clip = (proj @ view @ np.c_[points, np.ones(3)].T).T
    ndc = clip[:, :2] / clip[:, 3:]
    gl_pixels = np.c_[(ndc[:, 0] + 1) / 2 * W - 0.5, (1 - ndc[:, 1]) / 2 * H - 0.5]  # centres at integers
    ours = project(CAMERA.matrix, look_at(np.array(eye), np.array(target)), points)
    assert np.allclose(ours, gl_pixels, atol=1e-6)


def test_generated_markers_decode_to_their_ids() -> None:
    tracker = MarkerTracker(CAMERA, SIZE, dictionary="DICT_5X5_100")
    for marker_id in (0, 17, 99):
        sheet = generate_marker(marker_id, 100, "DICT_5X5_100", margin_px=20)
        assert sheet.shape == (140, 140) and sheet[0, 0] == 255 and sheet[20, 20] == 0
        image = np.full((H, W, 3), 255, np.uint8)
        image[100:240, 200:340] = sheet[..., None]
        assert list(tracker.detect(image)) == [marker_id]
    with pytest.raises(ValueError, match="ids 0..49"):
        generate_marker(50, 100)
    with pytest.raises(ValueError, match="DICT_4X4_51"):
        generate_marker(1, 100, "DICT_4X4_51")


def test_configuration_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="marker_size_m"):
        MarkerTracker(CAMERA, 0.0)
    with pytest.raises(ValueError, match="unknown ArUco dictionary 'DICT_BOGUS'"):
        MarkerTracker(CAMERA, SIZE, dictionary="DICT_BOGUS")
    with pytest.raises(ValueError, match="4x4"):
        MarkerTracker(CAMERA, SIZE, table_from_camera=np.eye(3))
    skewed = np.eye(4)
    skewed[0, 1] = 0.3
    with pytest.raises(ValueError, match="rotation"):
        MarkerTracker(CAMERA, SIZE, table_from_camera=skewed)
    tracker = MarkerTracker(CAMERA, SIZE)
    with pytest.raises(ValueError, match=r"RGB uint8 .* float64 array of shape \(480, 640, 3\)"):
        tracker.detect(np.zeros((H, W, 3)))
    with pytest.raises(ValueError, match=r"shape \(480, 640\)"):
        tracker.detect(np.zeros((H, W), np.uint8))
    with pytest.raises(ValueError, match="camera.wrist: missing intrinsics field"):
        CameraModel.from_mapping({"fx": 500, "fy": 500, "cx": 320}, where="camera.wrist")
    with pytest.raises(ValueError, match=r"cam.fy: expected a number"):
        CameraModel.from_mapping({"fx": 500, "fy": "wide", "cx": 320, "cy": 240}, where="cam")
    with pytest.raises(ValueError, match="distortion must be 5"):
        CameraModel.from_mapping({"fx": 500, "fy": 500, "cx": 320, "cy": 240, "distortion": [0.1, 0.2]})
    with pytest.raises(ValueError, match="fov_deg"):
        CameraModel.from_fov(W, H, 180)
    model = CameraModel.from_mapping({"fx": 500, "fy": 510, "cx": 320.5, "cy": 241, "distortion": [0.1, 0, 0, 0, 0]})
    assert model.matrix[1, 1] == 510 and model.distortion[0] == 0.1


SCENE = [(0, (0.0, 0.0), 0.0), (13, (0.1, 0.06), 0.9), (21, (-0.12, -0.04), -2.4), (37, (0.07, -0.09), 2.9)]


@pytest.mark.parametrize("eye", [(0.0, -0.32, 0.40), (0.25, 0.2, 0.38), (0.01, 0.0, 0.5)])
def test_poses_from_pybullet_renders(eye: tuple[float, float, float]) -> None:
    """An independent renderer: PyBullet's textured quads on a table, seen from about half a metre."""
    from sim.emulation.marker_scene import LIFT_M, MarkerScene

    with MarkerScene(W, H, FOV, eye, (0.0, 0.0, 0.0), SIZE) as scene:
        tracker = MarkerTracker(scene.camera, SIZE, table_from_camera=scene.table_from_camera)
        bodies = {i: scene.add_marker(i, xy, yaw) for i, xy, yaw in SCENE}
        seen = tracker.detect(scene.render())
        assert sorted(seen) == sorted(bodies)
        pos_err = [float(np.linalg.norm(seen[i].position - [*xy, LIFT_M])) for i, xy, _ in SCENE]
        head_err = [angle_error(seen[i].heading, yaw) for i, _, yaw in SCENE]
        print(f"\n[pybullet, eye {eye}] 4 markers: position error max {max(pos_err) * 1000:.1f} mm, "
              f"heading error max {math.degrees(max(head_err)):.2f} deg")
        assert max(pos_err) < 0.01 and math.degrees(max(head_err)) < 3.0
        scene.move_marker(bodies[13], (-0.02, 0.1), -0.5)  # an object carried the marker: the tracker follows
        moved = tracker.detect(scene.render(), time=2.0)[13]
        assert np.linalg.norm(moved.position - [-0.02, 0.1, LIFT_M]) < 0.01 and moved.time == 2.0
        assert angle_error(moved.heading, -0.5) < math.radians(3)
        scene.move_marker(bodies[21], (3.0, 3.0), 0.0)  # off the table, out of view
        assert sorted(tracker.detect(scene.render())) == [0, 13, 37]
