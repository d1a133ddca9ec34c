"""Replay-context latents in checkpoints: the part that keeps them and putting them back on resume."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from learner.replay.store import Replay

CONTEXT_PART = "replay_context"  # checkpoint part holding `Replay.context_state()`


def restore_context(replay: Replay, parts: Mapping[str, Any], source: str | Path) -> int:
    """Put a checkpoint's replay-context latents back into `replay`; returns the steps restored.

    A checkpoint without the part (written before it existed, or before any update) restores none.
    Latents that no longer fit the store are left out with a warning naming the checkpoint: they
    are a head start that training rebuilds, never a reason to refuse a resume.
    """
    state = parts.get(CONTEXT_PART)
    if not state:
        return 0
    try:
        return replay.load_context(state)
    except ValueError as exc:
        warnings.warn(f"{source}: replay context not restored, training rebuilds it: {exc}", stacklevel=2)
        return 0
