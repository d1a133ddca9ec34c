"""The chunks in RAM and how they chain: a *run* is a stream's chain of contiguous chunks in RAM
(linked by the previous-chunk uuid, so a run continues across chunk boundaries and across reloads);
positions count steps along a run. Step ids are `chunk seq * slot_size + row`: unique for the life of
the process, so a latent written back for a step that left RAM never lands on the step that reuses its
slot."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from learner.replay.chunk_file import ChunkMeta
from learner.replay.selectors import StartTable, start_table
from learner.replay.slab import Slab


@dataclass(eq=False)
class Chunk:
    meta: ChunkMeta
    slot: int
    run: Run
    start: int  # run position of the first step
    sealed: bool  # full (or cut) and written: no more steps (close_episode may still change a flag)
    dirty: bool = False  # holds changes not yet in its file


@dataclass(eq=False)
class Run:
    """Contiguous chunks of one stream in RAM, oldest first."""

    stream: str
    fresh: int = 0  # first position not yet cut into online windows
    chunks: deque[Chunk] = field(default_factory=deque)
    _arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @property
    def lo(self) -> int:
        return self.chunks[0].start if self.chunks else 0

    @property
    def end(self) -> int:
        return self.chunks[-1].start + self.chunks[-1].meta.length if self.chunks else 0

    def holds(self, start: int, length: int) -> bool:
        return bool(self.chunks) and start >= self.lo and start + length <= self.end

    def changed(self) -> None:
        self._arrays = None

    def locate(self, positions: np.ndarray, slot_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(slab row, step id, chunk index in this run) of run positions (all inside the run)."""
        if self._arrays is None:
            self._arrays = (
                np.array([c.start for c in self.chunks], np.int64),
                np.array([c.slot for c in self.chunks], np.int64),
                np.array([c.meta.seq for c in self.chunks], np.int64),
            )
        starts, slots, seqs = self._arrays
        k = np.searchsorted(starts, positions, side="right") - 1
        offset = positions - starts[k]
        return slots[k] * slot_size + offset, seqs[k] * slot_size + offset, k


class Runs:
    """Every chunk in RAM (by seq, oldest first), each in a slot of `slab`; each stream's newest run
    (`tail`) and the chunk it is filling (`open`); and the steps they hold (`steps`)."""

    def __init__(self, slab: Slab) -> None:
        self.slab = slab
        self.chunks: dict[int, Chunk] = {}
        self.open: dict[str, Chunk] = {}
        self.tail: dict[str, Run] = {}
        self.steps = 0
        self.evicted = False  # a chunk left RAM since the online queue was last pruned
        self._table: tuple[list[Chunk], np.ndarray, np.ndarray, np.ndarray] | None = None

    def add(self, meta: ChunkMeta, *, sealed: bool) -> tuple[Chunk, bool]:
        """A chunk (with the `meta.length` rows its caller writes to its slot) in a new slot, at the end of
        its stream's run if it continues it (then True), else starting a new run."""
        chunk = Chunk(meta=meta, slot=self.slab.take(), run=Run(meta.stream), start=0, sealed=sealed)
        self.slab.lengths[chunk.slot] = meta.length
        self.steps += meta.length
        stream = meta.stream
        run = self.tail.get(stream)
        continued = run is not None and bool(run.chunks) and run.chunks[-1].meta.uuid == meta.prev
        if not continued:
            run = self.tail[stream] = Run(stream)
        assert run is not None
        chunk.run, chunk.start = run, run.end
        run.chunks.append(chunk)
        run.changed()
        self.chunks[meta.seq] = chunk
        self._table = None
        return chunk, continued

    def grown(self, chunk: Chunk, n: int) -> None:
        """Count n rows just written at the end of `chunk`."""
        chunk.meta.length += n
        chunk.dirty = True
        self.slab.lengths[chunk.slot] += n
        self.steps += n

    def oldest(self) -> Chunk:
        return next(iter(self.chunks.values()))

    def evict(self, chunk: Chunk) -> None:
        """The oldest chunk leaves RAM (its file is written); its slot is free."""
        run = chunk.run
        assert run.chunks[0] is chunk
        run.chunks.popleft()
        run.changed()
        if not run.chunks and self.tail.get(run.stream) is run:
            del self.tail[run.stream]
        del self.chunks[chunk.meta.seq]
        self.slab.release(chunk.slot)
        self.steps -= chunk.meta.length
        self._table = None
        self.evicted = True

    def newest(self, stream: str, uuid: str) -> Chunk | None:
        """The stream's newest chunk if it is still in RAM (`uuid`: the newest the stream ever had)."""
        chunk = self.open.get(stream)
        run = self.tail.get(stream)
        if chunk is None and run is not None and run.chunks and run.chunks[-1].meta.uuid == uuid:
            chunk = run.chunks[-1]
        return chunk

    def in_ram(self) -> dict[str, int]:
        """Steps in RAM per stream."""
        counts: dict[str, int] = {}
        for chunk in self.chunks.values():
            counts[chunk.meta.stream] = counts.get(chunk.meta.stream, 0) + chunk.meta.length
        return counts

    def by_uuid(self) -> dict[str, Chunk]:
        return {c.meta.uuid: c for c in self.chunks.values()}

    # --- sampling -----------------------------------------------------------------------------------

    def start_table(self, length: int) -> tuple[list[Chunk], StartTable]:
        """The chunks in RAM and their valid starts of sequences of `length` (cached between changes)."""
        if self._table is None:
            chunks = list(self.chunks.values())
            run_ids: dict[int, int] = {}
            runs = np.array([run_ids.setdefault(id(c.run), len(run_ids)) for c in chunks], np.int64)
            starts = np.array([c.start for c in chunks], np.int64)
            slots = np.array([c.slot for c in chunks], np.int64)
            self._table = (chunks, starts, slots, runs)
        chunks, starts, slots, runs = self._table
        return chunks, start_table(starts, self.slab.lengths[slots], runs, length)

    def rows(self, picks: list[tuple[Run, int]], length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For sequences (run, start position): slab rows (n, length + 1) whose column 0 is the step before
        the sequence (the first step itself when the run holds none before it), step ids (n, length), and
        whether the run holds a step before each sequence."""
        n = len(picks)
        rows = np.empty((n, length + 1), np.int64)
        ids = np.empty((n, length), np.int64)
        has_prev = np.empty(n, bool)
        offsets = np.arange(-1, length)
        for b, (run, start) in enumerate(picks):
            positions = start + offsets
            has_prev[b] = start > run.lo
            if not has_prev[b]:
                positions[0] = start
            rows[b], step_ids, _ = run.locate(positions, self.slab.slot_size)
            ids[b] = step_ids[1:]
        return rows, ids, has_prev

    def rows_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Slab rows of step ids, and which ids still name a step in RAM."""
        slot_size = self.slab.slot_size
        seqs, offsets = np.divmod(ids, slot_size)
        unique, inverse = np.unique(seqs, return_inverse=True)
        chunks = [self.chunks.get(int(s)) for s in unique]
        slots = np.array([c.slot if c else -1 for c in chunks], np.int64)[inverse.reshape(ids.shape)]
        lengths = np.array([c.meta.length if c else 0 for c in chunks], np.int64)[inverse.reshape(ids.shape)]
        ok = (slots >= 0) & (offsets < lengths) & (ids >= 0)
        return slots * slot_size + offsets, ok

    # --- positions that survive a reload ------------------------------------------------------------

    def ref(self, run: Run, position: int) -> list[Any]:
        """A run position as [chunk uuid, row] (stable across a reload)."""
        _, _, k = run.locate(np.array([min(position, run.end - 1)]), self.slab.slot_size)
        chunk = run.chunks[int(k[0])]
        return [chunk.meta.uuid, position - chunk.start]

    @staticmethod
    def deref(ref: list[Any], by_uuid: dict[str, Chunk]) -> tuple[Run, int] | None:
        chunk = by_uuid.get(ref[0])
        return (chunk.run, chunk.start + int(ref[1])) if chunk else None
