"""The store's side on disk: its chunk files (what is there, the next chunk number, the disk cap) and
the background thread that writes and deletes them in order."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Collection
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from learner.replay.chunk_file import NAME_RE, ChunkMeta, remove_temp_files, write_chunk
from learner.replay.index import catalogue, entry_for, write_index


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



class ChunkFiles:
    """The chunk files of one store directory, oldest first, as index entries (`entries`, by file name).
    Writes and deletions go through a `DiskWorker`; an entry written but not yet synced has size None."""

    def __init__(self, directory: Path, *, compress: bool, disk_steps: int | None) -> None:
        self.directory = directory
        self.compress = compress
        self.disk_steps = disk_steps
        directory.mkdir(parents=True, exist_ok=True)
        remove_temp_files(directory)
        entries, self.stale = catalogue(directory)  # stale: the index on disk disagrees with the files
        self.entries: dict[str, dict[str, Any]] = {e["file"]: e for e in entries}
        # Unreadable files keep their numbers too: a new chunk never takes the name of an old one.
        seqs = [int(m.group(1)) for p in directory.iterdir() if (m := NAME_RE.match(p.name))]
        self.next_seq = max(seqs, default=-1) + 1
        self._worker = DiskWorker()

    @property
    def steps(self) -> int:
        return sum(e["length"] for e in self.entries.values())

    def take_seq(self) -> int:
        """The number of a new chunk: one more than any chunk file this directory has held."""
        self.next_seq += 1
        return self.next_seq - 1

    def write(self, meta: ChunkMeta, steps: dict[str, np.ndarray], times: np.ndarray, versions: np.ndarray) -> None:
        """Write a chunk file in the background; the arrays must not change until it is written."""
        path = self.directory / meta.name
        self._worker.submit(lambda: write_chunk(path, meta, steps, times, versions, self.compress))
        self.entries[path.name] = {"file": path.name, **asdict(meta), "size": None, "mtime_ns": None}

    def cap(self, keep: Collection[str]) -> list[str]:
        """Delete the oldest chunk files beyond disk_steps, never those named in `keep` (chunks still being
        filled); returns the deleted names."""
        if self.disk_steps is None:
            return []
        total = self.steps
        deleted = []
        for name, entry in list(self.entries.items()):
            if total <= self.disk_steps:
                break
            if name in keep:
                continue
            self._worker.submit(partial((self.directory / name).unlink, missing_ok=True))  # after its write
            del self.entries[name]
            total -= entry["length"]
            deleted.append(name)
        return deleted

    def sync(self) -> None:
        """Wait until every write and deletion is done, then put the files' sizes and mtimes in the index."""
        self._worker.wait()
        for name, entry in list(self.entries.items()):
            if entry["size"] is None:
                try:
                    self.entries[name] = entry_for(self.directory / name, ChunkMeta.from_dict(entry))
                except FileNotFoundError:  # removed behind our back
                    del self.entries[name]
        self.write_index()

    def write_index(self) -> None:
        write_index(self.directory, self.entries.values())
        self.stale = False

    def close(self) -> None:
        self._worker.close()
