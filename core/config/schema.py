"""The whole configuration of one robot or simulated task: the top-level keys, one block per owner
(`core.config.*` modules), and the checks that span blocks.

A config is a YAML file in `hardware_configs/`, one per robot or simulated task; each top-level block
below is a section of that file. Every field has a type, a range and a unit in its description;
unknown keys are errors. The robot, the learner and the simulator all read this one validated object.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from core.agents import AlgorithmName
from core.config.agent import DreamerConfig, ReplayConfig, TrainConfig
from core.config.base import Block, FieldError
from core.config.control import CameraConfig, ControlConfig
from core.config.emulator import EmulatorConfig
from core.config.explore import ExploreConfig
from core.config.gato import GatoConfig
from core.config.hardware import MotorsConfig, SafetyConfig
from core.config.link import MIN_STEP_EXTRA_BYTES, LinkConfig, chunk_steps, message_room_problem
from core.config.planet import PlanetConfig
from core.config.real_tasks import JointReachConfig, MarkerReachConfig, PickPlaceConfig, StandWalkConfig
from core.config.sensors import MarkersConfig, SensorsConfig
from core.config.sim_tasks import (
    ArmPickConfig,
    ArmReachConfig,
    QuadrupedWalkConfig,
    RandomizationConfig,
    SimConfig,
)
from core.config.tasks import MARKER_TASKS, SERVO_TASKS, SIM_TASKS, TASK_BLOCKS, TaskName
from core.config.world_models import WorldModelsConfig

MAX_SEED = 2**32 - 1  # numpy, torch, gymnasium and random.Random all take seeds this large (torch: not 2**70)


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
    agent: AlgorithmName = Field(
        "dreamer", description="the learning algorithm (core.agents.ALGORITHMS); its settings are the block named so"
    )
    dreamer: DreamerConfig = DreamerConfig()
    explore: ExploreConfig = ExploreConfig()
    gato: GatoConfig = GatoConfig()
    planet: PlanetConfig = PlanetConfig()
    world_models: WorldModelsConfig = WorldModelsConfig()
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

    def to_dict(self) -> dict[str, Any]:
        """Plain data with only the selected task's block, as it is written next to outputs."""
        unused = set(TASK_BLOCKS) - {self.task}
        if self.backend == "gym":
            unused |= {"camera", "sim", "randomization"}
        if self.backend != "servo":
            unused |= {"motors", "safety", "emulator", "sensors", "markers"}
        return self.model_dump(mode="json", exclude=unused)
