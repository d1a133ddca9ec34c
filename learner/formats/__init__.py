"""Replay directories to and from the formats the robot-learning community uses: LeRobotDataset v3.0
(`lerobot_export`, `lerobot_import`; the layout in `lerobot_layout`, its videos in `video_files`).
`reverie-replay export|import` runs them (`cli`).

The heavy packages (pyarrow, av) are the `offline` extra; `require` names it when one is missing.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class FormatError(Exception):
    """A dataset or replay that cannot be converted, with what and where."""


def require(module: str, purpose: str) -> ModuleType:
    """Import `module` or fail in one line naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise FormatError(f"{purpose} needs the Python package {module.split('.')[0]!r}: "
                          "pip install -e '.[offline]'") from None
