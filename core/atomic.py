"""Atomic file writes: a temp file in the same directory, fsync, rename over the target, fsync the
directory. A reader, or a process killed mid-write, sees the old file or the complete new one,
never a partial one. Everything Reverie keeps on disk (replay chunks, checkpoints, the robot's
spool, configs) is written this way."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (best effort: some filesystems refuse directory fsync)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp(path: Path, prefix: str | None, suffix: str) -> tuple[int, Path]:
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=prefix or f".{path.name}.", suffix=suffix)
    return fd, Path(name)


def _commit(tmp: Path, path: Path, mode: int) -> None:
    os.chmod(tmp, mode)  # mkstemp makes files private; ours are meant to be read by other tools
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write(path: Path, write: Callable[[IO[bytes]], None], *, prefix: str | None = None,
                 suffix: str = ".tmp", mode: int = 0o644) -> None:
    """`write(f)` fills a binary file object that becomes `path` atomically."""
    fd, tmp = _temp(path, prefix, suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        _commit(tmp, path, mode)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes | Iterable[bytes | memoryview], **kwargs) -> None:
    parts = [data] if isinstance(data, bytes | bytearray | memoryview) else data
    atomic_write(path, lambda f: [f.write(part) for part in parts], **kwargs)


def atomic_write_file(path: Path, write_to: Callable[[Path], None], *, prefix: str | None = None,
                      suffix: str = ".tmp", mode: int = 0o644) -> None:
    """For libraries that write by file name (safetensors): `write_to(tmp_path)`, then commit."""
    fd, tmp = _temp(path, prefix, suffix)
    os.close(fd)
    try:
        write_to(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _commit(tmp, path, mode)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
