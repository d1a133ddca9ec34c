"""What the Dreamer tests share: the flag entries of an observation space and a tiny config."""

from __future__ import annotations

from learner.config_agent import DreamerConfig

FLAG_SPACE = {
    "reward": ((), "float32"),
    "is_first": ((), "bool"),
    "is_last": ((), "bool"),
    "is_terminal": ((), "bool"),
}


def make_cfg(recipe: str = "2024", **over) -> DreamerConfig:
    return DreamerConfig.model_validate({"size": "tiny", "device": "cpu", "recipe": recipe, "imag_horizon": 3, **over})
