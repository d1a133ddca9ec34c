"""The chunk file format: one stream's consecutive steps plus their metadata, written atomically as `.npz`.

A chunk file holds every step key as an array of `length` rows and three reserved members:
`__meta__` (a JSON string: format, uuid, prev, stream, task, seq, length, and the optional source and
abandoned of `ChunkMeta`; files written before those existed still load), `__time__` (float64
wall-clock seconds per step) and `__version__` (int64 policy-weights version per step). No pickle:
strings live in the JSON member, which numpy stores as a fixed-width unicode array.

Files are named `{seq:010d}-{stream slug}-{uuid}.npz`; `seq` counts chunks in creation order within
one directory, so "oldest" is simply the smallest number (`index.py` caches their metadata).
"""

from __future__ import annotations

import json
import re
import uuid as uuidlib
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from core import atomic

FORMAT = 1
META, TIME, VERSION = "__meta__", "__time__", "__version__"
RESERVED = (META, TIME, VERSION)
TMP_SUFFIX = ".tmp"
NAME_RE = re.compile(r"^(\d{10})-([A-Za-z0-9_.]*)-([0-9a-f]{32})\.npz$")
Source = tuple[int, int, int]  # (robot chunk seq, row in that robot chunk, rows of that robot chunk)
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
    # Where the newest robot-fed row of this chunk sits in the robot's own numbering. Lets a restarted
    # learner drop resent data.
    source: Source | None = None
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


def _source(value: Any) -> Source | None:
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
