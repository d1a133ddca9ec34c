"""V's encoder: a frame to the mean and log-variance of its latent z, and the one frame transform that
acting and training share.

The reference VAE: four 4x4 stride-2 convs (depth x 1, 2, 4, 8 channels, ReLU) from a 64 x 64 frame to
2 x 2 x 8 depth features, then dense mean and log-variance of z. Frames of another size are resized to
64 x 64 first (the reference crops and resizes its car-racing frames the same way).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from core.config.world_models import IMAGE_SIZE

MULTS = (1, 2, 4, 8)
KERNEL, STRIDE = 4, 2


def feature_size(depth: int) -> int:
    """Flattened conv features of a 64 x 64 frame: 64 -> 31 -> 14 -> 6 -> 2 pixels a side."""
    side = IMAGE_SIZE
    for _ in MULTS:
        side = (side - KERNEL) // STRIDE + 1
    return side * side * depth * MULTS[-1]


def frames(images: np.ndarray | Tensor, device: torch.device | str = "cpu") -> Tensor:
    """uint8 (..., H, W, 3) -> float (N, 3, 64, 64) in [0, 1], the leading axes flattened."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, Tensor) else images, device=device)
    lead = x.shape[:-3]
    x = x.reshape(-1, *x.shape[-3:]).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")
    return x.reshape(*lead, 3, IMAGE_SIZE, IMAGE_SIZE) if lead else x[0]


class Encoder(nn.Module):
    """V's encoder: frames (N, 3, 64, 64) in [0, 1] -> (mean, log-variance) of z, each (N, z)."""

    def __init__(self, z: int, depth: int) -> None:
        super().__init__()
        channels = [3, *(depth * m for m in MULTS)]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, KERNEL, STRIDE) for a, b in zip(channels, channels[1:]))
        self.mean = nn.Linear(feature_size(depth), z)
        self.logvar = nn.Linear(feature_size(depth), z)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        for conv in self.convs:
            x = F.relu(conv(x))
        x = x.flatten(1)
        return self.mean(x), self.logvar(x)
