"""URDFs of the servo robots that the emulated bus drives: two small arms and a small quadruped.

They are written by code rather than shipped as files, so that dimensions, masses and limits live
in one readable table per robot. Geometry is boxes (and spheres for feet); inertias are those of
the boxes. A generated file is cached under `sim.assets._cache_dir()` by a digest of its text.

Joint angle 0 is the calibration pose of the matching config in `hardware_configs/`:
- arms: upper arm straight up, forearm and hand pointing forward (+x), gripper closed. Positive
  shoulder_lift / elbow_flex / wrist_flex tilt their link from +z towards +x (forward and down).
- quadruped: every leg straight down; positive thigh swings the foot backwards, a bent knee is negative.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import cache

from sim.assets import _cache_dir

Vec = tuple[float, float, float]
ARM_JOINTS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")
LEGS = ("fl", "fr", "rl", "rr")
LEG_JOINTS = tuple(f"{leg}_{part}" for leg in LEGS for part in ("hip", "thigh", "knee"))
MODELS = ("so101", "koch", "quadruped12")
LIMIT_MARGIN = 0.05  # URDF stops lie this far outside the configs' commanded ranges, rad


@dataclass(frozen=True)
class ArmDims:
    """Link lengths (m) and masses (kg) of a 5-DOF arm with a 1-DOF gripper; servos' mass included."""

    base: tuple[float, float]  # height, mass
    shoulder: tuple[float, float]  # height of the lift axis above the pan joint, mass
    upper: tuple[float, float]  # shoulder_lift -> elbow_flex
    forearm: tuple[float, float]  # elbow_flex -> wrist_flex
    wrist: tuple[float, float]  # wrist_flex -> wrist_roll
    hand: tuple[float, float]  # wrist_roll -> fingertip (fixed finger)
    jaw: tuple[float, float]  # moving jaw length
    width: float  # cross-section of the links
    limits: dict[str, tuple[float, float]]


# SO-101 (STS3215 servos, ~55 g each): about 0.4 m from the lift axis to the fingertip.
SO101 = ArmDims(
    base=(0.05, 0.40), shoulder=(0.06, 0.12), upper=(0.116, 0.15), forearm=(0.135, 0.12),
    wrist=(0.06, 0.08), hand=(0.10, 0.10), jaw=(0.08, 0.03), width=0.04,
    limits={"shoulder_pan": (-1.9, 1.9), "shoulder_lift": (-1.7, 1.7), "elbow_flex": (-1.6, 1.6),
            "wrist_flex": (-1.7, 1.7), "wrist_roll": (-2.7, 2.7), "gripper": (0.0, 1.5)},
)
# Koch v1.1 (XL430 at the shoulder, XL330 elsewhere): a smaller, lighter arm of the same layout.
KOCH = ArmDims(
    base=(0.045, 0.30), shoulder=(0.05, 0.09), upper=(0.108, 0.10), forearm=(0.10, 0.07),
    wrist=(0.045, 0.04), hand=(0.085, 0.05), jaw=(0.065, 0.02), width=0.032,
    limits={"shoulder_pan": (-2.0, 2.0), "shoulder_lift": (-1.7, 1.7), "elbow_flex": (-1.6, 1.6),
            "wrist_flex": (-1.7, 1.7), "wrist_roll": (-2.8, 2.8), "gripper": (0.0, 1.4)},
)


@dataclass(frozen=True)
class QuadrupedDims:
    body: Vec  # base box, m
    body_mass: float
    hip_xy: tuple[float, float]  # hip abduction axes at (+-x, +-y) from the body centre
    hip_offset: float  # sideways from the abduction axis to the thigh joint
    thigh: tuple[float, float]  # length, mass
    shin: tuple[float, float]
    hip_mass: float
    foot_radius: float
    limits: dict[str, tuple[float, float]]  # per joint kind: hip, thigh, knee


# About 2 kg with twelve XM430s (82 g each) in the legs; legs 0.2 m long.
QUADRUPED12 = QuadrupedDims(
    body=(0.26, 0.14, 0.07), body_mass=1.0, hip_xy=(0.11, 0.05), hip_offset=0.04,
    thigh=(0.10, 0.10), shin=(0.10, 0.05), hip_mass=0.09, foot_radius=0.012,
    limits={"hip": (-0.6, 0.6), "thigh": (-0.9, 1.8), "knee": (-2.5, -0.3)},
)


def _fmt(values: tuple[float, ...]) -> str:
    return " ".join(f"{v:.6g}" for v in values)


def _box_inertia(mass: float, size: Vec) -> Vec:
    x, y, z = size
    return (mass * (y * y + z * z) / 12, mass * (x * x + z * z) / 12, mass * (x * x + y * y) / 12)


def _geometry(parent: ET.Element, shape: str, size: Vec | float) -> None:
    geometry = ET.SubElement(parent, "geometry")
    if shape == "box":
        ET.SubElement(geometry, "box", size=_fmt(size))  # type: ignore[arg-type]
    else:
        ET.SubElement(geometry, "sphere", radius=f"{size:.6g}")


def _link(robot: ET.Element, name: str, mass: float, size: Vec, center: Vec, color: str,
          extra_spheres: tuple[tuple[Vec, float], ...] = ()) -> None:
    """A box link of `mass` centred at `center` (link frame), with optional sphere collisions (feet)."""
    link = ET.SubElement(robot, "link", name=name)
    inertial = ET.SubElement(link, "inertial")
    ET.SubElement(inertial, "origin", xyz=_fmt(center), rpy="0 0 0")
    ET.SubElement(inertial, "mass", value=f"{mass:.6g}")
    ixx, iyy, izz = _box_inertia(mass, size)
    ET.SubElement(inertial, "inertia", ixx=f"{ixx:.6g}", iyy=f"{iyy:.6g}", izz=f"{izz:.6g}", ixy="0", ixz="0", iyz="0")
    shapes: list[tuple[str, Vec | float, Vec]] = [("box", size, center)]
    shapes += [("sphere", radius, at) for at, radius in extra_spheres]
    for shape, dims, at in shapes:
        visual = ET.SubElement(link, "visual")
        ET.SubElement(visual, "origin", xyz=_fmt(at), rpy="0 0 0")
        _geometry(visual, shape, dims)
        material = ET.SubElement(visual, "material", name=f"{name}_{shape}")
        ET.SubElement(material, "color", rgba=color)
        collision = ET.SubElement(link, "collision")
        ET.SubElement(collision, "origin", xyz=_fmt(at), rpy="0 0 0")
        _geometry(collision, shape, dims)


def _joint(robot: ET.Element, name: str, parent: str, child: str, xyz: Vec, axis: Vec,
           limits: tuple[float, float], effort: float = 10.0, velocity: float = 20.0) -> None:
    joint = ET.SubElement(robot, "joint", name=name, type="revolute")
    ET.SubElement(joint, "parent", link=parent)
    ET.SubElement(joint, "child", link=child)
    ET.SubElement(joint, "origin", xyz=_fmt(xyz), rpy="0 0 0")
    ET.SubElement(joint, "axis", xyz=_fmt(axis))
    lower, upper = limits
    ET.SubElement(joint, "limit", lower=f"{lower - LIMIT_MARGIN:.6g}", upper=f"{upper + LIMIT_MARGIN:.6g}",
                  effort=f"{effort:.6g}", velocity=f"{velocity:.6g}")
    ET.SubElement(joint, "dynamics", damping="0", friction="0")


def arm_urdf(name: str, d: ArmDims) -> str:
    """URDF text of a pan / lift / elbow / wrist flex / wrist roll arm with a one-jaw gripper."""
    robot = ET.Element("robot", name=name)
    w = d.width
    grey, dark, orange = "0.85 0.85 0.85 1", "0.25 0.25 0.28 1", "0.95 0.55 0.15 1"
    _link(robot, "base", d.base[1], (0.1, 0.1, d.base[0]), (0, 0, d.base[0] / 2), dark)
    _link(robot, "shoulder", d.shoulder[1], (w, w, d.shoulder[0]), (0, 0, d.shoulder[0] / 2), orange)
    _link(robot, "upper_arm", d.upper[1], (w, w, d.upper[0]), (0, 0, d.upper[0] / 2), grey)
    _link(robot, "forearm", d.forearm[1], (d.forearm[0], w, w), (d.forearm[0] / 2, 0, 0), orange)
    _link(robot, "wrist", d.wrist[1], (d.wrist[0], w, w), (d.wrist[0] / 2, 0, 0), grey)
    _link(robot, "hand", d.hand[1], (d.hand[0], w / 2, w), (d.hand[0] / 2, w / 4, 0), orange)
    _link(robot, "jaw", d.jaw[1], (d.jaw[0], w / 4, w * 0.8), (d.jaw[0] / 2, 0, 0), grey)
    lim = d.limits
    _joint(robot, "shoulder_pan", "base", "shoulder", (0, 0, d.base[0]), (0, 0, 1), lim["shoulder_pan"])
    _joint(robot, "shoulder_lift", "shoulder", "upper_arm", (0, 0, d.shoulder[0]), (0, 1, 0), lim["shoulder_lift"])
    _joint(robot, "elbow_flex", "upper_arm", "forearm", (0, 0, d.upper[0]), (0, 1, 0), lim["elbow_flex"])
    _joint(robot, "wrist_flex", "forearm", "wrist", (d.forearm[0], 0, 0), (0, 1, 0), lim["wrist_flex"])
    _joint(robot, "wrist_roll", "wrist", "hand", (d.wrist[0], 0, 0), (1, 0, 0), lim["wrist_roll"])
    # The jaw hinges at the palm beside the fixed finger; opening swings it away from the finger (-y).
    jaw_at = (d.hand[0] - d.jaw[0], -w / 8, 0)
    _joint(robot, "gripper", "hand", "jaw", jaw_at, (0, 0, -1), lim["gripper"])
    return ET.tostring(robot, encoding="unicode")


def quadruped_urdf(name: str, d: QuadrupedDims) -> str:
    """URDF text of a four-legged robot, each leg hip abduction (x axis), thigh and knee (y axis)."""
    robot = ET.Element("robot", name=name)
    grey, dark, orange = "0.85 0.85 0.85 1", "0.25 0.25 0.28 1", "0.95 0.55 0.15 1"
    _link(robot, "base", d.body_mass, d.body, (0, 0, 0), dark)
    thigh_len, shin_len = d.thigh[0], d.shin[0]
    for leg in LEGS:
        sx = 1.0 if leg[0] == "f" else -1.0
        sy = 1.0 if leg[1] == "l" else -1.0
        hip, thigh, shin = f"{leg}_hip_link", f"{leg}_thigh_link", f"{leg}_shin_link"
        _link(robot, hip, d.hip_mass, (0.05, d.hip_offset, 0.04), (0, sy * d.hip_offset / 2, 0), orange)
        _link(robot, thigh, d.thigh[1], (0.025, 0.02, thigh_len), (0, 0, -thigh_len / 2), grey)
        foot = ((0.0, 0.0, -shin_len), d.foot_radius)
        _link(robot, shin, d.shin[1], (0.018, 0.015, shin_len), (0, 0, -shin_len / 2), dark, extra_spheres=(foot,))
        hip_xyz = (sx * d.hip_xy[0], sy * d.hip_xy[1], 0.0)
        _joint(robot, f"{leg}_hip", "base", hip, hip_xyz, (1, 0, 0), d.limits["hip"])
        _joint(robot, f"{leg}_thigh", hip, thigh, (0, sy * d.hip_offset, 0), (0, 1, 0), d.limits["thigh"])
        _joint(robot, f"{leg}_knee", thigh, shin, (0, 0, -thigh_len), (0, 1, 0), d.limits["knee"])
    return ET.tostring(robot, encoding="unicode")


@dataclass(frozen=True)
class ServoModel:
    """A servo robot the emulator can drive: its URDF text, joint names and whether its base is fixed."""

    name: str
    urdf: str
    joints: tuple[str, ...]
    fixed_base: bool


def _build(name: str) -> ServoModel:
    if name == "so101":
        return ServoModel(name, arm_urdf(name, SO101), ARM_JOINTS, True)
    if name == "koch":
        return ServoModel(name, arm_urdf(name, KOCH), ARM_JOINTS, True)
    if name == "quadruped12":
        return ServoModel(name, quadruped_urdf(name, QUADRUPED12), LEG_JOINTS, False)
    raise ValueError(f"unknown servo robot model {name!r}: expected one of {list(MODELS)}")


@cache
def servo_model(name: str) -> ServoModel:
    return _build(name)


@cache
def urdf_path(name: str) -> str:
    """Path of the (cached) URDF file of servo robot `name`."""
    text = servo_model(name).urdf
    digest = hashlib.sha1(text.encode()).hexdigest()[:12]
    target = _cache_dir() / f"servo-{name}-{digest}.urdf"
    if not target.exists():
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, target)  # atomic: parallel test workers may race here
    return str(target)
