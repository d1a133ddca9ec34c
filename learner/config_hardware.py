"""Config blocks of real hardware: the servo bus (`motors:`), the safety layer (`safety:`), the
proprioceptive servo task (`joint_reach:`) and the emulated bus that stands in for hardware (`emulator:`).

Angles are calibrated joint angles in radians (`reverie-robot calibrate` maps raw ticks to them).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from learner.config_base import Block
from learner.config_errors import FieldError

MotorModel = Literal["xl330-m077", "xl330-m288", "xl430-w250", "xm430-w350", "sts3215"]
Protocol = Literal["dynamixel", "feetech"]
FEETECH_MODELS = ("sts3215",)
Vec3 = Annotated[list[float], Field(min_length=3, max_length=3)]


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
    timeout_margin_ms: float = Field(
        10.0, gt=0, le=1000, description="added to each reply's wire time before it counts as missing, ms (USB "
        "latency and OS scheduling; FTDI adapters need their latency timer at 1 ms)"
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


class JointReachConfig(Block):
    """A proprioceptive task for servo robots: bring the joints to a target pose."""

    target: dict[str, float] = Field(
        default_factory=dict, description="target angle per joint name, rad; joints not named aim at their home"
    )


class EmulatedCameraConfig(Block):
    """Where the emulated scene's camera is; its frames are what `sensors.camera` reads."""

    eye: Vec3 = Field([0.25, 0.0, 0.9], description="camera position, world frame, m")
    target: Vec3 = Field([0.25, 0.0, 0.0], description="point looked at, world frame, m")
    fov_deg: float = Field(60.0, gt=1, lt=170, description="vertical field of view, degrees")
    width: int = Field(640, ge=16, le=1920, description="image width, pixels")
    height: int = Field(480, ge=16, le=1080, description="image height, pixels")
    fps: float = Field(15.0, gt=0, le=60, description="frames rendered per second")
    supersample: int = Field(
        1, ge=1, le=4, description="render at this multiple of the size and average down (soft edges like a lens; "
        "each step costs the square in render time: 2 is about 350 ms a 640x480 frame here)"
    )


class EmulatedMarkerConfig(Block):
    """An ArUco marker of `markers.dictionary` and `markers.size_m`, lying flat (facing up)."""

    id: int = Field(ge=0, description="marker id")
    link: str | None = Field(None, description="robot link carrying it (null: the table)")
    position: Vec3 = Field([0.0, 0.0, 0.0], description="world position (table) or offset in the link frame, m")
    heading: float = Field(0.0, description="rotation about the vertical axis, rad")


class EmulatedObjectConfig(Block):
    """A cube on the table with a marker on its top face."""

    marker_id: int = Field(ge=0, description="id of the marker on top")
    size: float = Field(0.035, gt=0.005, le=0.2, description="cube side, m")
    mass: float = Field(0.03, gt=0, le=2, description="mass, kg")
    position: Vec3 = Field([0.2, 0.1, 0.0], description="start position of the cube's bottom centre, world frame, m")


class EmulatorConfig(Block):
    """The emulated servo bus (`reverie-sim emulate`): PyBullet physics behind the real protocol."""

    model: Literal["so101", "koch", "quadruped12"] | None = Field(
        None, description="PyBullet model whose joints the emulated servos drive"
    )
    offset_spread: int = Field(
        0, ge=0, le=1024, description="raw zero of each emulated servo is 2048 +- up to this many ticks (seeded), "
        "so that calibration has something to find"
    )
    physics_hz: float = Field(240.0, gt=0, le=2000, description="physics rate, Hz, stepped in real time")
    camera: EmulatedCameraConfig | None = Field(
        None, description="a fixed camera rendering the emulated scene, served as an MJPEG stream over HTTP"
    )
    markers: list[EmulatedMarkerConfig] = Field(
        default_factory=list, description="printed ArUco markers in the scene (on the table or on robot links)"
    )
    object: EmulatedObjectConfig | None = Field(None, description="a cube with a marker on top (pick and place)")
    imu: bool = Field(False, description="an emulated BNO055 on its own pseudo-terminal, driven by the robot's base")

