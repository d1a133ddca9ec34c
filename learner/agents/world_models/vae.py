"""V: the convolutional VAE, its decoder and its loss with the KL tolerance ("free bits").

The reference loss: squared error summed over pixels, plus max(KL, kl_tolerance x z) per frame (a KL under
the tolerance costs a constant and passes no gradient, so V does not squeeze z below 0.5 nat a dimension),
both averaged over frames.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from core.agents.world_models.vision import Encoder, feature_size

DECONVS = ((4, 5), (2, 5), (1, 6))  # (channel multiplier of depth, kernel), then 3 channels with kernel 6


class Decoder(nn.Module):
    """z -> dense -> (features, 1, 1) -> four stride-2 deconvs (1 -> 5 -> 13 -> 30 -> 64) -> sigmoid."""

    def __init__(self, z: int, depth: int) -> None:
        super().__init__()
        self.width = feature_size(depth)
        self.dense = nn.Linear(z, self.width)
        channels = [self.width, *(depth * m for m, _ in DECONVS), 3]
        kernels = [k for _, k in DECONVS] + [6]
        self.deconvs = nn.ModuleList(nn.ConvTranspose2d(a, b, k, 2) for a, b, k in zip(channels, channels[1:], kernels))

    def forward(self, z: Tensor) -> Tensor:
        x = self.dense(z).reshape(-1, self.width, 1, 1)
        for i, deconv in enumerate(self.deconvs):
            x = deconv(x)
            x = torch.sigmoid(x) if i == len(self.deconvs) - 1 else F.relu(x)
        return x


class VAE(nn.Module):
    """V: the acting encoder and the decoder that only training (and dream videos) needs."""

    def __init__(self, z: int, depth: int) -> None:
        super().__init__()
        self.encoder = Encoder(z, depth)
        self.decoder = Decoder(z, depth)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Reconstruction, mean and log-variance of frames (N, 3, 64, 64) in [0, 1] (z sampled)."""
        mean, logvar = self.encoder(x)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device)
        return self.decoder(mean + torch.exp(0.5 * logvar) * eps), mean, logvar


def kl_divergence(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over z: (N,)."""
    return -0.5 * (1.0 + logvar - mean.square() - logvar.exp()).sum(-1)


def vae_loss(x: Tensor, recon: Tensor, mean: Tensor, logvar: Tensor, kl_tolerance: float) -> tuple[Tensor, dict]:
    """The reference VAE loss and its parts (metrics)."""
    rec = (recon - x).square().flatten(1).sum(-1).mean()
    kl = kl_divergence(mean, logvar)
    kl_term = kl.clamp(min=kl_tolerance * mean.shape[-1]).mean()
    return rec + kl_term, {"v/loss": rec + kl_term, "v/reconstruction": rec, "v/kl": kl.mean(), "v/kl_term": kl_term}
