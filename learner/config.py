"""The one place where Reverie configuration is typed, validated, loaded and written.

A config is a YAML file in `hardware_configs/`, one per robot or simulated task. Each top-level
block below is a section of that file. Every field has a type, a range and a unit in its
description; unknown keys are errors. Later issues add blocks (dreamer, replay, link, motors,
safety) here, so that robot, learner and sim all read one validated object.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from learner.atomic import atomic_write_bytes
from learner.config_agent import DreamerConfig, ReplayConfig, TrainConfig
from learner.config_base import Block
from learner.config_errors import ConfigError, FieldError, describe_errors
from learner.config_hardware import EmulatorConfig, JointReachConfig, MotorsConfig, SafetyConfig
from learner.config_link import MIN_STEP_EXTRA_BYTES, LinkConfig, chunk_steps, message_room_problem
from learner.config_sensors import MarkerReachConfig, MarkersConfig, PickPlaceConfig, SensorsConfig, StandWalkConfig

__all__ = ["Config", "ConfigError", "load_config", "parse_overrides", "write_resolved"]

RESOLVED_NAME = "config.yaml"
MAX_SEED = 2**32 - 1  # numpy, torch, gymnasium and random.Random all take seeds this large (torch: not 2**70)

Vec3 = Annotated[list[float], Field(min_length=3, max_length=3)]
Range = Annotated[list[float], Field(min_length=2, max_length=2)]


def _check_range(key: str, lo_hi: list[float], lower: float = -math.inf) -> None:
    lo, hi = lo_hi
    if not lo <= hi:
        raise FieldError(key, "[low, high] with low <= high", lo_hi)
    if lo < lower:
        raise FieldError(key, f"values >= {lower}", lo_hi)


def _check_box(key_low: str, low: list[float], high: list[float]) -> None:
    if any(a > b for a, b in zip(low, high)):
        raise FieldError(key_low, f"every element <= the matching high bound {high}", low)


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


class SimConfig(Block):
    physics_hz: float = Field(240.0, gt=0, le=20000, description="physics substep rate, Hz")
    render_proxy: bool = Field(
        True, description="render links with their (light) collision meshes instead of the detailed visual meshes"
    )


class RandomizationConfig(Block):
    """Domain randomisation, applied at every reset. The defaults change nothing."""

    colors: bool = Field(False, description="random colours for floor, objects and robot links")
    lighting: bool = Field(False, description="random light direction and ambient/diffuse/specular coefficients")
    camera_jitter: float = Field(0.0, ge=0, le=0.5, description="std of eye/target position noise, m")
    friction: Range = Field([1.0, 1.0], description="lateral friction multiplier, uniform [low, high]")
    mass_scale: Range = Field([1.0, 1.0], description="link mass multiplier, uniform [low, high]")

    @model_validator(mode="after")
    def _ranges(self) -> RandomizationConfig:
        _check_range("friction", self.friction, lower=0.0)
        _check_range("mass_scale", self.mass_scale, lower=1e-3)
        return self


class ArmReachConfig(Block):
    action_mode: Literal["joint", "cartesian"] = Field("cartesian", description="what the action in [-1, 1] moves")
    joint_delta: float = Field(0.1, gt=0, le=1.0, description="joint step at |action| = 1, rad")
    cartesian_delta: float = Field(0.04, gt=0, le=0.2, description="end-effector step at |action| = 1, m")
    success_distance: float = Field(0.03, gt=0, description="tool within this of the target counts as success, m")
    terminate_on_success: bool = Field(False, description="end the episode (terminal) on success")
    observe_target: bool = Field(
        False, description="add the marker's position (m, base frame) to the observations as `target`: random "
        "targets learnable without the camera"
    )
    target_low: Vec3 = Field([0.25, -0.2, 0.1], description="lower corner of the target sampling box, m")
    target_high: Vec3 = Field([0.5, 0.2, 0.35], description="upper corner of the target sampling box, m")
    workspace_low: Vec3 = Field([0.15, -0.35, 0.05], description="the end-effector goal is clamped to this box, m")
    workspace_high: Vec3 = Field([0.6, 0.35, 0.5], description="upper corner of the workspace box, m")

    @model_validator(mode="after")
    def _boxes(self) -> ArmReachConfig:
        _check_box("target_low", self.target_low, self.target_high)
        _check_box("workspace_low", self.workspace_low, self.workspace_high)
        return self


class ArmPickConfig(Block):
    action_mode: Literal["discrete", "cartesian"] = Field(
        "discrete", description="discrete: DayDreamer's six actions; cartesian: [dx, dy, dz, gripper] in [-1, 1]"
    )
    move_step: float = Field(0.04, gt=0, le=0.2, description="x/y step of a discrete action, m")
    cartesian_delta: float = Field(0.03, gt=0, le=0.2, description="end-effector step at |action| = 1, m")
    num_objects: int = Field(1, ge=1, le=4, description="objects placed in the source bin")
    object_size: float = Field(0.035, ge=0.02, le=0.05, description="edge of the cube objects, m")
    object_spread: float = Field(
        0.06, ge=0.0, le=0.07, description="objects start uniformly within +-this of the source bin's centre (x, y), m"
    )
    carry_height: float = Field(0.12, gt=0, le=0.5, description="tool height of the discrete 'up' state, m")
    grasp_height: float = Field(0.025, gt=0, le=0.5, description="tool height of the discrete 'down' state, m")
    lift_height: float = Field(
        0.03, gt=0, le=0.2, description="a held object is grasped once raised this far above its resting height, m"
    )
    workspace_low: Vec3 = Field([0.36, -0.3, 0.025], description="end-effector box, lower corner, m")
    workspace_high: Vec3 = Field([0.64, 0.3, 0.3], description="end-effector box, upper corner, m")
    grasp_reward: float = Field(1.0, description="reward when an object becomes grasped (held and lifted)")
    drop_penalty: float = Field(-1.0, description="reward when a released object comes to rest outside the target bin")
    place_reward: float = Field(10.0, description="reward the first time an object comes to rest in the target bin")

    @model_validator(mode="after")
    def _boxes(self) -> ArmPickConfig:
        _check_box("workspace_low", self.workspace_low, self.workspace_high)
        low, high = self.workspace_low[2], self.workspace_high[2]
        for key in ("grasp_height", "carry_height"):
            value = getattr(self, key)
            if not low <= value <= high:
                raise FieldError(key, f"a height inside the workspace's z range [{low}, {high}]", value)
        if self.grasp_height >= self.carry_height:
            raise FieldError("grasp_height", f"a height below carry_height ({self.carry_height})", self.grasp_height)
        return self


class QuadrupedWalkConfig(Block):
    kp: Vec3 = Field([60.0, 60.0, 60.0], description="PD stiffness for hip, upper, lower joints, N·m/rad")
    kd: Vec3 = Field([1.5, 1.5, 1.5], description="PD damping for hip, upper, lower joints, N·m·s/rad")
    max_torque: Vec3 = Field([20.0, 33.5, 33.5], description="torque limit for hip, upper, lower joints, N·m")
    action_scale: Vec3 = Field([0.8, 1.2, 1.2], description="joint offset from the standing pose at |action| = 1, rad")
    filter_cutoff_hz: float | None = Field(
        1.5, gt=0, description="2nd-order Butterworth low-pass on targets at the policy rate; null disables it"
    )
    reset_mode: Literal["reset", "reset_free"] = Field(
        "reset_free", description="reset: teleport to the initial pose each episode; reset_free: never teleport"
    )
    initial_pose: Literal["stand", "back", "random"] = Field(
        "back", description="pose of the first episode (and of every episode in reset mode)"
    )
    target_velocity: float = Field(0.3, gt=0, le=3.0, description="forward speed that earns full reward, m/s")
    stage_threshold: float = Field(0.7, gt=0, le=1.0, description="a reward stage counts once its term exceeds this")

    @model_validator(mode="after")
    def _positive(self) -> QuadrupedWalkConfig:
        for key in ("kp", "kd", "max_torque", "action_scale"):
            values = getattr(self, key)
            if any(v < 0 for v in values):
                raise FieldError(key, "three values >= 0", values)
        return self


TaskName = Literal["arm_reach", "arm_pick", "quadruped_walk", "joint_reach", "marker_reach", "pick_place", "stand_walk"]
TASK_BLOCKS: tuple[str, ...] = (
    "arm_reach", "arm_pick", "quadruped_walk", "joint_reach", "marker_reach", "pick_place", "stand_walk"
)
SIM_TASKS: tuple[str, ...] = ("arm_reach", "arm_pick", "quadruped_walk")
SERVO_TASKS: tuple[str, ...] = ("joint_reach", "marker_reach", "pick_place", "stand_walk")
MARKER_TASKS: tuple[str, ...] = ("marker_reach", "pick_place", "stand_walk")


class Config(Block):
    """A whole robot/task configuration."""

    name: str = Field(description="name of this robot or task; used in run directories")
    backend: Literal["sim", "gym", "servo"] = Field(
        "sim", description="sim: a Reverie simulated task; gym: a Gymnasium env; servo: real servos on a serial bus"
    )
    task: TaskName | None = Field(None, description="which task runs (backend sim or servo)")
    gym_id: str | None = Field(None, description="Gymnasium id, for example Pendulum-v1 (backend gym)")
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="seed of the first episode (0 .. 2^32-1: every seeded generator takes it)"
    )
    control: ControlConfig = ControlConfig()
    camera: CameraConfig = CameraConfig()
    sim: SimConfig = SimConfig()
    randomization: RandomizationConfig = RandomizationConfig()
    arm_reach: ArmReachConfig = ArmReachConfig()
    arm_pick: ArmPickConfig = ArmPickConfig()
    quadruped_walk: QuadrupedWalkConfig = QuadrupedWalkConfig()
    joint_reach: JointReachConfig = JointReachConfig()
    marker_reach: MarkerReachConfig = MarkerReachConfig()
    pick_place: PickPlaceConfig | None = None
    stand_walk: StandWalkConfig = StandWalkConfig()
    motors: MotorsConfig | None = None
    safety: SafetyConfig = SafetyConfig()
    sensors: SensorsConfig = SensorsConfig()
    markers: MarkersConfig = MarkersConfig()
    emulator: EmulatorConfig = EmulatorConfig()
    dreamer: DreamerConfig = DreamerConfig()
    replay: ReplayConfig = ReplayConfig()
    train: TrainConfig = TrainConfig()
    link: LinkConfig = LinkConfig()

    @model_validator(mode="after")
    def _backend(self) -> Config:
        if self.backend == "sim" and self.task not in SIM_TASKS:
            raise FieldError("task", f"a simulated task, one of {list(SIM_TASKS)} (backend sim)", self.task)
        if self.backend == "servo":
            if self.motors is None:
                raise FieldError("motors", "a motors block (backend servo)", None)
            if self.task not in SERVO_TASKS:
                raise FieldError("task", f"a servo task, one of {list(SERVO_TASKS)} (backend servo)", self.task)
            self._check_servo_task()
        if self.backend == "gym" and not self.gym_id:
            raise FieldError("gym_id", "a Gymnasium id (backend gym)", self.gym_id)
        return self

    def _check_servo_task(self) -> None:
        names = {s.name for s in self.motors.servos}
        for key, pose in (("joint_reach.target", self.joint_reach.target), ("stand_walk.rest_pose",
                                                                           self.stand_walk.rest_pose)):
            unknown = sorted(set(pose) - names)
            if unknown:
                raise FieldError(key, f"joint names from motors.servos {sorted(names)}", unknown)
        if self.task == "pick_place" and self.pick_place is None:
            raise FieldError("pick_place", "a pick_place block with its two regions (task pick_place)", None)
        if self.task in MARKER_TASKS:
            cam = self.sensors.camera
            if cam is None:
                raise FieldError("sensors.camera", f"a camera (task {self.task} tracks markers)", None)
            if cam.intrinsics is None and cam.fov_deg is None:
                raise FieldError("sensors.camera.intrinsics", "intrinsics or fov_deg (marker poses need them)", None)
        if self.task == "stand_walk" and self.sensors.imu is None:
            raise FieldError("sensors.imu", "an IMU (task stand_walk: uprightness comes from it)", None)
        if self.camera.enabled and self.sensors.camera is None:
            raise FieldError("camera.enabled", "false, or a sensors.camera to take images from (backend servo)", True)

    @model_validator(mode="after")
    def _substeps(self) -> Config:
        if self.backend != "sim":
            return self
        ratio = self.sim.physics_hz / self.control.hz
        if ratio < 1 or abs(ratio - round(ratio)) > 1e-6:
            raise FieldError(
                "sim.physics_hz",
                f"a whole multiple (>= 1x) of control.hz = {self.control.hz}",
                self.sim.physics_hz,
            )
        return self

    @model_validator(mode="after")
    def _link_chunk(self) -> Config:
        """link.max_message_mb must carry one chunk, or the robot records what it can never send. The config
        shows the camera image and the fixed entries; the robot checks its exact layout before it moves."""
        image = self.backend in ("sim", "servo") and self.camera.enabled
        per_step = MIN_STEP_EXTRA_BYTES + (self.camera.width * self.camera.height * 3 if image else 0)
        steps = chunk_steps(self.link.chunk_seconds, self.control.hz)
        why = (f"one chunk: {steps} steps of link.chunk_seconds x control.hz, each at least {per_step} bytes"
               + (" with the camera image" if image else ""))
        if problem := message_room_problem(self.link.max_message_mb, steps * per_step, why):
            raise FieldError("link.max_message_mb", problem, self.link.max_message_mb)
        return self

    @property
    def substeps(self) -> int:
        """Physics substeps per policy step."""
        return round(self.sim.physics_hz / self.control.hz)

    def task_block(self) -> Block | None:
        return getattr(self, self.task) if self.task else None

    def to_dict(self) -> dict[str, Any]:
        """Plain data with only the selected task's block, as it is written next to outputs."""
        unused = set(TASK_BLOCKS) - {self.task}
        if self.backend == "gym":
            unused |= {"camera", "sim", "randomization"}
        if self.backend != "servo":
            unused |= {"motors", "safety", "emulator", "sensors", "markers"}
        return self.model_dump(mode="json", exclude=unused)


MAX_DEPTH = 16  # a config nests a few levels; far deeper is a mistake or an attack, not a config


class ShapeError(yaml.MarkedYAMLError):
    """Valid YAML that no config file has: a duplicated key, or nesting deeper than MAX_DEPTH."""


class _Loader(yaml.SafeLoader):
    """Safe YAML that also reads `3e-4` as a number (YAML 1.1 wants a dot: `3.0e-4`), refuses a key given
    twice in one mapping (YAML keeps the last silently: a second `control:` block would replace the first)
    and refuses deep nesting before the recursive composer runs out of stack."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise ShapeError(problem=f"nested more than {MAX_DEPTH} levels deep", problem_mark=mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges are meant to be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: the base class says so
                continue
            if first is not key_node.start_mark:
                raise ShapeError(problem=f"duplicate key {key!r} (first at line {first.line + 1}; YAML would keep "
                                 "only the last)", problem_mark=key_node.start_mark)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """`line L, column C: what was wrong` for a YAML error."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if not isinstance(exc, ShapeError):
        problem = f"not valid YAML ({problem})"
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def _yaml_scalar(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`["control.hz=10", ...]` -> `{"control.hz": 10}`; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    if isinstance(items, str):
        items = [items]
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError([f"{item!r}: expected KEY.PATH=VALUE, for example control.hz=10"], "--set")
        try:
            out[key] = _yaml_scalar(text) if text.strip() else None
        except yaml.YAMLError as exc:
            shown = text if len(text) <= 40 else text[:40] + "..."
            raise ConfigError([f"{key}: value {shown!r}: {_yaml_problem(exc)}"], "--set") from None
    return out


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Set dotted keys in plain config data, creating blocks as needed."""
    for key, value in overrides.items():
        node = raw
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                path = ".".join(parts[: i + 1])
                raise ConfigError([f"{key}: {path} is a value ({child!r}), not a block"], f"--set {key}")
            node = child
        node[parts[-1]] = value


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError([f"file not found (looked for {path.resolve()})"], str(path))
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"cannot read it ({exc.strerror or exc})"], str(path)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        problem = f"line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        raise ConfigError([problem], str(path)) from None
    try:
        raw = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_problem(exc)], str(path)) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"<top level>: expected a mapping of blocks, found {type(raw).__name__}"], str(path))
    return raw


def config_from_dict(raw: dict[str, Any], source: str, overrides: dict[str, Any] | None = None) -> Config:
    """Validate plain data (already merged with overrides) into a Config."""
    texts = {k: f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
             for k, v in (overrides or {}).items()}
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, Config, texts), source) from None


def load_config(path: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load and validate a YAML config, applying `--set`-style dotted overrides first."""
    path = Path(path)
    raw = _read_yaml(path)
    parsed = parse_overrides(overrides)
    apply_overrides(raw, parsed)
    return config_from_dict(raw, str(path), parsed)


def write_resolved(cfg: Config, outdir: str | os.PathLike[str], name: str = RESOLVED_NAME) -> Path:
    """Write the resolved config into `outdir` atomically; every run calls this next to its outputs."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    target = outdir / name
    atomic_write_bytes(target, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode(), prefix=".config.")
    return target
