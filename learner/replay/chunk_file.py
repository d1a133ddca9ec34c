"""Chunk files: one stream's consecutive steps plus their metadata, written atomically as `.npz`.

A chunk file holds every step key as an array of `length` rows and three reserved members:
`__meta__` (a JSON string: format, uuid, prev, stream, task, seq, length, and the optional source and
abandoned of `ChunkMeta`; files written before those existed still load), `__time__` (float64
wall-clock seconds per step) and `__version__` (int64 policy-weights version per step). No pickle:
strings live in the JSON member, which numpy stores as a fixed-width unicode array.

Files are named `{seq:010d}-{stream slug}-{uuid}.npz`; `seq` counts chunks in creation order within
one directory, so "oldest" is simply the smallest number. `index.json` caches every file's metadata
so that opening a large store does not read every file; it is only a cache: files that are new,
changed (size or mtime) or missing from it are reconciled by reading the files themselves.
"""

from __future__ import annotations

import json
import queue
import re
import threading
import uuid as uuidlib
import warnings
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from learner import atomic

FORMAT = 1
META, TIME, VERSION = "__meta__", "__time__", "__version__"
RESERVED = (META, TIME, VERSION)
INDEX_NAME = "index.json"
TMP_SUFFIX = ".tmp"
NAME_RE = re.compile(r"^(\d{10})-([A-Za-z0-9_.]*)-([0-9a-f]{32})\.npz$")
# Everything a reader can meet in a damaged file; all mean "skip this file".
READ_ERRORS = (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile, json.JSONDecodeError)


class ChunkError(Exception):
    """A chunk file that cannot be used (truncated, corrupt, inconsistent)."""


@dataclass
class ChunkMeta:
    """What a chunk file says about itself (also one entry of the index)."""

    uuid: str
    prev: str  # uuid of the previous chunk of the same stream, "" for the first
    stream: str
    task: str
    seq: int
    length: int
    # Where the newest robot-fed row of this chunk sits in the robot's own numbering: (robot chunk seq,
    # row in that robot chunk, rows of that robot chunk). Lets a restarted learner drop resent data.
    source: tuple[int, int, int] | None = None
    # Rows whose is_last was set by Replay.close_episode: the episode was cut (robot gone), not ended.
    abandoned: tuple[int, ...] = ()

    @staticmethod
    def create(stream: str, task: str, seq: int, prev: str) -> ChunkMeta:
        return ChunkMeta(uuid=uuidlib.uuid4().hex, prev=prev, stream=stream, task=task, seq=seq, length=0)

    @property
    def name(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9_.]", "_", self.stream)[:40]
        return f"{self.seq:010d}-{slug}-{self.uuid}.npz"

    @staticmethod
    def from_dict(data: dict[str, Any]) -> ChunkMeta:
        meta = ChunkMeta(
            uuid=str(data["uuid"]),
            prev=str(data["prev"]),
            stream=str(data["stream"]),
            task=str(data["task"]),
            seq=int(data["seq"]),
            length=int(data["length"]),
            source=_source(data.get("source")),
            abandoned=tuple(int(row) for row in data.get("abandoned") or ()),
        )
        if meta.length < 0 or meta.seq < 0:
            raise ValueError(f"bad length/seq in chunk metadata: {data}")
        if any(not 0 <= row < meta.length for row in meta.abandoned):
            raise ValueError(f"abandoned rows outside the chunk's {meta.length} rows in chunk metadata: {data}")
        return meta


def _source(value: Any) -> tuple[int, int, int] | None:
    """A metadata `source` as (seq, index, total), checked; None when absent."""
    if value is None:
        return None
    seq, index, total = (int(x) for x in value)
    if seq < 0 or not 0 <= index < total:
        raise ValueError(f"bad source {value!r} in chunk metadata: want [seq >= 0, 0 <= index < total, total]")
    return seq, index, total


def is_chunk_name(name: str) -> bool:
    return NAME_RE.match(name) is not None


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Chunk files and the index, named so `remove_temp_files` can find a killed writer's leftovers."""
    atomic.atomic_write(path, write, prefix="." + path.name + ".", suffix=TMP_SUFFIX)


def remove_temp_files(directory: Path) -> list[str]:
    """Temp files are only ever left by a killed writer; their content is incomplete by definition."""
    removed = []
    for path in directory.glob("." + "*" + TMP_SUFFIX):
        path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed


def write_chunk(
    path: Path,
    meta: ChunkMeta,
    steps: dict[str, np.ndarray],
    times: np.ndarray,
    versions: np.ndarray,
    compress: bool,
) -> None:
    """Write the first `meta.length` rows of `steps` (plus metadata) to `path` atomically."""
    n = meta.length
    arrays = {key: value[:n] for key, value in steps.items()}
    arrays[META] = np.array(json.dumps({"format": FORMAT, **asdict(meta)}))
    arrays[TIME] = np.asarray(times[:n], np.float64)
    arrays[VERSION] = np.asarray(versions[:n], np.int64)
    save = np.savez_compressed if compress else np.savez
    atomic_write(path, lambda f: save(f, **arrays))


def _meta_of(npz: Any, path: Path) -> ChunkMeta:
    raw = npz[META]
    if raw.dtype.kind != "U" or raw.shape != ():
        raise ChunkError(f"{path.name}: metadata is not a JSON string")
    data = json.loads(str(raw))
    if data.get("format") != FORMAT:
        raise ChunkError(f"{path.name}: unknown chunk format {data.get('format')!r}")
    return ChunkMeta.from_dict(data)


def read_meta(path: Path) -> ChunkMeta:
    """Only the metadata member (cheap even for big or compressed chunks). Raises ChunkError."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return _meta_of(npz, path)
    except ChunkError:
        raise
    except READ_ERRORS as exc:
        raise ChunkError(f"{path.name}: unreadable chunk file ({type(exc).__name__}: {exc})") from exc


def read_chunk(
    path: Path, keys: Iterable[str] | None = None
) -> tuple[ChunkMeta, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(meta, step arrays, times, versions); `keys` limits which step arrays are read. Raises ChunkError
    for anything unusable, including arrays whose length disagrees with the metadata."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = _meta_of(npz, path)
            wanted = [k for k in npz.files if k not in RESERVED] if keys is None else list(keys)
            steps = {key: npz[key] for key in wanted}
            times, versions = npz[TIME], npz[VERSION]
    except ChunkError:
        raise
    except READ_ERRORS as exc:
        raise ChunkError(f"{path.name}: unreadable chunk file ({type(exc).__name__}: {exc})") from exc
    for key, value in [*steps.items(), (TIME, times), (VERSION, versions)]:
        if value.ndim == 0 or value.shape[0] != meta.length:
            raise ChunkError(f"{path.name}: {key!r} has {value.shape[:1]} rows, metadata says {meta.length}")
    return meta, steps, times, versions


def verify_crc(path: Path) -> None:
    """Check the CRC-32 of every member, including arrays a reader did not ask for (numpy checks only the
    members it reads, to their end). Raises ChunkError naming the first corrupt member."""
    member = ""
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                member = info.filename.removesuffix(".npy")
                with zf.open(info) as f:
                    while f.read(1 << 20):
                        pass
    except zipfile.BadZipFile as exc:
        if member and "CRC" in str(exc):
            raise ChunkError(f"{path.name}: corrupt: the data of {member!r} fails its CRC-32 check") from exc
        raise ChunkError(f"{path.name}: unreadable chunk file ({type(exc).__name__}: {exc})") from exc
    except READ_ERRORS as exc:
        raise ChunkError(f"{path.name}: unreadable chunk file ({type(exc).__name__}: {exc})") from exc


class DiskWorker:
    """Runs file writes and deletions in submission order on one background thread, so that ingest does
    not wait for the disk (fsync). The queue is bounded (backpressure when the disk is slower than the
    data); `wait()` blocks until everything submitted is on disk and re-raises the first failure."""

    def __init__(self, depth: int = 4) -> None:
        self._queue: queue.Queue[Callable[[], object] | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], object]) -> None:
        self.check()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="replay-disk", daemon=True)
            self._thread.start()
        self._queue.put(job)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if self._error is None:
                    job()
            except BaseException as exc:  # handed to the owner's thread by check()
                self._error = exc
            finally:
                self._queue.task_done()

    def check(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"replay: a background disk write failed: {error}") from error

    def wait(self) -> None:
        if self._thread is not None:
            self._queue.join()
        self.check()

    def close(self) -> None:
        self.wait()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None


# --- the index ------------------------------------------------------------------------------------


def write_index(directory: Path, entries: Iterable[dict[str, Any]]) -> None:
    data = {"format": FORMAT, "chunks": list(entries)}
    atomic_write(directory / INDEX_NAME, lambda f: f.write(json.dumps(data, indent=0).encode()))


def _read_index(directory: Path) -> dict[str, dict[str, Any]] | None:
    path = directory / INDEX_NAME
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"unknown format {data.get('format')!r}")
        return {entry["file"]: entry for entry in data["chunks"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        warnings.warn(f"replay index {path} is unreadable ({exc}); rebuilding it from the chunk files", stacklevel=3)
        return None


def catalogue(directory: Path) -> tuple[list[dict[str, Any]], bool]:
    """Every readable chunk file of `directory`, oldest first, as index entries (ChunkMeta fields plus
    file, size, mtime_ns), and whether the index on disk disagreed with the files. Unreadable files
    are skipped with a warning naming them. Reads nothing but metadata and never writes."""
    index = _read_index(directory)
    changed = index is None
    entries = []
    names = sorted(p.name for p in directory.iterdir() if is_chunk_name(p.name))
    for name in names:
        path = directory / name
        try:
            st = path.stat()
        except OSError:
            continue
        known = (index or {}).get(name)
        if known is not None and known.get("size") == st.st_size and known.get("mtime_ns") == st.st_mtime_ns:
            entries.append(known)
            continue
        changed = True
        try:
            meta = read_meta(path)
        except ChunkError as exc:
            warnings.warn(f"replay: skipping chunk file {path}: {exc}", stacklevel=2)
            continue
        entries.append({"file": name, **asdict(meta), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    if index is not None and set(index) - set(names):
        changed = True
    entries.sort(key=lambda e: (e["seq"], e["file"]))
    return entries, changed


def entry_for(path: Path, meta: ChunkMeta) -> dict[str, Any]:
    st = path.stat()
    return {"file": path.name, **asdict(meta), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


# --- episodes -------------------------------------------------------------------------------------


class EpisodeTracker:
    """Completed-episode returns of one stream. An episode runs from an `is_first` step to an `is_last`
    step, rewards of both included; one whose start was never seen (data loaded mid-episode), that is
    cut by a new `is_first`, or that was abandoned (its is_last set by Replay.close_episode; counted in
    `abandoned` instead) is not counted."""

    def __init__(self) -> None:
        self.returns: list[float] = []
        self.current: float | None = None
        self.abandoned = 0

    def step(self, reward: float, is_first: bool, is_last: bool) -> None:
        if is_first:
            self.current = 0.0
        if self.current is not None:
            self.current += reward
            if is_last:
                self.returns.append(self.current)
                self.current = None

    def extend(
        self, reward: np.ndarray, is_first: np.ndarray, is_last: np.ndarray, abandoned: Iterable[int] = ()
    ) -> None:
        """Same as `step` over arrays, looping only over episode boundaries; `abandoned` rows (is_last set
        by close_episode) end their episode without counting it."""
        csum = np.concatenate([[0.0], np.cumsum(np.asarray(reward, np.float64).reshape(-1))])
        first, last = np.asarray(is_first).reshape(-1), np.asarray(is_last).reshape(-1)
        cut = set(abandoned)
        begin = 0  # rewards from `begin` on are not yet in self.current
        for i in np.flatnonzero(first | last):
            if first[i]:
                self.current, begin = 0.0, i
            if last[i] and int(i) in cut:
                self.abandon()
            elif last[i] and self.current is not None:
                self.returns.append(self.current + float(csum[i + 1] - csum[begin]))
                self.current = None
        if self.current is not None:
            self.current += float(csum[-1] - csum[begin])

    def reset(self) -> None:
        """The next steps do not continue the previous ones (a gap in the stream)."""
        self.current = None

    def abandon(self) -> None:
        """The running episode was cut short (its robot vanished): dropped, and counted as abandoned."""
        self.current = None
        self.abandoned += 1


# --- the step schema ------------------------------------------------------------------------------

REQUIRED = ("reward", "is_first", "is_last", "is_terminal")
FLAGS = ("is_first", "is_last", "is_terminal")


def _as_array(value: Any) -> tuple[np.ndarray, bool]:
    """(array, exact): numpy values keep their dtype; Python floats (and lists of them) become float32,
    Python ints int64, Python bools bool."""
    if isinstance(value, np.ndarray | np.generic):
        return np.asarray(value), True
    arr = np.asarray(value)
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    return arr, False


def _reserved(key: str) -> bool:
    return key.startswith("__") or key == "ids" or key.startswith("context/")


def nonfinite_rows(arrays: dict[str, np.ndarray]) -> np.ndarray | None:
    """Which rows (leading axis) hold NaN or +-inf in any floating-point array; None when every value is
    finite (the common case). Such a value would turn every parameter NaN at the next update."""
    bad = None
    for value in arrays.values():
        if value.dtype.kind in "fc" and value.size:
            rows = ~np.isfinite(value.reshape(len(value), -1)).all(axis=1)
            bad = rows if bad is None else bad | rows
    return bad if bad is not None and bad.any() else None


def nonfinite_keys(arrays: dict[str, np.ndarray], row: int | None = None) -> list[str]:
    """The floating-point keys holding NaN or +-inf (in `row` of each array, when given)."""
    return [key for key, value in arrays.items()
            if value.dtype.kind in "fc" and not np.isfinite(value if row is None else value[row]).all()]


def step_count(steps: dict[str, np.ndarray], stream: str) -> int:
    """T of a dict of per-key arrays with a leading step axis; errors name the key and stream."""
    where = f"replay steps from stream {stream!r}"
    if not isinstance(steps, dict) or not steps:
        raise TypeError(f"{where}: expected a non-empty dict of arrays, got {type(steps).__name__}")
    counts = {}
    for key, value in steps.items():
        if not isinstance(value, np.ndarray) or value.ndim == 0:
            raise TypeError(f"{where}: key {key!r} must be a numpy array with a leading step axis")
        counts[key] = value.shape[0]
    if len(set(counts.values())) > 1:
        raise ValueError(f"{where}: keys hold different numbers of steps: {counts}")
    return next(iter(counts.values()))


class StepSpec:
    """The key set and each key's per-step shape and dtype, fixed by the first step a store sees (or by
    the chunk files it loads), so that every chunk of a store stacks into one array per key."""

    def __init__(self, fields: dict[str, tuple[tuple[int, ...], np.dtype]], origin: str) -> None:
        self.fields = fields
        self.origin = origin

    @staticmethod
    def from_step(step: dict[str, Any], stream: str) -> StepSpec:
        if not isinstance(step, dict):
            raise TypeError(f"replay step from stream {stream!r}: expected a dict of arrays, got {type(step).__name__}")
        fields = {}
        for key, value in step.items():
            if not isinstance(key, str) or _reserved(key):
                raise ValueError(f"replay step from stream {stream!r}: key {key!r} is reserved or not a string")
            arr, _ = _as_array(value)
            if arr.dtype.kind in "OV":
                raise ValueError(f"replay step from stream {stream!r}: key {key!r} has unsupported dtype {arr.dtype}")
            fields[key] = (arr.shape, arr.dtype)
        return StepSpec(fields, f"the first step, from stream {stream!r}")._checked(f"stream {stream!r}")

    @staticmethod
    def from_arrays(arrays: dict[str, np.ndarray], origin: str) -> StepSpec:
        """The layout of a chunk file's step arrays (rows = steps); ValueError if it lacks what a step needs."""
        return StepSpec({key: (value.shape[1:], value.dtype) for key, value in arrays.items()}, origin)._checked(origin)

    def _checked(self, where: str) -> StepSpec:
        missing = [key for key in REQUIRED if key not in self.fields]
        if missing:
            raise ValueError(f"replay step from {where}: missing required key(s) {missing}")
        for key in FLAGS:
            if self.fields[key] != ((), np.dtype(bool)):
                raise ValueError(f"replay step from {where}: key {key!r} must be a bool scalar")
        if self.fields["reward"][0] != () or self.fields["reward"][1].kind not in "fiu":
            raise ValueError(f"replay step from {where}: key 'reward' must be a numeric scalar")
        return self

    def convert(self, step: dict[str, Any], stream: str) -> dict[str, np.ndarray]:
        """The step's values as arrays of the stored shapes and dtypes; ValueError names what differs."""
        where = f"replay step from stream {stream!r}"
        if step.keys() != self.fields.keys():
            missing = sorted(self.fields.keys() - step.keys())
            extra = sorted(step.keys() - self.fields.keys())
            raise ValueError(
                f"{where}: keys differ from the ones this replay stores (fixed by {self.origin}): "
                f"missing {missing}, unexpected {extra}"
            )
        out = {}
        for key, (shape, dtype) in self.fields.items():
            value = step[key]
            if type(value) is np.ndarray and value.dtype == dtype and value.shape == shape:
                out[key] = value  # the common case, kept cheap
                continue
            arr, exact = _as_array(value)
            if not exact and arr.dtype != dtype and np.can_cast(arr.dtype, dtype, "same_kind"):
                arr = arr.astype(dtype)
            if arr.shape != shape or arr.dtype != dtype:
                raise ValueError(
                    f"{where}: key {key!r} {self._differs(arr.shape, arr.dtype, shape, dtype)} (fixed by {self.origin})"
                )
            out[key] = arr
        return out

    def convert_rows(self, steps: dict[str, np.ndarray], stream: str) -> tuple[dict[str, np.ndarray], int]:
        """(arrays, T) for T steps given as arrays with a leading step axis; numpy arrays are required and
        must have the stored per-step shape and dtype exactly (as numpy values in `convert`)."""
        where = f"replay steps from stream {stream!r}"
        if steps.keys() != self.fields.keys():
            missing = sorted(self.fields.keys() - steps.keys())
            extra = sorted(steps.keys() - self.fields.keys())
            raise ValueError(
                f"{where}: keys differ from the ones this replay stores (fixed by {self.origin}): "
                f"missing {missing}, unexpected {extra}"
            )
        count = step_count(steps, stream)
        for key, (shape, dtype) in self.fields.items():
            value = steps[key]
            if value.shape[1:] != shape or value.dtype != dtype:
                differs = self._differs(value.shape[1:], value.dtype, shape, dtype)
                raise ValueError(f"{where}: key {key!r} {differs} (fixed by {self.origin})")
        return steps, count

    def mismatch(self, other: StepSpec) -> str | None:
        """How `other` (e.g. a loaded chunk's arrays) differs, or None."""
        if other.fields.keys() != self.fields.keys():
            return f"keys {sorted(other.fields)} instead of {sorted(self.fields)}"
        for key, (shape, dtype) in self.fields.items():
            oshape, odtype = other.fields[key]
            if (oshape, odtype) != (shape, dtype):
                return f"key {key!r} has shape {oshape} dtype {odtype}, expected shape {shape} dtype {dtype}"
        return None

    @staticmethod
    def _differs(got_shape: tuple[int, ...], got_dtype: np.dtype, shape: tuple[int, ...], dtype: np.dtype) -> str:
        parts = []
        if got_shape != shape:
            parts.append(f"has shape {got_shape} but this replay stores shape {shape}")
        if got_dtype != dtype:
            parts.append(f"has dtype {got_dtype} but this replay stores dtype {dtype}")
        return " and ".join(parts)
