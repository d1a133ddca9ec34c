"""What the Dreamer tests share: the flag entries of an observation space and a tiny config."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from core.agents.spaces import ActSpace
from core.config.agent import DreamerConfig

FLAG_SPACE = {
    "reward": ((), "float32"),
    "is_first": ((), "bool"),
    "is_last": ((), "bool"),
    "is_terminal": ((), "bool"),
}


def make_cfg(recipe: str = "2024", **over) -> DreamerConfig:
    return DreamerConfig.model_validate({"size": "tiny", "device": "cpu", "recipe": recipe, "imag_horizon": 3, **over})


@torch.no_grad()
def randomise_biases(module: nn.Module, seed: int = 0) -> None:
    """Give every bias a non-zero value, as training does: at init they are all zero, which would
    hide a fast path that forgets one."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if name.endswith("bias"):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def make_batch(space: dict, act: ActSpace, b: int, t: int, seed: int = 0) -> dict:
    """A replay-like batch (B, T, ...): random observations and actions, each row one episode's start."""
    rng = np.random.default_rng(seed)
    batch: dict[str, np.ndarray] = {}
    for key, (shape, dtype) in space.items():
        if key in FLAG_SPACE:
            continue
        if dtype == "uint8":
            batch[key] = rng.integers(0, 256, (b, t, *shape), dtype=np.uint8)
        else:
            batch[key] = rng.normal(size=(b, t, *shape)).astype(np.float32)
    batch["reward"] = rng.normal(size=(b, t)).astype(np.float32)
    batch["is_first"] = np.zeros((b, t), bool)
    batch["is_first"][:, 0] = True
    batch["is_last"] = np.zeros((b, t), bool)
    batch["is_terminal"] = np.zeros((b, t), bool)
    if act.discrete:
        batch["action"] = np.eye(act.dim, dtype=np.float32)[rng.integers(0, act.dim, (b, t))]
    else:
        batch["action"] = rng.uniform(-1, 1, (b, t, act.dim)).astype(np.float32)
    return batch
