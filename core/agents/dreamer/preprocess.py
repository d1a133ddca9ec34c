"""The one observation transform, used both when acting and when training (a port once scaled
images differently in the two places; keeping a single function rules that out).

Images (uint8, H x W x C) become float in [-0.5, 0.5]; vectors become float32 (the encoder applies
symlog); flags become float32. Which keys are images and which are vectors is decided once, from
the observation space and the config's key patterns.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from core.agents.spaces import ObsSpace
from core.layout import ACTION_KEY, FLAG_KEYS

NOT_INPUTS = (*FLAG_KEYS, ACTION_KEY)


@dataclass(frozen=True)
class ObsKeys:
    images: tuple[str, ...]
    vectors: tuple[str, ...]
    scalars: tuple[str, ...] = ()  # vector keys of rank 0, given a feature axis of 1

    @classmethod
    def select(cls, space: ObsSpace, image_pattern: str, vector_pattern: str) -> ObsKeys:
        """Images: uint8 rank-3 keys matching `image_pattern`; vectors: other float/int keys of rank <= 1."""
        images, vectors, scalars = [], [], []
        for key, (shape, dtype) in sorted(space.items()):
            if key in NOT_INPUTS or key.startswith("log/"):
                continue
            if len(shape) == 3 and dtype == "uint8" and re.fullmatch(image_pattern, key):
                images.append(key)
            elif len(shape) <= 1 and re.fullmatch(vector_pattern, key):
                vectors.append(key)
                if not shape:
                    scalars.append(key)
        if not images and not vectors:
            raise ValueError(
                f"no observation key is used: keys {sorted(space)} match neither dreamer.image_keys "
                f"{image_pattern!r} (uint8 HxWxC) nor dreamer.vector_keys {vector_pattern!r} (rank <= 1)"
            )
        return cls(tuple(images), tuple(vectors), tuple(scalars))


def preprocess(obs: Mapping[str, np.ndarray | Tensor], keys: ObsKeys, device: torch.device) -> dict[str, Tensor]:
    """Observations (any leading batch/time axes) -> model inputs on `device`."""
    out: dict[str, Tensor] = {}
    for key in keys.images:
        x = torch.as_tensor(obs[key], device=device)
        out[key] = x.float() / 255.0 - 0.5
    for key in keys.vectors:
        x = torch.as_tensor(obs[key], device=device).float()
        out[key] = x[..., None] if key in keys.scalars else x
    for key in FLAG_KEYS:
        if key in obs:
            out[key] = torch.as_tensor(obs[key], device=device).float()
    return out


def vector_widths(space: ObsSpace, keys: ObsKeys) -> dict[str, int]:
    """Flat width of each vector key (1 for scalars)."""
    return {k: math.prod(space[k][0]) for k in keys.vectors}
