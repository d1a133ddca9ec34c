"""Moved to core.config.sensors and core.config.real_tasks: an alias until every import is rewritten (issue 22)."""
from core.config.real_tasks import (  # noqa: F401
    MarkerReachConfig,
    PickPlaceConfig,
    RegionConfig,
    StandWalkConfig,
)
from core.config.sensors import (  # noqa: F401
    CameraDeviceConfig,
    ImuConfig,
    IntrinsicsConfig,
    MarkersConfig,
    SensorsConfig,
)
