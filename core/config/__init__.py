"""The one place where Reverie configuration is typed, validated, loaded and written.

`Config` (schema.py) holds one block per top-level key; each block lives in the module of its owner:
control.py (the control loop and observed image, every backend), sim_tasks.py (simulated robots),
hardware.py (servo bus, safety), sensors.py (camera, IMU, markers), real_tasks.py (tasks on real
hardware), emulator.py (the emulated bus), agent.py (Dreamer, replay, training) and link.py (robot <->
learner link). tasks.py names the tasks; loading.py reads YAML and `--set` overrides; flags.py types the
command-line flags; doc.py writes docs/configuration.md from the schema. Importing this package stays
cheap (pydantic and yaml, no torch): the robot reads its config before anything else.
"""

from core.config.agent import DreamerConfig, ReplayConfig, TrainConfig
from core.config.base import Block, ConfigError, FieldError
from core.config.control import CameraConfig, ControlConfig
from core.config.emulator import EmulatorConfig
from core.config.hardware import MotorsConfig, SafetyConfig
from core.config.link import LinkConfig
from core.config.loading import (
    RESOLVED_NAME,
    apply_overrides,
    config_from_dict,
    load_config,
    parse_overrides,
    write_resolved,
)
from core.config.real_tasks import JointReachConfig, MarkerReachConfig, PickPlaceConfig, StandWalkConfig
from core.config.schema import MAX_SEED, Config
from core.config.sensors import MarkersConfig, SensorsConfig
from core.config.sim_tasks import ArmPickConfig, ArmReachConfig, QuadrupedWalkConfig, RandomizationConfig, SimConfig
from core.config.tasks import MARKER_TASKS, SERVO_TASKS, SIM_TASKS, TASK_BLOCKS, TaskName

__all__ = [
    "MARKER_TASKS",
    "MAX_SEED",
    "RESOLVED_NAME",
    "SERVO_TASKS",
    "SIM_TASKS",
    "TASK_BLOCKS",
    "ArmPickConfig",
    "ArmReachConfig",
    "Block",
    "CameraConfig",
    "Config",
    "ConfigError",
    "ControlConfig",
    "DreamerConfig",
    "EmulatorConfig",
    "FieldError",
    "JointReachConfig",
    "LinkConfig",
    "MarkerReachConfig",
    "MarkersConfig",
    "MotorsConfig",
    "PickPlaceConfig",
    "QuadrupedWalkConfig",
    "RandomizationConfig",
    "ReplayConfig",
    "SafetyConfig",
    "SensorsConfig",
    "SimConfig",
    "StandWalkConfig",
    "TaskName",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "load_config",
    "parse_overrides",
    "write_resolved",
]
