"""act()'s path from observation to action on a robot's CPU: the modules' arithmetic in fewer, cheaper kernels.

Why: at size12m from 64x64 pixels the encoder's four convolutions take ~1.4-1.5 ms on one core, about its float32
peak, and the plain modules spent nearly as much again around them: ~170 small kernels, each with Python, module-call
and allocation overhead (several times more when prepare()'s 20 MB of GRU weights have just gone through the caches),
and oneDNN re-laying out every convolution's weights on every call. `LeanPath` is built once from a loaded blob's
weights (a snapshot: the trainer's live modules, whose weights change every update, keep the plain path):
- convolution weights prepacked for oneDNN (plain channels-last `conv2d` on a build without it);
- the image written once into a padded channels-last float buffer whose border holds mid-grey, with `x / 255 - 0.5`
  folded into the first convolution's weights and bias: no normalising passes over the image;
- each norm one call (`F.rms_norm` / `F.layer_norm`) on the channels-last memory, activations in place;
- the CNN's features flattened in their memory order (H, W, C), the posterior's weight columns permuted to match;
- the observation half of each first layer one `addmm` onto the deter half `Policy.prepare()` computed, and the
  actor's latent half a sum of 32 weight rows (`embedding_bag`), as the latent sample is one-hot.
Results equal the modules' up to float rounding (tests/core/test_dreamer_act_path.py). Random numbers are drawn by
the same calls in the same order as the plain path, so a seeded policy samples the same actions on either.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.agents.dreamer.actor import Actor
from core.agents.dreamer.codec import Encoder
from core.agents.dreamer.dists import onehot_noise, symlog
from core.agents.dreamer.layers import ChannelNorm, Dense, Norm
from core.agents.dreamer.rssm import RSSM
from core.layout import StepLayout

Step = Callable[[Tensor], Tensor]


def norm_fn(norm: Norm) -> Step:
    """`norm` over the last axis as one call (the module computes RMSNorm in seven)."""
    if norm.kind == "none":
        return lambda x: x
    shape, scale, eps = (norm.scale.shape[0],), norm.scale.detach(), norm.eps
    if norm.kind == "layer":
        shift = norm.shift.detach()
        return lambda x: F.layer_norm(x, shape, scale, shift, eps)
    return lambda x: F.rms_norm(x, shape, scale, eps)


def act_fn(act: nn.Module) -> Step:
    """The activation module `act`, in place (its input is always a fresh tensor of this path)."""
    if isinstance(act, nn.SiLU):
        return lambda x: F.silu(x, inplace=True)
    if isinstance(act, nn.ELU):
        alpha = act.alpha
        return lambda x: F.elu(x, alpha, inplace=True)
    raise TypeError(f"no in-place form for activation {type(act).__name__}")


class Unit:
    """A Dense unit (Linear -> Norm -> activation) as functional calls. `blocks`: the weight's column blocks
    that multiply the inputs given to `__call__` (all columns by default); `first` there is the part of the
    product computed earlier, bias included (else the layer's bias is added)."""

    def __init__(self, dense: Dense, blocks: Sequence[Tensor] | None = None) -> None:
        linear, norm, act = dense
        self.blocks_t = [w.t() for w in (blocks if blocks is not None else [linear.weight.detach()])]
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.norm, self.act = norm_fn(norm), act_fn(act)

    def __call__(self, xs: Sequence[Tensor], first: Tensor | None = None) -> Tensor:
        start = first if first is not None else self.bias
        y = torch.mm(xs[0], self.blocks_t[0]) if start is None else torch.addmm(start, xs[0], self.blocks_t[0])
        for x, w in zip(xs[1:], self.blocks_t[1:]):
            y.addmm_(x, w)
        return self.act(self.norm(y))


class Conv:
    """A Conv2d on channels-last input, its weights prepacked for oneDNN once instead of re-laid out per call.
    `fold_input`: the input is raw 0-255 pixels, already padded with 127.5: `x / 255 - 0.5` is folded into the
    weights and bias and the convolution pads nothing (mid-grey is 0 after the normalisation, as the plain
    path's zero padding)."""

    def __init__(self, conv: nn.Conv2d, input_shape: Sequence[int], fold_input: bool = False) -> None:
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise TypeError("only numeric zero padding")
        weight = conv.weight.detach()
        bias = torch.zeros(conv.out_channels) if conv.bias is None else conv.bias.detach()
        padding = list(conv.padding)
        if fold_input:
            bias = bias - 0.5 * weight.sum((1, 2, 3))
            weight, padding = weight / 255.0, [0, 0]
        self.bias = None if conv.bias is None and not fold_input else bias
        self.args = (padding, list(conv.stride), list(conv.dilation), conv.groups)
        self.weight = weight.contiguous(memory_format=torch.channels_last)
        self.packed = None
        try:
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(weight.to_mkldnn(), *self.args, list(input_shape))
            probe = torch.rand(*input_shape, generator=torch.Generator().manual_seed(0))  # not torch's own stream
            probe = probe.contiguous(memory_format=torch.channels_last)
            if torch.allclose(self._mkldnn(probe, packed), self._plain(probe), rtol=1e-4, atol=1e-5):
                self.packed = packed
        except Exception:  # noqa: BLE001  (a build without oneDNN, or one that refuses this layer: plain conv2d)
            pass

    def _mkldnn(self, x: Tensor, packed: Tensor) -> Tensor:
        return torch.ops.mkldnn._convolution_pointwise(x, packed, self.bias, *self.args, "none", [], "")

    def _plain(self, x: Tensor) -> Tensor:
        padding, stride, dilation, groups = self.args
        return F.conv2d(x, self.weight, self.bias, stride, padding, dilation, groups)

    def __call__(self, x: Tensor) -> Tensor:
        return self._plain(x) if self.packed is None else self._mkldnn(x, self.packed)


def _channel_norm(norm: Step) -> Step:
    # Channels-last memory: the (N, H, W, C) permute is contiguous, so the norm runs over it directly.
    return lambda x: norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _max_pool(x: Tensor) -> Tensor:
    return F.max_pool2d(x, 2)


class LeanEncoder:
    """`Encoder.forward` for one step of raw observations with a batch axis: returns its parts, the CNN's
    features flat in (H, W, C) order and the vector MLP's output; `columns` orders a weight's columns to match."""

    def __init__(self, encoder: Encoder, space: StepLayout, batch: int) -> None:
        self.keys, self.batch = encoder.keys, batch
        self.channels = [space[k][0][2] for k in self.keys.images]
        self.steps: list[Step] = []
        if self.keys.images:
            self.cnn_shape = encoder.cnn.out_shape
            h, w = space[self.keys.images[0]][0][:2]
            first = encoder.cnn.net[0]
            if not isinstance(first, nn.Conv2d):
                raise TypeError("the CNN must start with a convolution")
            ph, pw = first.padding
            self.padded = torch.full((batch, h + 2 * ph, w + 2 * pw, sum(self.channels)), 127.5)
            self.image = self.padded[:, ph:ph + h, pw:pw + w]  # where the pixels go; the border stays mid-grey
            self.steps = self._cnn_steps(encoder.cnn.net, tuple(self.padded.permute(0, 3, 1, 2).shape))
        self.mlp = [Unit(dense) for dense in encoder.mlp] if self.keys.vectors else []

    @staticmethod
    def _cnn_steps(net: nn.Sequential, shape: tuple[int, ...]) -> list[Step]:
        """The CNN's layers as steps on a channels-last (N, C, H, W) tensor; `shape`: the padded image's."""
        steps: list[Step] = []
        n, _, h, w = shape
        for layer in net:
            if isinstance(layer, nn.Conv2d):
                conv = Conv(layer, (n, layer.in_channels, h, w), fold_input=not steps)
                steps.append(conv)
                (ph, pw), (sh, sw), (dh, dw), _ = conv.args
                h = (h + 2 * ph - dh * (layer.kernel_size[0] - 1) - 1) // sh + 1
                w = (w + 2 * pw - dw * (layer.kernel_size[1] - 1) - 1) // sw + 1
            elif isinstance(layer, nn.MaxPool2d) and layer.kernel_size == layer.stride == 2 and not layer.padding:
                steps.append(_max_pool)
                h, w = h // 2, w // 2
            elif isinstance(layer, ChannelNorm):
                steps.append(_channel_norm(norm_fn(layer)))
            elif isinstance(layer, nn.SiLU | nn.ELU):
                steps.append(act_fn(layer))
            else:
                raise TypeError(f"no lean step for encoder layer {type(layer).__name__}")
        return steps

    def columns(self, weight: Tensor) -> list[Tensor]:
        """A layer's weight columns that read the encoder's output, as blocks matching `__call__`'s parts."""
        blocks = []
        start = 0
        if self.keys.images:
            c, h, w = self.cnn_shape
            cnn = weight[:, : c * h * w].reshape(-1, c, h, w).permute(0, 2, 3, 1).reshape(-1, h * w * c)
            blocks.append(cnn)
            start = c * h * w
        if self.keys.vectors:
            blocks.append(weight[:, start:])
        return blocks

    def __call__(self, obs: Mapping[str, Any]) -> list[Tensor]:
        outs = []
        if self.keys.images:
            if len(self.channels) == 1:
                self.image.copy_(torch.as_tensor(np.asarray(obs[self.keys.images[0]])).reshape(self.image.shape))
            else:
                start = 0
                for key, c in zip(self.keys.images, self.channels):
                    self.image[..., start:start + c].copy_(
                        torch.as_tensor(np.asarray(obs[key])).reshape(*self.image.shape[:3], c))
                    start += c
            x = self.padded.permute(0, 3, 1, 2)
            for step in self.steps:
                x = step(x)
            outs.append(x.permute(0, 2, 3, 1).reshape(self.batch, -1))  # a view of the channels-last memory
        if self.keys.vectors:
            x = torch.cat([torch.as_tensor(np.asarray(obs[k]), dtype=torch.float32).reshape(self.batch, -1)
                           for k in self.keys.vectors], -1)
            x = [symlog(x)]
            for unit in self.mlp:
                x = [unit(x)]
            outs.append(x[0])
        return outs


class LeanPath:
    """The observation-dependent part of `Policy.act` for a categorical RSSM on CPU: the encoder, the posterior's
    sample from its prepared deter half, and the actor's distribution from its prepared deter half."""

    def __init__(self, encoder: Encoder, rssm: RSSM, actor: Actor, space: StepLayout, batch: int) -> None:
        self.batch, self.actor = batch, actor
        self.encoder = LeanEncoder(encoder, space, batch)
        self.stoch_shape = (batch, rssm.stoch, rssm.classes)
        self.unimix = rssm.cfg.unimix
        post_first = rssm.post_net[0].weight.detach()
        self.post = Unit(rssm.post_net, self.encoder.columns(post_first[:, rssm.deter:]))
        self.post_out = rssm.post_out.weight.detach().t(), rssm.post_out.bias.detach()
        # The actor's first layer on a one-hot latent: the sum of the weight rows of the classes sampled.
        linear = actor.net[0][0]
        self.actor_rows = linear.weight.detach()[:, linear.in_features - rssm.stoch_dim:].t().contiguous()
        self.actor_norm, self.actor_act = norm_fn(actor.net[0][1]), act_fn(actor.net[0][2])
        self.actor_rest = [Unit(dense) for dense in list(actor.net)[1:]]
        self.actor_out = actor.out.weight.detach().t(), actor.out.bias.detach()
        self.offsets = torch.arange(rssm.stoch) * rssm.classes

    @staticmethod
    def supports(encoder: Encoder, rssm: nn.Module, device: torch.device) -> str | None:
        """Why the lean path cannot act for these modules (None: it can)."""
        if device.type != "cpu":
            return "the lean path is for CPU"
        if type(rssm) is not RSSM:
            return f"the lean path samples categorical latents; dynamics {type(rssm).__name__}"
        if any(p.dtype != torch.float32 for p in encoder.parameters()):
            return "the lean path computes in float32"
        return None

    def stoch(self, obs: Mapping[str, Any], post_part: Tensor) -> tuple[Tensor, Tensor]:
        """The posterior's latent sample given the observation and `post_deter_part(deter)`: as one-hot
        (B, stoch, classes) and as the index of each latent's class (B, stoch).

        `sample_onehot(unimix_logits(logits))` with the mixture's probabilities taken directly rather than
        through their logarithm: the same inverse-CDF draw from the same uniforms."""
        h = self.post(self.encoder(obs), post_part)
        logits = torch.addmm(self.post_out[1], h, self.post_out[0]).view(self.stoch_shape)
        probs = torch.softmax(logits, -1)
        if self.unimix > 0:
            probs.mul_(1.0 - self.unimix).add_(self.unimix / probs.shape[-1])
        cdf = probs.cumsum(-1)
        u = onehot_noise(probs.shape).mul_(cdf[..., -1:])
        index = (cdf <= u).sum(-1).clamp_(max=probs.shape[-1] - 1)
        return F.one_hot(index, probs.shape[-1]).float(), index

    def action_dist(self, actor_part: Tensor, index: Tensor) -> Any:
        """The action distribution given `actor.deter_part(deter)` and the latents' classes from `stoch`."""
        x = F.embedding_bag(index + self.offsets, self.actor_rows, mode="sum").add_(actor_part)
        x = self.actor_act(self.actor_norm(x))
        for unit in self.actor_rest:
            x = unit([x])
        return self.actor.dist(torch.addmm(self.actor_out[1], x, self.actor_out[0]))
