"""Moved to core.config.hardware, .real_tasks and .emulator: an alias until every import is rewritten (issue 22)."""
from core.config.emulator import (  # noqa: F401
    EmulatedCameraConfig,
    EmulatedMarkerConfig,
    EmulatedObjectConfig,
    EmulatorConfig,
)
from core.config.hardware import FEETECH_MODELS, MotorModel, MotorsConfig, Protocol, SafetyConfig, ServoConfig  # noqa: F401
from core.config.real_tasks import JointReachConfig  # noqa: F401
