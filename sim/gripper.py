"""The Franka Panda from pybullet_data as an `Arm` with its parallel gripper.

`Arm` drives only the revolute joints; the Panda's two fingers are prismatic, so this subclass
adds them (position-controlled together, like the real gripper's mimic joint) and gives IK the
full 9-DoF limit lists that pybullet needs before it applies null-space limits and rest poses:
with shorter lists it silently drops them and the redundant elbow drifts from step to step.
"""

from __future__ import annotations

import numpy as np
import pybullet as p

from sim.arm import DOWN, Arm

PANDA = "franka_panda/panda.urdf"
FINGER_TRAVEL = 0.04  # m per finger; the opening between the fingers is twice the joint position
# Link pairs whose collision hulls overlap by construction (wrist link 7 / hand) or only when the
# fingers close on nothing; excluded from self-collision so they do not fight the motors.
OVERLAPPING_LINKS = (("panda_link7", "panda_hand"), ("panda_leftfinger", "panda_rightfinger"))


class PandaArm(Arm):
    """A fixed-base Panda whose tool point is the grasp point between the fingertips."""

    def __init__(
        self,
        client: int,
        render_proxy: bool = True,
        base_position: tuple[float, float, float] = (0.0, 0.0, 0.0),
        rest_pose: np.ndarray | None = None,
        finger_force: float = 20.0,
        color: tuple[float, float, float, float] | None = (0.75, 0.75, 0.78, 1.0),
    ) -> None:
        super().__init__(
            client,
            urdf=PANDA,
            render_proxy=render_proxy,
            ee_link_name="panda_grasptarget",
            base_position=base_position,
            color=color,
        )
        links: dict[str, int] = {}
        self.fingers: list[int] = []
        self.movable: list[int] = []  # every non-fixed joint, in pybullet's DoF order
        finger_limits = []
        for j in range(p.getNumJoints(self.body, physicsClientId=client)):
            info = p.getJointInfo(self.body, j, physicsClientId=client)
            links[info[12].decode()] = j
            if info[2] != p.JOINT_FIXED:
                self.movable.append(j)
            if info[2] == p.JOINT_PRISMATIC:
                self.fingers.append(j)
                finger_limits.append((info[8], info[9]))
        for a, b in OVERLAPPING_LINKS:
            p.setCollisionFilterPair(self.body, self.body, links[a], links[b], 0, physicsClientId=client)
        self.finger_force = finger_force
        self.finger_target = FINGER_TRAVEL
        lower = dict(zip(self.indices, self.lower))
        upper = dict(zip(self.indices, self.upper))
        for j, (lo, hi) in zip(self.fingers, finger_limits):
            lower[j], upper[j] = lo, hi
        self._ik_lower = [float(lower[j]) for j in self.movable]
        self._ik_upper = [float(upper[j]) for j in self.movable]
        self._ik_ranges = [hi - lo for lo, hi in zip(self._ik_lower, self._ik_upper)]
        # pybullet's IK takes the base's inertial frame for its link frame; the Panda's base has its
        # centre of mass 5 cm above its origin, so goals are shifted by that offset to compensate.
        _, base_orn = p.getBasePositionAndOrientation(self.body, physicsClientId=client)
        local_com = p.getDynamicsInfo(self.body, -1, physicsClientId=client)[3]
        self._ik_bias = np.array(p.multiplyTransforms((0, 0, 0), base_orn, local_com, (0, 0, 0, 1))[0])
        self.rest_pose = np.zeros(self.dof) if rest_pose is None else np.asarray(rest_pose, dtype=np.float64)

    # ----- gripper --------------------------------------------------------------------------
    def grip(self, closed: bool) -> None:
        """Drive both fingers to fully closed (squeezing what is between them) or fully open."""
        self.finger_target = 0.0 if closed else FINGER_TRAVEL
        p.setJointMotorControlArray(
            self.body,
            self.fingers,
            p.POSITION_CONTROL,
            targetPositions=[self.finger_target] * len(self.fingers),
            forces=[self.finger_force] * len(self.fingers),
            physicsClientId=self.client,
        )

    def teleport_fingers(self, closed: bool) -> None:
        """Set the fingers directly (episode resets only) and hold them there."""
        width = 0.0 if closed else FINGER_TRAVEL
        for j in self.fingers:
            p.resetJointState(self.body, j, width, 0.0, physicsClientId=self.client)
        self.grip(closed)

    def finger_positions(self) -> np.ndarray:
        states = p.getJointStates(self.body, self.fingers, physicsClientId=self.client)
        return np.array([s[0] for s in states])

    def opening(self) -> float:
        """Distance between the fingers, m (0 closed, 0.08 open)."""
        return float(self.finger_positions().sum())

    # ----- kinematics -----------------------------------------------------------------------
    def ik(self, position: np.ndarray, orientation: tuple[float, ...] = DOWN, iterations: int = 2) -> np.ndarray:
        """Joint angles for the tool at `position`, pulled toward `rest_pose` in the null space.

        The rest pose (not the current state) anchors the redundant DoF, so a goal maps to the
        same posture whatever path led there: long random walks cannot creep into a joint limit.
        """
        fingers = [self.finger_target] * len(self.fingers)
        rest = self.rest_pose.tolist() + fingers
        q = self.rest_pose
        for _ in range(iterations):  # each pass starts where the previous one ended
            sol = p.calculateInverseKinematics(
                self.body,
                self.ee_link,
                (np.asarray(position, dtype=np.float64) - self._ik_bias).tolist(),
                orientation,
                lowerLimits=self._ik_lower,
                upperLimits=self._ik_upper,
                jointRanges=self._ik_ranges,
                restPoses=rest,
                currentPositions=q.tolist() + fingers,
                maxNumIterations=100,
                residualThreshold=1e-5,
                physicsClientId=self.client,
            )
            q = self.clip(np.array(sol[: self.dof]))
        return q
