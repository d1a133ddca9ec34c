"""What the Dreamer tests share: the flag entries of an observation space and a tiny config."""

from __future__ import annotations

import torch
from torch import nn

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
