"""act()'s lean path (core/agents/dreamer/act_path.py) against the plain modules: a policy built from a real
safetensors blob with random weights, on random observations (two images, a vector, a scalar), acts the same up
to float rounding with either path: same actions, same recurrent state, same random numbers drawn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.agents.blob import blob_meta
from core.agents.dreamer.act_path import Conv
from core.agents.dreamer.policy import Policy, PolicyNet
from core.agents.spaces import ActSpace
from core.layout import StepLayout
from core.weights import weights_to_bytes
from tests.dreamer_helpers import FLAG_SPACE, make_cfg

# 32x32 images: the CNN ends on 2x2 pixels, so the posterior's columns really are reordered (H, W, C).
SPACE = StepLayout({"image": ((32, 32, 3), "uint8"), "depth": ((32, 32, 1), "uint8"),
                    "joints": ((5,), "float32"), "gripper": ((), "float32"), **FLAG_SPACE})
RECIPES = {"2024": {"image_keys": "image|depth"},  # pool CNN, RMSNorm, SiLU, unimix
           "2023": {"image_keys": "image|depth"},  # stride-2 CNN, LayerNorm
           "v2": {"image_keys": "image|depth"}}  # no norms, ELU, no unimix


def _blob(recipe: str, act: ActSpace, space: StepLayout = SPACE, seed: int = 0) -> bytes:
    """A policy blob whose every weight, bias and norm scale is random (zeros or ones would hide a slip)."""
    cfg = make_cfg(recipe, **RECIPES.get(recipe, {}))
    torch.manual_seed(seed)
    net = PolicyNet(cfg, space, act)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("bias") or name.endswith("shift"):
                p.normal_(0.0, 0.3)
            elif name.endswith("scale"):
                p.uniform_(0.5, 1.5)
        net.actor.out.weight.normal_(0.0, 1.0)  # a sharp actor: a slip shows in the action
    tensors = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    return weights_to_bytes(tensors, blob_meta("dreamer", cfg.model_dump(mode="json"), space, act, 3))


def _observations(n: int, batch: int | None = None, firsts: tuple[int, ...] = (0,), seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    lead = () if batch is None else (batch,)
    out = []
    for t in range(n):
        first = np.zeros(lead, bool) if batch is not None else np.bool_(False)
        if batch is None:
            first = np.bool_(t in firsts)
        else:
            first[:] = t == 0
            if t in firsts:
                first[t % batch] = True  # a row that starts a new episode in the middle of the batch's run
        out.append({"image": rng.integers(0, 256, (*lead, 32, 32, 3), dtype=np.uint8),
                    "depth": rng.integers(0, 256, (*lead, 32, 32, 1), dtype=np.uint8),
                    "joints": rng.normal(0, 2, (*lead, 5)).astype(np.float32),
                    "gripper": rng.normal(0, 1, lead).astype(np.float32),
                    "reward": np.zeros(lead, np.float32), "is_first": first,
                    "is_last": np.zeros(lead, bool), "is_terminal": np.zeros(lead, bool)})
    return out


def _rollout(policy: Policy, obs: list[dict], mode: str, prepare: bool, batched: bool = False) -> list[tuple]:
    torch.manual_seed(5)
    policy.reset()
    steps = []
    for o in obs:
        env = np.asarray(policy.act(o, mode=mode, batched=batched))
        steps.append((env, policy.last_action.copy(), *policy.context().values(), torch.rand(1).item()))
        if prepare:
            policy.prepare()
    return steps


def _pair(blob: bytes) -> tuple[Policy, Policy]:
    lean, plain = Policy.from_weights(blob), Policy.from_weights(blob)
    plain.lean = False
    assert lean.lean
    return lean, plain


def _assert_same(a: list[tuple], b: list[tuple]) -> None:
    for step_a, step_b in zip(a, b, strict=True):
        for x, y in zip(step_a[:-1], step_b[:-1], strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
        assert step_a[-1] == step_b[-1]  # the same random numbers drawn: torch's stream is where the plain path left it


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("discrete", [False, True], ids=["continuous", "discrete"])
@pytest.mark.parametrize("mode", ["sample", "mode"])
def test_lean_act_equals_the_plain_modules(recipe: str, discrete: bool, mode: str) -> None:
    act = ActSpace(4, discrete)
    lean, plain = _pair(_blob(recipe, act))
    obs = _observations(8, firsts=(0, 5))
    for prepare in (True, False):
        a, b = _rollout(lean, obs, mode, prepare), _rollout(plain, obs, mode, prepare)
        _assert_same(a, b)
    assert lean._lean is not None and plain._lean is None  # the lean path really acted
    if discrete:  # the actions are not all one tie (the mode of a random actor may be)
        assert mode == "mode" or len({int(s[0]) for s in a}) > 1
    else:
        assert np.ptp(np.stack([s[0] for s in a]), axis=0).max() > 0.1


def test_lean_act_equals_the_plain_modules_on_a_batch() -> None:
    lean, plain = _pair(_blob("2024", ActSpace(3, False)))
    obs = _observations(6, batch=3, firsts=(0, 2, 4))
    _assert_same(_rollout(lean, obs, "sample", True, batched=True), _rollout(plain, obs, "sample", True, batched=True))
    single = _observations(3)  # a batch of one afterwards: the path is rebuilt for it
    _assert_same(_rollout(lean, single, "sample", True), _rollout(plain, single, "sample", True))
    assert lean._lean.batch == 1


def test_convolutions_are_prepacked_and_the_plain_conv_fallback_agrees() -> None:
    """Where torch has oneDNN, each convolution's weights are laid out once; the fallback (a build without it)
    gives the same output."""
    lean, _ = _pair(_blob("2024", ActSpace(3, False)))
    lean.act(_observations(1)[0])
    convs = [s for s in lean._lean.encoder.steps if isinstance(s, Conv)]
    assert len(convs) == 4
    if torch.backends.mkldnn.is_available():
        assert all(c.packed is not None for c in convs)
    x = torch.rand(1, 4, 36, 36).contiguous(memory_format=torch.channels_last) * 255  # a padded raw image
    first = convs[0]
    with torch.inference_mode():
        packed = first(x)
        first.packed = None
        torch.testing.assert_close(first(x), packed, rtol=1e-5, atol=1e-4)


def test_the_plain_path_acts_where_the_lean_one_does_not_apply() -> None:
    """Gaussian latents (Dreamer v1), a transformer world model and the trainer's live modules (whose weights
    change every update, while the lean path keeps prepacked copies) act through the plain modules."""
    act = ActSpace(3, False)
    gaussian = Policy.from_weights(_blob("v1", act))
    assert not gaussian.lean
    gaussian.act(_observations(1)[0])
    net = PolicyNet(make_cfg(image_keys="image|depth"), SPACE, act)
    live = Policy(net_cfg := make_cfg(image_keys="image|depth"), SPACE, act, net, torch.device("cpu"))
    assert not live.lean and net_cfg.dynamics == "rssm"
    live.act(_observations(1)[0])
    assert live._lean is None


@pytest.mark.parametrize("keys", [("image",), ("joints", "gripper")], ids=["image-only", "vectors-only"])
def test_lean_act_equals_the_plain_modules_with_one_kind_of_input(keys: tuple[str, ...]) -> None:
    space = StepLayout({k: v for k, v in SPACE.items() if k in keys or k in FLAG_SPACE})
    lean, plain = _pair(_blob("2024", ActSpace(3, False), space))
    obs = [{k: v for k, v in o.items() if k in space} for o in _observations(5, firsts=(0, 3))]
    _assert_same(_rollout(lean, obs, "sample", True), _rollout(plain, obs, "sample", True))


def test_an_encoder_layer_without_a_lean_form_leaves_acting_to_the_modules() -> None:
    lean, plain = _pair(_blob("2024", ActSpace(3, False)))
    for policy in (lean, plain):
        policy.encoder.cnn.net.append(torch.nn.Identity())  # a layer the lean path does not know
    obs = _observations(3)
    _assert_same(_rollout(lean, obs, "sample", True), _rollout(plain, obs, "sample", True))
    assert not lean.lean and lean._lean is None
