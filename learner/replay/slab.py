"""The RAM slab: one preallocated array per step key, `cap` slots of `slot_size` rows each. Every chunk
in RAM owns one slot, so adding a step is one row write per key and sampling is one fancy-indexing
gather per key."""

from __future__ import annotations

import math
import os

import numpy as np

from core.layout import StepLayout
from learner.replay.chunk_file import TIME, VERSION
from learner.replay.context import Context
from learner.replay.validation import StepSpec


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


class Slab:
    """The arrays (allocated at the first step, whose `spec` fixes their keys, shapes and dtypes, plus
    TIME and VERSION columns), the replay-context latents of the same rows, and the slots."""

    def __init__(self, slot_size: int, ram_steps: int) -> None:
        self.slot_size = slot_size
        self.ram_steps = ram_steps
        self.spec: StepSpec | None = None
        self.data: dict[str, np.ndarray] = {}  # key -> (cap * slot_size, *shape)
        self.context = Context()
        self.lengths = np.zeros(0, np.int64)  # steps held in each slot
        self.cap = self._used = 0
        self._free: list[int] = []

    def allocate(self, spec: StepSpec) -> None:
        """Fix the layout. Reserve what ram_steps needs at once (np.zeros is backed by memory only where
        written) unless that is a large share of physical memory; then grow geometrically as data arrives."""
        self.spec = spec
        columns = StepLayout({**spec.layout, TIME: ((), np.float64), VERSION: ((), np.int64)})
        self.data = {key: np.zeros((0, *shape), dtype) for key, (shape, dtype) in columns.items()}
        row_bytes = columns.step_bytes()
        hint = self._slots_hint()
        self._grow(hint if hint * self.slot_size * row_bytes <= _physical_memory() // 4 else min(8, hint))

    def _slots_hint(self) -> int:
        return math.ceil(self.ram_steps / self.slot_size) + 2

    def _grow(self, cap: int) -> None:
        """Geometric growth (amortised O(1) per step) up to what ram_steps needs; np.zeros leaves
        untouched rows unbacked by memory."""
        rows = cap * self.slot_size

        def grown(arr: np.ndarray) -> np.ndarray:
            new = np.zeros((rows, *arr.shape[1:]), arr.dtype)
            new[: len(arr)] = arr
            return new

        self.data = {key: grown(arr) for key, arr in self.data.items()}
        self.context.arrays = {key: grown(arr) for key, arr in self.context.arrays.items()}
        self.context.ok = grown(self.context.ok)
        lengths = np.zeros(cap, np.int64)
        lengths[: self.cap] = self.lengths
        self.lengths, self.cap = lengths, cap

    def take(self) -> int:
        """A free slot (growing the arrays when none is left; `data` is then a new dict)."""
        if self._free:
            return self._free.pop()
        if self._used == self.cap:
            hint = self._slots_hint()
            self._grow(min(2 * self.cap, hint) if self.cap < hint else self.cap + max(1, self.cap // 2))
        self._used += 1
        return self._used - 1

    def release(self, slot: int) -> None:
        """The slot's chunk left RAM: its rows (and their latents) are free for the next chunk."""
        self.context.ok[slot * self.slot_size : (slot + 1) * self.slot_size] = False
        self.lengths[slot] = 0
        self._free.append(slot)

    def rows(self, slot: int, length: int) -> dict[str, np.ndarray]:
        """Copies of the first `length` rows of a slot, per column (the slot may be reused before a
        background write of them is done)."""
        base = slot * self.slot_size
        return {key: arr[base : base + length].copy() for key, arr in self.data.items()}

    def gather(self, rows: np.ndarray, ids: np.ndarray, has_prev: np.ndarray) -> dict[str, np.ndarray]:
        """A batch: step keys at `rows[:, 1:]`, `ids`, and the replay context of the steps at `rows[:, 0]`
        (valid where the sequence has a step before it in its run, within the same episode, that has
        latents)."""
        assert self.spec is not None
        out = {key: self.data[key][rows[:, 1:]] for key in self.spec.layout}
        out["ids"] = ids
        prev = rows[:, 0]
        valid = has_prev & self.context.ok[prev] & ~out["is_first"][:, 0]
        self.context.gather(prev, valid, out)
        return out
