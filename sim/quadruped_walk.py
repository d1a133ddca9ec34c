"""QuadrupedWalk: a Unitree A1 learns to roll over, stand up and walk forward, DayDreamer style.

Control. The policy runs at `control.hz` (20 Hz) over `sim.physics_hz` (1 kHz) physics substeps,
`cfg.substeps` (50) per action. An action a in [-1, 1]^12 (joint order FR, FL, RR, RL legs x hip,
upper, lower) asks for the joint targets `STAND + a * action_scale`, clipped to the URDF limits.
That target is low-pass filtered once per policy step (2nd-order Butterworth at
`filter_cutoff_hz`, see `sim.filters`) and then linearly interpolated over the substeps from the
previous filtered target to the new one. Every substep our own PD law computes the motor torques,
applied in TORQUE_CONTROL mode (pybullet's default velocity motors are switched off):

    tau = clip(kp * (q_des - q) - kd * qd, -max_torque, max_torque)

with kp, kd and max_torque per joint type (hip, upper, lower). Joint speeds are clamped to the
URDF's speed limit (28.6 rad/s; pybullet's clamp is one value per body, so the smallest of the
joints' limits is used). pybullet enforces the URDF position limits but
adds a limit row to the solver only once a joint has crossed its limit, so a joint that hits a
stop at speed w ends up to about w * dt past it for a substep before being pushed back. The
`joint_pos` spec allows `limit_tolerance` = max speed / physics_hz + 0.01 rad (0.039 rad at 1 kHz)
for that; with the default 1.5 Hz filter the measured overshoot is about 0.001 rad, unfiltered
bang-bang actions reach about 0.027 rad.

Observations: `joint_pos` (12, rad), `joint_vel` (12, rad/s), `imu` (base roll and pitch in rad, and
the base-frame angular rates about its x and y axes in rad/s, as a body-mounted gyro reads them),
the camera `image` when enabled (it follows the base) and the episode flags.

Reward, staged as in DayDreamer. With R the base orientation and q the joint angles:

    upright  = (1 + z_base . z_world) / 2                      in [0, 1]; 1 upright, 0 on its back
    hip      = 1 - min(1, mean_legs |q_hip   - 0.0| / 0.8)     in [0, 1]
    upper    = 1 - min(1, mean_legs |q_upper - 0.9| / 1.2)     in [0, 1]
    lower    = 1 - min(1, mean_legs |q_lower + 1.8| / 1.2)     in [0, 1]
    velocity = clip(v_forward / target_velocity, -1, 1)        in [-1, 1]

where v_forward is the base displacement over the last control period along the base heading (the
base x axis projected on the floor), divided by the period. The terms form the chain
upright -> hip -> upper -> lower -> velocity; a term is counted only when every term before it
exceeds `stage_threshold`:

    reward = sum_k t_k * [t_j > stage_threshold for all j < k]     in [0, 5]

so a robot on its back earns only `upright` (about 0), a robot standing still in the standing pose
about 4, and one walking forward at `target_velocity` in that pose 5. `info` holds every term, the
forward speed (`forward_velocity`, m/s), the number of counted stages (`stages`) and the peak
|torque| of the last control period (`peak_torque`, N·m).

Episodes. Episodes end after `control.episode_steps` steps with `is_last` (never `is_terminal`).
`reset_mode: reset` teleports the robot to `initial_pose` at every reset. `reset_mode: reset_free`
never teleports after the first episode: a reset only starts a new episode where the robot is, with
the motor targets and filter carried over, so it has to get up by itself. The first episode, and any
reset given an explicit seed (a seed restarts the whole run reproducibly), starts from
`initial_pose`: `back` (lying on its back, as DayDreamer began), `stand`, or `random` (a random
orientation, dropped from a few centimetres); `back` and `stand` face a random heading (yaw) drawn
from the episode's generator. Joints start at rest in the standing angles, at the floor's origin.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pybullet as p

from core.interface import ArraySpec
from sim.assets import asset, robot_urdf
from sim.base import SimRobot
from sim.filters import LowPassFilter

A1 = "a1/a1.urdf"
LEGS = ("FR", "FL", "RR", "RL")
PARTS = ("hip", "upper", "lower")
JOINT_NAMES = tuple(f"{leg}_{part}_joint" for leg in LEGS for part in PARTS)
STAND = np.tile([0.0, 0.9, -1.8], len(LEGS))  # standing joint angles, rad (feet under the hips)
POSTURE_SCALE = np.array([0.8, 1.2, 1.2])  # mean |error| at which a posture term reaches 0, rad
LIMIT_SLACK = 0.01  # solver slack on top of one substep of travel at top speed, rad
DROP_HEIGHT = 0.05  # gap under the lowest point of a randomly oriented robot, m
REWARD_TERMS = ("upright", "hip", "upper", "lower", "velocity")


def substep_targets(previous: np.ndarray, new: np.ndarray, substeps: int) -> np.ndarray:
    """(substeps, joints) PD targets that move linearly from `previous` to reach `new` on the last substep."""
    fraction = np.arange(1, substeps + 1) / substeps
    return previous + np.outer(fraction, new - previous)


def _per_joint(values: list[float]) -> np.ndarray:
    """Expand (hip, upper, lower) values to the 12 joints."""
    return np.tile(np.asarray(values, dtype=np.float64), len(LEGS))


class QuadrupedWalk(SimRobot):
    def build_scene(self) -> None:
        c, task = self.client, self.cfg.quadruped_walk
        self.floor = p.loadURDF(asset("plane.urdf"), physicsClientId=c)
        self.robot = p.loadURDF(
            robot_urdf(A1, self.cfg.sim.render_proxy),
            [0.0, 0.0, 0.5],
            flags=p.URDF_USE_SELF_COLLISION,  # legs must not pass through the body when it rolls
            physicsClientId=c,
        )
        by_name: dict[str, int] = {}
        links: dict[str, int] = {}
        for j in range(p.getNumJoints(self.robot, physicsClientId=c)):
            info = p.getJointInfo(self.robot, j, physicsClientId=c)
            by_name[info[1].decode()] = j
            links[info[12].decode()] = j
        self.joints = [by_name[name] for name in JOINT_NAMES]
        self.lower = np.array([p.getJointInfo(self.robot, j, physicsClientId=c)[8] for j in self.joints])
        self.upper = np.array([p.getJointInfo(self.robot, j, physicsClientId=c)[9] for j in self.joints])
        self.max_joint_speed = min(p.getJointInfo(self.robot, j, physicsClientId=c)[11] for j in self.joints)
        p.changeDynamics(self.robot, -1, maxJointVelocity=self.max_joint_speed, physicsClientId=c)
        self.limit_tolerance = self.max_joint_speed / self.cfg.sim.physics_hz + LIMIT_SLACK
        for leg in LEGS:
            # The collision-only shoulder cylinder and the thigh are siblings that always overlap;
            # checking them every substep would triple the physics cost and push the thigh around.
            p.setCollisionFilterPair(self.robot, self.robot, links[f"{leg}_upper_shoulder"], links[f"{leg}_upper"], 0,
                                     physicsClientId=c)
            p.changeDynamics(self.robot, links[f"{leg}_toe"], lateralFriction=1.0, physicsClientId=c)
        self._disable_motors()
        self.kp = _per_joint(task.kp)
        self.kd = _per_joint(task.kd)
        self.max_torque = _per_joint(task.max_torque)
        self.action_scale = _per_joint(task.action_scale)
        self.filter = LowPassFilter(task.filter_cutoff_hz, self.cfg.control.hz, len(self.joints))
        self.target = STAND.copy()  # filtered joint target of the last control period
        self.peak_torque = np.zeros(len(self.joints))
        self._prev_base = np.zeros(3)
        self._placed = False
        self._restart = True

    def _disable_motors(self) -> None:
        """Switch off the velocity motors pybullet attaches to every joint, so torques act alone."""
        p.setJointMotorControlArray(self.robot, self.joints, p.VELOCITY_CONTROL, forces=[0.0] * len(self.joints),
                                    physicsClientId=self.client)

    def randomized_bodies(self) -> list[int]:
        return [self.floor, self.robot]

    def camera_base_xy(self) -> tuple[float, float]:
        pos, _ = p.getBasePositionAndOrientation(self.robot, physicsClientId=self.client)
        return (pos[0], pos[1])

    # ----- specs ----------------------------------------------------------------------------------
    def make_action_spec(self) -> ArraySpec:
        scale = self.cfg.quadruped_walk.action_scale
        return ArraySpec((len(JOINT_NAMES),), np.float32, -1.0, 1.0, f"x{scale} rad (hip, upper, lower)", JOINT_NAMES,
                         "joint target offsets from the standing pose")

    def proprio_spec(self) -> dict[str, ArraySpec]:
        tol = self.limit_tolerance
        speed = np.full(len(JOINT_NAMES), self.max_joint_speed, np.float32)  # float32: clamped values hit it exactly
        return {
            "joint_pos": ArraySpec((len(JOINT_NAMES),), np.float32, (self.lower - tol).astype(np.float32),
                                   (self.upper + tol).astype(np.float32), "rad", JOINT_NAMES,
                                   f"joint angles (URDF limits, which pybullet may overshoot by {tol:.3f} rad)"),
            "joint_vel": ArraySpec((len(JOINT_NAMES),), np.float32, -speed, speed, "rad/s", JOINT_NAMES,
                                   "joint speeds (pybullet clamps them to the URDF limit)"),
            "imu": ArraySpec((4,), np.float32, np.array([-np.pi, -np.pi / 2, -np.inf, -np.inf], np.float32),
                             np.array([np.pi, np.pi / 2, np.inf, np.inf], np.float32), "rad, rad, rad/s, rad/s",
                             ("roll", "pitch", "roll_rate", "pitch_rate"),
                             "base roll and pitch; angular rates about the base x and y axes (gyro)"),
        }

    # ----- episodes -------------------------------------------------------------------------------
    def reset(self, seed: int | None = None) -> dict[str, np.ndarray]:
        self._restart = self._restart or seed is not None  # a seed restarts the run from initial_pose
        return super().reset(seed)

    def reset_task(self) -> None:
        if self.cfg.quadruped_walk.reset_mode == "reset" or self._restart or not self._placed:
            self._place(self.cfg.quadruped_walk.initial_pose)
        self._restart = False
        self._prev_base = self.base_position()

    def _place(self, pose: str) -> None:
        """Teleport the robot into `pose` at rest, lowest point just above the floor, targets held."""
        c = self.client
        self.restore_initial_state()
        self._disable_motors()
        yaw = float(self.rng.uniform(-np.pi, np.pi))  # any heading: the floor is the same everywhere
        if pose == "stand":
            orn, gap = p.getQuaternionFromEuler([0.0, 0.0, yaw]), 0.0
        elif pose == "back":
            orn, gap = p.getQuaternionFromEuler([np.pi, 0.0, yaw]), 0.0
        else:
            quat = self.rng.normal(size=4)  # uniform over rotations
            orn, gap = tuple((quat / np.linalg.norm(quat)).tolist()), DROP_HEIGHT
        for j, angle in zip(self.joints, STAND):
            p.resetJointState(self.robot, j, float(angle), 0.0, physicsClientId=c)
        p.resetBasePositionAndOrientation(self.robot, [0.0, 0.0, 1.0], orn, physicsClientId=c)
        lowest = min(p.getAABB(self.robot, link, physicsClientId=c)[0][2]
                     for link in range(-1, p.getNumJoints(self.robot, physicsClientId=c)))
        p.resetBasePositionAndOrientation(self.robot, [0.0, 0.0, 1.0 - lowest + gap + 1e-3], orn, physicsClientId=c)
        p.resetBaseVelocity(self.robot, [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], physicsClientId=c)
        self.target = STAND.copy()
        self.filter.reset(self.target)
        self.peak_torque = np.zeros(len(self.joints))
        self._placed = True

    # ----- control --------------------------------------------------------------------------------
    def apply_action(self, action: np.ndarray) -> None:
        c, body, joints, n = self.client, self.robot, self.joints, self.cfg.substeps
        wanted = np.clip(STAND + action * self.action_scale, self.lower, self.upper)
        new = np.clip(self.filter(wanted), self.lower, self.upper)  # Butterworth overshoot stays in limits
        ramp = substep_targets(self.target, new, n)
        kp, kd, limit = self.kp, self.kd, self.max_torque
        peak = np.zeros(len(joints))
        self._prev_base = self.base_position()
        for q_des in ramp:
            state = np.array([s[:2] for s in p.getJointStates(body, joints, physicsClientId=c)])
            tau = np.clip(kp * (q_des - state[:, 0]) - kd * state[:, 1], -limit, limit)
            p.setJointMotorControlArray(body, joints, p.TORQUE_CONTROL, forces=tau.tolist(), physicsClientId=c)
            p.stepSimulation(physicsClientId=c)
            np.maximum(peak, np.abs(tau), out=peak)
        self.target = new
        self.peak_torque = peak

    # ----- sensing --------------------------------------------------------------------------------
    def joint_state(self) -> tuple[np.ndarray, np.ndarray]:
        state = np.array([s[:2] for s in p.getJointStates(self.robot, self.joints, physicsClientId=self.client)])
        return state[:, 0], state[:, 1]

    def base_position(self) -> np.ndarray:
        return np.array(p.getBasePositionAndOrientation(self.robot, physicsClientId=self.client)[0])

    def base_rotation(self) -> np.ndarray:
        """Rotation matrix base -> world (columns are the base axes in world coordinates)."""
        _, orn = p.getBasePositionAndOrientation(self.robot, physicsClientId=self.client)
        return np.array(p.getMatrixFromQuaternion(orn)).reshape(3, 3)

    def imu(self) -> np.ndarray:
        _, orn = p.getBasePositionAndOrientation(self.robot, physicsClientId=self.client)
        roll, pitch, _ = p.getEulerFromQuaternion(orn)
        _, omega = p.getBaseVelocity(self.robot, physicsClientId=self.client)
        gyro = self.base_rotation().T @ np.asarray(omega)  # world -> base frame
        return np.array([roll, pitch, gyro[0], gyro[1]])

    def read_proprio(self) -> dict[str, np.ndarray]:
        q, qd = self.joint_state()
        return {
            "joint_pos": q.astype(np.float32),
            "joint_vel": qd.astype(np.float32),
            "imu": self.imu().astype(np.float32),
        }

    # ----- reward ---------------------------------------------------------------------------------
    def reward_terms(self) -> dict[str, float]:
        """The five staged terms of the module docstring, plus the forward speed (m/s)."""
        task = self.cfg.quadruped_walk
        rot = self.base_rotation()
        upright = 0.5 * (1.0 + rot[2, 2])
        q, _ = self.joint_state()
        err = np.abs(q - STAND).reshape(len(LEGS), len(PARTS)).mean(axis=0)
        posture = 1.0 - np.minimum(1.0, err / POSTURE_SCALE)
        heading = rot[:2, 0]
        norm = float(np.linalg.norm(heading))
        moved = self.base_position() - self._prev_base
        forward = float(moved[:2] @ heading) / norm * self.cfg.control.hz if norm > 1e-6 else 0.0
        return {
            "upright": float(upright),
            "hip": float(posture[0]),
            "upper": float(posture[1]),
            "lower": float(posture[2]),
            "velocity": float(np.clip(forward / task.target_velocity, -1.0, 1.0)),
            "forward_velocity": forward,
        }

    def evaluate(self) -> tuple[float, bool, dict[str, Any]]:
        terms = self.reward_terms()
        threshold = self.cfg.quadruped_walk.stage_threshold
        reward, stages = 0.0, 0
        for key in REWARD_TERMS:
            reward += terms[key]
            stages += 1
            if terms[key] <= threshold:
                break
        info: dict[str, Any] = dict(terms)
        info["stages"] = stages
        info["peak_torque"] = float(self.peak_torque.max())
        return reward, False, info
