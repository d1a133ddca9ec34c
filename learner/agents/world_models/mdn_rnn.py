"""M: the LSTM (`core.agents.world_models.memory`) with a mixture-density head over the next z (K Gaussians per
latent dimension), and reward and done heads, which training inside the dream needs.

From h_{t+1} = LSTM([z_t, a_t], h_t) it predicts p(z_{t+1}), r_{t+1} and whether the episode ends at t+1.
Sampling at temperature tau divides the mixture logits by tau and scales each std by sqrt(tau): tau -> 0
gives the mean of the most likely Gaussian, tau > 1 a wilder dream that C cannot exploit as easily.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from core.agents.world_models.memory import Memory, State

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


class Mixture(NamedTuple):
    """Per latent dimension: K mixture logits, means and log-stds, each (..., z, K)."""

    logits: Tensor
    mean: Tensor
    logstd: Tensor


def mdn_nll(mix: Mixture, target: Tensor) -> Tensor:
    """-log sum_k pi_k N(target; mu_k, sigma_k) per latent dimension: (..., z)."""
    x = target[..., None]
    log_normal = -0.5 * ((x - mix.mean) * torch.exp(-mix.logstd)).square() - mix.logstd - LOG_SQRT_2PI
    return -torch.logsumexp(F.log_softmax(mix.logits, -1) + log_normal, -1)


def mdn_sample(mix: Mixture, tau: float, uniform: Tensor, normal: Tensor) -> Tensor:
    """A sample (..., z) at temperature `tau`, from given noise: `uniform` in [0, 1) picks the Gaussian (inverse
    CDF of softmax(logits / tau)), `normal` draws from it with std x sqrt(tau). Passing the noise in lets a
    whole population share it (common random numbers)."""
    probs = torch.softmax(mix.logits / tau, -1)
    index = (probs.cumsum(-1) < uniform[..., None]).sum(-1, keepdim=True).clamp(max=probs.shape[-1] - 1)
    mean = mix.mean.gather(-1, index)[..., 0]
    std = torch.exp(mix.logstd.gather(-1, index)[..., 0])
    return mean + std * math.sqrt(tau) * normal


class MDNRNN(nn.Module):
    """M: the acting LSTM plus its heads."""

    def __init__(self, z: int, act_dim: int, units: int, mixtures: int) -> None:
        super().__init__()
        self.z, self.k = z, mixtures
        self.memory = Memory(z, act_dim, units)
        self.head = nn.Linear(units, 3 * z * mixtures + 2)

    def heads(self, h: Tensor) -> tuple[Mixture, Tensor, Tensor]:
        """Mixture over the next z, predicted reward and done logit, from h (..., units)."""
        out = self.head(h)
        mix = out[..., : 3 * self.z * self.k].reshape(*h.shape[:-1], self.z, 3, self.k)
        return Mixture(mix[..., 0, :], mix[..., 1, :], mix[..., 2, :]), out[..., -2], out[..., -1]

    def observe(self, z: Tensor, action: Tensor, is_first: Tensor) -> tuple[State, Tensor]:
        """Run the LSTM along sequences (B, T, ...), resetting at episode starts. Returns the state C sees at
        each step, (h, c) each (B, T, units), and h after each step's (z, a): what predicts step t + 1."""
        b, t = z.shape[:2]
        state = self.memory.initial(b, z.device)
        seen_h, seen_c, after = [], [], []
        for i in range(t):
            keep = (1.0 - is_first[:, i].float())[:, None]
            state = (state[0] * keep, state[1] * keep)
            seen_h.append(state[0])
            seen_c.append(state[1])
            state = self.memory(z[:, i], action[:, i], state)
            after.append(state[0])
        return (torch.stack(seen_h, 1), torch.stack(seen_c, 1)), torch.stack(after, 1)


def sequence_loss(model: MDNRNN, z: Tensor, action: Tensor, reward: Tensor, terminal: Tensor, is_first: Tensor,
                  reward_scale: float, done_scale: float) -> tuple[Tensor, dict[str, Tensor]]:
    """M's loss on replayed sequences (B, T, ...): mixture NLL of z_{t+1} (averaged over dimensions), squared
    error of r_{t+1}, and cross-entropy of the episode ending at t+1, over the transitions that stay inside
    one episode."""
    _, after = model.observe(z, action, is_first)
    mix, pred_reward, done_logit = model.heads(after[:, :-1])
    valid = 1.0 - is_first[:, 1:].float()
    count = valid.sum().clamp(min=1.0)
    nll = (mdn_nll(mix, z[:, 1:]).mean(-1) * valid).sum() / count
    rew = ((pred_reward - reward[:, 1:]).square() * valid).sum() / count
    done = (F.binary_cross_entropy_with_logits(done_logit, terminal[:, 1:].float(), reduction="none")
            * valid).sum() / count
    loss = nll + reward_scale * rew + done_scale * done
    return loss, {"m/loss": loss, "m/nll": nll, "m/reward_mse": rew, "m/done_bce": done}
