"""Config blocks of real hardware: the servo bus (`motors:`) and the safety layer between the policy
and the motors (`safety:`).

Angles are calibrated joint angles in radians (`reverie-robot calibrate` maps raw ticks to them).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from core.config.base import Block, FieldError

MotorModel = Literal["xl330-m077", "xl330-m288", "xl430-w250", "xm430-w350", "sts3215"]
Protocol = Literal["dynamixel", "feetech"]
FEETECH_MODELS = ("sts3215",)


class ServoConfig(Block):
    name: str = Field(description="joint name (observation and calibration key)")
    id: int = Field(ge=0, le=252, description="servo id on the bus")
    model: MotorModel = Field(description="servo model; must speak the bus protocol")
    lower: float = Field(description="lowest commanded angle, rad (calibrated)")
    upper: float = Field(description="highest commanded angle, rad (calibrated)")
    home: float = Field(0.0, description="angle of the home pose, rad; reset moves here")
    gripper: bool = Field(False, description="a gripper joint: its torque is limited by torque_limit")
    torque_limit: float | None = Field(
        None, gt=0, le=1, description="fraction of the servo's maximum torque/current it may use (grippers lock up "
        "and burn at full torque); null = the servo's own setting"
    )

    @model_validator(mode="after")
    def _range(self) -> ServoConfig:
        if not self.lower < self.upper:
            raise FieldError("lower", f"an angle below upper ({self.upper})", self.lower)
        if not self.lower <= self.home <= self.upper:
            raise FieldError("home", f"an angle inside [lower, upper] = [{self.lower}, {self.upper}]", self.home)
        return self


class MotorsConfig(Block):
    protocol: Protocol = Field(description="dynamixel (Protocol 2.0) or feetech (STS/SMS)")
    port: str = Field(description="serial port (prefer /dev/serial/by-id/...) or a pyserial URL such as spy://PORT")
    baud: int = Field(1_000_000, gt=0, description="bus baud rate, bit/s")
    servos: list[ServoConfig] = Field(min_length=1, description="every servo on the bus, in action order")
    calibration: str | None = Field(
        None, description="calibration file written by reverie-robot calibrate; null = calibration/<name>.json"
    )
    read_velocity: bool = Field(True, description="read present velocities too (one wider sync read)")
    timeout_margin_ms: float | None = Field(
        None, gt=0, le=1000, description="added to each reply's wire time before it counts as missing, ms (USB "
        "latency and OS scheduling; FTDI adapters need their latency timer at 1 ms); null = 10 on a USB adapter, 30 "
        "on a pseudo-terminal (an emulated bus: its replies wait for the emulator process to be scheduled)"
    )
    retries: int = Field(2, ge=0, le=10, description="a failed read is retried this many times within a tick")
    read_budget_ms: float | None = Field(
        None, gt=0, le=10000, description="longest a control step's sync read may take, retries included, ms; one "
        "not complete by then is a missed tick (the episode ends; safety.max_failed_ticks in a row stop the robot); "
        "null = one control period, so the robot keeps control.hz or stops"
    )
    action_mode: Literal["delta", "absolute"] = Field(
        "delta", description="delta: action in [-1, 1] moves each goal by up to joint_delta; absolute: it maps to "
        "[lower, upper]"
    )
    joint_delta: float = Field(0.05, gt=0, le=1.0, description="goal change at |action| = 1 in delta mode, rad")

    @model_validator(mode="after")
    def _servos(self) -> MotorsConfig:
        for i, servo in enumerate(self.servos):
            feetech = servo.model in FEETECH_MODELS
            if feetech != (self.protocol == "feetech"):
                raise FieldError(f"motors.servos.{i}.model", f"a {self.protocol} model", servo.model)
        for key in ("id", "name"):
            values = [getattr(s, key) for s in self.servos]
            dupes = sorted({v for v in values if values.count(v) > 1}, key=str)
            if dupes:
                raise FieldError(f"motors.servos.*.{key}", f"a different {key} for every servo", dupes)
        return self


class SafetyConfig(Block):
    """Between every policy output and the motors. Defaults are conservative."""

    max_step: float = Field(0.1, gt=0, le=3.2, description="largest goal change of one joint per control step, rad")
    watchdog_s: float = Field(
        0.3, gt=0, le=10, description="no fresh command reaches the motors for this long -> safe state, s"
    )
    on_watchdog: Literal["hold", "torque_off"] = Field(
        "hold", description="safe state when the watchdog fires: hold the present position, or torque off"
    )
    on_exit: Literal["torque_off", "home_then_torque_off"] = Field(
        "torque_off", description="every exit path ends with torque off; optionally after moving to the home pose"
    )
    exit_move_s: float = Field(2.0, gt=0, le=30, description="time allowed for the move home before torque off, s")
    bus_watchdog_ms: int | None = Field(
        200, ge=20, le=2540, description="Dynamixel Bus_Watchdog: servos stop by themselves when the host is silent "
        "this long (20 ms units); null disables. Feetech servos have none"
    )
    max_failed_ticks: int = Field(
        3, ge=1, le=100, description="control ticks in a row whose sync read may fail (each within "
        "motors.read_budget_ms, motors.retries retries included) before a safe stop naming the servos and the reply "
        "loss; each failure ends the episode"
    )
    estop_file: str | None = Field(None, description="software e-stop: the robot stops when this file exists")
    estop_key: bool = Field(
        True, description="software e-stop: a key press stops the robot, except p/c/r/h which drive the operator "
        "prompt (when stdin is a TTY)"
    )
