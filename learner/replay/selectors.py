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
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from learner.replay.runs import Chunk, Run, Runs

STATE_FORMAT = 1  # of `Sampler.state()`


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


class Sampler:
    """Picks a batch's sequences: online windows first (when `online`), the rest uniform starts or, each
    with probability `recency`, recency-weighted ones. Its rng and queue are checkpoint state."""

    def __init__(self, seed: int, *, online: bool, recency: float) -> None:
        self.online = online
        self.recency = recency
        self.rng = np.random.default_rng(seed)
        self.queue = OnlineQueue()

    def choose(
        self, batch: int, length: int, chunks: list[Chunk], table: StartTable, runs: Runs
    ) -> list[tuple[Run, int]]:
        """`batch` sequences as (run, start position); `table` (of `chunks`) must hold a valid start."""
        picks: list[tuple[Run, int]] = []
        if self.online:
            if runs.evicted:
                self.queue.prune()
                runs.evicted = False
            self.queue.refill(list(runs.tail.values()), length)
            while len(picks) < batch and (window := self.queue.pop(length)) is not None:
                picks.append((window.run, window.start))
        rest = batch - len(picks)
        if rest:
            ranks = uniform_ranks(self.rng, table.total, rest)
            if self.recency > 0:
                recent = self.rng.random(rest) < self.recency
                ranks = np.where(recent, recent_ranks(self.rng, table.total, rest), ranks)
            index, positions = table.locate(ranks)
            picks += [(chunks[i].run, int(p)) for i, p in zip(index, positions)]
        return picks

    def state(self, runs: Runs) -> dict[str, Any]:
        """Small JSON-able state: the rng, the queued windows and each run's fresh-data mark, by chunk uuid
        and row (stable across a reload)."""
        live = [w for w in self.queue.windows if w.run.holds(w.start, w.length)]
        return {
            "format": STATE_FORMAT,
            "rng": self.rng.bit_generator.state,
            "queue": [[*runs.ref(w.run, w.start), w.length] for w in live],
            "fresh": {s: runs.ref(r, max(r.fresh, r.lo)) for s, r in runs.tail.items() if r.chunks},
        }

    def load(self, state: dict[str, Any], runs: Runs) -> None:
        """Restore `state()` (after reopening the directory); references to steps no longer in RAM are
        dropped."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"replay state: unknown format {state.get('format')!r}")
        self.rng.bit_generator.state = state["rng"]
        by_uuid = runs.by_uuid()
        self.queue = OnlineQueue()
        for uuid, row, length in state["queue"]:
            found = runs.deref([uuid, row], by_uuid)
            if found and found[0].holds(found[1], length):
                self.queue.windows.append(Window(found[0], found[1], length))
        for stream, ref in state["fresh"].items():
            found = runs.deref(ref, by_uuid)
            if found and runs.tail.get(stream) is found[0]:
                found[0].fresh = found[1]
