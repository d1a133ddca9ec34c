"""The disk-backed replay store: steps arrive per stream, land in fixed-length chunks that are written
to disk when full, and the newest `ram_steps` steps stay in memory to be sampled as sequences.

`Replay` is the front: it checks what callers hand it and composes the parts, each in its module:
`validation` (the step layout a store fixes at its first step, NaN/inf), `slab` (the arrays in RAM,
one slot per chunk), `runs` (which chunks are in RAM and how a stream's chunks chain), `ingest`
(where steps go: chunks filled, sealed, written, evicted; refused steps; robot positions), `disk` and
`chunk_file`/`index` (the files), `streams` (per-stream episodes and robot positions), `selectors`
(which sequences a batch replays) and `context` (the replay-context latents).

Thread-safe: one `threading.RLock` (`self.lock`) serialises the public methods, so a network thread
may ingest while the trainer samples; flush holds it while it waits for the disk. One process (the
learner) owns a store directory.
"""

from __future__ import annotations

import threading
import time as _time
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import numpy as np

from learner.replay.chunk_file import TIME, ChunkMeta, Source
from learner.replay.context import state_ids
from learner.replay.describe import read_descriptions, write_descriptions
from learner.replay.disk import ChunkFiles
from learner.replay.ingest import Ingest, Rows, cap_disk
from learner.replay.runs import Runs
from learner.replay.selectors import Sampler
from learner.replay.slab import Slab
from learner.replay.streams import Streams
from learner.replay.validation import StepSpec, nonfinite_keys, per_step, step_count

if TYPE_CHECKING:
    from core.config.agent import ReplayConfig

# A stream's steps as add_steps was given them: (stream, arrays with a leading step axis, time argument).
StepsAdded = Callable[[str, dict[str, np.ndarray], "np.ndarray | float | None"], None]
_P = ParamSpec("_P")
_R = TypeVar("_R")


def _locked(method: Callable[Concatenate[Replay, _P], _R]) -> Callable[Concatenate[Replay, _P], _R]:
    """Run a Replay method holding `self.lock` (re-entrant, so locked methods may call each other)."""

    @wraps(method)
    def locked(self: Replay, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self.lock:
            return method(self, *args, **kwargs)

    return locked


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
        self._closed = False
        self.on_steps_added: StepsAdded | None = None  # see add_steps
        self._files = ChunkFiles(self.directory, compress=compress, disk_steps=disk_steps)
        self._streams = Streams()
        for entry in self._files.entries.values():
            self._streams.last_uuid[entry["stream"]] = entry["uuid"]
        stale = cap_disk(self._files) | self._files.stale
        chosen = self._newest_fitting()
        # A slot holds a chunk: as long as chunk_length, or as the longest file (written with a larger one).
        self._slab = Slab(max([chunk_length, *(e["length"] for e in chosen)]), ram_steps)
        self._runs = Runs(self._slab)
        self._ingest = Ingest(
            self._slab, self._runs, self._streams, self._files, chunk_length=chunk_length, ram_steps=ram_steps
        )
        self._sampler = Sampler(seed, online=online, recency=recency)
        self._descriptions = read_descriptions(self.directory)  # streams.json: what each stream's arrays mean
        self._load(chosen)
        if stale:
            self._files.write_index()

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

    def _newest_fitting(self) -> list[dict[str, Any]]:
        """Index entries of the newest non-empty chunk files that fit in ram_steps together, oldest first."""
        chosen, total = [], 0
        for e in reversed(list(self._files.entries.values())):
            if total + e["length"] > self.ram_steps:
                break
            if e["length"] > 0:
                chosen.append(e)
                total += e["length"]
        chosen.reverse()
        return chosen

    def _load(self, chosen: list[dict[str, Any]]) -> None:
        """Read the chosen files into RAM, and each stream's robot position and abandoned state from all."""
        loaded = {e["file"]: self._ingest.load(self.directory / e["file"]) for e in chosen}
        for e in self._files.entries.values():
            if e["file"] in loaded and loaded[e["file"]] is None:
                continue  # unreadable: its rows are not here, so its source must not count
            self._streams.note_newest(loaded.get(e["file"]) or ChunkMeta.from_dict(e))
        for run in self._runs.tail.values():
            run.fresh = run.end  # what was on disk counts as seen by the online queue

    # --- adding -------------------------------------------------------------------------------------

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
        spec = self._slab.spec
        if spec is None:
            spec = StepSpec.from_step(step, stream)
            self._slab.allocate(spec)
        values = spec.convert(step, stream)
        bad = nonfinite_keys(values) + ([] if time is None or np.isfinite(time) else [TIME])
        if bad:
            self._ingest.refuse(stream, task, bad, f"step {self._streams.seen(stream)}")
            return
        self._ingest.add(stream, task, values, time, policy_version, context)

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
        first_index + T); each replay chunk records the robot position of its newest row.

        Then `on_steps_added(stream, steps, time)`, when set, hears them (serve --rerun shows the robots'
        camera images: learner/viewers/rerun_live.py), outside the lock so that sampling never waits on it."""
        self._add_steps(steps, stream, task=task, policy_version=policy_version, time=time, source=source,
                        first_index=first_index, total=total)
        if self.on_steps_added is not None:
            self.on_steps_added(str(stream), steps, time)

    @_locked
    def _add_steps(self, steps: dict[str, np.ndarray], stream: str, *, task: str,
                   policy_version: np.ndarray | int | None, time: np.ndarray | float | None, source: int | None,
                   first_index: int, total: int | None) -> None:
        self._check_open()
        stream = str(stream)
        spec = self._slab.spec
        if spec is None:
            if step_count(steps, stream) == 0:
                return
            spec = StepSpec.from_step({key: value[0] for key, value in steps.items()}, stream)
            self._slab.allocate(spec)
        values, count = spec.convert_rows(steps, stream)
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
        versions = per_step(policy_version, 0, count, np.int64, f"{where}: policy_version")
        times = per_step(time, _time.time(), count, np.float64, f"{where}: time")
        self._ingest.add_rows(Rows(values, versions, times, source, first_index, total), stream, task)

    @_locked
    def describe(self, stream: str, description: dict[str, Any]) -> None:
        """Record what `stream`'s arrays mean (`core.describe`: names, units, bounds, control rate, task) in
        the directory's streams.json, written at once when it is new or changed."""
        self._check_open()
        stream = str(stream)
        if self._descriptions.get(stream) != description:
            self._descriptions[stream] = description
            write_descriptions(self.directory, self._descriptions)

    @_locked
    def close_episode(self, stream: str) -> bool:
        """End `stream`'s running episode at its last stored step (a robot vanished): is_last, not
        is_terminal, so it counts as cut; the change reaches its chunk file at the next flush. The
        stream's next step is made is_first (a robot that comes back must not continue across the gap).
        False when the stream has no steps, its last step is already is_last, or it left RAM (logged)."""
        self._check_open()
        return self._ingest.close_episode(str(stream))

    @_locked
    def source_position(self, stream: str) -> Source | None:
        """The newest recorded robot position (seq, index, total) of `stream`, in RAM or on disk (None if
        it has none). Robot chunks with seq < s are duplicates, rows <= index of seq s are stored, seq
        s + 1 is next. After flush() it is exactly what the files say, so it survives a kill."""
        return self._streams.source.get(str(stream))

    @_locked
    def flush(self) -> None:
        """Write every partially filled chunk now (it stays open; later steps rewrite the same file) and
        every sealed chunk close_episode changed, and wait until all of it is on disk."""
        self._ingest.flush()

    @_locked
    def close(self) -> None:
        """Flush, and stop the disk worker. Data not flushed or closed is lost if the process dies."""
        if not self._closed:
            self.flush()
            self._files.close()
            self._closed = True

    def __enter__(self) -> Replay:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __len__(self) -> int:
        return self._runs.steps

    # --- sampling -----------------------------------------------------------------------------------

    @_locked
    def sample(self, batch: int, length: int) -> dict[str, np.ndarray]:
        """`batch` sequences of `length` consecutive steps of one stream each: step keys shaped
        (batch, length, ...), `ids` (batch, length) for write_context, and the replay context of the
        step before each sequence (`context/<key>` (batch, ...), `context/valid` (batch,))."""
        if batch < 1 or length < 1:
            raise ValueError(f"replay.sample: batch and length must be >= 1, got {batch} and {length}")
        chunks, table = self._runs.start_table(length)
        if table.total == 0:
            longest = max((r.end - r.lo for r in {id(c.run): c.run for c in chunks}.values()), default=0)
            raise ValueError(
                f"replay {self.directory}: no sequence of {length} contiguous steps yet "
                f"({self._runs.steps} steps in RAM, longest contiguous stream stretch {longest})"
            )
        picks = self._sampler.choose(batch, length, chunks, table, self._runs)
        return self._slab.gather(*self._runs.rows(picks, length))

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
        rows, ok = self._runs.rows_of(ids)
        self._slab.context.put(rows[ok], {key: value[ok] for key, value in arrays.items()})

    @_locked
    def context_state(self) -> dict[str, Any]:
        """The replay-context latents of the steps in RAM that have them, addressed by chunk uuid and
        row (stable across a reload): what a checkpoint keeps so that a resumed run starts its
        sequences from the same latents as a run that never stopped. Empty when none were written."""
        return self._slab.context.state(self._runs.chunks.values(), self._slab.slot_size)

    @_locked
    def load_context(self, state: dict[str, Any]) -> int:
        """Restore `context_state()` (after reopening the directory); rows of chunks no longer in RAM
        are dropped. Returns how many steps got their latents back. Raises ValueError, naming the
        field, on a state that does not fit this store (then nothing is changed)."""
        if not state:
            return 0
        ids, latents = state_ids(state, self._runs.by_uuid(), self._slab.slot_size)
        # Through write_context, whose checks (keys, per-step shapes) come before it changes anything.
        self.write_context(ids, latents)
        return len(ids)

    # --- stats and checkpoint state -----------------------------------------------------------------

    @_locked
    def stats(self) -> dict[str, Any]:
        """Per stream (steps loaded at open plus added since): task, steps, completed episodes and their
        returns, abandoned episodes, steps in RAM, robot source position; and totals, including what is
        on disk."""
        streams = self._streams.stats(self._runs.in_ram())
        totals = {
            "streams": len(streams),
            "steps": sum(v["steps"] for v in streams.values()),
            "episodes": sum(v["episodes"] for v in streams.values()),
            "abandoned": sum(v["abandoned"] for v in streams.values()),
            "refused_steps": sum(self._streams.refused.values()),
            "ram_steps": self._runs.steps,
            "disk_steps": self._files.steps,
            "disk_chunks": len(self._files.entries),
            "online_queue": len(self._sampler.queue),
        }
        return {"streams": streams, "totals": totals}

    @_locked
    def save(self) -> dict[str, Any]:
        """Small JSON-able state for checkpoints (rng, online queue, fresh-data marks). Flushes first, so
        every step it refers to is on disk."""
        self.flush()
        return self._sampler.state(self._runs)

    @_locked
    def load(self, state: dict[str, Any]) -> None:
        """Restore `save()`'s state (after reopening the directory); references to steps no longer in
        RAM are dropped."""
        self._sampler.load(state, self._runs)
