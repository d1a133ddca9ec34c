"""PlaNet's acting parts with real torch: the CEM refit and bounds, the planner on Pendulum-v1's own equations,
the Gaussian-latent RSSM, the planner policy (action repeat, exploration, bounds) and its policy blob."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.agents import load_policy, read_policy
from core.agents.dreamer.gaussian import gaussian_kl
from core.agents.planet.cem import plan, refit
from core.agents.planet.net import PlanetNet
from core.agents.planet.policy import Policy, policy_weights
from core.agents.spaces import ActSpace
from core.config.planet import PlanetConfig
from core.interface import flag_specs
from core.layout import StepLayout
from core.weights import weights_to_bytes

SPACE = StepLayout({"vector": ((3,), "float32"), **{k: (s.shape, s.dtype) for k, s in flag_specs().items()}})
TINY = {"deter": 16, "hidden": 16, "stoch": 4, "units": 16, "candidates": 40, "top_k": 4, "iterations": 2,
        "horizon": 3}


def tiny_policy(**overrides: object) -> Policy:
    torch.manual_seed(0)
    net = PlanetNet(PlanetConfig(**{**TINY, **overrides}), SPACE, ActSpace(1, False))
    return Policy.from_model(net)


def obs(first: bool, value: float = 0.0) -> dict:
    return {"vector": np.full(3, value, np.float32), "reward": np.float32(0.0), "is_first": first,
            "is_last": False, "is_terminal": False}


# --- the cross-entropy method
def test_refit_is_the_mean_and_population_std_of_the_top_k_candidates() -> None:
    # 2 start states x 5 candidates x horizon 2 x 1 action dimension
    actions = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5], [-0.5, -0.4, -0.3, -0.2, -0.1]])[:, :, None, None]
    actions = actions.expand(2, 5, 2, 1) * torch.tensor([1.0, -1.0])[None, None, :, None]
    returns = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [0.0, 0.0, 9.0, 0.0, 8.0]])
    mean, std = refit(actions, returns, top_k=2)
    assert mean.shape == std.shape == (2, 2, 1)
    assert torch.allclose(mean[0, :, 0], torch.tensor([0.3, -0.3]))  # candidates 1 and 3: 0.2 and 0.4
    assert torch.allclose(std[0, :, 0], torch.tensor([0.1, 0.1]))
    assert torch.allclose(mean[1, :, 0], torch.tensor([-0.2, 0.2]))  # candidates 2 and 4: -0.3 and -0.1
    assert torch.allclose(std[1, :, 0], torch.tensor([0.1, 0.1]))
    with pytest.raises(ValueError, match="top_k must be in 1..candidates"):
        plan(lambda a: a.sum((2, 3)), 1, 2, 1, iterations=1, candidates=4, top_k=5)


def test_plan_stays_in_the_action_bounds_and_converges_to_the_best_corner() -> None:
    """A score that grows without bound past the action limits: candidates are clipped before scoring, so
    the plan is the corner of the box, never beyond it."""
    target = torch.tensor([1.0, -1.0, 1.0])
    generator = torch.Generator().manual_seed(0)
    scored = []

    def score(actions: torch.Tensor) -> torch.Tensor:
        scored.append(actions)
        return (actions * target).sum((2, 3))

    mean = plan(score, 4, 5, 3, iterations=10, candidates=200, top_k=20, generator=generator)
    assert mean.shape == (4, 5, 3)
    assert all(a.shape == (4, 200, 5, 3) for a in scored) and len(scored) == 10  # one batched tensor per iteration
    assert all(a.abs().max() <= 1.0 for a in scored)
    assert mean.abs().max() <= 1.0
    assert torch.all(mean * target > 0) and (mean * target).mean() > 0.9  # pushed to the bounds, not past them


def pendulum_step(th: torch.Tensor, thdot: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gymnasium Pendulum-v1's equations, vectorised (g 10, m 1, l 1, dt 0.05, max speed 8, max torque 2);
    u in [-1, 1] as the model acts, scaled to the torque as learner.envs maps actions."""
    torque = u.clamp(-1.0, 1.0) * 2.0
    angle = (th + math.pi) % (2 * math.pi) - math.pi
    reward = -(angle.square() + 0.1 * thdot.square() + 0.001 * torque.square())
    thdot = (thdot + (3 * 10.0 / 2 * torch.sin(th) + 3.0 * torque) * 0.05).clamp(-8.0, 8.0)
    return th + thdot * 0.05, thdot, reward


def test_cem_on_the_true_pendulum_dynamics_swings_up_and_holds() -> None:
    """The planner check without a model: 10 episodes of 200 steps, all planned at once (B = 10), reach a mean
    return >= -200 (random: about -1200). CI-sized: 100 candidates, top 10, 5 iterations (official 1000, 100,
    10) at the official horizon 12, each action held 2 steps as in hardware_configs/gym_pendulum_planet.yaml."""
    generator = torch.Generator().manual_seed(0)
    episodes, repeat = 10, 2
    th = torch.rand(episodes, generator=generator) * 2 * math.pi - math.pi  # Pendulum-v1's reset ranges
    thdot = torch.rand(episodes, generator=generator) * 2 - 1
    total = torch.zeros(episodes)

    def score(actions: torch.Tensor) -> torch.Tensor:
        b, n = actions.shape[:2]
        s_th, s_thdot, ret = th[:, None].expand(b, n), thdot[:, None].expand(b, n), torch.zeros(b, n)
        for action in actions.repeat_interleave(repeat, 2).unbind(2):
            s_th, s_thdot, reward = pendulum_step(s_th, s_thdot, action[..., 0])
            ret = ret + reward
        return ret

    for t in range(200):
        if t % repeat == 0:
            action = plan(score, episodes, 12, 1, iterations=5, candidates=100, top_k=10, generator=generator)[:, 0, 0]
        th, thdot, reward = pendulum_step(th, thdot, action)
        total += reward
    assert total.mean() >= -200, total


# --- the Gaussian-latent RSSM
def test_gaussian_kl_matches_torch_distributions() -> None:
    g = torch.Generator().manual_seed(1)
    m1, m2 = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    s1, s2 = torch.rand(5, 4, generator=g) + 0.1, torch.rand(5, 4, generator=g) + 0.1
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(m1, s1), torch.distributions.Normal(m2, s2))
    assert torch.allclose(gaussian_kl(m1, s1, m2, s2), expected, atol=1e-6)


def test_gaussian_rssm_states_stds_and_free_nats() -> None:
    net = tiny_policy().net
    rssm = net.rssm
    state = rssm.initial(3, torch.device("cpu"))
    assert state["stoch"].shape == (3, 4) and rssm.feat(state).shape == (3, 20)
    step = rssm.img_step(state, torch.zeros(3, 1))
    assert step["stoch"].shape == step["mean"].shape == step["std"].shape == (3, 4)
    assert step["std"].min() >= 0.1  # softplus + min std
    embed = net.encoder({"vector": torch.zeros(3, 5, 3)})
    post, prior = rssm.observe(embed, torch.zeros(3, 5, 1), torch.zeros(3, 5), state)
    assert post["stoch"].shape == (3, 5, 4) and prior["mean"].shape == (3, 5, 4)
    assert torch.all(rssm.kl_loss(post, prior) >= 3.0)  # free nats 3
    assert rssm.feat_cols is None  # no one-hot gathering on Gaussian samples


# --- the planner policy
def test_policy_plans_every_action_repeat_steps_holds_in_between_and_replans_at_an_episode_start() -> None:
    policy = tiny_policy(action_repeat=3)
    calls = []
    original = policy.plan
    policy.plan = lambda start: calls.append(1) or original(start)  # type: ignore[method-assign]
    actions = []
    for t in range(7):
        policy.act(obs(t == 0, 0.1 * t), mode="sample")
        actions.append(policy.last_action.copy())
    assert len(calls) == 3  # steps 0, 3, 6
    assert np.array_equal(actions[0], actions[1]) and np.array_equal(actions[1], actions[2])
    assert np.array_equal(actions[3], actions[4]) and np.array_equal(actions[4], actions[5])
    policy.act(obs(True), mode="sample")  # a new episode plans at once, whatever the hold
    assert len(calls) == 4


def test_policy_actions_stay_in_bounds_with_any_exploration_noise() -> None:
    policy = tiny_policy()
    for t in range(5):
        action = policy.act(obs(t == 0, 3.0), mode="sample", noise=10.0)
        assert action.dtype == np.float32 and action.shape == (1,) and np.all(np.abs(action) <= 1.0)
    batched = {k: np.stack([np.asarray(v)] * 3) for k, v in obs(True).items()}
    assert np.all(np.abs(policy.act(batched, batched=True, noise=10.0)) <= 1.0)


def test_evaluation_acts_without_exploration_noise() -> None:
    """mode 'mode' executes the plan's first action as planned; 'sample' adds planet.explore noise."""
    policy = tiny_policy(explore=0.3)
    torch.manual_seed(7)
    mode = policy.act(obs(True), mode="mode")
    torch.manual_seed(7)
    sample = policy.act(obs(True), mode="sample")
    assert not np.array_equal(mode, sample)  # the same plan (same seed), plus noise when collecting


def test_policy_blob_round_trip_acts_the_same_and_names_its_cost_settings() -> None:
    policy = tiny_policy()
    blob = weights_to_bytes(*policy_weights(policy.net, 7))
    read = read_policy(blob)
    assert read.algorithm == "planet" and read.version == 7 and not any(k.startswith("decoder.") for k in read.tensors)
    loaded = load_policy(blob)
    assert isinstance(loaded, Policy) and loaded.version == 7
    for p in (policy, loaded):
        torch.manual_seed(3)
        p.generator = np.random.default_rng(0)
        p.act(obs(True, 0.5), mode="sample")
    assert np.array_equal(policy.last_action, loaded.last_action)
    assert "planet.candidates (40)" in loaded.cost_settings and "planet.horizon (3)" in loaded.cost_settings


def test_policy_blobs_over_the_bounds_or_for_discrete_actions_are_refused_before_building() -> None:
    tensors, meta = policy_weights(tiny_policy().net, 1)
    huge = {**meta, "planet": {**meta["planet"], "deter": 1 << 20}}
    with pytest.raises(ValueError, match=r"planet.deter: 1048576 is more than a policy blob may declare"):
        read_policy(weights_to_bytes(tensors, huge))
    wrong = {**meta, "planet": {**meta["planet"], "units": 24}}
    with pytest.raises(ValueError, match="in the blob, but the network its planet config declares"):
        load_policy(weights_to_bytes(tensors, wrong))
    discrete = {**meta, "act_space": {"dim": 3, "discrete": True}}
    with pytest.raises(ValueError, match="planet plans continuous actions .* 3 discrete choices"):
        read_policy(weights_to_bytes(tensors, discrete))
