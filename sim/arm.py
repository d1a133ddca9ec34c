"""A position-controlled serial arm in pybullet: joints, limits, end effector and IK.

Shared by the arm tasks so that joint-limit handling, IK and motor settings exist once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pybullet as p

from core.interface import ArraySpec
from sim.assets import robot_urdf

XARM6 = "xarm/xarm6_robot.urdf"
# The joint-limit constraints let a joint sit up to this far past a stop (measured ~0.002 rad);
# observation bounds include it so that a spec check does not flag physics' own slack.
JOINT_TOLERANCE = 0.01
DOWN = p.getQuaternionFromEuler([np.pi, 0.0, 0.0])  # tool z axis pointing at the floor


@dataclass(frozen=True)
class JointInfo:
    index: int
    name: str
    lower: float
    upper: float
    max_force: float
    max_velocity: float


class Arm:
    """A fixed-base arm loaded from pybullet_data, driven by joint position targets."""

    def __init__(
        self,
        client: int,
        urdf: str = XARM6,
        render_proxy: bool = True,
        ee_link_name: str = "link6",
        ee_offset: tuple[float, float, float] = (0.0, 0.0, 0.0),
        base_position: tuple[float, float, float] = (0.0, 0.0, 0.0),
        position_gain: float = 0.3,
        color: tuple[float, float, float, float] | None = (0.75, 0.75, 0.78, 1.0),
    ) -> None:
        self.client = client
        self.body = p.loadURDF(
            robot_urdf(urdf, render_proxy),
            basePosition=base_position,
            useFixedBase=True,
            flags=p.URDF_USE_SELF_COLLISION,
            physicsClientId=client,
        )
        self.joints: list[JointInfo] = []
        self.ee_link = -1
        for j in range(p.getNumJoints(self.body, physicsClientId=client)):
            info = p.getJointInfo(self.body, j, physicsClientId=client)
            if info[12].decode() == ee_link_name:
                self.ee_link = j
            if info[2] == p.JOINT_REVOLUTE:
                self.joints.append(JointInfo(j, info[1].decode(), info[8], info[9], info[10], info[11]))
        if color is not None:  # one neutral colour, so task markers stand out in images
            for link in range(-1, p.getNumJoints(self.body, physicsClientId=client)):
                p.changeVisualShape(self.body, link, rgbaColor=list(color), physicsClientId=client)
        if self.ee_link < 0:
            raise ValueError(f"{urdf}: no link named {ee_link_name!r}")
        self.ee_offset = ee_offset
        self.indices = [j.index for j in self.joints]
        self.lower = np.array([j.lower for j in self.joints])
        self.upper = np.array([j.upper for j in self.joints])
        self.gains = [position_gain] * len(self.joints)
        self.targets = np.zeros(len(self.joints))

    @property
    def dof(self) -> int:
        return len(self.joints)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(j.name for j in self.joints)

    def clip(self, q: np.ndarray) -> np.ndarray:
        return np.clip(q, self.lower, self.upper)

    def joint_state(self) -> tuple[np.ndarray, np.ndarray]:
        states = p.getJointStates(self.body, self.indices, physicsClientId=self.client)
        return np.array([s[0] for s in states]), np.array([s[1] for s in states])

    def ee_pose(self) -> tuple[np.ndarray, np.ndarray]:
        """World position of the tool point (link frame + offset) and the link's orientation."""
        state = p.getLinkState(self.body, self.ee_link, computeForwardKinematics=True, physicsClientId=self.client)
        pos, orn = state[4], state[5]
        tip, _ = p.multiplyTransforms(pos, orn, self.ee_offset, (0, 0, 0, 1))
        return np.array(tip), np.array(orn)

    def ee_position(self) -> np.ndarray:
        return self.ee_pose()[0]

    def command(self, q: np.ndarray) -> None:
        """Set joint position targets, clipped to the joint limits."""
        self.targets = self.clip(np.asarray(q, dtype=np.float64))
        # Per joint, because only this call takes the URDF velocity limit; without it a far
        # target makes the motor overshoot a joint limit.
        for joint, target, gain in zip(self.joints, self.targets, self.gains):
            p.setJointMotorControl2(
                self.body,
                joint.index,
                p.POSITION_CONTROL,
                targetPosition=float(target),
                force=joint.max_force,
                maxVelocity=joint.max_velocity,
                positionGain=gain,
                physicsClientId=self.client,
            )

    def teleport(self, q: np.ndarray) -> None:
        """Set joint angles directly (episode resets only) and hold them."""
        q = self.clip(np.asarray(q, dtype=np.float64))
        for idx, angle in zip(self.indices, q):
            p.resetJointState(self.body, idx, float(angle), 0.0, physicsClientId=self.client)
        self.command(q)

    def proprio_spec(self) -> dict[str, ArraySpec]:
        """Specs of what `proprio` returns: joint angles and speeds, and the tool point."""
        names = self.names
        return {
            "joint_pos": ArraySpec((self.dof,), np.float32, (self.lower - JOINT_TOLERANCE).astype(np.float32),
                                   (self.upper + JOINT_TOLERANCE).astype(np.float32), "rad", names),
            "joint_vel": ArraySpec((self.dof,), np.float32, unit="rad/s", names=names),
            "tool_pos": ArraySpec((3,), np.float32, unit="m", names=("x", "y", "z"), description="tool point"),
        }

    def proprio(self) -> dict[str, np.ndarray]:
        q, qd = self.joint_state()
        return {
            "joint_pos": q.astype(np.float32),
            "joint_vel": qd.astype(np.float32),
            "tool_pos": self.ee_position().astype(np.float32),
        }

    def ik(self, position: np.ndarray, orientation: tuple[float, ...] = DOWN, iterations: int = 3) -> np.ndarray:
        """Joint angles that put the tool point at `position` with `orientation`, within limits.

        pybullet solves for the link frame, so the tool offset is removed first; a few outer
        iterations refine from the current solution.
        """
        rot = np.array(p.getMatrixFromQuaternion(orientation)).reshape(3, 3)
        link_target = np.asarray(position) - rot @ np.asarray(self.ee_offset)
        q_now, _ = self.joint_state()
        ranges = (self.upper - self.lower).tolist()
        q = q_now
        for _ in range(iterations):
            sol = p.calculateInverseKinematics(
                self.body,
                self.ee_link,
                link_target.tolist(),
                orientation,
                lowerLimits=self.lower.tolist(),
                upperLimits=self.upper.tolist(),
                jointRanges=ranges,
                restPoses=q.tolist(),
                maxNumIterations=100,
                residualThreshold=1e-5,
                physicsClientId=self.client,
            )
            q = self.clip(np.array(sol[: self.dof]))
        return q
