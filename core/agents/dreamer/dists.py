"""Distributions of DreamerV3, always evaluated in float32 (mixed precision never reaches them)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def symlog(x: Tensor) -> Tensor:
    return torch.sign(x) * torch.log1p(torch.abs(x))


def symexp(x: Tensor) -> Tensor:
    # Written per side so the slope at 0 is 1 (sign(x) * expm1(|x|) has zero gradient there).
    return torch.where(x >= 0, torch.expm1(x.clamp(min=0)), -torch.expm1((-x).clamp(min=0)))


def make_bins(kind: str, num: int, limit: float) -> Tensor:
    """Bin positions. symexp: in raw space (2024); symlog: evenly spaced in symlog space (2023).

    Built from one half and mirrored, so the set is exactly symmetric around 0.
    """
    half = torch.linspace(-limit, 0.0, (num + 1) // 2, dtype=torch.float64)
    if kind == "symexp":
        half = symexp(half)
    upper = -half.flip(0)
    bins = torch.cat([half, upper[1:]] if num % 2 else [half, upper])
    return bins.float()


class TwoHot:
    """Categorical over fixed bins whose mean is a real number (reward and critic heads).

    `kind` symexp: bins and target in raw space; symlog: bins in symlog space, target symlog'd.
    """

    def __init__(self, logits: Tensor, bins: Tensor, kind: str) -> None:
        self.logits = logits.float()
        self.bins = bins
        self.kind = kind

    def mean(self) -> Tensor:
        probs = torch.softmax(self.logits, -1)
        n = self.bins.shape[0]
        half = n // 2
        # Sum the two halves in mirrored order so a symmetric distribution decodes to exactly 0.
        lo = (probs[..., :half] * self.bins[:half]).flip(-1).sum(-1)
        hi = (probs[..., n - half:] * self.bins[n - half:]).sum(-1)
        mid = probs[..., half] * self.bins[half] if n % 2 else 0.0
        value = lo + hi + mid
        return symexp(value) if self.kind == "symlog" else value

    def log_prob(self, target: Tensor) -> Tensor:
        target = target.float()
        if self.kind == "symlog":
            target = symlog(target)
        # sum(twohot(target) * log_softmax(logits)) read at the two non-zero bins: the same sum
        # without two (..., bins) one-hot tensors per call (the critic's targets: 16k rows x 255).
        below, above, w_below, w_above = twohot_parts(target, self.bins)
        logp = torch.log_softmax(self.logits, -1)
        return (w_below * logp.gather(-1, below[..., None]).squeeze(-1)
                + w_above * logp.gather(-1, above[..., None]).squeeze(-1))


def twohot_parts(x: Tensor, bins: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(index below, index above, weight below, weight above) of `x`'s two-hot encoding over `bins`."""
    n = bins.shape[0]
    x = x.clamp(bins[0], bins[-1])
    below = (torch.searchsorted(bins, x.contiguous(), right=True) - 1).clamp(0, n - 1)
    above = (below + 1).clamp(0, n - 1)
    lo, hi = bins[below], bins[above]
    span = hi - lo
    w_above = torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1.0), torch.zeros_like(x))
    return below, above, 1.0 - w_above, w_above


def twohot(x: Tensor, bins: Tensor) -> Tensor:
    """Two-hot encoding of `x` over `bins`; values beyond the ends go wholly to the end bins."""
    below, above, w_below, w_above = twohot_parts(x, bins)
    n = bins.shape[0]
    return F.one_hot(below, n) * w_below[..., None] + F.one_hot(above, n) * w_above[..., None]


def unimix_logits(logits: Tensor, unimix: float) -> Tensor:
    """Log-probabilities of softmax(logits) mixed with `unimix` of the uniform distribution."""
    logits = logits.float()
    if unimix <= 0:
        return torch.log_softmax(logits, -1)
    probs = torch.softmax(logits, -1)
    probs = (1.0 - unimix) * probs + unimix / logits.shape[-1]
    return torch.log(probs)


def onehot_noise(shape: torch.Size | tuple[int, ...], device: torch.device | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
    """The uniforms `sample_onehot` draws for log-probabilities of `shape`: one per categorical."""
    return torch.rand(tuple(shape[:-1]) + (1,), generator=generator, device=device)


def sample_onehot(logp: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
    """One-hot sample with straight-through gradients (gradient of the probabilities).

    `noise`: the uniforms (`onehot_noise`) drawn beforehand; a compiled step takes them as an input,
    so that it samples exactly what the eager step samples from the same generator state.
    """
    probs = logp.exp()
    # Inverse-CDF sampling: one uniform per categorical and a comparison, several times cheaper on
    # CPU than torch.multinomial for the thousands of small categoricals of an imagination step.
    cdf = probs.detach().cumsum(-1)
    u = onehot_noise(probs.shape, probs.device, generator) if noise is None else noise
    idx = (cdf <= u.to(cdf.dtype) * cdf[..., -1:]).sum(-1).clamp(max=probs.shape[-1] - 1)
    onehot = F.one_hot(idx, probs.shape[-1]).to(probs.dtype)
    return onehot + (probs - probs.detach())  # exactly one-hot in value, gradient of probs


def categorical_kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) over the last axis, from log-probabilities."""
    return (logp.exp() * (logp - logq)).sum(-1)


def categorical_entropy(logp: Tensor) -> Tensor:
    return -(logp.exp() * logp).sum(-1)


class BoundedNormal:
    """Continuous actions: mean tanh(m), std in [0.1, 1] via a sigmoid; sampling does not clip."""

    MIN_STD, MAX_STD = 0.1, 1.0

    def __init__(self, out: Tensor) -> None:
        out = out.float()
        mean, std = out.chunk(2, -1)
        self.mean = torch.tanh(mean)
        self.std = (self.MAX_STD - self.MIN_STD) * torch.sigmoid(std + 2.0) + self.MIN_STD

    @staticmethod
    def noise(shape: torch.Size | tuple[int, ...], device: torch.device | None = None,
              generator: torch.Generator | None = None) -> Tensor:
        """The unit normals `rsample` draws for raw outputs of `shape` (mean and std halves)."""
        return torch.randn(tuple(shape[:-1]) + (shape[-1] // 2,), generator=generator, device=device)

    def rsample(self, generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        if noise is None:
            noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device)
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        return self.mean

    def log_prob(self, x: Tensor) -> Tensor:
        z = (x.float() - self.mean) / self.std
        return (-0.5 * z.square() - torch.log(self.std) - 0.5 * torch.log(torch.tensor(2 * torch.pi))).sum(-1)

    def entropy(self) -> Tensor:
        return (0.5 + 0.5 * torch.log(torch.tensor(2 * torch.pi)) + torch.log(self.std)).sum(-1)


class TanhNormal:
    """Dreamer v1's continuous actions: tanh of a Normal with mean 5 tanh(m / 5) and std
    softplus(s + softplus^-1(5)) + 1e-4 (starts wide: std ~5 before the squash), reparameterised."""

    MEAN_SCALE, INIT_STD, MIN_STD = 5.0, 5.0, 1e-4
    RAW_INIT_STD = math.log(math.expm1(INIT_STD))
    noise = BoundedNormal.noise  # one unit normal per action dimension, as BoundedNormal draws

    def __init__(self, out: Tensor) -> None:
        mean, std = out.float().chunk(2, -1)
        self.loc = self.MEAN_SCALE * torch.tanh(mean / self.MEAN_SCALE)
        self.scale = F.softplus(std + self.RAW_INIT_STD) + self.MIN_STD

    def rsample(self, generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        if noise is None:
            noise = torch.randn(self.loc.shape, generator=generator, device=self.loc.device)
        return torch.tanh(self.loc + self.scale * noise)

    def mode(self) -> Tensor:
        """tanh of the Normal's mean: a deterministic stand-in for v1's mode (the most likely of 100 samples)."""
        return torch.tanh(self.loc)

    def log_prob(self, x: Tensor) -> Tensor:
        x = x.float().clamp(-1 + 1e-6, 1 - 1e-6)
        u = torch.atanh(x)
        z = (u - self.loc) / self.scale
        normal = -0.5 * z.square() - torch.log(self.scale) - 0.5 * math.log(2 * math.pi)
        return (normal - torch.log1p(-x.square())).sum(-1)  # minus the log |d tanh / du|

    def entropy(self) -> Tensor:
        """The Normal's entropy plus E[log(1 - tanh(u)^2)] taken at the mean (v1 estimated it from samples;
        its entropy weight is 0, so this is a metric)."""
        squash = torch.log1p(-torch.tanh(self.loc).square() + 1e-6)
        return (0.5 + 0.5 * math.log(2 * math.pi) + torch.log(self.scale) + squash).sum(-1)


class OneHotDist:
    """Discrete actions as one-hot vectors, with unimix and straight-through samples."""

    def __init__(self, logits: Tensor, unimix: float) -> None:
        self.logp = unimix_logits(logits, unimix)

    @staticmethod
    def noise(shape: torch.Size | tuple[int, ...], device: torch.device | None = None,
              generator: torch.Generator | None = None) -> Tensor:
        """The uniforms `rsample` draws for logits of `shape`."""
        return onehot_noise(shape, device, generator)

    def rsample(self, generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        return sample_onehot(self.logp, generator, noise)

    def mode(self) -> Tensor:
        return F.one_hot(self.logp.argmax(-1), self.logp.shape[-1]).float()

    def log_prob(self, x: Tensor) -> Tensor:
        return (x.float() * self.logp).sum(-1)

    def entropy(self) -> Tensor:
        return categorical_entropy(self.logp)
