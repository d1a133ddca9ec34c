"""Observation encoder and decoder: images through the CNN, vectors through symlog MLPs."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from core.agents.dreamer.dists import symlog
from core.agents.dreamer.layers import MLP, ConvDecoder, ConvEncoder, cnn_channels
from core.agents.dreamer.onehot import OneHotCols
from core.agents.dreamer.preprocess import ObsKeys, vector_widths
from core.agents.spaces import ObsSpace
from core.config.agent import DreamerConfig


def _image_shape(space: ObsSpace, keys: ObsKeys, levels: int) -> tuple[int, int, int]:
    """(H, W, total channels) of the image keys, which must share H and W."""
    shapes = {space[k][0][:2] for k in keys.images}
    if len(shapes) != 1:
        raise ValueError(f"image keys {keys.images} differ in height/width: {sorted(shapes)}")
    (h, w), c = shapes.pop(), sum(space[k][0][2] for k in keys.images)
    if h % (1 << levels) or w % (1 << levels):
        raise ValueError(f"image size {h}x{w} must be divisible by {1 << levels} ({levels} halvings in the CNN)")
    return h, w, c


class Encoder(nn.Module):
    """Images through the CNN, vectors (symlog'd) through an MLP; the outputs concatenated."""

    def __init__(self, cfg: DreamerConfig, space: ObsSpace, keys: ObsKeys) -> None:
        super().__init__()
        self.keys = keys
        self.dims = vector_widths(space, keys)
        self.out_dim = 0
        if keys.images:
            h, w, c = _image_shape(space, keys, len(cfg.cnn_mults))
            self.cnn = ConvEncoder(c, cnn_channels(cfg.cnn_depth, cfg.cnn_mults), cfg.encoder, cfg.norm, (h, w))
            self.out_dim += self.cnn.out_dim
        if keys.vectors:
            self.mlp = MLP(sum(self.dims.values()), cfg.mlp_layers, cfg.units, cfg.norm, act=cfg.act)
            self.out_dim += cfg.units

    def forward(self, obs: dict[str, Tensor]) -> Tensor:
        lead = obs[(self.keys.images + self.keys.vectors)[0]].shape[: -3 if self.keys.images else -1]
        outs = []
        if self.keys.images:
            x = torch.cat([obs[k] for k in self.keys.images], -1)
            x = x.reshape(-1, *x.shape[-3:]).permute(0, 3, 1, 2)  # NHWC memory, NCHW view (channels_last)
            outs.append(self.cnn(x).reshape(*lead, -1))
        if self.keys.vectors:
            x = torch.cat([obs[k].reshape(*lead, -1) for k in self.keys.vectors], -1)
            outs.append(self.mlp(symlog(x)))
        return torch.cat(outs, -1)


class Decoder(nn.Module):
    """Features [deter, stoch] -> images (mean in [-0.5, 0.5] space) and vectors (in symlog space)."""

    def __init__(self, cfg: DreamerConfig, space: ObsSpace, keys: ObsKeys, feat_dim: int,
                 onehot: OneHotCols | None = None) -> None:
        super().__init__()
        self.keys, self.space = keys, space
        self.dims = vector_widths(space, keys)
        if keys.images:
            h, w, c = _image_shape(space, keys, len(cfg.cnn_mults))
            chans = cnn_channels(cfg.cnn_depth, cfg.cnn_mults)
            self.cnn = ConvDecoder(feat_dim, c, chans, cfg.encoder, cfg.norm, (h, w), onehot, cfg.deter, cfg.units)
        if keys.vectors:
            self.mlp = MLP(feat_dim, cfg.mlp_layers, cfg.units, cfg.norm, onehot, cfg.act)
            self.vec_out = nn.Linear(cfg.units, sum(self.dims.values()))

    def forward(self, feat: Tensor) -> dict[str, Tensor]:
        lead = feat.shape[:-1]
        out: dict[str, Tensor] = {}
        if self.keys.images:
            x = self.cnn(feat.reshape(-1, feat.shape[-1])).permute(0, 2, 3, 1)
            x = x.reshape(*lead, *x.shape[1:])
            start = 0
            for k in self.keys.images:
                c = self.space[k][0][2]
                out[k] = x[..., start : start + c]
                start += c
        if self.keys.vectors:
            x = self.vec_out(self.mlp(feat))
            for k, part in zip(self.keys.vectors, x.split(list(self.dims.values()), -1)):
                out[k] = part
        return out
