"""A replay directory opened read-only for the offline tools: its readable chunk files by stream, the
streams' descriptions, and its episodes (with where their rows lie), from the chunk files alone.

Nothing here writes (not even the index), so it is safe on a directory a learner is using. A chunk file
that cannot be used (half-written, truncated, corrupt: every member's CRC-32 is checked) is skipped and
named in `problems`; a directory that is not a replay, or holds no usable chunk, raises `ReplayDirError`
with a message that says which and where.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.layout import ACTION_KEY, FLAG_KEYS, StepLayout
from learner.replay.chunk_file import (
    TIME,
    TMP_SUFFIX,
    VERSION,
    ChunkError,
    ChunkMeta,
    is_chunk_name,
    read_chunk,
    read_meta,
    verify_crc,
)
from learner.replay.describe import read_descriptions
from learner.replay.index import INDEX_NAME

FLAG_COLUMNS = (*FLAG_KEYS, TIME, VERSION)


class ReplayDirError(Exception):
    """A directory the offline tools cannot read as a replay, with the reason."""


@dataclass
class Span:
    """Rows lo..hi-1 of one chunk file."""

    path: Path
    lo: int
    hi: int


@dataclass
class Episode:
    """One episode of a stream as recorded: its rows (possibly across chunk files) and what they say.

    `end` is "terminal" (the task ended it), "time limit" (is_last without is_terminal), "abandoned" (its
    robot vanished: the learner cut it), or "open" (the data ends before it does). `started` is False when
    the data begins mid-episode (the stream's first rows, or after a gap of deleted/unreadable chunks)."""

    stream: str
    index: int  # position among the stream's episodes, from 0
    task: str
    length: int = 0
    ret: float = 0.0
    started: bool = True
    end: str = "open"
    start_time: float | None = None
    end_time: float | None = None
    versions: tuple[int, int] = (0, 0)  # (min, max) policy-weights version that acted
    last_reward: float = 0.0
    success: bool | None = None
    spans: list[Span] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.started and self.end in ("terminal", "time limit")

    @property
    def key(self) -> str:
        """How the tools name an episode: `stream:index`."""
        return f"{self.stream}:{self.index}"

    def row(self) -> dict[str, Any]:
        return {"stream": self.stream, "episode": self.index, "task": self.task, "length": self.length,
                "return": self.ret, "success": self.success, "complete": self.complete, "started": self.started,
                "end": self.end, "abandoned": self.end == "abandoned", "start_time": self.start_time,
                "end_time": self.end_time, "policy_versions": list(self.versions)}


def success_of(rule: dict[str, Any] | None, episode: Episode, terminal: bool) -> bool | None:
    """Whether a complete episode succeeded under the stream's success rule (None: no rule, or incomplete)."""
    if not rule or not episode.complete:
        return None
    if rule.get("kind") == "terminal":
        return bool(terminal)
    if rule.get("kind") == "last_reward_above":
        return bool(episode.last_reward > float(rule["threshold"]))
    return None


class ReplayDir:
    """A replay directory, read-only (see the module docstring)."""

    def __init__(self, directory: str | Path, verify: bool = True) -> None:
        self.directory = Path(directory)
        d = self.directory
        if not d.exists():
            raise ReplayDirError(f"{d}: no such directory")
        if not d.is_dir():
            raise ReplayDirError(f"{d}: not a directory")
        try:
            names = sorted(p.name for p in d.iterdir())
        except OSError as exc:
            raise ReplayDirError(f"{d}: cannot list it ({exc.strerror})") from None
        chunk_names = [n for n in names if is_chunk_name(n)]
        if INDEX_NAME not in names and not chunk_names:
            hint = f"; its replay store is {d / 'replay'}" if (d / "replay").is_dir() else ""
            raise ReplayDirError(f"{d}: not a replay directory (no {INDEX_NAME} and no chunk files){hint}")
        self.problems: dict[str, str] = {}
        for name in names:
            if name.startswith(".") and name.endswith(TMP_SUFFIX):
                self.problems[name] = "a temp file a writer killed mid-write left behind (ignored)"
        self.chunks: list[tuple[Path, ChunkMeta]] = []
        for name in chunk_names:  # names sort by creation order
            path = d / name
            try:
                if verify:
                    verify_crc(path)
                self.chunks.append((path, read_meta(path)))
            except ChunkError as exc:
                self.problems[name] = str(exc).removeprefix(f"{name}: ")
        if not self.chunks:
            why = "" if not chunk_names else f"; unreadable: {self.problem_text()}"
            raise ReplayDirError(f"{d}: the replay is empty (no readable chunk files{why})")
        self.descriptions = read_descriptions(d)
        self._layout: StepLayout | None = None
        self._episodes: list[Episode] | None = None

    def problem_text(self) -> str:
        return "; ".join(f"{name} ({why})" for name, why in self.problems.items())

    def warnings(self) -> list[str]:
        """One line per skipped file, for stderr."""
        return [f"warning: skipping {self.directory / name}: {why}" for name, why in self.problems.items()]

    @property
    def streams(self) -> list[str]:
        return list(dict.fromkeys(meta.stream for _, meta in self.chunks))

    def by_stream(self) -> dict[str, list[tuple[Path, ChunkMeta]]]:
        out: dict[str, list[tuple[Path, ChunkMeta]]] = {}
        for path, meta in self.chunks:
            out.setdefault(meta.stream, []).append((path, meta))
        return out

    @property
    def layout(self) -> StepLayout:
        """The step layout of the first readable non-empty chunk (every chunk of a store shares it)."""
        if self._layout is None:
            for path, meta in self.chunks:
                if meta.length:
                    _, steps, _, _ = self.read(path)
                    self._layout = StepLayout.from_rows(steps)
                    break
            else:
                raise ReplayDirError(f"{self.directory}: the replay is empty (its chunk files hold no steps)")
        return self._layout

    def observation_keys(self) -> list[str]:
        return [k for k in self.layout if k not in FLAG_KEYS and k != ACTION_KEY]

    def image_keys(self) -> list[str]:
        return [k for k, f in self.layout.items() if len(f.shape) == 3 and f.dtype == np.uint8 and k != ACTION_KEY]

    def discrete_actions(self) -> bool:
        """Whether actions are one-hot choices: from the streams' descriptions, else (a replay written before
        they existed) whether every stored action of its first chunks is one-hot."""
        for desc in self.descriptions.values():
            if "discrete" in desc.get("action", {}):
                return bool(desc["action"]["discrete"])
        for path, meta in self.chunks[:4]:
            if meta.length:
                a = self.read(path, [ACTION_KEY])[1][ACTION_KEY]
                return bool(np.all((a == 0) | (a == 1)) and np.all(a.sum(-1) == 1))
        return False

    def read(self, path: Path, keys: Iterable[str] | None = None) -> tuple[ChunkMeta, dict, np.ndarray, np.ndarray]:
        try:
            return read_chunk(path, keys)
        except ChunkError as exc:
            raise ReplayDirError(f"{path}: {str(exc).removeprefix(path.name + ': ')}") from None

    # --- episodes ---------------------------------------------------------------------------------------

    def episodes(self) -> list[Episode]:
        """Every episode of every stream, streams in order of first appearance, each stream's in order."""
        if self._episodes is None:
            self._episodes = [ep for stream, chunks in self.by_stream().items() for ep in self._scan(stream, chunks)]
        return self._episodes

    def _scan(self, stream: str, chunks: list[tuple[Path, ChunkMeta]]) -> Iterator[Episode]:
        rule = (self.descriptions.get(stream) or {}).get("success")
        current: Episode | None = None
        count, prev_uuid = 0, None
        for path, meta in chunks:
            if prev_uuid is not None and meta.prev != prev_uuid and current is not None:
                current.end = "open"  # a gap: the episode's rest is gone
                yield current
                current = None
            prev_uuid = meta.uuid
            if not meta.length:
                continue
            _, s, times, versions = self.read(path, FLAG_KEYS)
            first, last, terminal = s["is_first"], s["is_last"], s["is_terminal"]
            reward = np.asarray(s["reward"], np.float64)
            row = 0
            while row < meta.length:
                if first[row] and current is not None:
                    current.end = "open"  # cut by a new episode without an end
                    yield current
                    current = None
                if current is None:
                    current = Episode(stream, count, meta.task, started=bool(first[row]))
                    count += 1
                ends = np.flatnonzero(last[row:])
                firsts = np.flatnonzero(first[row + 1:])
                stop = meta.length if not len(ends) else row + int(ends[0]) + 1
                if len(firsts):
                    stop = min(stop, row + 1 + int(firsts[0]))
                self._grow(current, path, row, stop, reward, times, versions)
                if last[stop - 1]:
                    current.end = ("abandoned" if stop - 1 in meta.abandoned
                                   else "terminal" if terminal[stop - 1] else "time limit")
                    current.success = success_of(rule, current, bool(terminal[stop - 1]))
                    yield current
                    current = None
                row = stop
        if current is not None:
            yield current

    @staticmethod
    def _grow(ep: Episode, path: Path, lo: int, hi: int, reward: np.ndarray, times: np.ndarray,
              versions: np.ndarray) -> None:
        ep.spans.append(Span(path, lo, hi))
        ep.length += hi - lo
        ep.ret += float(reward[lo:hi].sum())
        ep.last_reward = float(reward[hi - 1])
        if ep.start_time is None:
            ep.start_time = float(times[lo])
            ep.versions = (int(versions[lo:hi].min()), int(versions[lo:hi].max()))
        ep.end_time = float(times[hi - 1])
        ep.versions = (min(ep.versions[0], int(versions[lo:hi].min())), max(ep.versions[1], int(versions[lo:hi].max())))

    def steps(self, episode: Episode, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """An episode's arrays (all step keys unless `keys`), plus `__time__` and `__version__`."""
        parts: list[dict[str, np.ndarray]] = []
        wanted = None if keys is None else list(keys)
        for span in episode.spans:
            _, s, times, versions = self.read(span.path, wanted)
            parts.append({**{k: v[span.lo:span.hi] for k, v in s.items()},
                          TIME: times[span.lo:span.hi], VERSION: versions[span.lo:span.hi]})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
