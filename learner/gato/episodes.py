"""A task's recorded episodes, read offline from its replay directory, tokenised once for training.

Replay directories are read from their chunk files alone (as `reverie-replay info` reads them): chunks of
each stream in creation order, episodes from an `is_first` step to an `is_last` step. An episode whose start
was never seen, that a gap between chunks (a deleted or unreadable file) cuts, or that was abandoned (its
robot vanished) is left out: behaviour cloning learns only from whole expert episodes.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.agents.gato.tokens import Body
from core.agents.spaces import ActSpace
from core.config import Config, load_config
from core.config.gato import GatoConfig
from core.layout import ACTION_KEY, StepLayout
from learner.gato.experts import REPLAY_DIR, TASK_FILE, TASK_FORMAT
from learner.replay.chunk_file import ChunkError, is_chunk_name, read_chunk

Episode = dict[str, np.ndarray]  # key -> (T, ...): observations, action, reward and flags of one episode


def read_episodes(directory: str | Path) -> list[Episode]:
    """The complete episodes of a replay directory, oldest first (ValueError when it is not one; unreadable
    chunk files are skipped with a warning on stderr, and the episodes they cut are left out)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory}: no such replay directory")
    paths = sorted(p for p in directory.iterdir() if is_chunk_name(p.name))
    if not paths:
        raise ValueError(f"{directory}: not a replay directory (no chunk files)")
    episodes: list[Episode] = []
    current: dict[str, list[dict[str, np.ndarray]]] = {}  # per stream: the open episode's pieces
    last_uuid: dict[str, str] = {}
    for path in paths:
        try:
            meta, steps, _, _ = read_chunk(path)
        except ChunkError as exc:
            print(f"gato: warning: skipping chunk file {path}: {exc}", file=sys.stderr)
            continue
        if last_uuid.get(meta.stream, "") != meta.prev:
            current.pop(meta.stream, None)  # a gap: the open episode is cut
        last_uuid[meta.stream] = meta.uuid
        first, last = steps["is_first"].reshape(-1), steps["is_last"].reshape(-1)
        begin = 0
        for i in np.flatnonzero(first | last):
            if first[i]:
                if i > begin and meta.stream in current:
                    current.pop(meta.stream)  # a new episode before the last one ended
                current[meta.stream], begin = [], int(i)
            if last[i]:
                pieces = current.pop(meta.stream, None)
                if pieces is not None and int(i) not in meta.abandoned:
                    pieces.append({k: v[begin: i + 1] for k, v in steps.items()})
                    episodes.append({k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]})
                begin = int(i) + 1
        if meta.stream in current and begin < meta.length:
            current[meta.stream].append({k: v[begin:] for k, v in steps.items()})
    return episodes


@dataclass
class TaskData:
    """One task's episodes as a body's tokens: what the sampler draws from and the evaluation prompts with."""

    name: str
    body: Body
    space: StepLayout  # the observation space of its steps (the flags included): a blob's obs_space
    episodes: list[Episode]
    tokens: list[tuple[np.ndarray, np.ndarray]]  # per episode: (tokens (T, S), patches (T, P, p, p, 3))
    returns: np.ndarray
    config: Config | None = None  # the config the episodes were recorded with (evaluation builds its env)
    info: dict[str, Any] | None = None  # task.json

    @classmethod
    def from_episodes(cls, name: str, episodes: list[Episode], act: ActSpace, gato: GatoConfig,
                      config: Config | None = None, info: dict[str, Any] | None = None) -> TaskData:
        if not episodes:
            raise ValueError(f"task {name!r}: no complete episode to learn from")
        space = StepLayout.from_rows({k: v for k, v in episodes[0].items() if k != ACTION_KEY})
        body = Body.of(space, act, gato)
        tokens = [body.tokenise({k: e[k] for k in body.inputs}, e[ACTION_KEY]) for e in episodes]
        returns = np.asarray([float(e["reward"].sum()) for e in episodes])
        return cls(name, body, space, episodes, tokens, returns, config, info)

    @classmethod
    def load(cls, directory: str | Path, gato: GatoConfig) -> TaskData:
        """A task directory written by `gato data` (task.json, the resolved config and replay/)."""
        directory = Path(directory)
        try:
            info = json.loads((directory / TASK_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{directory}: not a gato task directory ({TASK_FILE}: {exc}); record one with "
                             "`reverie-learner gato data`") from exc
        if not isinstance(info, dict) or info.get("format") != TASK_FORMAT:
            raise ValueError(f"{directory / TASK_FILE}: not a {TASK_FORMAT} file")
        try:
            act = ActSpace(int(info["act_space"]["dim"]), bool(info["act_space"]["discrete"]))
            config = load_config(directory / str(info["config"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{directory / TASK_FILE}: {exc}") from exc
        episodes = read_episodes(directory / REPLAY_DIR)
        return cls.from_episodes(str(info["name"]), episodes, act, gato, config, info)

    def best_episode(self) -> Episode:
        """The prompt at evaluation and in exported policies: the highest-return episode (the first of ties)."""
        return self.episodes[int(np.argmax(self.returns))]
