"""The real tasks' rewards and success flags, from markers rendered by PyBullet at scripted poses.

Every reading goes the way it goes on a robot: a rendered camera image -> ArUco detection -> the table
frame of the table marker -> the task's reward. The table marker is turned and offset on purpose, so a
task that confused camera or world coordinates with table coordinates would fail.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.config import Config
from robot.real_tasks import PickPlace, Reading, StandWalk, gravity_in_body, make_task, upright
from robot.sensors.tracking import TableTracker
from sim.emulation.marker_scene import LIFT_M, MarkerScene

W, H, FOV, SIZE, TABLE_SIZE = 640, 480, 60.0, 0.04, 0.10
TABLE_AT, TABLE_YAW = np.array([-0.25, -0.2]), 0.4  # where the table marker lies in the scene


def to_scene(xy: np.ndarray) -> np.ndarray:
    """A table-frame point (relative to the table marker) in the scene's coordinates."""
    c, s = math.cos(TABLE_YAW), math.sin(TABLE_YAW)
    return TABLE_AT + np.array([[c, -s], [s, c]]) @ np.asarray(xy, dtype=np.float64)


def config(task: str, **blocks: object) -> Config:
    servos = [{"name": f"j{i}", "id": i + 1, "model": "sts3215", "lower": -1.0, "upper": 1.0} for i in range(3)]
    data = {
        "name": "bench", "backend": "servo", "task": task, "camera": {"enabled": False},
        "motors": {"protocol": "feetech", "port": "/dev/null", "servos": servos},
        "sensors": {"camera": {"device": "/dev/video0", "width": W, "height": H, "fov_deg": FOV}},
        "markers": {"size_m": SIZE, "table_size_m": TABLE_SIZE, "table_id": 0, "max_lost_s": 0.5},
    }
    if task == "stand_walk":
        data["sensors"]["imu"] = {"port": "/dev/null"}
    return Config.model_validate(data | blocks)


class Table:
    """A PyBullet-rendered table seen from above, with the table marker and movable markers on it."""

    def __init__(self, cfg: Config, ids: list[int]) -> None:
        self.scene = MarkerScene(W, H, FOV, (0.0, -0.35, 0.75), (0.0, 0.0, 0.0), SIZE)
        self.scene.add_marker(0, TABLE_AT, TABLE_YAW, size_m=TABLE_SIZE)
        self.bodies = {i: self.scene.add_marker(i, (5.0, 5.0), 0.0) for i in ids}  # off the table until placed
        cam = cfg.sensors.camera
        from robot.sensors.tracking import camera_model

        self.tracker = TableTracker(camera_model(cam), cfg.markers)
        self.time = 0.0

    def place(self, marker_id: int, xyz: tuple[float, ...] | np.ndarray | None) -> None:
        if xyz is None:
            self.scene.move_marker(self.bodies[marker_id], (5.0, 5.0), 0.0)  # out of view
            return
        x, y = to_scene(np.asarray(xyz[:2]))
        z = xyz[2] if len(xyz) > 2 else 0.0
        self.scene.move_marker(self.bodies[marker_id], (x, y, z), TABLE_YAW)

    def read(self, dt: float = 0.1, up: float | None = None) -> Reading:
        self.time += dt
        self.tracker.update(self.scene.render(), self.time)
        return Reading(np.zeros(3), self.time, self.tracker, up)

    def close(self) -> None:
        self.scene.close()


@pytest.fixture
def reach():
    cfg = config("marker_reach", marker_reach={"effector_id": 1, "target_id": 2, "success_distance": 0.03})
    table = Table(cfg, [1, 2])
    yield cfg, table
    table.close()


def test_tracker_reports_positions_in_the_table_markers_frame(reach) -> None:
    cfg, table = reach
    spots = {1: (0.14, 0.05), 2: (0.3, -0.08)}
    for marker_id, xy in spots.items():
        table.place(marker_id, xy)
    table.read()
    assert table.tracker.table_found
    for marker_id, xy in spots.items():
        seen = table.tracker.last(marker_id)
        error = np.linalg.norm(seen.position - [*xy, 0.0])
        assert error < 0.02, f"marker {marker_id}: {seen.position} vs {xy}: {error * 1000:.1f} mm"
        assert abs(seen.heading) < math.radians(5)  # laid down square to the table marker


def test_marker_reach_rewards_follow_the_distance_to_the_target_and_success_only_there(reach) -> None:
    cfg, table = reach
    task = make_task(cfg, ["j0", "j1", "j2"], np.zeros(3))
    target = np.array([0.32, 0.10, 0.0])
    table.place(2, target)
    start, stop = np.array([0.14, -0.10, 0.08]), target + [0.0, -0.01, 0.015]  # the gripper ends just above it
    table.place(1, start)
    assert task.begin(table.read()) is None
    first = task.step(table.read(), first=True)
    assert first.reward == 0.0 and not first.success
    np.testing.assert_allclose(first.extras["target_pos"], target, atol=0.025)
    rewards, truths, successes = [], [], []
    for f in np.linspace(0.0, 1.0, 9)[1:]:
        at = start + f * (stop - start)
        table.place(1, at)
        out = task.step(table.read(), first=False)
        rewards.append(out.reward)
        truths.append(-float(np.linalg.norm(at - target)))
        successes.append(out.success)
        assert out.end is None and not out.terminal
    errors = np.abs(np.array(rewards) - truths)
    print(f"\nmarker_reach: reward error vs true distance: max {errors.max() * 1000:.1f} mm, "
          f"mean {errors.mean() * 1000:.1f} mm over {len(rewards)} steps")
    assert errors.max() < 0.02, (rewards, truths)
    assert rewards[-1] > rewards[0] + 0.15 and np.corrcoef(rewards, truths)[0, 1] > 0.98
    assert successes[-1] and not any(successes[:5])


def test_marker_reach_ends_the_episode_when_the_gripper_marker_stays_hidden(reach) -> None:
    cfg, table = reach
    task = make_task(cfg, ["j0", "j1", "j2"], np.zeros(3))
    table.place(2, (0.3, 0.1))
    table.place(1, (0.15, 0.0, 0.05))
    task.begin(table.read())
    assert task.step(table.read(), first=False).end is None
    table.place(1, None)  # the arm turned the marker away from the camera
    assert task.step(table.read(dt=0.2), first=False).end is None  # briefly unseen: the last sighting serves
    out = task.step(table.read(dt=0.5), first=False)
    assert out.end is not None and "marker 1 (gripper)" in out.end and "0.7 s" in out.end


def test_marker_reach_asks_for_a_person_when_the_target_is_not_in_view(reach) -> None:
    cfg, table = reach
    task = make_task(cfg, ["j0", "j1", "j2"], np.zeros(3))
    request = task.begin(table.read())
    assert request is not None and "marker 2 (target) never seen" in request


def test_pick_place_goal_is_the_other_region_and_success_is_resting_there() -> None:
    regions = [{"low": [0.12, 0.0], "high": [0.22, 0.1]}, {"low": [0.32, 0.0], "high": [0.42, 0.1]}]
    cfg = config("pick_place", pick_place={"object_id": 3, "effector_id": 1, "regions": regions,
                                           "rest_height": 0.03})
    table = Table(cfg, [1, 3])
    try:
        task = make_task(cfg, ["j0", "j1", "j2"], np.zeros(3))
        assert isinstance(task, PickPlace)
        a, b = np.array([0.17, 0.05, 0.0]), np.array([0.37, 0.05, 0.0])
        table.place(3, a)
        table.place(1, (0.17, -0.1, 0.1))
        assert task.begin(table.read()) is None and task.goal == 1
        first = task.step(table.read(), first=True)
        np.testing.assert_allclose(first.extras["goal"], [0.37, 0.05], atol=1e-6)
        assert not first.success
        # a scripted carry: up from A, across, down into B (the gripper marker rides along above the object)
        path = [a, a + [0, 0, 0.08], 0.5 * (a + b) + [0, 0, 0.08], b + [0, 0, 0.08], b]
        outs = []
        for point in path:
            table.place(3, point)
            table.place(1, point + [0.0, -0.07, 0.03])  # beside it: markers must not cover each other
            outs.append(task.step(table.read(), first=False))
        assert [o.success for o in outs] == [False, False, False, False, True]
        assert outs[-1].reward > outs[0].reward + cfg.pick_place.success_bonus * 0.9
        assert outs[3].reward > outs[2].reward > outs[1].reward  # closer to B's centre
        # the next episode goes back to A; an object dropped between the regions needs a person
        assert task.begin(table.read()) is None and task.goal == 0
        table.place(3, (0.27, 0.3, 0.0))
        request = task.begin(table.read())
        assert request is not None and "in neither region" in request
    finally:
        table.close()


def test_stand_walk_progress_counts_only_while_upright_and_a_flipped_robot_needs_a_person() -> None:
    cfg = config("stand_walk", stand_walk={"body_id": 4, "forward": [1.0, 0.0], "upright_min": 0.8,
                                           "progress_weight": 10.0, "upright_weight": 1.0,
                                           "success_distance": 0.15})
    table = Table(cfg, [4])
    try:
        task = make_task(cfg, ["j0", "j1", "j2"], np.zeros(3))
        assert isinstance(task, StandWalk)
        table.place(4, (0.12, 0.1, 0.1))
        assert task.begin(table.read(up=1.0)) is None
        task.step(table.read(up=1.0), first=True)
        lying = task.step(table.read(up=0.1), first=False)  # still folded on the floor
        assert lying.reward == pytest.approx(0.1, abs=0.02)
        rewards = []
        for x in (0.17, 0.22, 0.27, 0.32):  # walking forward, upright
            table.place(4, (x, 0.1, 0.1))
            out = task.step(table.read(up=0.98), first=False)
            rewards.append(out.reward)
        assert all(r == pytest.approx(0.98 + 10 * 0.05, abs=0.1) for r in rewards), rewards
        assert task.progress == pytest.approx(0.20, abs=0.02) and out.success
        table.place(4, (0.42, 0.1, 0.1))  # slid forward while on its side: no progress
        tipped = task.step(table.read(up=0.2), first=False)
        assert tipped.reward == pytest.approx(0.2, abs=0.02) and task.progress == pytest.approx(0.20, abs=0.02)
        request = task.begin(table.read(up=-0.9))
        assert request is not None and "upside down" in request
    finally:
        table.close()


def test_imu_quaternion_gives_uprightness_and_gravity_in_the_body_frame() -> None:
    assert upright(np.array([1.0, 0, 0, 0])) == pytest.approx(1.0)
    np.testing.assert_allclose(gravity_in_body(np.array([1.0, 0, 0, 0])), [0, 0, -1], atol=1e-7)
    roll = math.pi / 2  # on its right side: rotated +90 deg about x
    q = np.array([math.cos(roll / 2), math.sin(roll / 2), 0, 0])
    assert upright(q) == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_allclose(gravity_in_body(q), [0, -1, 0], atol=1e-7)  # body -y points down
    flipped = np.array([0.0, 1.0, 0, 0])
    assert upright(flipped) == pytest.approx(-1.0)


def test_marker_z_is_measured_from_the_table(reach) -> None:
    """A marker held above the table reads its height: pick-and-place tells lifted from resting by it."""
    cfg, table = reach
    table.place(1, (0.2, 0.0, 0.12))
    table.read()
    assert table.tracker.last(1).position[2] == pytest.approx(0.12, abs=0.025)
    assert LIFT_M < 0.001
