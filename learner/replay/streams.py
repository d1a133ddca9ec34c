"""What a store knows of each stream, whether its steps are in RAM, on disk or gone: its episodes, step
and refusal counts, its task, its newest chunk, and its robot's position (what makes ingest exactly
once: a restarted learner asks the robot for nothing before it)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from learner.replay.chunk_file import ChunkMeta, Source


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



class Streams:
    """Per-stream bookkeeping of a store (plain dicts by stream name, read and written by `Replay`)."""

    def __init__(self) -> None:
        self.trackers: dict[str, EpisodeTracker] = {}
        self.steps: dict[str, int] = {}  # loaded at open plus added since
        self.tasks: dict[str, str] = {}
        self.last_uuid: dict[str, str] = {}  # uuid of the stream's newest chunk (in RAM or not)
        self.source: dict[str, Source] = {}  # newest recorded robot position
        self.force_first: set[str] = set()  # streams whose next step must start an episode
        self.refused: dict[str, int] = {}  # steps refused for holding NaN or inf

    def tracker(self, stream: str, task: str) -> EpisodeTracker:
        """The stream's episode tracker (registering the stream, and its task as the current one)."""
        self.tasks[stream] = task
        self.steps.setdefault(stream, 0)
        return self.trackers.setdefault(stream, EpisodeTracker())

    def seen(self, stream: str) -> int:
        """Steps of the stream this store was given: stored plus refused."""
        return self.steps.get(stream, 0) + self.refused.get(stream, 0)

    def note_newest(self, meta: ChunkMeta) -> None:
        """Take a stream's robot position and abandoned state from its chunks, oldest first."""
        if meta.source is not None:
            self.source[meta.stream] = meta.source
        if meta.length:
            if meta.length - 1 in meta.abandoned:
                self.force_first.add(meta.stream)
            else:
                self.force_first.discard(meta.stream)

    def stats(self, in_ram: dict[str, int]) -> dict[str, dict[str, Any]]:
        """Per stream: task, steps, completed episodes and their returns, abandoned episodes, steps in RAM,
        robot source position, refused steps."""
        return {
            s: {
                "task": self.tasks[s],
                "steps": self.steps[s],
                "episodes": len(t.returns),
                "returns": list(t.returns),
                "abandoned": t.abandoned,
                "ram_steps": in_ram.get(s, 0),
                "source": list(self.source[s]) if s in self.source else None,
                "refused_steps": self.refused.get(s, 0),
            }
            for s, t in self.trackers.items()
        }
