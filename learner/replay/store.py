"""The disk-backed replay store: steps arrive per stream, land in fixed-length chunks that are written
to disk when full, and the newest `ram_steps` steps stay in memory to be sampled as sequences.

Memory layout: one preallocated "slab" array per step key, `slots x slot_size` rows; every chunk in
RAM owns one slot, so adding a step is one row write per key and sampling is one fancy-indexing
gather per key. A *run* is a stream's chain of contiguous chunks in RAM (linked by the previous-chunk
uuid, so a run continues across chunk boundaries and across reloads); positions count steps along a
run. Step ids handed out by `sample` are `chunk seq * slot_size + row`: unique for the life of the
process, so `write_context` can tell a step that left RAM from the step that reuses its slot.

Robot streams: `add_steps` ingests a robot's chunk of T steps as slice writes and records in each
replay chunk where its newest row sits in the robot's numbering (`ChunkMeta.source`); after `flush()`
that is on disk, so a restarted learner reads `source_position` to drop chunks a robot resends.
Files are only ever written whole (atomic rename) and in order, so after a kill the newest file of a
stream names exactly the rows the directory holds. `close_episode` cuts the episode of a robot that
vanished (is_last without is_terminal, recorded in `ChunkMeta.abandoned`).

Thread-safe: one `threading.RLock` (`self.lock`) serialises the public methods, so a network thread
may ingest while the trainer samples; flush holds it while it waits for the disk. One process (the
learner) owns a store directory.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time as _time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial, wraps
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import numpy as np

from learner.replay.chunk import (
    NAME_RE,
    TIME,
    VERSION,
    ChunkError,
    ChunkMeta,
    DiskWorker,
    EpisodeTracker,
    StepSpec,
    catalogue,
    entry_for,
    nonfinite_keys,
    nonfinite_rows,
    read_chunk,
    remove_temp_files,
    step_count,
    write_chunk,
    write_index,
)
from learner.replay.selectors import OnlineQueue, StartTable, Window, recent_ranks, start_table, uniform_ranks

if TYPE_CHECKING:
    from learner.config_agent import ReplayConfig

log = logging.getLogger(__name__)
STATE_FORMAT = 1
Source = tuple[int, int, int]  # (robot chunk seq, row in that robot chunk, rows of that robot chunk)
_P = ParamSpec("_P")
_R = TypeVar("_R")


def _locked(method: Callable[Concatenate[Replay, _P], _R]) -> Callable[Concatenate[Replay, _P], _R]:
    """Run a Replay method holding `self.lock` (re-entrant, so locked methods may call each other)."""

    @wraps(method)
    def locked(self: Replay, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self.lock:
            return method(self, *args, **kwargs)

    return locked


@dataclass(eq=False)
class _Chunk:
    meta: ChunkMeta
    slot: int
    run: _Run
    start: int  # run position of the first step
    sealed: bool  # full (or cut) and written: no more steps (close_episode may still change a flag)
    dirty: bool = False  # holds changes not yet in its file


@dataclass(eq=False)
class _Run:
    """Contiguous chunks of one stream in RAM, oldest first."""

    stream: str
    fresh: int = 0  # first position not yet cut into online windows
    chunks: deque[_Chunk] = field(default_factory=deque)
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


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


class Replay:
    """Chunked, disk-backed replay with online queue, recency sampling and replay context (2024 recipe)."""

    def __init__(
        self,
        directory: str | Path,
        *,
        chunk_length: int = 1024,
        compress: bool = False,
        ram_steps: int = 1_000_000,
        disk_steps: int | None = None,
        online: bool = True,
        recency: float = 0.0,
        seed: int = 0,
    ) -> None:
        if chunk_length < 1 or ram_steps < 1 or (disk_steps is not None and disk_steps < 1):
            raise ValueError("replay: chunk_length, ram_steps and disk_steps must be >= 1")
        if not 0.0 <= recency <= 1.0:
            raise ValueError(f"replay: recency must be in [0, 1], got {recency}")
        self.lock = threading.RLock()
        self.directory = Path(directory)
        self.chunk_length = chunk_length
        self.compress = compress
        self.ram_steps = ram_steps
        self.disk_steps = disk_steps
        self.online = online
        self.recency = recency
        self._rng = np.random.default_rng(seed)
        self._queue = OnlineQueue()
        self._closed = False
        self._spec: StepSpec | None = None
        self._slot_size = chunk_length
        self._data: dict[str, np.ndarray] = {}  # slab: key -> (slots * slot_size, *shape)
        self._ctx: dict[str, np.ndarray] = {}  # replay-context latents, same rows as the slab
        self._ctx_ok = np.zeros(0, bool)
        self._slot_len = np.zeros(0, np.int64)
        self._cap = self._used = 0
        self._free: list[int] = []
        self._chunks: dict[int, _Chunk] = {}  # seq -> chunk in RAM, oldest first
        self._open: dict[str, _Chunk] = {}  # stream -> chunk still being filled
        self._tail: dict[str, _Run] = {}  # stream -> run new steps continue
        self._last_uuid: dict[str, str] = {}  # stream -> uuid of its newest chunk (in RAM or not)
        self._ram = 0
        self._table: tuple[list[_Chunk], np.ndarray, np.ndarray, np.ndarray] | None = None
        self._evicted = False
        self._worker = DiskWorker()
        self._trackers: dict[str, EpisodeTracker] = {}
        self._steps: dict[str, int] = {}
        self._tasks: dict[str, str] = {}
        self._source: dict[str, Source] = {}  # stream -> newest recorded robot position
        self._force_first: set[str] = set()  # streams whose next step must start an episode
        self._rewrite: dict[int, _Chunk] = {}  # seq -> sealed chunk changed by close_episode
        self._refused: dict[str, int] = {}  # stream -> steps refused for holding NaN or inf
        self._open_dir()

    @classmethod
    def from_config(cls, directory: str | Path, cfg: ReplayConfig, seed: int = 0) -> Replay:
        return cls(
            directory,
            chunk_length=cfg.chunk_length,
            compress=cfg.compress,
            ram_steps=cfg.ram_steps,
            disk_steps=cfg.disk_steps,
            online=cfg.online,
            recency=cfg.recency,
            seed=seed,
        )

    # --- opening an existing directory ------------------------------------------------------------

    def _open_dir(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        remove_temp_files(self.directory)
        entries, changed = catalogue(self.directory)
        self._disk: dict[str, dict[str, Any]] = {e["file"]: e for e in entries}
        seqs = [int(m.group(1)) for p in self.directory.iterdir() if (m := NAME_RE.match(p.name))]
        self._seq = max(seqs, default=-1) + 1
        for e in entries:
            self._last_uuid[e["stream"]] = e["uuid"]
        changed |= self._enforce_disk_cap()
        chosen, total = [], 0
        for e in reversed(list(self._disk.values())):
            if total + e["length"] > self.ram_steps:
                break
            if e["length"] > 0:
                chosen.append(e)
                total += e["length"]
        chosen.reverse()
        self._slot_size = max([self.chunk_length, *(e["length"] for e in chosen)])
        loaded = {e["file"]: self._load_chunk(self.directory / e["file"]) for e in chosen}
        for e in self._disk.values():
            if e["file"] in loaded and loaded[e["file"]] is None:
                continue  # unreadable: its rows are not here, so its source must not count
            self._note_newest(loaded.get(e["file"]) or ChunkMeta.from_dict(e))
        for run in self._tail.values():
            run.fresh = run.end  # what was on disk counts as seen by the online queue
        if changed:
            write_index(self.directory, self._disk.values())

    def _note_newest(self, meta: ChunkMeta) -> None:
        """Take a stream's robot position and abandoned state from its chunks, oldest first."""
        if meta.source is not None:
            self._source[meta.stream] = meta.source
        if meta.length:
            if meta.length - 1 in meta.abandoned:
                self._force_first.add(meta.stream)
            else:
                self._force_first.discard(meta.stream)

    def _load_chunk(self, path: Path) -> ChunkMeta | None:
        """Read a chunk file into a slot; None (with a warning) when the file cannot be used."""
        try:
            meta, steps, times, versions = read_chunk(path)
            try:
                spec = StepSpec.from_arrays(steps, f"chunk file {path.name}")
            except ValueError as exc:
                raise ChunkError(str(exc)) from exc
            if self._spec is not None and (why := self._spec.mismatch(spec)):
                raise ChunkError(f"{path.name}: {why} (the store's layout is fixed by {self._spec.origin})")
            if meta.length > self._slot_size:
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
        if self._spec is None:
            self._spec = spec
            self._allocate()
        chunk = _Chunk(meta=meta, slot=self._take_slot(), run=_Run(meta.stream), start=0, sealed=True)
        rows = slice(chunk.slot * self._slot_size, chunk.slot * self._slot_size + meta.length)
        for key, value in steps.items():
            self._data[key][rows] = value
        self._data[TIME][rows] = times
        self._data[VERSION][rows] = versions
        self._slot_len[chunk.slot] = meta.length
        continued = self._attach(chunk)
        tracker = self._tracker(meta.stream, meta.task)
        if not continued:
            tracker.reset()
        tracker.extend(steps["reward"], steps["is_first"], steps["is_last"], meta.abandoned)
        self._steps[meta.stream] += meta.length
        self._ram += meta.length
        return meta

    # --- memory -------------------------------------------------------------------------------------

    def _allocate(self) -> None:
        assert self._spec is not None
        columns = {key: spec for key, spec in self._spec.fields.items()}
        columns[TIME] = ((), np.dtype(np.float64))
        columns[VERSION] = ((), np.dtype(np.int64))
        self._data = {key: np.zeros((0, *shape), dtype) for key, (shape, dtype) in columns.items()}
        # Reserve what ram_steps needs at once (np.zeros is backed by memory only where written) unless
        # that is a large share of physical memory; then grow geometrically as data arrives.
        row_bytes = sum(math.prod(shape) * dtype.itemsize for shape, dtype in columns.values())
        hint = self._slots_hint()
        self._grow(hint if hint * self._slot_size * row_bytes <= _physical_memory() // 4 else min(8, hint))

    def _slots_hint(self) -> int:
        return math.ceil(self.ram_steps / self._slot_size) + 2

    def _grow(self, cap: int) -> None:
        """Geometric growth (amortised O(1) per step) up to what ram_steps needs; np.zeros leaves
        untouched rows unbacked by memory."""
        rows = cap * self._slot_size

        def grown(arr: np.ndarray) -> np.ndarray:
            new = np.zeros((rows, *arr.shape[1:]), arr.dtype)
            new[: len(arr)] = arr
            return new

        self._data = {key: grown(arr) for key, arr in self._data.items()}
        self._ctx = {key: grown(arr) for key, arr in self._ctx.items()}
        self._ctx_ok = grown(self._ctx_ok)
        slot_len = np.zeros(cap, np.int64)
        slot_len[: self._cap] = self._slot_len
        self._slot_len, self._cap = slot_len, cap

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        if self._used == self._cap:
            hint = self._slots_hint()
            self._grow(min(2 * self._cap, hint) if self._cap < hint else self._cap + max(1, self._cap // 2))
        self._used += 1
        return self._used - 1

    def _attach(self, chunk: _Chunk) -> bool:
        """Register a chunk in RAM at the end of its stream's run (or a new run); True if it continues."""
        stream = chunk.meta.stream
        run = self._tail.get(stream)
        continued = run is not None and bool(run.chunks) and run.chunks[-1].meta.uuid == chunk.meta.prev
        if not continued:
            run = self._tail[stream] = _Run(stream)
        assert run is not None
        chunk.run, chunk.start = run, run.end
        run.chunks.append(chunk)
        run.changed()
        self._chunks[chunk.meta.seq] = chunk
        self._table = None
        return continued

    def _evict(self) -> None:
        """Oldest chunks leave RAM until it holds at most ram_steps steps (a chunk still being filled is
        written first, so nothing is lost when ram_steps is smaller than the open chunks)."""
        while self._ram > self.ram_steps:
            chunk = next(iter(self._chunks.values()))
            if not chunk.sealed:
                self._seal(chunk)
            elif self._rewrite.pop(chunk.meta.seq, None) is not None:
                self._write_sealed(chunk)
            run = chunk.run
            assert run.chunks[0] is chunk
            run.chunks.popleft()
            run.changed()
            if not run.chunks and self._tail.get(run.stream) is run:
                del self._tail[run.stream]
            del self._chunks[chunk.meta.seq]
            rows = slice(chunk.slot * self._slot_size, (chunk.slot + 1) * self._slot_size)
            self._ctx_ok[rows] = False
            self._slot_len[chunk.slot] = 0
            self._free.append(chunk.slot)
            self._ram -= chunk.meta.length
            self._table = None
            self._evicted = True

    # --- adding and writing -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"replay {self.directory} is closed")

    @_locked
    def add(
        self,
        step: dict[str, Any],
        stream: str = "0",
        *,
        task: str = "",
        policy_version: int = 0,
        time: float | None = None,
        context: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Append one step of `stream` (steps of a stream arrive in order; streams may interleave).

        `context`: the posterior latents the acting policy computed at this step (each without a
        batch axis), stored as its replay context, so a sequence starting right after it has a
        start state before any update has seen the step (as the official agent does)."""
        self._check_open()
        stream = str(stream)
        if self._spec is None:
            self._spec = StepSpec.from_step(step, stream)
            self._allocate()
        values = self._spec.convert(step, stream)
        bad = nonfinite_keys(values) + ([] if time is None or np.isfinite(time) else [TIME])
        if bad:
            self._refuse(stream, task, bad, f"step {self._steps.get(stream, 0) + self._refused.get(stream, 0)}")
            return
        if stream in self._force_first:
            values = {**values, "is_first": np.True_}
            self._force_first.discard(stream)
        chunk = self._chunk_for(stream, task)
        row = chunk.slot * self._slot_size + chunk.meta.length
        for key, value in values.items():
            self._data[key][row] = value
        self._data[TIME][row] = _time.time() if time is None else time
        self._data[VERSION][row] = policy_version
        if context is not None:
            self._put_context(np.array([row]), {key: np.asarray(value)[None] for key, value in context.items()})
        self._grown(chunk, 1)
        self._tracker(stream, task).step(float(values["reward"]), bool(values["is_first"]), bool(values["is_last"]))
        self._after_rows(chunk)

    @_locked
    def add_steps(
        self,
        steps: dict[str, np.ndarray],
        stream: str,
        *,
        task: str = "",
        policy_version: np.ndarray | int | None = None,
        time: np.ndarray | float | None = None,
        source: int | None = None,
        first_index: int = 0,
        total: int | None = None,
    ) -> None:
        """Append T steps of `stream` given as arrays with a leading axis T (the keys of `add`): the same
        as T calls of `add`, written as slices. `policy_version` and `time` are per step (T,) or one
        value for all (time defaults to now). A robot chunk passes `source` (its chunk seq),
        `first_index` (the row of steps[0] in it, when resending a tail) and `total` (its rows, default
        first_index + T); each replay chunk records the robot position of its newest row."""
        self._check_open()
        stream = str(stream)
        if self._spec is None:
            if step_count(steps, stream) == 0:
                return
            self._spec = StepSpec.from_step({key: value[0] for key, value in steps.items()}, stream)
            self._allocate()
        values, count = self._spec.convert_rows(steps, stream)
        total = first_index + count if total is None else total
        if source is not None and (source < 0 or first_index < 0 or total < first_index + count):
            raise ValueError(
                f"replay steps from stream {stream!r}: bad robot position: source {source}, first_index "
                f"{first_index}, total {total} for {count} steps (want source >= 0, 0 <= first_index, "
                "first_index + steps <= total)"
            )
        if count == 0:
            return
        where = f"replay steps from stream {stream!r}"
        versions = _per_step(policy_version, 0, count, np.int64, f"{where}: policy_version")
        times = _per_step(time, _time.time(), count, np.float64, f"{where}: time")
        rows = _Rows(values, versions, times, source, first_index, total)
        bad = nonfinite_rows({**values, TIME: times})
        if bad is None:
            self._append(rows, stream, task, 0, count)
            return
        # Store the finite stretches; each refused row cuts the episode (see _refuse).
        good = np.concatenate([[False], ~bad, [False]]).astype(np.int8)
        done = 0
        for lo, hi in np.flatnonzero(np.diff(good)).reshape(-1, 2).tolist():
            self._refuse_rows(rows, stream, task, done, lo)
            self._append(rows, stream, task, lo, hi)
            done = hi
        self._refuse_rows(rows, stream, task, done, count)
        if bad[-1] and source is not None:  # the robot's rows up to its last are handled: never ask again
            self._advance_source(stream, (source, first_index + count - 1, total))

    def _append(self, rows: _Rows, stream: str, task: str, done: int, end: int) -> None:
        """Write rows done..end-1 of a robot chunk (or batch) of `stream` as slices, chunk by chunk."""
        values, versions, times, source = rows.values, rows.versions, rows.times, rows.source
        first_index, total = rows.first_index, rows.total
        while done < end:
            chunk = self._chunk_for(stream, task)
            # stop where a run of `add` calls would evict, so both cut the same chunks
            n = min(end - done, self.chunk_length - chunk.meta.length, max(1, self.ram_steps + 1 - self._ram))
            base = chunk.slot * self._slot_size + chunk.meta.length
            span = slice(base, base + n)
            for key, value in values.items():
                self._data[key][span] = value[done : done + n]
            self._data[TIME][span] = times[done : done + n]
            self._data[VERSION][span] = versions[done : done + n]
            if stream in self._force_first:
                self._data["is_first"][base] = True
                self._force_first.discard(stream)
            if source is not None:
                chunk.meta.source = self._source[stream] = (source, first_index + done + n - 1, total)
            self._grown(chunk, n)
            self._tracker(stream, task).extend(
                self._data["reward"][span], self._data["is_first"][span], self._data["is_last"][span]
            )
            done += n
            self._after_rows(chunk)

    def _refuse_rows(self, rows: _Rows, stream: str, task: str, lo: int, hi: int) -> None:
        arrays = {**rows.values, TIME: rows.times}
        for row in range(lo, hi):
            where = (f"robot chunk {rows.source} row {rows.first_index + row}" if rows.source is not None
                     else f"row {row} of {len(rows.times)} added together")
            self._refuse(stream, task, nonfinite_keys(arrays, row), where)

    def _refuse(self, stream: str, task: str, keys: list[str], where: str) -> None:
        """Refuse a step holding NaN or inf: one such value turns every parameter NaN at the next update.
        Counted per stream (stats' `refused_steps`) and logged; the stream's episode is cut before it
        (is_last without is_terminal, like a robot that vanished) and its next stored step starts one,
        so no sequence runs across the missing step. Everything else of the stream is kept."""
        self._tracker(stream, task)
        n = self._refused[stream] = self._refused.get(stream, 0) + 1
        if n & (n - 1) == 0:  # the 1st, 2nd, 4th, 8th ...: loud, yet a sensor stuck at inf cannot flood the log
            log.warning(
                "replay %s: stream %r %s: %s holds NaN or inf; step refused, its episode cut there "
                "(%d step(s) refused from this stream so far)",
                self.directory, stream, where, ", ".join(repr(k) for k in keys), n,
            )
        if stream in self._last_uuid:
            self.close_episode(stream)
        self._force_first.add(stream)

    def _advance_source(self, stream: str, position: Source) -> None:
        """The robot rows up to `position` are handled though the last of them were refused: record it on
        the stream's newest chunk in RAM, so that the next flush puts it on disk (a restarted learner must
        not ask the robot for rows it has deleted). Without such a chunk it holds until a restart."""
        self._source[stream] = position
        chunk = self._open.get(stream)
        run = self._tail.get(stream)
        if chunk is None and run is not None and run.chunks and run.chunks[-1].meta.uuid == self._last_uuid[stream]:
            chunk = run.chunks[-1]
        if chunk is None or chunk.meta.length == 0:
            return
        chunk.meta.source = position
        chunk.dirty = True
        if chunk.sealed:
            self._rewrite[chunk.meta.seq] = chunk

    def _chunk_for(self, stream: str, task: str) -> _Chunk:
        """The chunk the stream's next step goes to (a new one after a task change: a chunk has one task)."""
        chunk = self._open.get(stream)
        if chunk is not None and chunk.meta.task != task:
            self._seal(chunk)
            chunk = None
        return self._new_chunk(stream, task) if chunk is None else chunk

    def _grown(self, chunk: _Chunk, n: int) -> None:
        """Count n rows just written at the end of `chunk`."""
        chunk.meta.length += n
        chunk.dirty = True
        self._slot_len[chunk.slot] += n
        self._ram += n
        self._steps[chunk.meta.stream] = self._steps.get(chunk.meta.stream, 0) + n

    def _after_rows(self, chunk: _Chunk) -> None:
        if chunk.meta.length >= self.chunk_length:
            self._seal(chunk)
        self._evict()

    @_locked
    def close_episode(self, stream: str) -> bool:
        """End `stream`'s running episode at its last stored step (a robot vanished): is_last, not
        is_terminal, so it counts as cut; the change reaches its chunk file at the next flush. The
        stream's next step is made is_first (a robot that comes back must not continue across the gap).
        False when the stream has no steps, its last step is already is_last, or it left RAM (logged)."""
        self._check_open()
        stream = str(stream)
        if stream not in self._last_uuid:
            return False
        self._force_first.add(stream)
        chunk = self._open.get(stream)
        run = self._tail.get(stream)
        if chunk is None and run is not None and run.chunks and run.chunks[-1].meta.uuid == self._last_uuid[stream]:
            chunk = run.chunks[-1]
        if chunk is None or chunk.meta.length == 0:
            log.warning(
                "replay %s: cannot mark the episode of stream %r abandoned: its last step left RAM (chunk %s)",
                self.directory,
                stream,
                self._last_uuid[stream],
            )
            return False
        row = chunk.slot * self._slot_size + chunk.meta.length - 1
        if self._data["is_last"][row]:
            return False
        self._data["is_last"][row] = True
        chunk.meta.abandoned = (*chunk.meta.abandoned, chunk.meta.length - 1)
        chunk.dirty = True
        if chunk.sealed:
            self._rewrite[chunk.meta.seq] = chunk
        self._trackers[stream].abandon()
        return True

    @_locked
    def source_position(self, stream: str) -> Source | None:
        """The newest recorded robot position (seq, index, total) of `stream`, in RAM or on disk (None if
        it has none). Robot chunks with seq < s are duplicates, rows <= index of seq s are stored, seq
        s + 1 is next. After flush() it is exactly what the files say, so it survives a kill."""
        return self._source.get(str(stream))

    def _tracker(self, stream: str, task: str) -> EpisodeTracker:
        self._tasks[stream] = task
        self._steps.setdefault(stream, 0)
        return self._trackers.setdefault(stream, EpisodeTracker())

    def _new_chunk(self, stream: str, task: str) -> _Chunk:
        meta = ChunkMeta.create(stream, task, self._seq, prev=self._last_uuid.get(stream, ""))
        self._seq += 1
        self._last_uuid[stream] = meta.uuid
        chunk = _Chunk(meta=meta, slot=self._take_slot(), run=_Run(stream), start=0, sealed=False)
        self._attach(chunk)
        self._open[stream] = chunk
        return chunk

    def _write(self, chunk: _Chunk) -> None:
        """Hand a copy of the chunk's rows to the disk worker (the slot may be reused before it is done).
        The index entry gets its file size and mtime at the next flush, once the write is complete."""
        assert self._spec is not None
        base = chunk.slot * self._slot_size
        rows = slice(base, base + chunk.meta.length)
        steps = {key: self._data[key][rows].copy() for key in self._spec.fields}
        times, versions = self._data[TIME][rows].copy(), self._data[VERSION][rows].copy()
        meta = replace(chunk.meta)
        path = self.directory / meta.name
        self._worker.submit(lambda: write_chunk(path, meta, steps, times, versions, self.compress))
        self._disk[path.name] = {"file": path.name, **asdict(meta), "size": None, "mtime_ns": None}
        chunk.dirty = False

    def _write_sealed(self, chunk: _Chunk) -> None:
        """Rewrite a sealed chunk changed by close_episode, unless the disk cap already deleted its file."""
        if chunk.dirty and chunk.meta.name in self._disk:
            self._write(chunk)
        chunk.dirty = False

    def _seal(self, chunk: _Chunk) -> None:
        self._write(chunk)
        chunk.sealed = True
        del self._open[chunk.meta.stream]
        self._enforce_disk_cap()

    def _enforce_disk_cap(self) -> bool:
        """Delete the oldest chunk files beyond disk_steps (never a chunk still being filled)."""
        if self.disk_steps is None:
            return False
        total = sum(e["length"] for e in self._disk.values())
        open_names = {c.meta.name for c in self._open.values()}
        deleted = []
        for name, entry in list(self._disk.items()):
            if total <= self.disk_steps:
                break
            if name in open_names:
                continue
            self._worker.submit(partial((self.directory / name).unlink, missing_ok=True))  # after its write
            del self._disk[name]
            total -= entry["length"]
            deleted.append(name)
        if deleted:
            log.info(
                "replay %s: disk cap of %d steps reached, deleted %d oldest chunk file(s): %s",
                self.directory,
                self.disk_steps,
                len(deleted),
                ", ".join(deleted),
            )
        return bool(deleted)

    @_locked
    def flush(self) -> None:
        """Write every partially filled chunk now (it stays open; later steps rewrite the same file) and
        every sealed chunk close_episode changed, and wait until all of it is on disk."""
        for chunk in list(self._open.values()):
            if chunk.dirty and chunk.meta.length > 0:
                self._write(chunk)
        for chunk in self._rewrite.values():
            self._write_sealed(chunk)
        self._rewrite.clear()
        self._enforce_disk_cap()
        self._worker.wait()
        for name, entry in list(self._disk.items()):
            if entry["size"] is None:
                try:
                    self._disk[name] = entry_for(self.directory / name, ChunkMeta.from_dict(entry))
                except FileNotFoundError:  # removed behind our back
                    del self._disk[name]
        write_index(self.directory, self._disk.values())

    @_locked
    def close(self) -> None:
        """Flush, and stop the disk worker. Data not flushed or closed is lost if the process dies."""
        if not self._closed:
            self.flush()
            self._worker.close()
            self._closed = True

    def __enter__(self) -> Replay:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __len__(self) -> int:
        return self._ram

    # --- sampling -----------------------------------------------------------------------------------

    def _start_table(self, length: int) -> tuple[list[_Chunk], StartTable]:
        if self._table is None:
            chunks = list(self._chunks.values())
            run_ids: dict[int, int] = {}
            runs = np.array([run_ids.setdefault(id(c.run), len(run_ids)) for c in chunks], np.int64)
            starts = np.array([c.start for c in chunks], np.int64)
            slots = np.array([c.slot for c in chunks], np.int64)
            self._table = (chunks, starts, slots, runs)
        chunks, starts, slots, runs = self._table
        return chunks, start_table(starts, self._slot_len[slots], runs, length)

    @_locked
    def sample(self, batch: int, length: int) -> dict[str, np.ndarray]:
        """`batch` sequences of `length` consecutive steps of one stream each: step keys shaped
        (batch, length, ...), `ids` (batch, length) for write_context, and the replay context of the
        step before each sequence (`context/<key>` (batch, ...), `context/valid` (batch,))."""
        if batch < 1 or length < 1:
            raise ValueError(f"replay.sample: batch and length must be >= 1, got {batch} and {length}")
        chunks, table = self._start_table(length)
        if table.total == 0:
            longest = max((r.end - r.lo for r in {id(c.run): c.run for c in chunks}.values()), default=0)
            raise ValueError(
                f"replay {self.directory}: no sequence of {length} contiguous steps yet "
                f"({self._ram} steps in RAM, longest contiguous stream stretch {longest})"
            )
        picks: list[tuple[_Run, int]] = []
        if self.online:
            if self._evicted:
                self._queue.prune()
                self._evicted = False
            self._queue.refill(list(self._tail.values()), length)
            while len(picks) < batch and (window := self._queue.pop(length)) is not None:
                picks.append((window.run, window.start))
        rest = batch - len(picks)
        if rest:
            ranks = uniform_ranks(self._rng, table.total, rest)
            if self.recency > 0:
                recent = self._rng.random(rest) < self.recency
                ranks = np.where(recent, recent_ranks(self._rng, table.total, rest), ranks)
            index, positions = table.locate(ranks)
            picks += [(chunks[i].run, int(p)) for i, p in zip(index, positions)]
        return self._gather(picks, length)

    def _gather(self, picks: list[tuple[_Run, int]], length: int) -> dict[str, np.ndarray]:
        assert self._spec is not None
        n = len(picks)
        rows = np.empty((n, length + 1), np.int64)  # column 0: the step before the sequence
        ids = np.empty((n, length), np.int64)
        has_prev = np.empty(n, bool)
        offsets = np.arange(-1, length)
        for b, (run, start) in enumerate(picks):
            positions = start + offsets
            has_prev[b] = start > run.lo
            if not has_prev[b]:
                positions[0] = start
            rows[b], step_ids, _ = run.locate(positions, self._slot_size)
            ids[b] = step_ids[1:]
        out = {key: self._data[key][rows[:, 1:]] for key in self._spec.fields}
        out["ids"] = ids
        prev = rows[:, 0]
        valid = has_prev & self._ctx_ok[prev] & ~out["is_first"][:, 0]
        for key, arr in self._ctx.items():
            context = arr[prev]
            context[~valid] = 0
            out[f"context/{key}"] = context
        out["context/valid"] = valid
        return out

    # --- replay context -----------------------------------------------------------------------------

    @_locked
    def write_context(self, ids: np.ndarray, latents: dict[str, np.ndarray]) -> None:
        """Store per-step posterior latents (each (batch, length, ...), matching `ids`) so that later
        sequences starting right after these steps start from them. Steps that left RAM are skipped."""
        ids = np.asarray(ids, np.int64)
        arrays = {key: np.asarray(value) for key, value in latents.items()}
        for key, value in arrays.items():
            if value.shape[: ids.ndim] != ids.shape:
                raise ValueError(f"write_context: latent {key!r} has shape {value.shape}, ids have {ids.shape}")
        rows, ok = self._rows_of(ids)
        self._put_context(rows[ok], {key: value[ok] for key, value in arrays.items()})

    def _put_context(self, rows: np.ndarray, latents: dict[str, np.ndarray]) -> None:
        """Store latents (each (len(rows), ...)) at slab `rows`; the first call fixes keys and shapes."""
        if not self._ctx:
            if not latents:
                raise ValueError("write_context: no latents given")
            size = self._cap * self._slot_size
            self._ctx = {key: np.zeros((size, *v.shape[1:]), v.dtype) for key, v in latents.items()}
        if latents.keys() != self._ctx.keys():
            raise ValueError(
                f"write_context: latents {sorted(latents)} differ from the stored ones {sorted(self._ctx)}")
        for key, value in latents.items():
            if value.shape[1:] != self._ctx[key].shape[1:]:
                raise ValueError(
                    f"write_context: latent {key!r} has per-step shape {value.shape[1:]}, "
                    f"stored ones have {self._ctx[key].shape[1:]}"
                )
        for key, value in latents.items():
            self._ctx[key][rows] = value
        self._ctx_ok[rows] = True

    @_locked
    def context_state(self) -> dict[str, Any]:
        """The replay-context latents of the steps in RAM that have them, addressed by chunk uuid and
        row (stable across a reload): what a checkpoint keeps so that a resumed run starts its
        sequences from the same latents as a run that never stopped. Empty when none were written."""
        if not self._ctx:
            return {}
        chunks = [c for c in self._chunks.values() if c.meta.length]
        parts = [np.flatnonzero(self._ctx_ok[c.slot * self._slot_size : c.slot * self._slot_size + c.meta.length])
                 for c in chunks]
        rows = np.concatenate([np.zeros(0, np.int64), *parts])
        chunk = np.repeat(np.arange(len(chunks), dtype=np.int64), [len(p) for p in parts])
        slab = np.array([c.slot * self._slot_size for c in chunks], np.int64)[chunk] + rows
        return {"uuids": [c.meta.uuid for c in chunks], "chunk": chunk, "row": rows,
                "latents": {key: arr[slab] for key, arr in self._ctx.items()}}

    @_locked
    def load_context(self, state: dict[str, Any]) -> int:
        """Restore `context_state()` (after reopening the directory); rows of chunks no longer in RAM
        are dropped. Returns how many steps got their latents back. Raises ValueError, naming the
        field, on a state that does not fit this store (then nothing is changed)."""
        if not state:
            return 0
        try:
            uuids, latents = list(state["uuids"]), dict(state["latents"])
            chunk, row = (np.asarray(state[k], np.int64) for k in ("chunk", "row"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"replay context state: missing or malformed field ({exc})") from exc
        n = chunk.shape[0]
        if chunk.shape != (n,) or row.shape != (n,) or (n and (chunk.min() < 0 or chunk.max() >= len(uuids))):
            raise ValueError("replay context state: 'chunk' and 'row' must be equal-length index vectors into 'uuids'")
        arrays = {key: np.asarray(value) for key, value in latents.items()}
        for key, value in arrays.items():
            if value.shape[:1] != (n,):
                raise ValueError(f"replay context state: latent {key!r} has {value.shape[:1]} rows, expected {n}")
        if not arrays:
            raise ValueError("replay context state: no latents")
        by_uuid = {c.meta.uuid: c for c in self._chunks.values()}
        found = [by_uuid.get(u) for u in uuids]
        seqs = np.array([c.meta.seq if c else -1 for c in found], np.int64)[chunk]
        lengths = np.array([c.meta.length if c else 0 for c in found], np.int64)[chunk]
        ok = (seqs >= 0) & (row >= 0) & (row < lengths)
        # Through write_context, whose checks (keys, per-step shapes) come before it changes anything.
        self.write_context((seqs * self._slot_size + row)[ok], {key: value[ok] for key, value in arrays.items()})
        return int(ok.sum())

    def _rows_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Slab rows of step ids, and which ids still name a step in RAM."""
        seqs, offsets = np.divmod(ids, self._slot_size)
        unique, inverse = np.unique(seqs, return_inverse=True)
        chunks = [self._chunks.get(int(s)) for s in unique]
        slots = np.array([c.slot if c else -1 for c in chunks], np.int64)[inverse.reshape(ids.shape)]
        lengths = np.array([c.meta.length if c else 0 for c in chunks], np.int64)[inverse.reshape(ids.shape)]
        ok = (slots >= 0) & (offsets < lengths) & (ids >= 0)
        return slots * self._slot_size + offsets, ok

    # --- stats and checkpoint state -----------------------------------------------------------------

    @_locked
    def stats(self) -> dict[str, Any]:
        """Per stream (steps loaded at open plus added since): task, steps, completed episodes and their
        returns, abandoned episodes, steps in RAM, robot source position; and totals, including what is
        on disk."""
        in_ram: dict[str, int] = {}
        for chunk in self._chunks.values():
            in_ram[chunk.meta.stream] = in_ram.get(chunk.meta.stream, 0) + chunk.meta.length
        streams = {
            s: {
                "task": self._tasks[s],
                "steps": self._steps[s],
                "episodes": len(t.returns),
                "returns": list(t.returns),
                "abandoned": t.abandoned,
                "ram_steps": in_ram.get(s, 0),
                "source": list(self._source[s]) if s in self._source else None,
                "refused_steps": self._refused.get(s, 0),
            }
            for s, t in self._trackers.items()
        }
        totals = {
            "streams": len(streams),
            "steps": sum(v["steps"] for v in streams.values()),
            "episodes": sum(v["episodes"] for v in streams.values()),
            "abandoned": sum(v["abandoned"] for v in streams.values()),
            "refused_steps": sum(self._refused.values()),
            "ram_steps": self._ram,
            "disk_steps": sum(e["length"] for e in self._disk.values()),
            "disk_chunks": len(self._disk),
            "online_queue": len(self._queue),
        }
        return {"streams": streams, "totals": totals}

    def _ref(self, run: _Run, position: int) -> list[Any]:
        """A run position as [chunk uuid, row] (stable across a reload)."""
        _, _, k = run.locate(np.array([min(position, run.end - 1)]), self._slot_size)
        chunk = run.chunks[int(k[0])]
        return [chunk.meta.uuid, position - chunk.start]

    def _deref(self, ref: list[Any], by_uuid: dict[str, _Chunk]) -> tuple[_Run, int] | None:
        chunk = by_uuid.get(ref[0])
        return (chunk.run, chunk.start + int(ref[1])) if chunk else None

    @_locked
    def save(self) -> dict[str, Any]:
        """Small JSON-able state for checkpoints (rng, online queue, fresh-data marks). Flushes first, so
        every step it refers to is on disk."""
        self.flush()
        live = [w for w in self._queue.windows if w.run.holds(w.start, w.length)]
        return {
            "format": STATE_FORMAT,
            "rng": self._rng.bit_generator.state,
            "queue": [[*self._ref(w.run, w.start), w.length] for w in live],
            "fresh": {s: self._ref(r, max(r.fresh, r.lo)) for s, r in self._tail.items() if r.chunks},
        }

    @_locked
    def load(self, state: dict[str, Any]) -> None:
        """Restore `save()`'s state (after reopening the directory); references to steps no longer in
        RAM are dropped."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"replay state: unknown format {state.get('format')!r}")
        self._rng.bit_generator.state = state["rng"]
        by_uuid = {c.meta.uuid: c for c in self._chunks.values()}
        self._queue = OnlineQueue()
        for uuid, row, length in state["queue"]:
            found = self._deref([uuid, row], by_uuid)
            if found and found[0].holds(found[1], length):
                self._queue.windows.append(Window(found[0], found[1], length))
        for stream, ref in state["fresh"].items():
            found = self._deref(ref, by_uuid)
            if found and self._tail.get(stream) is found[0]:
                found[0].fresh = found[1]


@dataclass
class _Rows:
    """A robot chunk (or batch) of steps being added, with where it sits in the robot's numbering."""

    values: dict[str, np.ndarray]
    versions: np.ndarray
    times: np.ndarray
    source: int | None
    first_index: int
    total: int


def _per_step(value: Any, default: Any, count: int, dtype: type, where: str) -> np.ndarray:
    """A per-step column (count,) from one value for all steps or an array of count values."""
    arr = np.asarray(default if value is None else value, dtype)
    if arr.ndim == 0:
        return np.full(count, arr)
    if arr.shape != (count,):
        raise ValueError(f"{where} has shape {arr.shape}, expected ({count},) or one value")
    return arr
