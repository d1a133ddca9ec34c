"""The World Models policy a robot builds from a blob alone (real torch, real safetensors bytes): it acts as the
trainer's live policy does, prepare() changes nothing but when the LSTM step runs, the random policy before C
is evolved is smooth, and a blob that does not fit is refused with a message naming what is wrong."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.agents import load_policy
from core.agents.spaces import ActSpace
from core.agents.world_models.policy import Policy, PolicyNet, policy_weights
from core.config.world_models import WorldModelsConfig
from core.layout import StepLayout
from core.weights import weights_to_bytes

CFG = WorldModelsConfig(z=4, lstm=8, vae_depth=2, mixtures=2, random_policy="smooth", smooth_dt=0.01)
SPACE = StepLayout({"image": ((48, 48, 3), "uint8"), "joints": ((6,), "float32"), "is_first": ((), "bool"),
                    "is_last": ((), "bool"), "is_terminal": ((), "bool")})
ACT = ActSpace(3, False)


def _net(evolved: bool) -> PolicyNet:
    torch.manual_seed(0)
    net = PolicyNet(CFG, ACT)
    with torch.no_grad():
        net.controller.params.normal_(0, 0.5)
        net.controller.evolved.fill_(int(evolved))
    return net


def _episode(length: int = 6) -> list[dict]:
    rng = np.random.default_rng(1)
    return [{"image": rng.integers(0, 255, (48, 48, 3), dtype=np.uint8), "joints": np.zeros(6, np.float32),
             "is_first": t == 0} for t in range(length)]


def test_a_blob_policy_acts_as_the_trainers_live_policy_and_prepare_only_moves_work() -> None:
    net = _net(evolved=True)
    live = Policy.from_modules(CFG, SPACE, ACT, net)
    robot = load_policy(weights_to_bytes(*policy_weights(net, CFG, SPACE, ACT, version=7)))
    assert isinstance(robot, Policy) and robot.version == 7 and robot.inputs == ("image",)
    for policy in (live, robot):
        policy.reset()
    for step in _episode():
        a = live.act(step, mode="mode")
        b = robot.act(step, mode="mode")
        robot.prepare()  # the robot steps the LSTM between ticks; the live policy inside the next act()
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert a.shape == (3,) and np.all(np.abs(a) <= 1)


def test_before_c_is_evolved_the_policy_walks_smoothly_at_random() -> None:
    policy = Policy.from_modules(CFG, SPACE, ACT, _net(evolved=False))
    actions = np.stack([policy.act(step) for step in _episode(40)])
    steps = np.abs(np.diff(actions, axis=0))
    assert np.all(np.abs(actions) <= 1) and steps.max() < 0.1 * 5  # sqrt(dt) = 0.1 a step, 5 sigma at most
    assert np.ptp(actions, axis=0).max() > 0.1  # it moves


def test_a_blob_whose_tensors_do_not_fit_its_config_is_refused_naming_the_tensor() -> None:
    tensors, meta = policy_weights(_net(True), CFG, SPACE, ACT, version=1)
    meta["world_models"] = {**meta["world_models"], "lstm": 16}
    with pytest.raises(ValueError, match=r"memory.cell.weight_ih is \[32, 7\] in the blob.*lstm 16"):
        load_policy(weights_to_bytes(tensors, meta))


def test_a_blob_for_an_image_the_robot_lacks_is_refused_naming_the_key() -> None:
    tensors, meta = policy_weights(_net(True), CFG, SPACE, ACT, version=1)
    meta["world_models"] = {**meta["world_models"], "image_key": "wrist"}
    with pytest.raises(ValueError, match="world_models.image_key: 'wrist' is not an observation here"):
        load_policy(weights_to_bytes(tensors, meta))
