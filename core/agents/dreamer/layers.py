"""Network building blocks. Norms compute in float32 whatever the autocast dtype."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.agents.dreamer.onehot import OneHotCols, OneHotLinear, onehot_linear


class Norm(nn.Module):
    """RMSNorm (2024) or LayerNorm (2023) over the last axis, computed in float32; kind "none" (Dreamer
    v1, DreamerV2's MLPs) passes its input through and has no parameters."""

    def __init__(self, dim: int, kind: str, eps: float = 1e-4) -> None:
        super().__init__()
        self.kind, self.eps = kind, eps
        self.scale = nn.Parameter(torch.ones(dim)) if kind != "none" else None
        self.shift = nn.Parameter(torch.zeros(dim)) if kind == "layer" else None

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "none":
            return x
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
        if self.kind == "none":
            return x
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def linear(inp: int, out: int, onehot: OneHotCols | None = None, bias: bool = True) -> nn.Linear:
    """nn.Linear, or its one-hot-gathering twin when input columns `onehot` hold latent samples."""
    return nn.Linear(inp, out, bias=bias) if onehot is None else OneHotLinear(inp, out, onehot, bias=bias)


def norm_keeps_bias(norm: str) -> bool:
    """Whether a Linear or Conv followed by `norm` needs its own bias.

    LayerNorm (2023) re-centres and adds a learned shift, so a bias before it is redundant. RMSNorm
    (2024) has no shift: without a bias the layer's output is rescaled to unit RMS whatever its
    input's size, so it sees only the input's direction (an action of 0.2 and of 1.0 look alike).
    Without a norm (v1, v2) the bias is the layer's only offset.
    """
    return norm != "layer"


ACTIVATIONS = {"silu": nn.SiLU, "elu": nn.ELU}  # DreamerV3: SiLU; Dreamer v1 and V2: ELU


class Dense(nn.Sequential):
    """Linear -> Norm -> activation (SiLU unless `act`): the unit every MLP of Dreamer is made of."""

    def __init__(self, inp: int, out: int, norm: str, onehot: OneHotCols | None = None, act: str = "silu") -> None:
        super().__init__(linear(inp, out, onehot, bias=norm_keeps_bias(norm)), Norm(out, norm), ACTIVATIONS[act]())


class MLP(nn.Sequential):
    """`layers` Dense units; `onehot` marks latent-sample columns of the input (first layer)."""

    def __init__(self, inp: int, layers: int, units: int, norm: str, onehot: OneHotCols | None = None,
                 act: str = "silu") -> None:
        super().__init__(*[Dense(inp if i == 0 else units, units, norm, onehot if i == 0 else None, act)
                           for i in range(layers)])
        self.out_dim = units if layers else inp


def mlps_on(x: Tensor, mlps: Sequence[MLP]) -> list[Tensor]:
    """[mlp(x) for mlp in mlps], with the first layers of all of them as one matrix product.

    The same results up to float rounding. Why: heads that read one input (reward and continuation
    on every imagined state) then read it, and check its one-hot columns, once, and its gradient is
    summed inside one product instead of arriving as one full-size tensor per head to be added up.
    """
    firsts = [mlp[0][0] for mlp in mlps if len(mlp)]
    with_bias = {f.bias is not None for f in firsts}
    if len(firsts) < max(2, len(mlps)) or len(with_bias) > 1:
        return [mlp(x) for mlp in mlps]  # nothing to share: one MLP, an empty one, or unlike layers
    weight = torch.cat([f.weight for f in firsts])
    bias = torch.cat([f.bias for f in firsts]) if with_bias.pop() else None
    # One-hot columns shared by all (OneHotLinear), else a plain product: both are exact, as the
    # gather checks its input.
    cols = {getattr(f, "cols", None) for f in firsts}
    shared = cols.pop() if len(cols) == 1 else None
    hidden = F.linear(x, weight, bias) if shared is None else onehot_linear(x, weight, bias, shared)
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
        # (blocks, out, inp), as nn.Linear: each output's weights are contiguous, which makes the
        # matrix-vector products of acting (batch 1) read memory in order (~2-3x faster on CPU).
        self.weight = nn.Parameter(torch.empty(blocks, out, inp))
        self.bias = nn.Parameter(torch.zeros(blocks, out))
        init_weight_(self.weight, "in")

    SMALL_BATCH = 64  # below it W @ x^T (matrix-vector like) is faster than x @ W^T on CPU

    def forward(self, x: Tensor) -> Tensor:
        # x: (batch, blocks, inp) -> (batch, blocks, out)
        if x.shape[0] < self.SMALL_BATCH:
            return torch.baddbmm(self.bias[:, :, None], self.weight, x.permute(1, 2, 0)).permute(2, 0, 1)
        return torch.baddbmm(self.bias[:, None], x.transpose(0, 1), self.weight.transpose(1, 2)).transpose(0, 1)


# --- initialisation
TRUNC_STD = 0.87962566103423978  # std of a unit normal truncated to [-2, 2]


def fans(weight: Tensor, transposed: bool = False) -> tuple[int, int]:
    """(fan_in, fan_out) of a Linear (out, in), Conv (out, in, k, k), transposed Conv (in, out, k, k)
    or BlockLinear (blocks, out, in) weight. A block-diagonal layer's fans are its whole input and
    output, not one block's: each output mixes one block, but the layer's input is the whole vector."""
    if weight.ndim == 2:
        return weight.shape[1], weight.shape[0]
    if weight.ndim == 3:  # BlockLinear
        return weight.shape[0] * weight.shape[2], weight.shape[0] * weight.shape[1]
    space = math.prod(weight.shape[2:])
    out, inp = weight.shape[:2] if not transposed else weight.shape[1::-1]
    return inp * space, out * space


@torch.no_grad()
def init_weight_(weight: Tensor, fan: str, scale: float = 1.0, transposed: bool = False) -> None:
    """Truncated normal in [-2, 2] std with std sqrt(1 / fan) after truncation, times `scale`.

    fan "in" (2024) or "avg" (2023, the mean of fan_in and fan_out). torch's default (uniform with
    bound 1/sqrt(fan_in)) has a std 1.7x smaller.
    """
    fan_in, fan_out = fans(weight, transposed)
    size = fan_in if fan == "in" else (fan_in + fan_out) / 2
    nn.init.trunc_normal_(weight, 0.0, 1.0, -2.0, 2.0)
    weight.mul_(scale * math.sqrt(1.0 / size) / TRUNC_STD)


def init_params_(module: nn.Module, fan: str) -> None:
    """Initialise every Linear, Conv and BlockLinear in `module` as the recipe does; biases 0.

    A layer with an `outscale` attribute (output layers) has its weights scaled by it (0: zeros).
    """
    for layer in module.modules():
        if isinstance(layer, nn.Linear | nn.Conv2d | nn.ConvTranspose2d | BlockLinear):
            init_weight_(layer.weight, fan, getattr(layer, "outscale", 1.0),
                         transposed=isinstance(layer, nn.ConvTranspose2d))
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def zero_linear(inp: int, out: int) -> nn.Linear:
    """Output layer that starts at exactly zero (reward and critic heads predict 0 at first)."""
    return scaled_linear(inp, out, 0.0)


def scaled_linear(inp: int, out: int, scale: float) -> nn.Linear:
    """Output layer whose initial weights are scaled by `scale` (kept by `init_params_`)."""
    layer = nn.Linear(inp, out)
    layer.outscale = scale
    init_weight_(layer.weight, "in", scale)
    with torch.no_grad():
        layer.bias.zero_()
    return layer


def cnn_channels(depth: int, mults: list[int]) -> list[int]:
    return [depth * m for m in mults]


class ConvEncoder(nn.Module):
    """Images (N, C, H, W) in [-0.5, 0.5] -> flat features.

    pool (2024): 5x5 stride-1 conv (with bias) -> 2x2 max-pool -> RMSNorm -> SiLU per layer; pooling
    before the norm makes the norm run on a quarter of the pixels. stride (2023): 4x4 stride-2 conv
    (no bias) -> LayerNorm -> SiLU. Either halves the resolution per layer.
    """

    def __init__(self, in_ch: int, chans: list[int], kind: str, norm: str, size: tuple[int, int]) -> None:
        super().__init__()
        self.kind = kind
        layers: list[nn.Module] = []
        h, w = size
        bias = norm_keeps_bias(norm)
        for out in chans:
            if kind == "pool":
                layers += [nn.Conv2d(in_ch, out, 5, 1, 2, bias=bias), nn.MaxPool2d(2), ChannelNorm(out, norm),
                           nn.SiLU()]
            else:
                layers += [nn.Conv2d(in_ch, out, 4, 2, 1, bias=bias), ChannelNorm(out, norm), nn.SiLU()]
            in_ch, h, w = out, h // 2, w // 2
        self.net = nn.Sequential(*layers)
        self.out_shape = (in_ch, h, w)
        self.out_dim = in_ch * h * w

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).flatten(1)


SPATIAL_BLOCKS = 8  # blocks of the 2024 decoder's deter -> first-feature-map projection (official: 8)


class SpatialProjection(nn.Module):
    """The 2024 decoder's first feature map from [deter, stoch]: a block-linear map of deter (each
    block of deter writes its own channel group of every pixel) plus an MLP of stoch, then norm and
    SiLU. Far fewer weights than one dense layer from all of [deter, stoch] to every pixel."""

    def __init__(self, deter: int, stoch: int, units: int, shape: tuple[int, int, int], norm: str,
                 onehot: OneHotCols | None = None) -> None:
        super().__init__()
        c, h, w = shape
        self.deter, self.shape = deter, shape
        self.blocks = math.gcd(SPATIAL_BLOCKS, deter, c)
        self.from_deter = BlockLinear(deter // self.blocks, h * w * c // self.blocks, self.blocks)
        stoch_cols = None if onehot is None else OneHotCols(0, stoch, onehot.classes)
        self.from_stoch = nn.Sequential(Dense(stoch, 2 * units, norm, stoch_cols), nn.Linear(2 * units, c * h * w))
        self.norm = ChannelNorm(c, norm)

    def forward(self, feat: Tensor) -> Tensor:
        c, h, w = self.shape
        deter, stoch = feat[:, : self.deter], feat[:, self.deter :]
        # Block k's outputs are its channel group (c / blocks channels) at every pixel.
        x0 = self.from_deter(deter.reshape(deter.shape[0], self.blocks, -1)).reshape(-1, c, h, w)
        x1 = self.from_stoch(stoch).reshape(-1, c, h, w)
        return F.silu(self.norm(x0 + x1))


class ConvDecoder(nn.Module):
    """Flat features [deter, stoch] -> images (N, C, H, W) in [-0.5, 0.5] space, mirroring the encoder.

    pool (2024): the spatial projection, then per layer nearest 2x upsampling + 5x5 conv (+ norm +
    SiLU but the last), and a sigmoid: the image mean in [0, 1], shifted by -0.5 to compare with the
    encoder's inputs (the same loss as the sigmoid against [0, 1] pixels). stride (2023): one dense
    layer to the first map, transposed 4x4 stride-2 convs, an unbounded output.
    """

    def __init__(self, inp: int, out_ch: int, chans: list[int], kind: str, norm: str, size: tuple[int, int],
                 onehot: OneHotCols | None = None, deter: int = 0, units: int = 0) -> None:
        super().__init__()
        chans = chans[::-1]
        h, w = size[0] >> len(chans), size[1] >> len(chans)
        self.start = (chans[0], h, w)
        self.sigmoid = kind == "pool"
        if kind == "pool":
            self.linear = SpatialProjection(deter, inp - deter, units, self.start, norm, onehot)
        else:
            self.linear = linear(inp, chans[0] * h * w, onehot)
        layers: list[nn.Module] = []
        outs = [*chans[1:], out_ch]
        for i, (cin, cout) in enumerate(zip(chans, outs)):
            last = i == len(chans) - 1
            bias = last or norm_keeps_bias(norm)
            if kind == "pool":
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 5, 1, 2, bias=bias)]
            else:
                layers += [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=bias)]
            if not last:
                layers += [ChannelNorm(cout, norm), nn.SiLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(self.linear(x).reshape(-1, *self.start))
        return torch.sigmoid(out) - 0.5 if self.sigmoid else out
