"""Network building blocks. Norms compute in float32 whatever the autocast dtype."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from learner.dreamer.onehot import OneHotCols, OneHotLinear, onehot_linear


class Norm(nn.Module):
    """RMSNorm (2024) or LayerNorm (2023) over the last axis, computed in float32."""

    def __init__(self, dim: int, kind: str, eps: float = 1e-4) -> None:
        super().__init__()
        self.kind, self.eps = kind, eps
        self.scale = nn.Parameter(torch.ones(dim))
        self.shift = nn.Parameter(torch.zeros(dim)) if kind == "layer" else None

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type):
            return self._norm(x)  # the plain float32 path (acting on a robot CPU): no extra overhead
        dtype = x.dtype
        with torch.autocast(x.device.type, enabled=False):
            if self.kind == "layer" and dtype == torch.bfloat16 and x.device.type == "cpu":
                # The CPU kernel takes bf16 input with fp32 parameters and accumulates in fp32: the
                # same float32 norm without materialising float32 copies (much of a bf16 update).
                return F.layer_norm(x, x.shape[-1:], self.scale, self.shift, self.eps)
            return self._norm(x.float()).to(dtype)

    def _norm(self, x: Tensor) -> Tensor:
        if self.kind == "layer":
            return F.layer_norm(x, x.shape[-1:], self.scale, self.shift, self.eps)
        if torch.is_grad_enabled() and (x.requires_grad or self.scale.requires_grad):
            return RMSNormFn.apply(x, self.scale, self.eps)
        return _rms_norm(x, self.scale, self.eps)[0]  # acting: no autograd.Function overhead


def _rms_norm(x: Tensor, scale: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(x * r * scale, r) with r = rsqrt(mean(x^2, -1) + eps) (keepdim)."""
    r = torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps))
    return (x * r).mul_(scale), r


class RMSNormFn(torch.autograd.Function):
    """y = x * rsqrt(mean(x^2, -1) + eps) * scale, with the backward written out.

    torch has no fused CPU kernel for it: the composite records ~10 elementwise ops whose autograd
    backward is ~20 passes over x, 6x slower than LayerNorm's fused kernel on the 15k x 512
    activations of imagination. Here the forward is three passes (a norm reduction, two scalings)
    and the backward five, with the same result up to float rounding.
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, eps: float) -> Tensor:  # noqa: ANN001
        out, r = _rms_norm(x, scale, eps)
        ctx.save_for_backward(x, scale, r)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        x, scale, r = ctx.saved_tensors
        d = x.shape[-1]
        grad_x = grad_scale = None
        if ctx.needs_input_grad[0]:
            # d/dx [x r] = r (g s) - x r^3 mean(g s x): r depends on every entry of the row.
            gs = grad * scale
            coef = torch.linalg.vecdot(gs, x, dim=-1).unsqueeze(-1).mul_(r.pow(3)).div_(-d)
            grad_x = torch.addcmul(gs.mul_(r), x, coef)
        if ctx.needs_input_grad[1]:
            # sum over rows of g * x * r, as one (1, N) @ (N, d) product
            grad_scale = (r.reshape(1, -1) @ (grad * x).reshape(-1, d)).reshape(d)
        return grad_x, grad_scale, None


class ChannelNorm(Norm):
    """The same norm over the channel axis of an NCHW image tensor."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def linear(inp: int, out: int, onehot: OneHotCols | None = None, bias: bool = True) -> nn.Linear:
    """nn.Linear, or its one-hot-gathering twin when input columns `onehot` hold latent samples."""
    return nn.Linear(inp, out, bias=bias) if onehot is None else OneHotLinear(inp, out, onehot, bias=bias)


class Dense(nn.Sequential):
    """Linear -> Norm -> SiLU: the unit every MLP of DreamerV3 is made of."""

    def __init__(self, inp: int, out: int, norm: str, onehot: OneHotCols | None = None) -> None:
        super().__init__(linear(inp, out, onehot, bias=False), Norm(out, norm), nn.SiLU())


class MLP(nn.Sequential):
    """`layers` Dense units; `onehot` marks latent-sample columns of the input (first layer)."""

    def __init__(self, inp: int, layers: int, units: int, norm: str, onehot: OneHotCols | None = None) -> None:
        super().__init__(*[Dense(inp if i == 0 else units, units, norm, onehot if i == 0 else None)
                           for i in range(layers)])
        self.out_dim = units if layers else inp


def mlps_on(x: Tensor, mlps: Sequence[MLP]) -> list[Tensor]:
    """[mlp(x) for mlp in mlps], with the first layers of all of them as one matrix product.

    The same results up to float rounding. Why: heads that read one input (reward and continuation
    on every imagined state) then read it, and check its one-hot columns, once, and its gradient is
    summed inside one product instead of arriving as one full-size tensor per head to be added up.
    """
    firsts = [mlp[0][0] for mlp in mlps if len(mlp)]
    if len(firsts) < max(2, len(mlps)) or any(f.bias is not None for f in firsts):
        return [mlp(x) for mlp in mlps]  # nothing to share: one MLP, an empty one, or biases
    weight = torch.cat([f.weight for f in firsts])
    # One-hot columns shared by all (OneHotLinear), else a plain product: both are exact, as the
    # gather checks its input.
    cols = {getattr(f, "cols", None) for f in firsts}
    shared = cols.pop() if len(cols) == 1 else None
    hidden = F.linear(x, weight) if shared is None else onehot_linear(x, weight, None, shared)
    outs = []
    for mlp, h in zip(mlps, hidden.split([f.out_features for f in firsts], -1)):
        for layer in [*list(mlp[0])[1:], *list(mlp)[1:]]:  # the first unit's norm and SiLU, then the rest
            h = layer(h)
        outs.append(h)
    return outs


class BlockLinear(nn.Module):
    """A block-diagonal linear map: `blocks` independent linear maps over equal slices (2024 GRU)."""

    def __init__(self, inp: int, out: int, blocks: int) -> None:
        super().__init__()
        self.blocks = blocks
        bound = 1.0 / math.sqrt(inp)
        # (blocks, out, inp), as nn.Linear: each output's weights are contiguous, which makes the
        # matrix-vector products of acting (batch 1) read memory in order (~2-3x faster on CPU).
        self.weight = nn.Parameter(torch.empty(blocks, out, inp).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(blocks, out))

    SMALL_BATCH = 64  # below it W @ x^T (matrix-vector like) is faster than x @ W^T on CPU

    def forward(self, x: Tensor) -> Tensor:
        # x: (batch, blocks, inp) -> (batch, blocks, out)
        if x.shape[0] < self.SMALL_BATCH:
            return torch.baddbmm(self.bias[:, :, None], self.weight, x.permute(1, 2, 0)).permute(2, 0, 1)
        return torch.baddbmm(self.bias[:, None], x.transpose(0, 1), self.weight.transpose(1, 2)).transpose(0, 1)


def zero_linear(inp: int, out: int) -> nn.Linear:
    """Output layer that starts at exactly zero (reward and critic heads predict 0 at first)."""
    layer = nn.Linear(inp, out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def scaled_linear(inp: int, out: int, scale: float) -> nn.Linear:
    layer = nn.Linear(inp, out)
    with torch.no_grad():
        layer.weight.mul_(scale)
        layer.bias.zero_()
    return layer


def cnn_channels(depth: int, mults: list[int]) -> list[int]:
    return [depth * m for m in mults]


class ConvEncoder(nn.Module):
    """Images (N, C, H, W) in [-0.5, 0.5] -> flat features.

    pool (2024): 5x5 stride-1 conv + norm + SiLU + 2x2 max-pool per layer; stride (2023): 4x4
    stride-2 conv + norm + SiLU. Either halves the resolution per layer.
    """

    def __init__(self, in_ch: int, chans: list[int], kind: str, norm: str, size: tuple[int, int]) -> None:
        super().__init__()
        self.kind = kind
        layers: list[nn.Module] = []
        h, w = size
        for out in chans:
            if kind == "pool":
                layers += [nn.Conv2d(in_ch, out, 5, 1, 2, bias=False), ChannelNorm(out, norm), nn.SiLU(),
                           nn.MaxPool2d(2)]
            else:
                layers += [nn.Conv2d(in_ch, out, 4, 2, 1, bias=False), ChannelNorm(out, norm), nn.SiLU()]
            in_ch, h, w = out, h // 2, w // 2
        self.net = nn.Sequential(*layers)
        self.out_shape = (in_ch, h, w)
        self.out_dim = in_ch * h * w

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).flatten(1)


class ConvDecoder(nn.Module):
    """Flat features -> images (N, C, H, W), mirroring the encoder (nearest upsampling + conv)."""

    def __init__(self, inp: int, out_ch: int, chans: list[int], kind: str, norm: str, size: tuple[int, int],
                 onehot: OneHotCols | None = None) -> None:
        super().__init__()
        chans = chans[::-1]
        h, w = size[0] >> len(chans), size[1] >> len(chans)
        self.start = (chans[0], h, w)
        self.linear = linear(inp, chans[0] * h * w, onehot)
        layers: list[nn.Module] = []
        outs = [*chans[1:], out_ch]
        for i, (cin, cout) in enumerate(zip(chans, outs)):
            last = i == len(chans) - 1
            if kind == "pool":
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 5, 1, 2, bias=last)]
            else:
                layers += [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=last)]
            if not last:
                layers += [ChannelNorm(cout, norm), nn.SiLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.linear(x).reshape(-1, *self.start))
