"""A BNO055 strapped to the base of a PyBullet robot: the `source` of `robot.emulated.imu.EmulatedBNO055`.

PyBullet gives the base orientation as (x, y, z, w) in the world frame and its angular velocity in the
world frame; the chip reports its orientation as (w, x, y, z) and its rate about its own axes. `mount` is
the chip's orientation in the base frame (w, x, y, z; identity = chip axes along the base axes, x forward,
z up). The fused world frame is taken to be PyBullet's (z up; heading 0 along world x).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from sim.emulation.servo_plant import PyBulletPlant

IDENTITY = (1.0, 0.0, 0.0, 0.0)


def quat_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product of quaternions (w, x, y, z): the rotation b, then a."""
    aw, ax, ay, az = a
    bw, bx, by, bz = b
    return np.array([
        aw * bw - ax * bx - ay * by - az * bz,
        aw * bx + ax * bw + ay * bz - az * by,
        aw * by - ax * bz + ay * bw + az * bx,
        aw * bz + ax * by - ay * bx + az * bw,
    ])


def rotate_into(q: np.ndarray, v: np.ndarray) -> np.ndarray:
    """World vector `v` in the frame whose orientation is the unit quaternion `q` (w, x, y, z): R(q)ᵀ v."""
    w, xyz = q[0], np.asarray(q[1:])
    # R(q)^T v = R(q*) v with q* = (w, -xyz)
    t = 2.0 * np.cross(-xyz, v)
    return v + w * t + np.cross(-xyz, t)


def pybullet_imu_source(plant: PyBulletPlant,
                        mount: Sequence[float] = IDENTITY) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    """A function returning (quaternion w, x, y, z; angular rate rad/s in the chip frame) of the plant's base."""
    mount_q = np.asarray(mount, dtype=np.float64)
    norm = np.linalg.norm(mount_q)
    if mount_q.shape != (4,) or not norm > 0:
        raise ValueError(f"mount: expected a quaternion (w, x, y, z), got {list(mount)}")
    mount_q = mount_q / norm

    def source() -> tuple[np.ndarray, np.ndarray]:
        _, (x, y, z, w), omega_world = plant.base_state()
        chip = quat_multiply(np.array([w, x, y, z]), mount_q)
        chip /= np.linalg.norm(chip)
        if chip[0] < 0:
            chip = -chip  # q and -q are the same rotation: report the one with w >= 0
        return chip, rotate_into(chip, omega_world)

    return source
