"""What the link tests share: a small robot step layout and its hello."""

from __future__ import annotations

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
