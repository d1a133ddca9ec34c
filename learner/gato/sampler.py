"""Training sequences for Gato: windows of expert episodes of several tasks in one batch, some prompted.

Each sequence is one task's (tasks drawn uniformly, so a small dataset is not drowned by a large one): a
window of consecutive steps of one episode, as many as fit in the context. With probability
`prompt_fraction` a demonstration from another episode of the same task is prepended, up to
`prompt_tokens` of whole steps: half of the time the demonstration's last steps (its end: where the task
is done), otherwise a window from anywhere in it.
"""

from __future__ import annotations

import numpy as np
import torch

from core.agents.gato.model import Packed, Segment, pack
from core.config.gato import GatoConfig
from learner.gato.episodes import TaskData


class Sampler:
    """Draws padded batches of sequences (`Packed`) from the tasks' tokenised episodes."""

    def __init__(self, tasks: list[TaskData], cfg: GatoConfig, rng: np.random.Generator) -> None:
        if not tasks:
            raise ValueError("gato: no task to train on")
        for task in tasks:
            if task.body.step_len > cfg.context:
                raise ValueError(f"task {task.name!r}: a step of {task.body.step_len} tokens does not fit in "
                                 f"gato.context ({cfg.context})")
        self.tasks, self.cfg, self.rng = tasks, cfg, rng

    def sequence(self, task: TaskData) -> list[Segment]:
        """One training sequence of `task`: an optional prompt, then a window of one episode."""
        cfg, rng, body = self.cfg, self.rng, task.body
        size = body.step_len
        index = int(rng.integers(len(task.tokens)))
        segments: list[Segment] = []
        budget = cfg.context
        if cfg.prompt_tokens >= size and rng.random() < cfg.prompt_fraction:
            others = [i for i in range(len(task.tokens)) if i != index] or [index]
            tokens, patches = task.tokens[others[int(rng.integers(len(others)))]]
            steps = min(len(tokens), cfg.prompt_tokens // size)
            from_end = rng.random() < cfg.prompt_end_fraction
            start = len(tokens) - steps if from_end else int(rng.integers(len(tokens) - steps + 1))
            segments.append((body, tokens[start:start + steps], patches[start:start + steps]))
            budget -= steps * size
        tokens, patches = task.tokens[index]
        steps = min(len(tokens), budget // size)
        start = int(rng.integers(len(tokens) - steps + 1))
        segments.append((body, tokens[start:start + steps], patches[start:start + steps]))
        return segments

    def batch(self, size: int, device: torch.device | str = "cpu") -> Packed:
        rows = [self.sequence(self.tasks[int(self.rng.integers(len(self.tasks)))]) for _ in range(size)]
        return pack(rows, device)
