"""What the link tests share: a small robot step layout and its hello, and waiting for something."""

from __future__ import annotations

import time
from collections.abc import Callable

DEADLINE = 30.0  # generous wait for an event over loopback (not a speed assertion)
ROBOT = "rover-1"
SPEC = {
    "obs": ["float32", [3]],
    "image": ["uint8", [8, 8, 3]],
    "action": ["float32", [2]],
    "reward": ["float32", []],
    "is_first": ["bool", []],
    "is_last": ["bool", []],
    "is_terminal": ["bool", []],
}
HELLO = {"spec": SPEC, "task": "test-task", "hz": 20.0}


def wait_for(cond: Callable[[], bool], what: str, deadline: float = DEADLINE) -> None:
    """Poll until `cond()` holds; fail naming `what` after `deadline` seconds (a generous wait, not a timing test)."""
    end = time.monotonic() + deadline
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"not within {deadline} s: {what}")
        time.sleep(0.02)
