"""Reverie on-robot process: the robot interface, (later) drivers, safety layer and link client."""

from robot.interface import ArraySpec, DiscreteSpec, Robot, RobotError, flag_specs

__all__ = ["ArraySpec", "DiscreteSpec", "Robot", "RobotError", "flag_specs"]
