"""Open-loop prediction videos: the agent's model sees 5 real frames of replayed sequences, then imagines
the rest from the recorded actions alone (`Agent.openloop`). Written as truth / prediction / error videos."""

from __future__ import annotations

from pathlib import Path

from core.agents import Agent
from core.video import openloop_grid, write_video
from learner.replay import Replay

CONTEXT = 5
LENGTH = 50  # 5 seen, 45 imagined


def write_openloop(agent: Agent, replay: Replay, path: Path, fps: float, sequences: int = 4) -> Path:
    batch = replay.sample(sequences, min(LENGTH, len(replay)))
    truth, pred = agent.openloop(batch, CONTEXT)
    write_video(path, openloop_grid(truth, pred, CONTEXT), fps=fps)
    return path
