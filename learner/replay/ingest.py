"""Where checked steps go: rows written into the slot of their stream's open chunk, chunks sealed and
written when full, the oldest chunks leaving RAM, the disk cap, and what a step holding NaN or inf or a
vanished robot does to its stream's episode; also chunk files read back into RAM when a store opens.

Robot streams: a robot's chunk of T steps is written as slices, and each replay chunk records where
its newest row sits in the robot's numbering (`ChunkMeta.source`); after `flush()` that is on disk,
so a restarted learner drops chunks a robot resends. Files are only ever written whole (atomic
rename) and in order, so after a kill the newest file of a stream names exactly the rows the
directory holds.
"""

from __future__ import annotations

import logging
import time as _time
import warnings
from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from learner.replay.chunk_file import TIME, VERSION, ChunkError, ChunkMeta, Source, read_chunk
from learner.replay.disk import ChunkFiles
from learner.replay.runs import Chunk, Runs
from learner.replay.slab import Slab
from learner.replay.streams import Streams
from learner.replay.validation import StepSpec, nonfinite_keys, nonfinite_rows

log = logging.getLogger("learner.replay.store")  # the replay's one logger, under the name it has always had


def cap_disk(files: ChunkFiles, keep: Collection[str] = ()) -> bool:
    """Delete the oldest chunk files beyond disk_steps, never those named in `keep` (chunks still being
    filled), and log it; True if any were deleted."""
    deleted = files.cap(keep)
    if deleted:
        log.info(
            "replay %s: disk cap of %d steps reached, deleted %d oldest chunk file(s): %s",
            files.directory,
            files.disk_steps,
            len(deleted),
            ", ".join(deleted),
        )
    return bool(deleted)


@dataclass
class Rows:
    """A robot chunk (or batch) of checked steps, with where it sits in the robot's numbering."""

    values: dict[str, np.ndarray]
    versions: np.ndarray
    times: np.ndarray
    source: int | None
    first_index: int
    total: int


class Ingest:
    """The write side of a `Replay` (which holds the lock and checks what callers hand it)."""

    def __init__(
        self, slab: Slab, runs: Runs, streams: Streams, files: ChunkFiles, *, chunk_length: int, ram_steps: int
    ) -> None:
        self.slab, self.runs, self.streams, self.files = slab, runs, streams, files
        self.chunk_length = chunk_length
        self.ram_steps = ram_steps
        self._rewrite: dict[int, Chunk] = {}  # seq -> sealed chunk changed since its file was written

    # --- steps ----------------------------------------------------------------------------------------

    def add(
        self,
        stream: str,
        task: str,
        values: dict[str, np.ndarray],
        time: float | None,
        policy_version: int,
        context: dict[str, np.ndarray] | None,
    ) -> None:
        """Append one checked, finite step (see `Replay.add`)."""
        if stream in self.streams.force_first:
            values = {**values, "is_first": np.True_}
            self.streams.force_first.discard(stream)
        chunk = self._chunk_for(stream, task)
        row = chunk.slot * self.slab.slot_size + chunk.meta.length
        data = self.slab.data
        for key, value in values.items():
            data[key][row] = value
        data[TIME][row] = _time.time() if time is None else time
        data[VERSION][row] = policy_version
        if context is not None:
            self.slab.context.put(np.array([row]), {key: np.asarray(value)[None] for key, value in context.items()})
        self._grown(chunk, 1)
        self.streams.tracker(stream, task).step(
            float(values["reward"]), bool(values["is_first"]), bool(values["is_last"])
        )
        self._after_rows(chunk)

    def add_rows(self, rows: Rows, stream: str, task: str) -> None:
        """Append checked steps, refusing each row that holds NaN or inf (see `refuse`)."""
        count = len(rows.times)
        bad = nonfinite_rows({**rows.values, TIME: rows.times})
        if bad is None:
            self._append(rows, stream, task, 0, count)
            return
        # Store the finite stretches; each refused row cuts the episode.
        good = np.concatenate([[False], ~bad, [False]]).astype(np.int8)
        done = 0
        for lo, hi in np.flatnonzero(np.diff(good)).reshape(-1, 2).tolist():
            self._refuse_rows(rows, stream, task, done, lo)
            self._append(rows, stream, task, lo, hi)
            done = hi
        self._refuse_rows(rows, stream, task, done, count)
        if bad[-1] and rows.source is not None:  # the robot's rows up to its last are handled: never ask again
            self._advance_source(stream, (rows.source, rows.first_index + count - 1, rows.total))

    def _append(self, rows: Rows, stream: str, task: str, done: int, end: int) -> None:
        """Write rows done..end-1 of a robot chunk (or batch) of `stream` as slices, chunk by chunk."""
        values, versions, times, source = rows.values, rows.versions, rows.times, rows.source
        first_index, total = rows.first_index, rows.total
        while done < end:
            chunk = self._chunk_for(stream, task)
            # stop where a run of `add` calls would evict, so both cut the same chunks
            n = min(end - done, self.chunk_length - chunk.meta.length, max(1, self.ram_steps + 1 - self.runs.steps))
            base = chunk.slot * self.slab.slot_size + chunk.meta.length
            span = slice(base, base + n)
            data = self.slab.data
            for key, value in values.items():
                data[key][span] = value[done : done + n]
            data[TIME][span] = times[done : done + n]
            data[VERSION][span] = versions[done : done + n]
            if stream in self.streams.force_first:
                data["is_first"][base] = True
                self.streams.force_first.discard(stream)
            if source is not None:
                chunk.meta.source = self.streams.source[stream] = (source, first_index + done + n - 1, total)
            self._grown(chunk, n)
            tracker = self.streams.tracker(stream, task)
            tracker.extend(data["reward"][span], data["is_first"][span], data["is_last"][span])
            done += n
            self._after_rows(chunk)

    def _refuse_rows(self, rows: Rows, stream: str, task: str, lo: int, hi: int) -> None:
        arrays = {**rows.values, TIME: rows.times}
        for row in range(lo, hi):
            where = (f"robot chunk {rows.source} row {rows.first_index + row}" if rows.source is not None
                     else f"row {row} of {len(rows.times)} added together")
            self.refuse(stream, task, nonfinite_keys(arrays, row), where)

    def refuse(self, stream: str, task: str, keys: list[str], where: str) -> None:
        """Refuse a step holding NaN or inf: one such value turns every parameter NaN at the next update.
        Counted per stream (stats' `refused_steps`) and logged; the stream's episode is cut before it
        (is_last without is_terminal, like a robot that vanished) and its next stored step starts one,
        so no sequence runs across the missing step. Everything else of the stream is kept."""
        self.streams.tracker(stream, task)
        n = self.streams.refused[stream] = self.streams.refused.get(stream, 0) + 1
        if n & (n - 1) == 0:  # the 1st, 2nd, 4th, 8th ...: loud, yet a sensor stuck at inf cannot flood the log
            log.warning(
                "replay %s: stream %r %s: %s holds NaN or inf; step refused, its episode cut there "
                "(%d step(s) refused from this stream so far)",
                self.files.directory, stream, where, ", ".join(repr(k) for k in keys), n,
            )
        if stream in self.streams.last_uuid:
            self.close_episode(stream)
        self.streams.force_first.add(stream)

    def _advance_source(self, stream: str, position: Source) -> None:
        """The robot rows up to `position` are handled though the last of them were refused: record it on
        the stream's newest chunk in RAM, so that the next flush puts it on disk (a restarted learner must
        not ask the robot for rows it has deleted). Without such a chunk it holds until a restart."""
        self.streams.source[stream] = position
        chunk = self.runs.newest(stream, self.streams.last_uuid[stream])
        if chunk is None or chunk.meta.length == 0:
            return
        chunk.meta.source = position
        self._changed(chunk)

    def close_episode(self, stream: str) -> bool:
        """End `stream`'s running episode at its last stored step (see `Replay.close_episode`)."""
        if stream not in self.streams.last_uuid:
            return False
        self.streams.force_first.add(stream)
        chunk = self.runs.newest(stream, self.streams.last_uuid[stream])
        if chunk is None or chunk.meta.length == 0:
            log.warning(
                "replay %s: cannot mark the episode of stream %r abandoned: its last step left RAM (chunk %s)",
                self.files.directory,
                stream,
                self.streams.last_uuid[stream],
            )
            return False
        row = chunk.slot * self.slab.slot_size + chunk.meta.length - 1
        if self.slab.data["is_last"][row]:
            return False
        self.slab.data["is_last"][row] = True
        chunk.meta.abandoned = (*chunk.meta.abandoned, chunk.meta.length - 1)
        self._changed(chunk)
        self.streams.trackers[stream].abandon()
        return True

    # --- chunks ---------------------------------------------------------------------------------------

    def load(self, path: Path) -> ChunkMeta | None:
        """Read a chunk file into a slot; None (with a warning) when the file cannot be used."""
        try:
            meta, steps, times, versions = read_chunk(path)
            try:
                spec = StepSpec.from_arrays(steps, f"chunk file {path.name}")
            except ValueError as exc:
                raise ChunkError(str(exc)) from exc
            if self.slab.spec is not None and (why := self.slab.spec.mismatch(spec)):
                raise ChunkError(f"{path.name}: {why} (the store's layout is fixed by {self.slab.spec.origin})")
            if meta.length > self.slab.slot_size:
                raise ChunkError(f"{path.name}: {meta.length} steps, more than a slot holds")
        except ChunkError as exc:
            warnings.warn(f"replay: skipping chunk file {path}: {exc}", stacklevel=3)
            return None
        if (bad := nonfinite_rows({**steps, TIME: times})) is not None:
            # Written before ingest refused such steps: its rows are accounted for (the robot position
            # counts) but never sampled, and the file stays for inspection.
            row = int(np.flatnonzero(bad)[0])
            keys = ", ".join(repr(k) for k in nonfinite_keys({**steps, TIME: times}, row))
            warnings.warn(f"replay: chunk file {path} holds non-finite values ({keys} row {row}; "
                          f"{int(bad.sum())} row(s) in all): not used for training, the file is kept", stacklevel=3)
            return meta
        if self.slab.spec is None:
            self.slab.allocate(spec)
        chunk, continued = self.runs.add(meta, sealed=True)
        rows = slice(chunk.slot * self.slab.slot_size, chunk.slot * self.slab.slot_size + meta.length)
        for key, value in steps.items():
            self.slab.data[key][rows] = value
        self.slab.data[TIME][rows] = times
        self.slab.data[VERSION][rows] = versions
        tracker = self.streams.tracker(meta.stream, meta.task)
        if not continued:
            tracker.reset()
        tracker.extend(steps["reward"], steps["is_first"], steps["is_last"], meta.abandoned)
        self.streams.steps[meta.stream] += meta.length
        return meta

    def _chunk_for(self, stream: str, task: str) -> Chunk:
        """The chunk the stream's next step goes to (a new one after a task change: a chunk has one task)."""
        chunk = self.runs.open.get(stream)
        if chunk is not None and chunk.meta.task != task:
            self._seal(chunk)
            chunk = None
        return self._new_chunk(stream, task) if chunk is None else chunk

    def _new_chunk(self, stream: str, task: str) -> Chunk:
        meta = ChunkMeta.create(stream, task, self.files.take_seq(), prev=self.streams.last_uuid.get(stream, ""))
        self.streams.last_uuid[stream] = meta.uuid
        chunk, _ = self.runs.add(meta, sealed=False)
        self.runs.open[stream] = chunk
        return chunk

    def _grown(self, chunk: Chunk, n: int) -> None:
        self.runs.grown(chunk, n)
        self.streams.steps[chunk.meta.stream] = self.streams.steps.get(chunk.meta.stream, 0) + n

    def _after_rows(self, chunk: Chunk) -> None:
        if chunk.meta.length >= self.chunk_length:
            self._seal(chunk)
        self._evict()

    def _changed(self, chunk: Chunk) -> None:
        """A chunk's rows or metadata changed after rows were added: a sealed one is rewritten at flush."""
        chunk.dirty = True
        if chunk.sealed:
            self._rewrite[chunk.meta.seq] = chunk

    def _evict(self) -> None:
        """Oldest chunks leave RAM until it holds at most ram_steps steps (a chunk still being filled is
        written first, so nothing is lost when ram_steps is smaller than the open chunks)."""
        while self.runs.steps > self.ram_steps:
            chunk = self.runs.oldest()
            if not chunk.sealed:
                self._seal(chunk)
            elif self._rewrite.pop(chunk.meta.seq, None) is not None:
                self._write_sealed(chunk)
            self.runs.evict(chunk)

    def _write(self, chunk: Chunk) -> None:
        """Hand a copy of the chunk's rows to the disk worker (the slot may be reused before it is done).
        The index entry gets its file size and mtime at the next flush, once the write is complete."""
        steps = self.slab.rows(chunk.slot, chunk.meta.length)
        times, versions = steps.pop(TIME), steps.pop(VERSION)
        self.files.write(replace(chunk.meta), steps, times, versions)
        chunk.dirty = False

    def _write_sealed(self, chunk: Chunk) -> None:
        """Rewrite a sealed chunk changed by close_episode, unless the disk cap already deleted its file."""
        if chunk.dirty and chunk.meta.name in self.files.entries:
            self._write(chunk)
        chunk.dirty = False

    def _seal(self, chunk: Chunk) -> None:
        self._write(chunk)
        chunk.sealed = True
        del self.runs.open[chunk.meta.stream]
        self._cap_disk()

    def _cap_disk(self) -> None:
        cap_disk(self.files, {c.meta.name for c in self.runs.open.values()})

    def flush(self) -> None:
        """Write every partially filled chunk (it stays open) and every sealed chunk changed since its file
        was written, and wait until all of it is on disk."""
        for chunk in list(self.runs.open.values()):
            if chunk.dirty and chunk.meta.length > 0:
                self._write(chunk)
        for chunk in self._rewrite.values():
            self._write_sealed(chunk)
        self._rewrite.clear()
        self._cap_disk()
        self.files.sync()

