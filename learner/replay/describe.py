"""`streams.json`: what each stream of a replay directory records (`core.describe`: observation and
action names, units and bounds, the control rate, the task, its success rule), one entry per stream.

Written atomically whenever a stream's description is new or changes; directories written before it
existed have none, and every reader treats a missing file or stream as "not described".
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from learner.replay.chunk_file import atomic_write

DESCRIPTIONS_NAME = "streams.json"
FORMAT = 1


def read_descriptions(directory: Path) -> dict[str, dict[str, Any]]:
    """Stream -> description; {} when the directory has none (or an unreadable one, with a warning)."""
    path = Path(directory) / DESCRIPTIONS_NAME
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT or not isinstance(data.get("streams"), dict):
            raise ValueError(f"unknown format {data.get('format')!r}")
        return {str(k): v for k, v in data["streams"].items() if isinstance(v, dict)}
    except (OSError, ValueError, AttributeError) as exc:
        warnings.warn(f"replay: {path} is unreadable ({exc}); the streams are treated as not described",
                      stacklevel=2)
        return {}


def write_descriptions(directory: Path, streams: dict[str, dict[str, Any]]) -> None:
    """Replace `streams.json` atomically (a reader sees the old file or the new one)."""
    data = {"format": FORMAT, "streams": streams}
    atomic_write(Path(directory) / DESCRIPTIONS_NAME, lambda f: f.write(json.dumps(data, indent=1).encode()))
