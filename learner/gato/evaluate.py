"""Gato's evaluation (each task's return beside its scripted expert's) and the policy blob of one task.

The score of a task is Gato's expert-normalised return, (return - random) / (expert - random): 1 is the
scripted expert, 0 the uniform random policy (ArmReach's returns are negative distances, so a plain ratio
of returns would mean nothing). At evaluation the model is prompted with one successful episode of the
task (its highest-return recorded episode), as an exported policy is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.agents.gato.model import GatoNet
from core.agents.gato.policy import Policy, policy_weights
from core.config.gato import GatoConfig
from core.weights import save_weights
from learner.envs import Env
from learner.gato.episodes import TaskData
from learner.gato.experts import run_episode

EVAL_SEED_OFFSET = 2_000_000  # evaluation starts from states neither the expert's nor the random policy's episodes saw


def score(value: float, expert: float, random: float | None) -> float | None:
    """(value - random) / (expert - random); None without a random baseline or when expert = random."""
    if random is None or abs(expert - random) < 1e-9:
        return None
    return (value - random) / (expert - random)


def evaluate(net: GatoNet, cfg: GatoConfig, task: TaskData, episodes: int, mode: str = "mode",
             seed: int | None = None, prompt_from: TaskData | None = None) -> dict[str, Any]:
    """`episodes` episodes of `task` in its environment: return, success and score beside the expert's.
    `prompt_from`: prompt with another task's best episode instead (that task must share this body)."""
    if task.config is None:
        raise ValueError(f"task {task.name!r} has no config to build its environment from")
    source = prompt_from or task
    if source.body != task.body:
        raise ValueError(f"task {source.name!r} has another body than {task.name!r}: it cannot prompt it")
    policy = Policy(cfg, task.space, task.body.act, net, next(net.parameters()).device, 0, source.best_episode())
    base = task.config.seed + EVAL_SEED_OFFSET if seed is None else seed
    env = Env(task.config, seed=base)
    net.eval()
    try:
        with torch.inference_mode():
            results = [run_episode(env, lambda obs: _act(policy, obs, mode)) for _ in range(episodes)]
    finally:
        env.close()
        net.train()
    returns = [r for r, _ in results]
    success = [s for _, s in results if s is not None]
    info = task.info or {}
    expert = float(info.get("expert_return", task.returns.mean()))
    random = info.get("random_return")
    mean = float(np.mean(returns))
    return {"task": task.name, "return": mean, "returns": returns, "expert_return": expert, "random_return": random,
            "score": score(mean, expert, random), "success": float(np.mean(success)) if success else None,
            "prompt": source.name}


def _act(policy: Policy, obs: dict[str, Any], mode: str) -> np.ndarray:
    policy.act(obs, mode=mode)
    return policy.last_action[0]


def export(net: GatoNet, cfg: GatoConfig, task: TaskData, path: str | Path, version: int) -> Path:
    """Write `task`'s policy blob: the whole network, prompted with the task's best episode."""
    tensors, meta = policy_weights(net, cfg, task.space, task.body.act, version, task.best_episode())
    return save_weights(path, tensors, meta)

