"""Reverie's on-robot process: the control loop, the servo and sensor drivers, the safety layer, the real
tasks and the link client that streams experience to the learner and takes weights back."""

from core.interface import ArraySpec, DiscreteSpec, Robot, RobotError, flag_specs

__all__ = ["ArraySpec", "DiscreteSpec", "Robot", "RobotError", "flag_specs"]
