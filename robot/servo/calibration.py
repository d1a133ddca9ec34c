"""Raw servo ticks <-> calibrated joint angles in radians, per joint.

`reverie-robot calibrate` records, for every joint, the raw reading at the joint's angle 0 (the
calibration pose) and the range the joint was moved through, and saves them as a small JSON file that
a person can read and edit (flip `direction` to -1 for a joint that turns the other way).

Angles are taken relative to the zero reading and wrapped to half a turn either side of it, so a
joint whose range crosses the encoder's 0/4095 seam still reads continuously (joints turn less than
one revolution). Goals from `to_ticks` are not wrapped: servos in position mode expect the zero near
the middle of their range, which is where calibration puts it on a well-assembled arm.

A calibration `reverie-sim emulate` writes for its emulated servos says so (`"emulated": true`): it may sit
at the default path while a person tries the guide without hardware, and must never drive a real robot.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.atomic import atomic_write_bytes
from core.config import Config
from core.config.hardware import ServoConfig
from robot.servo.errors import MotorConfigError
from robot.servo.tables import MODELS

log = logging.getLogger(__name__)

FORMAT = "reverie-calibration"
VERSION = 1
JOINT_KEYS = ("id", "zero_ticks", "direction", "min_ticks", "max_ticks")


@dataclass(frozen=True)
class JointCalibration:
    id: int
    zero_ticks: int  # raw reading at joint angle 0
    direction: int  # +1 or -1: the sign of ticks per radian
    min_ticks: int  # range recorded during calibration (relative to zero it may leave 0..ticks_per_rev)
    max_ticks: int


class Calibration:
    """Per-joint mapping between raw ticks and radians; arrays are ordered by the `names` passed in."""

    def __init__(self, joints: dict[str, JointCalibration], ticks_per_rev: dict[str, int] | int = 4096,
                 emulated: bool = False) -> None:
        self.joints = dict(joints)
        self.emulated = emulated  # written for the emulated servos of `reverie-sim emulate`, not for hardware
        if isinstance(ticks_per_rev, int):
            ticks_per_rev = {name: ticks_per_rev for name in self.joints}
        missing = sorted(set(self.joints) - set(ticks_per_rev))
        if missing:
            raise MotorConfigError(f"calibration: no ticks_per_rev for joints {missing}")
        self.ticks_per_rev = {name: int(ticks_per_rev[name]) for name in self.joints}

    @classmethod
    def default(cls, servos: Sequence[ServoConfig]) -> Calibration:
        """Zero at mid-range (2048 of 4096), direction +1, full range: only for trying things without a
        calibration file; angles are then off by however the servos were assembled."""
        log.warning("no calibration file: assuming every joint's zero at mid-range; angles and joint limits may "
                    "be wrong (run `reverie-robot calibrate --config ...`)")
        joints, ticks = {}, {}
        for servo in servos:
            n = _ticks_per_rev(servo)
            joints[servo.name] = JointCalibration(servo.id, n // 2, 1, 0, n - 1)
            ticks[servo.name] = n
        return cls(joints, ticks)

    @classmethod
    def load(cls, path: str | os.PathLike[str], servos: Sequence[ServoConfig]) -> Calibration:
        """Read a calibration file for the joints in `servos`; every error names the file, joint and key."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise MotorConfigError(f"calibration file {path} not found: run `reverie-robot calibrate --config ...` "
                                   "(or set motors.calibration)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MotorConfigError(f"calibration file {path}: not readable JSON ({exc})") from None
        joints_data = _joints_block(data, path)
        joints, ticks = {}, {}
        for servo in servos:
            entry = joints_data.get(servo.name)
            if entry is None:
                raise MotorConfigError(f"calibration file {path}: no entry for joint {servo.name!r} (servo "
                                       f"{servo.id}); calibrate again with this config")
            joints[servo.name], ticks[servo.name] = _parse_joint(entry, servo, path)
        extra = sorted(set(joints_data) - {s.name for s in servos})
        if extra:
            log.warning("calibration file %s: joints %s are not in the config; ignored", path, extra)
        emulated = data.get("emulated", False)
        if not isinstance(emulated, bool):
            raise MotorConfigError(f"calibration file {path}: key 'emulated' must be true or false, found {emulated!r}")
        return cls(joints, ticks, emulated)

    def to_dict(self) -> dict[str, Any]:
        joints = {name: {**asdict(j), "ticks_per_rev": self.ticks_per_rev[name]} for name, j in self.joints.items()}
        return {"format": FORMAT, "version": VERSION, **({"emulated": True} if self.emulated else {}), "joints": joints}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the file atomically as indented JSON (a crash never leaves half a calibration)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        atomic_write_bytes(path, text.encode(), prefix=f".{path.name}.")

    def _arrays(self, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        try:
            joints = [self.joints[n] for n in names]
        except KeyError as exc:
            raise MotorConfigError(f"calibration has no joint {exc.args[0]!r} (joints: {sorted(self.joints)})") \
                from None
        zero = np.array([j.zero_ticks for j in joints], np.float64)
        sign = np.array([j.direction for j in joints], np.float64)
        per_rev = np.array([self.ticks_per_rev[n] for n in names], np.float64)
        return zero, sign, per_rev

    def to_radians(self, names: Sequence[str], ticks: np.ndarray) -> np.ndarray:
        """Raw positions (last axis ordered like `names`) to joint angles, rad (float64)."""
        zero, sign, per_rev = self._arrays(names)
        delta = np.asarray(ticks, np.float64) - zero
        delta = np.mod(delta + per_rev / 2, per_rev) - per_rev / 2  # half a turn either side of zero
        return sign * delta * (2 * math.pi / per_rev)

    def to_ticks(self, names: Sequence[str], radians: np.ndarray) -> np.ndarray:
        """Joint angles (last axis ordered like `names`) to raw goal positions (int64, rounded)."""
        zero, sign, per_rev = self._arrays(names)
        ticks = zero + sign * np.asarray(radians, np.float64) * (per_rev / (2 * math.pi))
        return np.rint(ticks).astype(np.int64)

    def range_radians(self, name: str) -> tuple[float, float]:
        """The range recorded during calibration, as (low, high) angles in rad."""
        zero, sign, per_rev = self._arrays([name])
        joint = self.joints[name]
        ends = sign[0] * (np.array([joint.min_ticks, joint.max_ticks], np.float64) - zero[0]) * (2 * math.pi
                                                                                                   / per_rev[0])
        return float(ends.min()), float(ends.max())


def default_path(cfg: Config) -> Path:
    """Where the calibration of this config lives: motors.calibration, else calibration/<name>.json."""
    if cfg.motors is not None and cfg.motors.calibration:
        return Path(cfg.motors.calibration)
    return Path("calibration") / f"{cfg.name}.json"


def _ticks_per_rev(servo: ServoConfig) -> int:
    model = MODELS.get(servo.model)
    return int(model.ticks_per_rev) if model is not None else 4096


def _joints_block(data: Any, path: Path) -> dict[str, Any]:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise MotorConfigError(f"calibration file {path}: not a Reverie calibration (expected a JSON object with "
                               f"\"format\": \"{FORMAT}\")")
    if data.get("version") != VERSION:
        raise MotorConfigError(f"calibration file {path}: key 'version' is {data.get('version')!r}, this Reverie "
                               f"reads version {VERSION}")
    joints = data.get("joints")
    if not isinstance(joints, dict):
        raise MotorConfigError(f"calibration file {path}: key 'joints' must be an object of joint name -> entry")
    return joints


def _parse_joint(entry: Any, servo: ServoConfig, path: Path) -> tuple[JointCalibration, int]:
    where = f"calibration file {path}, joint {servo.name!r}"
    if not isinstance(entry, dict):
        raise MotorConfigError(f"{where}: expected an object with keys {list(JOINT_KEYS)}, found {entry!r}")
    values = {}
    for key in (*JOINT_KEYS, "ticks_per_rev"):
        value = entry.get(key, _ticks_per_rev(servo) if key == "ticks_per_rev" else None)
        if value is None:
            raise MotorConfigError(f"{where}: key {key!r} is missing")
        if isinstance(value, bool) or not isinstance(value, int):
            raise MotorConfigError(f"{where}: key {key!r} must be an integer, found {value!r}")
        values[key] = value
    if values["id"] != servo.id:
        raise MotorConfigError(f"{where}: key 'id' is {values['id']} but the config puts this joint on servo "
                               f"{servo.id}; calibrate again or fix the config")
    if values["direction"] not in (1, -1):
        raise MotorConfigError(f"{where}: key 'direction' must be 1 or -1, found {values['direction']}")
    if values["min_ticks"] > values["max_ticks"]:
        raise MotorConfigError(f"{where}: key 'min_ticks' ({values['min_ticks']}) is above 'max_ticks' "
                               f"({values['max_ticks']})")
    if values["ticks_per_rev"] <= 0:
        raise MotorConfigError(f"{where}: key 'ticks_per_rev' must be positive, found {values['ticks_per_rev']}")
    per_rev = values.pop("ticks_per_rev")
    return JointCalibration(**values), per_rev
