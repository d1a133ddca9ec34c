"""Command-line flags shared by `reverie-learner`, `reverie-robot` and `reverie-sim`, typed and checked here.

Each function is an argparse `type=`: a bad value stops the command before anything starts, with
argparse's one error line naming the flag (`argument --duration: expected ..., found 'nan'`) and
exit status 2. The ranges match the config schema's (`core/config/`) where a flag and a key
mean the same thing.
"""

from __future__ import annotations

import argparse
import math

from core.config.link import robot_id_problem
from core.config.schema import MAX_SEED
from core.config.sensors import MAX_DEAD_AFTER_S

MIN_PIXELS, MAX_PIXELS = 8, 2048


def _refuse(expected: str, text: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"expected {expected}, found {text!r}")


def seconds(text: str) -> float:
    """A duration: finite and > 0 (nan never compares as reached, so `--duration nan` ran forever)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise _refuse("a finite number of seconds > 0", text)
    return value


def camera_dead_after(text: str) -> float:
    """A camera's dead time, in the range of `sensors.camera.dead_after_s`."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= MAX_DEAD_AFTER_S):
        raise _refuse(f"a number of seconds > 0 and <= {MAX_DEAD_AFTER_S:g}", text)
    return value


def _whole(text: str, low: int, high: int | None, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise _refuse(expected, text) from None
    if value < low or (high is not None and value > high):
        raise _refuse(expected, text)
    return value


def count(text: str) -> int:
    """A number of steps or episodes: >= 1 (0 and negative numbers used to run one step and exit 0)."""
    return _whole(text, 1, None, "a whole number >= 1")


def pixels(text: str) -> int:
    """An image side in pixels (0 divided by zero deep inside the renderer)."""
    return _whole(text, MIN_PIXELS, MAX_PIXELS, f"a whole number of pixels in {MIN_PIXELS}..{MAX_PIXELS}")


def seed(text: str) -> int:
    """A random seed, in the config's `seed` range."""
    return _whole(text, 0, MAX_SEED, f"a whole number in 0..{MAX_SEED}")


def robot_id(text: str) -> str:
    """A robot id the wire protocol accepts (checked before the robot opens, not by the link after)."""
    if expected := robot_id_problem(text):
        raise _refuse(expected, text)
    return text
