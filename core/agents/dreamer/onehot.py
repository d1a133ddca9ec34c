"""A linear layer that reads the one-hot latent columns of its input by index instead of multiplying.

The stochastic latent is `stoch` categoricals of `classes` each, and every sample is exactly one-hot
(the straight-through term `probs - probs.detach()` adds exactly 0.0) or all-zero (a reset state).
A layer fed [deter, stoch] (every head, the actor, the critic, the GRU input) spends most of its
multiply on those columns (1024 at 32x32 latents), of which only `stoch` (32) are non-zero per row.
On CPU the product is a sum of 32 weight columns per row (`embedding_bag`), about 10x cheaper, and
the weight gradient 32 row additions per row instead of a matrix product. The input gradient stays the dense `g @ W`:
the straight-through estimator needs it at every class, not only the sampled one.

The result equals `F.linear` up to float rounding, for any input: an input with any group that is
not one-hot-or-zero takes the dense path whole. The gather is used only where it pays: float32 on
CPU outside autocast (bf16 and CUDA multiply faster than they gather), in eager mode (not while
torch.compile traces), for batches of at least `MIN_ROWS` rows and for latents of at least
`MIN_CLASSES` classes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MIN_ROWS = 64  # below it (acting, small tests) the checks cost more than the multiply
# Below it the latent columns are too dense for gathering to pay: with size1m's 4 classes a quarter of
# them are hot, and the gather plus its check took 1.4-2x the multiply's time (8 classes: 1.1-1.4x;
# 16, size12m: 0.95x; 32: 0.65x; one CPU thread, 16k rows, forward and weight gradient).
MIN_CLASSES = 16
CHUNK = 1024  # rows per block of the weight-gradient scatter: keeps the gradient block in cache


class OneHotCols(NamedTuple):
    """Columns [lo, hi) of a layer's input hold one-hot groups of `classes` each."""

    lo: int
    hi: int
    classes: int


def onehot_index(x: Tensor, cols: OneHotCols) -> Tensor | None:
    """Flat column indices (N, groups) of the hot entries of `x[:, lo:hi]`, or None unless every
    group is exactly one-hot or all zero. An all-zero group gets index `hi - lo` (a dummy column)."""
    n, groups = x.shape[0], (cols.hi - cols.lo) // cols.classes
    # One contiguous copy first: reductions over the strided column slice run several times slower.
    hot = x[:, cols.lo : cols.hi].contiguous().reshape(n, groups, cols.classes)
    low, high = torch.aminmax(hot)
    if low < 0 or high > 1:
        return None
    val, idx = hot.max(-1)
    # Entries in [0, 1]: one-hot or zero  <=>  the largest entry is 0 or 1 and the group sums to it.
    if not bool(((hot.sum(-1) == val) & ((val == 0) | (val == 1))).all()):
        return None
    idx = idx + torch.arange(groups, device=x.device) * cols.classes
    return torch.where(val == 0, cols.hi - cols.lo, idx)


class _OneHotLinear(torch.autograd.Function):
    """x @ W^T for an `x` whose columns `cols` are one-hot groups with hot indices `idx`."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, idx: Tensor, cols: OneHotCols) -> Tensor:  # noqa: ANN001
        lo, hi, _ = cols
        table = weight.new_zeros(hi - lo + 1, weight.shape[0])  # the last row: all-zero groups
        table[:-1] = weight[:, lo:hi].t()
        out = F.embedding_bag(idx, table, mode="sum")
        if lo > 0:
            out = torch.addmm(out, x[:, :lo], weight[:, :lo].t())
        if hi < x.shape[1]:
            out = torch.addmm(out, x[:, hi:], weight[:, hi:].t())
        ctx.save_for_backward(x, weight, idx)
        ctx.cols = cols
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        x, weight, idx = ctx.saved_tensors
        lo, hi, _ = ctx.cols
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_wt = grad.new_empty(weight.shape[1], weight.shape[0])  # (in, out): row blocks are contiguous
            if lo > 0:
                torch.mm(x[:, :lo].t(), grad, out=grad_wt[:lo])
            if hi < x.shape[1]:
                torch.mm(x[:, hi:].t(), grad, out=grad_wt[hi:])
            scatter = grad.new_zeros(hi - lo + 1, grad.shape[1])
            for start in range(0, grad.shape[0], CHUNK):
                rows, block = idx[start : start + CHUNK], grad[start : start + CHUNK]
                for group in range(idx.shape[1]):
                    scatter.index_add_(0, rows[:, group], block)
            grad_wt[lo:hi] = scatter[:-1]
            grad_w = grad_wt.t()
        return grad_x, grad_w, None, None


class OneHotLinear(nn.Linear):
    """nn.Linear (same parameters, same results) that gathers its one-hot input columns on CPU."""

    def __init__(self, inp: int, out: int, cols: OneHotCols, bias: bool = True) -> None:
        super().__init__(inp, out, bias=bias)
        if not 0 <= cols.lo < cols.hi <= inp or (cols.hi - cols.lo) % cols.classes:
            raise ValueError(f"one-hot columns {cols} do not fit an input of {inp}")
        self.cols = cols

    def forward(self, x: Tensor) -> Tensor:
        return onehot_linear(x, self.weight, self.bias, self.cols)


def onehot_linear(x: Tensor, weight: Tensor, bias: Tensor | None, cols: OneHotCols) -> Tensor:
    """F.linear(x, weight, bias) for an `x` whose columns `cols` may hold one-hot groups: gathered
    where that pays and every group is one-hot or zero, multiplied otherwise."""
    flat = x.reshape(-1, x.shape[-1])
    if not _gathers(flat, weight, cols):
        return F.linear(x, weight, bias)
    idx = onehot_index(flat, cols)
    if idx is None:
        return F.linear(x, weight, bias)
    out = _OneHotLinear.apply(flat, weight, idx, cols)
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _gathers(flat: Tensor, weight: Tensor, cols: OneHotCols) -> bool:
    # Not while torch.compile traces: the data-dependent check would break its graph apart.
    return (flat.device.type == "cpu" and flat.dtype == torch.float32 and weight.dtype == torch.float32
            and flat.shape[0] >= MIN_ROWS and cols.classes >= MIN_CLASSES and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling())
