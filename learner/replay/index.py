"""`index.json`: every chunk file's metadata in one file, so that opening a large store does not read
every file. It is only a cache: files that are new, changed (size or mtime) or missing from it are
reconciled by reading the files themselves.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from learner.replay.chunk_file import FORMAT, ChunkError, ChunkMeta, atomic_write, is_chunk_name, read_meta

INDEX_NAME = "index.json"


def write_index(directory: Path, entries: Iterable[dict[str, Any]]) -> None:
    """Replace the index with `entries` atomically (a reader sees the old one or the new one)."""
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
        entries.append(entry_for(path, meta, st))
    if index is not None and set(index) - set(names):
        changed = True
    entries.sort(key=lambda e: (e["seq"], e["file"]))
    return entries, changed


def entry_for(path: Path, meta: ChunkMeta, st: os.stat_result | None = None) -> dict[str, Any]:
    """A file's index entry: its metadata plus the size and mtime that tell whether it changed since."""
    st = path.stat() if st is None else st
    return {"file": path.name, **asdict(meta), "size": st.st_size, "mtime_ns": st.st_mtime_ns}

