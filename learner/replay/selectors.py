"""Which sequences a batch replays: the online queue, uniform starts and recency-weighted starts.

All choices are over *valid start positions*: a position p of a stream is valid for length T when
p..p+T-1 are contiguous steps of that stream held in RAM. Positions are ranked newest first (chunks
by creation order, newest chunk first; inside a chunk, later steps first); rank 0 is the newest.

Uniform draws pick a rank uniformly. Recency draws pick a rank with probability roughly
proportional to 1 / (rank + 1) (a power law with exponent 1, as in the official DreamerV3 recency
selector): the rank is `floor((N + 1) ** u) - 1` for u uniform in [0, 1), i.e. log-uniform age. It
needs no half-life parameter and works the same for any buffer size: half of the recency draws land
on the newest sqrt(N) starts, while old data keeps a heavy tail of probability.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class StartTable:
    """Valid start counts per RAM chunk, newest chunk first (`counts[i]` starts in chunk `order[i]`)."""

    order: np.ndarray  # index into the caller's chunk list, newest first
    counts: np.ndarray  # valid starts in that chunk
    cum: np.ndarray  # cumulative counts
    first: np.ndarray  # run position of the chunk's first step

    @property
    def total(self) -> int:
        return int(self.cum[-1]) if len(self.cum) else 0

    def locate(self, ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(chunk index into the caller's list, run position) of each start rank (newest first)."""
        k = np.searchsorted(self.cum, ranks, side="right")
        offset = ranks - (self.cum[k] - self.counts[k])
        return self.order[k], self.first[k] + self.counts[k] - 1 - offset


def start_table(starts: np.ndarray, lengths: np.ndarray, runs: np.ndarray, length: int) -> StartTable:
    """Chunks given oldest first as (run position of first step, steps, run number). A start in a chunk
    is valid when the run (contiguous chunks) still holds `length` steps from it."""
    ends = np.zeros(int(runs.max()) + 1 if len(runs) else 0, np.int64)
    np.maximum.at(ends, runs, starts + lengths)
    counts = np.clip(np.minimum(lengths, ends[runs] - length + 1 - starts), 0, None)
    order = np.arange(len(starts))[::-1]
    counts = counts[order]
    return StartTable(order=order, counts=counts, cum=np.cumsum(counts), first=starts[order])


def uniform_ranks(rng: np.random.Generator, total: int, size: int) -> np.ndarray:
    return rng.integers(0, total, size=size)


def recent_ranks(rng: np.random.Generator, total: int, size: int) -> np.ndarray:
    """Ranks with P(rank) ~ 1 / (rank + 1), newest = 0 (see the module docstring)."""
    u = rng.random(size)
    return np.clip(np.floor(np.power(total + 1.0, u)).astype(np.int64) - 1, 0, total - 1)


@dataclass
class Window:
    """A queued online sequence: `length` steps of `run` from run position `start`."""

    run: Any
    start: int
    length: int


class OnlineQueue:
    """Fresh, complete, non-overlapping windows of each stream, each replayed once, in arrival order
    (FIFO, as the official queue): every new step is trained on soon after it arrives, the oldest
    first, so no window waits behind a stream of newer ones until it leaves RAM."""

    def __init__(self) -> None:
        self.windows: deque[Window] = deque()

    def __len__(self) -> int:
        return len(self.windows)

    def refill(self, runs: list[Any], length: int) -> None:
        """Cut each run's unqueued fresh steps (from `run.fresh`) into windows of `length`."""
        for run in runs:
            run.fresh = max(run.fresh, run.lo)
            while run.end - run.fresh >= length:
                self.windows.append(Window(run, run.fresh, length))
                run.fresh += length

    def pop(self, length: int) -> Window | None:
        """The oldest queued window still in RAM; windows cut for another length are dropped."""
        while self.windows:
            w = self.windows.popleft()
            if w.length == length and w.run.holds(w.start, w.length):
                return w
        return None

    def prune(self) -> None:
        """Drop windows whose steps left RAM (called after evictions)."""
        self.windows = deque(w for w in self.windows if w.run.holds(w.start, w.length))
