"""The one-hot-gathering linear layer gives what nn.Linear gives, and only takes its fast path on
inputs whose latent columns really are one-hot (or all-zero) groups."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from dreamer_helpers import make_cfg

import core.agents.dreamer.onehot as onehot
from core.agents.dreamer.onehot import OneHotCols, OneHotLinear, onehot_index
from core.agents.spaces import ActSpace
from learner.agents.dreamer.agent import Dreamer

GROUPS, CLASSES = 6, 5
# The two layouts the model uses: [deter, stoch] (heads, actor, critic) and [stoch, action] (GRU input).
LAYOUTS = {"feat": (7, OneHotCols(7, 7 + GROUPS * CLASSES, CLASSES)),
           "stoch-action": (3, OneHotCols(0, GROUPS * CLASSES, CLASSES))}


def onehot_input(rows: int, layout: str, seed: int = 0) -> torch.Tensor:
    extra, cols = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    hot = F.one_hot(torch.randint(0, CLASSES, (rows, GROUPS), generator=g), CLASSES).float()
    hot[:3] = 0.0  # reset states: all-zero groups
    hot[5, 2] = 0.0
    dense = torch.randn(rows, extra, generator=g)
    parts = [dense, hot.reshape(rows, -1)] if cols.lo else [hot.reshape(rows, -1), dense]
    return torch.cat(parts, -1)


def pair(layout: str, bias: bool) -> tuple[OneHotLinear, torch.nn.Linear]:
    extra, cols = LAYOUTS[layout]
    torch.manual_seed(0)
    fast = OneHotLinear(extra + GROUPS * CLASSES, 9, cols, bias=bias)
    ref = torch.nn.Linear(extra + GROUPS * CLASSES, 9, bias=bias)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


@pytest.fixture
def gathers(monkeypatch) -> list:
    """Records each run of the gathered path (the real function runs). The tests' latents have 4-5
    classes, below MIN_CLASSES, where the layers multiply; here they gather, so that path is tested."""
    monkeypatch.setattr(onehot, "MIN_CLASSES", 1)
    calls: list = []
    forward = onehot._OneHotLinear.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    monkeypatch.setattr(onehot._OneHotLinear, "forward", staticmethod(counted))
    return calls


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("needs", ["input", "weight", "both"])
def test_gathered_layer_equals_linear_with_gradients(layout, bias, needs, gathers):
    fast, ref = pair(layout, bias)
    x = onehot_input(onehot.MIN_ROWS + 10, layout)
    assert onehot_index(x, LAYOUTS[layout][1]) is not None
    want_x, want_w = needs in ("input", "both"), needs in ("weight", "both")
    for layer in (fast, ref):
        layer.requires_grad_(want_w)
    xs = [x.clone().requires_grad_(want_x) for _ in range(2)]
    out_fast, out_ref = fast(xs[0]), ref(xs[1])
    assert gathers == [1]
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(out_ref)
    targets = lambda layer, xx: ([xx] if want_x else []) + (list(layer.parameters()) if want_w else [])  # noqa: E731
    for a, b in zip(torch.autograd.grad(out_fast, targets(fast, xs[0]), g),
                    torch.autograd.grad(out_ref, targets(ref, xs[1]), g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gathered_layer_takes_leading_axes_and_no_grad(gathers):
    fast, ref = pair("feat", True)
    x = onehot_input(4 * 40, "feat").reshape(4, 40, -1)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-6, atol=1e-6)
    assert gathers == [1]


def test_small_batches_multiply(gathers):
    fast, ref = pair("feat", True)
    x = onehot_input(onehot.MIN_ROWS - 1, "feat")
    torch.testing.assert_close(fast(x), ref(x))
    assert not gathers


@pytest.mark.parametrize("case", ["probabilities", "two-hot", "negative", "two", "half"])
def test_inputs_that_are_not_one_hot_take_the_dense_path(case, gathers):
    _, cols = LAYOUTS["feat"]
    x = onehot_input(onehot.MIN_ROWS + 10, "feat")
    hot = x[:, cols.lo:].reshape(x.shape[0], GROUPS, CLASSES)
    if case == "probabilities":
        hot[7] = torch.softmax(torch.randn(GROUPS, CLASSES), -1)
    elif case == "two-hot":
        hot[7, 1] = torch.tensor([1.0, 1.0, 0, 0, 0])
    elif case == "negative":  # sums to its largest entry, but is not one-hot
        hot[7, 1] = torch.tensor([1.0, 0.5, -0.5, 0, 0])
    elif case == "two":
        hot[7, 1] = torch.tensor([2.0, 0, 0, 0, 0])
    else:
        hot[7, 1] = torch.tensor([0.5, 0, 0, 0, 0])
    assert onehot_index(x, cols) is None
    fast, ref = pair("feat", True)
    torch.testing.assert_close(fast(x), ref(x))
    assert not gathers


@pytest.mark.parametrize("classes, gathered", [(4, False), (8, False), (16, True), (32, True)])
def test_latents_of_few_classes_multiply(classes, gathered, monkeypatch, gathers):
    """Gathering pays only where few of the latent columns are hot: size1m's 4 classes (a quarter of
    the columns hot) and 8 multiply, size12m's 16 and more gather. Same result either way."""
    monkeypatch.setattr(onehot, "MIN_CLASSES", 16)  # the real threshold (the fixture lowers it)
    cols = OneHotCols(7, 7 + 3 * classes, classes)
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(80, 7, generator=g),
                   F.one_hot(torch.randint(0, classes, (80, 3), generator=g), classes).float().flatten(1)], -1)
    torch.manual_seed(0)
    layer = OneHotLinear(x.shape[1], 9, cols)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    assert bool(gathers) == gathered


def test_one_hot_index_points_at_the_hot_columns_and_a_dummy_for_zero_groups():
    _, cols = LAYOUTS["stoch-action"]
    x = onehot_input(onehot.MIN_ROWS, "stoch-action")
    idx = onehot_index(x, cols)
    dummy = cols.hi - cols.lo
    for row in range(x.shape[0]):
        for group in range(GROUPS):
            block = x[row, group * CLASSES:(group + 1) * CLASSES]
            expect = dummy if block.sum() == 0 else group * CLASSES + int(block.argmax())
            assert int(idx[row, group]) == expect


def test_columns_must_fit_the_layer():
    with pytest.raises(ValueError, match="do not fit"):
        OneHotLinear(10, 4, OneHotCols(4, 12, 4))
    with pytest.raises(ValueError, match="do not fit"):
        OneHotLinear(10, 4, OneHotCols(4, 10, 4))  # 6 columns are not whole groups of 4


@pytest.mark.parametrize("recipe", ["2024", "2023"])
def test_full_update_with_gathering_equals_the_dense_update(recipe, monkeypatch, gathers):
    """A whole update (world model, imagination, actor and critic) with the gathered layers gives
    the loss and gradients of the same update through plain matrix multiplies."""
    cfg = make_cfg(recipe)
    space = {"vec": ((5,), "float32"), "image": ((16, 16, 3), "uint8")}
    act = ActSpace(2, discrete=False)
    torch.manual_seed(0)
    agent = Dreamer(cfg, space, act)
    dense = copy.deepcopy(agent)
    rng = torch.Generator().manual_seed(3)
    b, t = 8, 10  # 80 rows per replayed head: above MIN_ROWS, so every kind of layer gathers
    batch = {"vec": torch.randn(b, t, 5, generator=rng).numpy(),
             "image": torch.randint(0, 255, (b, t, 16, 16, 3), generator=rng, dtype=torch.uint8).numpy(),
             "action": torch.rand(b, t, 2, generator=rng).mul(2).sub(1).numpy(),
             "reward": torch.randn(b, t, generator=rng).numpy(),
             "is_first": torch.zeros(b, t).numpy(), "is_terminal": torch.zeros(b, t).numpy(),
             "is_last": torch.zeros(b, t).numpy()}
    batch["is_first"][:, 0] = 1

    def update(a: Dreamer) -> tuple[torch.Tensor, list[torch.Tensor]]:
        data, start = a.to_inputs(batch), a.context_from_batch(batch)
        torch.manual_seed(1)
        total, _, _ = a._update(data, start)
        params = [p for p in a.model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(total, params, allow_unused=True)
        return total, [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]

    total_fast, grads_fast = update(agent)
    assert len(gathers) > 5  # the gathered path really ran (heads, actor, critic, GRU input)
    monkeypatch.setattr(onehot, "MIN_ROWS", 10**9)  # every layer multiplies
    gathers.clear()
    total_dense, grads_dense = update(dense)
    assert not gathers
    torch.testing.assert_close(total_fast, total_dense, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_fast, grads_dense, strict=True):  # equal up to float rounding, tensor by tensor
        assert float((a - b).norm()) <= 1e-4 * float(b.norm()) + 1e-9



@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own imports warn
def test_compiled_layer_traces_into_one_graph():
    """Under torch.compile the layer multiplies: the data-dependent check would split the graph
    (fullgraph=True raises on any break)."""
    fast, ref = pair("feat", True)
    x = onehot_input(onehot.MIN_ROWS + 10, "feat")
    compiled = torch.compile(fast, fullgraph=True)
    torch.testing.assert_close(compiled(x), ref(x))
