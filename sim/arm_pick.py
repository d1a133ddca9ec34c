"""ArmPick: DayDreamer's pick-and-place on a Franka Panda, from images and sparse rewards.

Scene: two open bins side by side in front of the arm (centres y = -0.17 and y = +0.17 m); at
each reset the seeded rng picks one as the source and puts `num_objects` coloured cubes in it,
uniformly within `object_spread` of its centre (kept apart so the fingers fit between them), with a
small random yaw. The goal is to move every object into the other, the target, bin.

Actions
    discrete (DayDreamer): 0 +x, 1 -x, 2 +y, 3 -y (tool goal moves by `move_step`), 4 toggle the
    gripper (open/closed), 5 toggle the height (between `carry_height` and `grasp_height`).
    cartesian: [dx, dy, dz, gripper] in [-1, 1]; dx, dy, dz move the tool goal by
    `cartesian_delta` times their value; gripper > 0 closes, <= 0 opens.
The goal is clamped to the workspace box and the tool always points down; within one policy step
the goal is reached along a straight line (IK at a few waypoints), then held, so a discrete move
completes inside the step. The fingers are position-controlled (squeezing with 20 N when closed).

Rewards (sparse; the values come from the `arm_pick` config), evaluated after every policy step:
    held     an object touches both fingers.
    grasp    +grasp_reward when an object that is not grasped is held and its centre is more than
             `lift_height` above its resting height on a bin floor, unless it is over the target
             bin (taking objects out of the target is no progress, and paying for it would let a
             policy farm grasps there). It then stays grasped (no second reward for lowering and
             lifting again) until it touches fewer than two fingers: it is then released.
    drop     drop_penalty when a released object comes to rest (speed < 5 cm/s, spin < 1 rad/s,
             touching no finger) outside the target bin. An object that comes to rest inside it
             costs nothing.
    place    +place_reward when an object is at rest, not touching a finger, inside the target
             bin (within its inner walls, below wall top + one object size), the first time that
             happens to that object in the episode (taking it out and back earns nothing more).
Termination: `is_terminal` once every object is at rest in the target bin (`info["success"]`);
otherwise the episode is cut after `control.episode_steps` steps.

Joints: targets are clipped to the URDF limits; the joint-limit constraints hold the joints to
within JOINT_TOLERANCE (0.01 rad) of them, and the joint_pos spec includes that tolerance; likewise
each finger stays within FINGER_TOLERANCE (5 mm) of its travel, as the `gripper` spec allows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pybullet as p

from core.interface import ArraySpec, DiscreteSpec
from sim.arm import DOWN
from sim.assets import asset
from sim.base import SimRobot
from sim.gripper import FINGER_TRAVEL, PandaArm

BIN_X = 0.5
BIN_YS = (-0.17, 0.17)  # bin 0 on the robot's right, bin 1 on its left
BIN_INNER = (0.20, 0.26)  # inner size (x, y), m
BIN_WALL = 0.01  # wall and floor thickness, m
BIN_HEIGHT = 0.05  # wall top above the ground, m
BIN_FLOOR = BIN_WALL  # floor top above the ground, m
HOME_XY = (0.5, 0.0)
REST_POSE = np.array([0.0, -0.3, 0.0, -2.2, 0.0, 2.0, np.pi / 4])  # elbow up, hand down, fingers along y
FINGER_TOLERANCE = 0.005  # m, the same for a finger (squeezing shut pushes each ~1 mm past 0)
MAX_YAW = 0.26  # rad, random yaw of a cube at reset
REST_SPEED = 0.05  # m/s; slower (and spinning less than REST_SPIN rad/s) counts as at rest
REST_SPIN = 1.0
OBJECT_MASS = 0.05  # kg
OBJECT_COLORS = ((0.9, 0.15, 0.1, 1), (0.1, 0.75, 0.2, 1), (0.15, 0.35, 0.95, 1), (0.95, 0.85, 0.1, 1))
BIN_COLOR = (0.45, 0.32, 0.2, 1)
FLOOR_COLOR = (0.82, 0.82, 0.8, 1)
DISCRETE_NAMES = ("move +x", "move -x", "move +y", "move -y", "toggle gripper", "toggle height")
MOVES = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
# Clearance that the open fingers need around an object's centre, m: finger pads reach 7 cm out
# along y (the closing direction) and 1.8 cm along x.
FINGER_REACH_Y = 0.07
FINGER_HALF_X = 0.018


def _bin_shapes(client: int) -> int:
    """One static body: a floor plate and four walls around an inner area of BIN_INNER."""
    ix, iy = BIN_INNER[0] / 2, BIN_INNER[1] / 2
    t, h = BIN_WALL, BIN_HEIGHT
    boxes = [  # (half extents, centre)
        ((ix + t, iy + t, t / 2), (0, 0, t / 2)),
        ((t / 2, iy + t, h / 2), (ix + t / 2, 0, h / 2)),
        ((t / 2, iy + t, h / 2), (-ix - t / 2, 0, h / 2)),
        ((ix, t / 2, h / 2), (0, iy + t / 2, h / 2)),
        ((ix, t / 2, h / 2), (0, -iy - t / 2, h / 2)),
    ]
    halves = [list(b[0]) for b in boxes]
    centres = [list(b[1]) for b in boxes]
    col = p.createCollisionShapeArray(
        [p.GEOM_BOX] * len(boxes), halfExtents=halves, collisionFramePositions=centres, physicsClientId=client
    )
    vis = p.createVisualShapeArray(
        [p.GEOM_BOX] * len(boxes),
        halfExtents=halves,
        visualFramePositions=centres,
        rgbaColors=[list(BIN_COLOR)] * len(boxes),
        physicsClientId=client,
    )
    return p.createMultiBody(0, col, vis, physicsClientId=client)


class ArmPick(SimRobot):
    """Move `num_objects` cubes from one bin into the other (see the module docstring)."""

    # ----- scene ----------------------------------------------------------------------------
    def build_scene(self) -> None:
        c, task = self.client, self.cfg.arm_pick
        self.floor = p.loadURDF(asset("plane.urdf"), physicsClientId=c)
        p.changeVisualShape(self.floor, -1, rgbaColor=list(FLOOR_COLOR), textureUniqueId=-1, physicsClientId=c)
        self.arm = PandaArm(c, render_proxy=self.cfg.sim.render_proxy, rest_pose=REST_POSE)
        self.bins = []
        for y in BIN_YS:
            body = _bin_shapes(c)
            p.resetBasePositionAndOrientation(body, [BIN_X, y, 0.0], [0, 0, 0, 1], physicsClientId=c)
            self.bins.append(body)
        half = task.object_size / 2
        col = p.createCollisionShape(p.GEOM_BOX, halfExtents=[half] * 3, physicsClientId=c)
        self.objects: list[int] = []
        for i in range(task.num_objects):
            vis = p.createVisualShape(p.GEOM_BOX, halfExtents=[half] * 3, rgbaColor=list(OBJECT_COLORS[i]),
                                      physicsClientId=c)
            body = p.createMultiBody(OBJECT_MASS, col, vis, basePosition=[BIN_X, BIN_YS[0], BIN_FLOOR + half],
                                     physicsClientId=c)
            p.changeDynamics(body, -1, lateralFriction=1.0, spinningFriction=0.001, rollingFriction=0.0,
                             physicsClientId=c)
            self.objects.append(body)
        self.low = np.array(task.workspace_low)
        self.high = np.array(task.workspace_high)
        self.home_tool = np.clip([*HOME_XY, task.carry_height], self.low, self.high)
        self.arm.teleport(REST_POSE)
        self.home_q = self.arm.ik(self.home_tool, DOWN)
        self.arm.teleport(self.home_q)
        self.arm.teleport_fingers(closed=False)
        self._clear_episode()

    def _clear_episode(self) -> None:
        n = len(self.objects)
        self.goal = self.home_tool.copy()
        self.closed = False
        self.down = False
        self.source = 0
        self.target = 1
        self.grasped = np.zeros(n, bool)
        self.released = np.zeros(n, bool)  # let go of after a grasp, not yet come to rest
        self.rewarded_place = np.zeros(n, bool)
        self.placed = np.zeros(n, bool)

    def randomized_bodies(self) -> list[int]:
        return [self.floor, self.arm.body, *self.bins, *self.objects]

    # ----- specs ----------------------------------------------------------------------------
    def make_action_spec(self) -> ArraySpec | DiscreteSpec:
        task = self.cfg.arm_pick
        if task.action_mode == "discrete":
            return DiscreteSpec(len(DISCRETE_NAMES), DISCRETE_NAMES)
        return ArraySpec((4,), np.float32, -1.0, 1.0, f"x{task.cartesian_delta} m", ("dx", "dy", "dz", "gripper"),
                         "tool goal deltas in the base frame; gripper > 0 closes")

    def proprio_spec(self) -> dict[str, ArraySpec]:
        return {
            **self.arm.proprio_spec(),
            "gripper": ArraySpec((1,), np.float32, -2 * FINGER_TOLERANCE, 2 * (FINGER_TRAVEL + FINGER_TOLERANCE), "m",
                                 ("opening",), "distance between the fingers"),
        }

    # ----- episode --------------------------------------------------------------------------
    def reset_task(self) -> None:
        task = self.cfg.arm_pick
        self.restore_initial_state()
        self._clear_episode()
        self.arm.teleport(self.home_q)
        self.arm.teleport_fingers(closed=False)
        self.source = int(self.rng.integers(2))
        self.target = 1 - self.source
        half = task.object_size / 2
        for body, (x, y) in zip(self.objects, self._sample_positions()):
            yaw = self.rng.uniform(-MAX_YAW, MAX_YAW)
            orn = p.getQuaternionFromEuler([0.0, 0.0, yaw])
            p.resetBasePositionAndOrientation(body, [x, y, BIN_FLOOR + half], orn, physicsClientId=self.client)
            p.resetBaseVelocity(body, [0, 0, 0], [0, 0, 0], physicsClientId=self.client)

    def _sample_positions(self) -> list[tuple[float, float]]:
        """Uniform positions in the source bin, each pair far enough apart for the open fingers."""
        task = self.cfg.arm_pick
        spread = task.object_spread
        centre = np.array([BIN_X, BIN_YS[self.source]])
        gap_x = FINGER_HALF_X + task.object_size / 2 + 0.01
        gap_y = FINGER_REACH_Y + task.object_size / 2 + 0.005
        for _ in range(1000):
            points: list[np.ndarray] = []
            for _ in range(len(self.objects)):
                for _ in range(100):
                    q = centre + self.rng.uniform(-spread, spread, size=2)
                    if all(abs(q[0] - o[0]) >= gap_x or abs(q[1] - o[1]) >= gap_y for o in points):
                        points.append(q)
                        break
                else:
                    break
            if len(points) == len(self.objects):
                return [(float(q[0]), float(q[1])) for q in points]
        # the spread is too small for this many objects to stay apart: a fixed grid around the centre
        offsets = [(-gap_x / 2, -gap_y / 2), (gap_x / 2, gap_y / 2), (-gap_x / 2, gap_y / 2), (gap_x / 2, -gap_y / 2)]
        return [(float(centre[0] + dx), float(centre[1] + dy)) for dx, dy in offsets[: len(self.objects)]]

    # ----- acting ---------------------------------------------------------------------------
    def apply_action(self, action: np.ndarray | int) -> None:
        task = self.cfg.arm_pick
        start = self.goal.copy()
        goal = self.goal.copy()
        if task.action_mode == "discrete":
            a = int(action)
            if a < len(MOVES):
                goal[:2] += MOVES[a] * task.move_step
            elif a == 4:
                self.closed = not self.closed
            else:
                self.down = not self.down
                goal[2] = task.grasp_height if self.down else task.carry_height
        else:
            act = np.asarray(action, dtype=np.float64)
            goal += act[:3] * task.cartesian_delta
            self.closed = bool(act[3] > 0)
        self.goal = np.clip(goal, self.low, self.high)
        self.arm.grip(self.closed)
        self._move(start, self.goal)

    def _move(self, start: np.ndarray, goal: np.ndarray) -> None:
        """Straight-line motion to the goal over the first 3/4 of the step, then hold it."""
        substeps = self.cfg.substeps
        moving = max(1, (3 * substeps) // 4)
        waypoints = 1 if np.allclose(start, goal) else max(1, min(4, moving // 8))
        done = 0
        for k in range(1, waypoints + 1):
            point = start + (goal - start) * (k / waypoints)
            self.arm.command(self.arm.ik(point, DOWN, iterations=1))
            until = (moving * k) // waypoints if k < waypoints else substeps
            for _ in range(until - done):
                p.stepSimulation(physicsClientId=self.client)
            done = until

    # ----- sensing --------------------------------------------------------------------------
    def read_proprio(self) -> dict[str, np.ndarray]:
        return {
            **self.arm.proprio(),
            "gripper": np.array([self.arm.opening()], np.float32),
        }

    def object_positions(self) -> np.ndarray:
        """(n, 3) object centres, m (privileged: for scripted policies and tests)."""
        return np.array([p.getBasePositionAndOrientation(b, physicsClientId=self.client)[0] for b in self.objects])

    def finger_contacts(self, body: int) -> int:
        """How many of the two fingers touch `body`."""
        return sum(
            bool(p.getContactPoints(body, self.arm.body, -1, f, physicsClientId=self.client)) for f in self.arm.fingers
        )

    def over_bin(self, position: np.ndarray, which: int) -> bool:
        """Within the inner walls of bin `which` in x and y, at any height."""
        dx = abs(position[0] - BIN_X)
        dy = abs(position[1] - BIN_YS[which])
        return bool(dx < BIN_INNER[0] / 2 and dy < BIN_INNER[1] / 2)

    def in_bin(self, position: np.ndarray, which: int) -> bool:
        """Inside the inner walls of bin `which` and no higher than one object above the wall top."""
        top = BIN_HEIGHT + self.cfg.arm_pick.object_size
        return self.over_bin(position, which) and bool(position[2] < top)

    def bin_centre(self, which: int) -> np.ndarray:
        """(x, y) of bin `which`'s centre, m."""
        return np.array([BIN_X, BIN_YS[which]])

    def evaluate(self) -> tuple[float, bool, dict[str, Any]]:
        task = self.cfg.arm_pick
        rest_z = BIN_FLOOR + task.object_size / 2
        reward = 0.0
        for i, body in enumerate(self.objects):
            pos, _ = p.getBasePositionAndOrientation(body, physicsClientId=self.client)
            vel, spin = p.getBaseVelocity(body, physicsClientId=self.client)
            touching = self.finger_contacts(body)
            held = touching == 2
            if self.grasped[i] and not held:
                self.grasped[i] = False
                self.released[i] = True
            elif not self.grasped[i] and held:
                if self.released[i]:  # caught again before it landed: the same grasp continues
                    self.grasped[i], self.released[i] = True, False
                elif pos[2] > rest_z + task.lift_height:
                    self.grasped[i] = True
                    if not self.over_bin(np.array(pos), self.target):
                        reward += task.grasp_reward
            at_rest = touching == 0 and np.linalg.norm(vel) < REST_SPEED and np.linalg.norm(spin) < REST_SPIN
            inside = self.in_bin(np.array(pos), self.target)
            if self.released[i] and at_rest:
                self.released[i] = False
                if not inside:
                    reward += task.drop_penalty
            self.placed[i] = at_rest and inside
            if self.placed[i] and not self.rewarded_place[i]:
                self.rewarded_place[i] = True
                reward += task.place_reward
        placed = int(self.placed.sum())
        success = placed == len(self.objects)
        info = {"grasped": bool(self.grasped.any()), "placed": placed, "success": success, "target_bin": self.target}
        return reward, success, info


class PickScripted:
    """Solves ArmPick from privileged state (object poses), in either action mode.

    Above the next unplaced object at carry height, descend, close, lift, carry over the target
    bin and open there. Discrete mode reaches only the 4 cm lattice of goals, so it aligns to the
    nearest lattice point, as a learned policy would have to. Proves rewards and success work.
    """

    def __init__(self, robot: ArmPick) -> None:
        self.robot = robot

    def _next_object(self) -> int | None:
        """The grasped object, else one held between the fingers, else the first still to place."""
        r = self.robot
        if r.grasped.any():
            return int(np.argmax(r.grasped))
        for i, body in enumerate(r.objects):
            if r.finger_contacts(body) == 2:
                return i
        for i in range(len(r.objects)):
            if not r.placed[i] and not r.released[i]:
                return i
        return None

    def _drop_point(self) -> np.ndarray:
        r = self.robot
        k = int(r.placed.sum()) % 4
        offsets = np.array([[0.0, 0.0], [-0.05, -0.06], [0.05, 0.06], [-0.05, 0.06]])
        return r.bin_centre(r.target) + offsets[k]

    def __call__(self, obs: dict[str, np.ndarray]) -> np.ndarray | int:
        """The next action; reads the world directly, so `obs` is not needed."""
        r = self.robot
        i = self._next_object()
        holding = i is not None and (r.grasped[i] or (r.closed and r.finger_contacts(r.objects[i]) == 2))
        if r.cfg.arm_pick.action_mode == "discrete":
            return self._discrete(i, holding)
        return self._cartesian(i, holding)

    def _discrete(self, i: int | None, holding: bool) -> int:
        r, task = self.robot, self.robot.cfg.arm_pick
        half = task.move_step / 2

        def move_toward(xy: np.ndarray) -> int | None:
            err = xy - r.goal[:2]
            axis = int(np.argmax(np.abs(err)))
            if abs(err[axis]) <= half:
                return None
            return (0 if err[axis] > 0 else 1) if axis == 0 else (2 if err[axis] > 0 else 3)

        if i is None:  # nothing to pick up right now (an object is still falling): harmless move
            return 3 if r.goal[1] > 0 else 2
        if holding:
            if r.down:
                return 5
            step = move_toward(self._drop_point())
            return 4 if step is None else step
        if r.closed:
            return 4
        step = move_toward(r.object_positions()[i][:2])
        if step is not None:
            return 5 if r.down else step
        return 4 if r.down else 5

    def _cartesian(self, i: int | None, holding: bool) -> np.ndarray:
        r, task = self.robot, self.robot.cfg.arm_pick
        delta = task.cartesian_delta
        act = np.zeros(4)

        def toward(point: np.ndarray) -> np.ndarray:
            return np.clip((point - r.goal) / delta, -1.0, 1.0)

        if i is None:
            act[3] = -1.0
            return act.astype(np.float32)
        obj = r.object_positions()[i]
        if holding:
            act[3] = 1.0
            dest = np.array([*self._drop_point(), task.carry_height])
            if r.goal[2] < task.carry_height - 0.01:  # lift straight up first
                act[2] = toward(dest)[2]
            elif np.linalg.norm(dest[:2] - r.goal[:2]) > 0.005:
                act[:3] = toward(dest)
            else:
                act[3] = -1.0
            return act.astype(np.float32)
        act[3] = -1.0
        if r.closed:  # closed on nothing: open and back up
            act[2] = 1.0
            return act.astype(np.float32)
        xy_err = np.linalg.norm(obj[:2] - r.goal[:2])
        grasp = np.array([obj[0], obj[1], max(task.grasp_height, self.robot.low[2])])
        if xy_err > 0.004:
            if xy_err > 0.02 and r.goal[2] < task.carry_height - 0.01:
                act[2] = 1.0  # rise before travelling so as not to sweep objects along
            else:
                act[:3] = toward(np.array([obj[0], obj[1], r.goal[2]]))
        elif abs(r.goal[2] - grasp[2]) > 0.002:
            act[:3] = toward(grasp)
        else:
            act[3] = 1.0
        return act.astype(np.float32)
