"""Config blocks every backend reads: the control loop (`control:`) and the camera image in the
observations (`camera:`; its size and `enabled` hold for every backend, the viewpoint for simulated ones).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from core.config.base import Block, FieldError, Vec3


class ControlConfig(Block):
    hz: float = Field(
        10.0, ge=0.1, le=1000, description="policy (control) rate, Hz (slower than one step per 10 s is a mistake)"
    )
    episode_steps: int = Field(100, ge=1, description="policy steps before is_last is set")
    realtime_priority: int | None = Field(
        None, ge=1, le=99, description="robot: run the control loop thread SCHED_FIFO at this priority (Linux, "
        "needs CAP_SYS_NICE; warns and carries on without); null = normal scheduling"
    )
    cpus: list[int] | None = Field(
        None, description="robot: pin the control loop thread to these CPUs (Linux; e.g. one kept free with "
        "isolcpus); the link process stays where it started; null = wherever the OS puts it"
    )
    status_every_s: float = Field(
        10.0, ge=0, description="robot: print a status line (steps, rate, episodes, weights, period error, link) "
        "this often, s; 0 = never"
    )
    spin_ms: float = Field(
        2.0, ge=0, le=50, description="robot: sleep to this many ms before each tick, then spin to it: a sleeping "
        "CPU can wake several ms late when the machine is busy; spinning costs spin_ms * hz / 1000 of one core"
    )

    @model_validator(mode="after")
    def _cpu_list(self) -> ControlConfig:
        if self.cpus is not None and (not self.cpus or min(self.cpus) < 0):
            raise FieldError("cpus", "a non-empty list of CPU numbers (0, 1, ...) or null", self.cpus)
        return self


class CameraConfig(Block):
    enabled: bool = Field(True, description="include the `image` entry in observations")
    width: int = Field(64, ge=8, le=1024, description="image width, pixels")
    height: int = Field(64, ge=8, le=1024, description="image height, pixels")
    renderer: Literal["tiny", "egl", "auto"] = Field(
        "tiny", description="tiny: CPU software renderer (deterministic); egl: OpenGL; auto: egl if it loads"
    )
    eye: Vec3 = Field([1.0, 0.0, 0.8], description="camera position, m (relative to the followed base if follow_base)")
    target: Vec3 = Field([0.3, 0.0, 0.2], description="point looked at, m")
    up: Vec3 = [0.0, 0.0, 1.0]
    fov_deg: float = Field(60.0, gt=1, lt=170, description="vertical field of view, degrees")
    near: float = Field(0.05, gt=0, description="near clip plane, m")
    far: float = Field(5.0, gt=0, description="far clip plane, m")
    follow_base: bool = Field(False, description="move eye and target with the robot base (x, y)")

    @model_validator(mode="after")
    def _planes(self) -> CameraConfig:
        if self.far <= self.near:
            raise FieldError("far", f"a distance > near ({self.near})", self.far)
        return self
