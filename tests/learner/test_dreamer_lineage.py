"""Dreamer v1 and DreamerV2 as recipes of the one Dreamer implementation (issue 26 s1).

The presets against ../shared/reference/lineage.md, the Gaussian latents shared with PlaNet, the free-nats
placement, and one test per mistake ports of these agents made (lineage.md): horizon off by one,
lambda-return misaligned by one step, actions paired with the wrong observation, no episode-boundary
masking inside a sequence, inputs not normalised when acting. Each runs on v1 and v2. Real torch, CPU,
tiny sizes; the last tests train each recipe end to end from the command line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from dreamer_helpers import FLAG_SPACE, make_batch, make_cfg

from core.agents.dreamer.dists import BoundedNormal, TanhNormal
from core.agents.dreamer.gaussian import GaussianRSSM
from core.agents.dreamer.layers import Norm
from core.agents.dreamer.policy import Policy, export_policy
from core.agents.dreamer.rssm import RSSM, free_nats
from core.agents.planet.net import PlanetNet
from core.agents.spaces import ActSpace
from core.config.agent import DreamerConfig
from core.config.planet import PlanetConfig
from learner.agents.dreamer.agent import Dreamer
from learner.agents.dreamer.behavior import Behavior, lambda_return
from learner.agents.dreamer.optim import PartsAdam
from learner.cli import main as learner_main

RECIPES = ("v1", "v2")
CONT = ActSpace(2, False)
SPACE = {"image": ((16, 16, 3), "uint8"), "pos": ((3,), "float32"), **FLAG_SPACE}


def agent(recipe: str, act: ActSpace = CONT, **over) -> Dreamer:
    torch.manual_seed(0)
    return Dreamer(make_cfg(recipe, **over), SPACE, act)


# ------------------------------------------------------------------------------------------------
# The presets


def test_v1_preset_is_the_papers_recipe():
    c = DreamerConfig(recipe="v1")
    assert (c.latent, c.stoch, c.deter, c.hidden, c.min_std, c.units, c.act, c.norm) == (
        "gaussian", 30, 200, 200, 0.1, 400, "elu", "none")
    assert (c.free_nats, c.free_nats_placement, c.kl_dyn + c.kl_rep, c.cont_scale) == (3.0, "mean", 1.0, 10.0)
    assert (c.optimizer, c.model_lr, c.ac_lr, c.critic_lr, c.model_clip, c.ac_clip) == (
        "adam", 6e-4, 8e-5, None, 100.0, 100.0)
    assert c.gamma == pytest.approx(0.99) and (c.lam, c.imag_horizon) == (0.95, 15)
    assert (c.actor_dist, c.actor_grad_continuous, c.actor_baseline, c.return_norm, c.act_noise) == (
        "tanh_normal", "dynamics", False, False, 0.3)
    assert c.entropy == 0.0 and c.slow_critic_reg == 0.0 and c.critic_bootstrap == "fast"


def test_v2_preset_is_the_papers_recipe_per_domain():
    c = DreamerConfig(recipe="v2")
    assert (c.latent, c.stoch, c.classes, c.unimix, c.act, c.norm, c.gru_norm) == (
        "categorical", 32, 32, 0.0, "elu", "none", "layer")
    assert c.kl_dyn / (c.kl_dyn + c.kl_rep) == pytest.approx(0.8) and c.free_nats_placement == "mean"
    assert (c.free_nats, c.entropy, c.model_lr, c.ac_lr, c.critic_lr, c.deter) == (1.0, 1e-4, 3e-4, 8e-5, 8e-5, 200)
    assert (c.critic_bootstrap, c.slow_critic_every, c.slow_critic_rate, c.slow_critic_reg) == ("slow", 100, 1.0, 0.0)
    assert (c.actor_grad_continuous, c.actor_grad_mix, c.optimizer, c.ac_clip) == ("dynamics", 0.1, "adam", 100.0)
    atari = DreamerConfig(recipe="v2", domain="atari")
    assert (atari.free_nats, atari.entropy, atari.deter, atari.critic_lr) == (0.0, 1e-3, 600, 1e-4)
    assert atari.gamma == pytest.approx(0.999) and atari.kl_dyn / (atari.kl_dyn + atari.kl_rep) == pytest.approx(0.8)
    # The domain is v2's alone; a size named in the file wins over the recipe's own dimensions.
    assert DreamerConfig(recipe="2024", domain="atari").free_nats == 1.0
    assert DreamerConfig(recipe="v2", size="tiny").deter == 64


def test_built_models_follow_v1_and_v2():
    a1, a2 = agent("v1"), agent("v2")
    assert isinstance(a1.wm.rssm, GaussianRSSM) and type(a2.wm.rssm) is RSSM
    assert all(m.kind == "none" for m in a1.model.modules() if isinstance(m, Norm))
    kinds2 = {m.kind for m in a2.model.modules() if isinstance(m, Norm)}
    assert kinds2 == {"none", "layer"} and a2.wm.rssm.gates_norm.kind == "layer"
    assert any(isinstance(m, torch.nn.ELU) for m in a1.behavior.actor.modules())
    assert not any(isinstance(m, torch.nn.SiLU) for m in a1.behavior.modules())
    assert isinstance(a1.behavior.actor(torch.zeros(1, a1.wm.feat_dim)), TanhNormal)
    assert isinstance(a2.behavior.actor(torch.zeros(1, a2.wm.feat_dim)), BoundedNormal)
    for a in (a1, a2):
        assert isinstance(a.optimizer, PartsAdam)
    lrs = {k: o.param_groups[0]["lr"] for k, o in agent("v2", size="tiny", critic_lr=2e-4).optimizer.optimizers.items()}
    assert lrs == {"world_model": 3e-4, "actor": 8e-5, "critic": 2e-4}


def test_planet_and_v1_share_one_gaussian_rssm():
    """One concept in one place: PlaNet's latents are the class Dreamer v1 builds."""
    net = PlanetNet(PlanetConfig(deter=16, hidden=16, stoch=4, units=16, cnn_depth=2), SPACE, CONT)
    assert type(net.rssm) is GaussianRSSM is type(agent("v1").wm.rssm)
    assert net.rssm.min_std == 0.1 and net.rssm.cfg.free_nats_placement == "step"


# ------------------------------------------------------------------------------------------------
# Free nats: per step (DreamerV3, PlaNet) or after averaging (v1, v2)


def test_free_nats_after_averaging_differs_from_per_step():
    kl = torch.tensor([[0.5, 5.0], [1.0, 2.0]], requires_grad=True)  # mean 2.125
    step, mean = free_nats(kl, 3.0, "step"), free_nats(kl, 3.0, "mean")
    assert step.requires_grad
    assert float(step.detach().mean()) == pytest.approx((3 + 5 + 3 + 3) / 4)
    assert float(mean.detach().mean()) == 3.0  # max(mean KL, 3)
    (g,) = torch.autograd.grad(mean.mean(), kl)
    assert torch.all(g == 0)  # the mean is below the floor: no gradient anywhere
    high = free_nats(kl * 2, 3.0, "mean")  # mean 4.25 > 3: the KL itself, gradient everywhere
    assert float(high.detach().mean()) == pytest.approx(4.25)
    (g,) = torch.autograd.grad(high.mean(), kl)
    assert torch.all(g > 0)


@pytest.mark.parametrize("recipe", RECIPES)
def test_kl_losses_use_the_recipes_placement(recipe):
    def observed(a):
        torch.manual_seed(7)
        data, start = a.to_inputs(make_batch(SPACE, CONT, 2, 5)), a.initial_context(2)
        prev = torch.cat([start["action"][:, None], data["action"][:, :-1]], 1)
        return a.wm.rssm.observe(a.wm.encoder(data), prev, data["is_first"], start)

    kl = agent(recipe).wm.rssm.kl(*observed(agent(recipe)))
    free = 1.05 * float(kl.detach().mean())  # the mean is below the floor, some positions above it
    assert float(kl.max()) > free
    a = agent(recipe, free_nats=free)
    dyn, rep = a.wm.rssm.kl_losses(*observed(a))
    assert torch.allclose(a.wm.rssm.kl(*observed(a)), kl)
    assert torch.all(dyn == free) and torch.all(rep == free)  # after averaging: every position the floor


# ------------------------------------------------------------------------------------------------
# The mistakes ports made


@pytest.mark.parametrize("recipe", RECIPES)
def test_imagination_takes_exactly_horizon_steps(recipe):
    """Horizon off by one: H imagined steps give states s_0..s_H, H actions and H returns, the last
    bootstrapped from s_H; the actor's H decisions are the ones its loss weighs."""
    a = agent(recipe, imag_horizon=4)
    data, start = a.to_inputs(make_batch(SPACE, CONT, 2, 3)), a.initial_context(2)
    _, post, _ = a.wm.loss(data, start)
    flat = {k: post[k].detach().reshape(6, *post[k].shape[2:]) for k in ("deter", "stoch")}
    steps = []
    real = a.wm.rssm.img_step

    def counted(*args, **kwargs):
        steps.append(1)
        return real(*args, **kwargs)

    a.wm.rssm.img_step = counted
    try:
        states, actions, outs = a.cells.imagine(flat, a.cfg.imag_horizon)
    finally:
        del a.wm.rssm.img_step
    assert len(steps) == 4
    assert states["deter"].shape[0] == 5 and actions.shape[0] == 4 and outs.shape[0] == 4
    assert torch.equal(states["deter"][0], flat["deter"])  # s_0 is the real start state
    ret = lambda_return(torch.zeros(5, 6), torch.ones(5, 6), a.behavior.critic(a.wm.rssm.feat(states)).mean(), 0.95)
    assert ret.shape == (4, 6)  # one return per decision


@pytest.mark.parametrize("recipe", RECIPES)
def test_lambda_return_credits_a_reward_to_the_states_before_it(recipe):
    """lambda-return misaligned by one: a reward arriving on entering s_k reaches R_0 discounted k - 1
    times, R_{k-1} undiscounted, and no R_t with t >= k."""
    cfg = make_cfg(recipe, imag_horizon=5)
    g, lam, h, k = cfg.gamma, cfg.lam, 5, 3
    reward = torch.zeros(h + 1, 1)
    reward[k] = 1.0
    disc = torch.full((h + 1, 1), g)
    ret = lambda_return(reward, disc, torch.zeros(h + 1, 1), lam)
    expected = [(g * lam) ** (k - 1 - t) if t < k else 0.0 for t in range(h)]
    assert ret[:, 0].tolist() == pytest.approx(expected)
    # With lam = 0 each return is one step: r_{t+1} + gamma v(s_{t+1}).
    value = torch.arange(h + 1.0)[:, None]
    one = lambda_return(reward, disc, value, 0.0)
    assert one[:, 0].tolist() == pytest.approx([float(reward[t + 1]) + g * float(value[t + 1]) for t in range(h)])
    # The recipe's behaviour returns R_0 of each start (zero critic: values are exactly 0).
    beh = Behavior(cfg, 8, CONT)
    feat = torch.randn(h + 1, 1, 8)
    _, ret0, _ = beh.loss(feat, torch.zeros(h, 1, 2), reward, torch.ones(h + 1, 1))
    assert float(ret0[0]) == pytest.approx((g * lam) ** (k - 1))


@pytest.mark.parametrize("recipe", RECIPES)
def test_the_model_reads_the_action_taken_before_each_observation(recipe):
    """Actions paired with the wrong observation: the state at step t follows a_{t-1}, the action taken
    after observing o_{t-1}; changing a_t changes steps t+1 on, never step t or before."""
    a = agent(recipe)
    batch = make_batch(SPACE, CONT, 2, 6)
    changed = {k: v.copy() for k, v in batch.items()}
    changed["action"][:, 3] = -changed["action"][:, 3]

    def posts(b):
        torch.manual_seed(1)
        _, post, _ = a.wm.loss(a.to_inputs(b), a.initial_context(2))
        return post["deter"].detach()

    d0, d1 = posts(batch), posts(changed)
    assert torch.equal(d0[:, :4], d1[:, :4])
    assert not torch.allclose(d0[:, 4], d1[:, 4])
    # Acting: the action fed to the next step is the one just taken (with its exploration noise).
    policy = Policy.from_model(a.model)
    obs = {k: batch[k][0, 0] for k in ("image", "pos")} | {"is_first": True, "reward": 0.0, "is_last": False,
                                                           "is_terminal": False}
    env_action = policy.act(obs)
    assert np.array_equal(policy.state["action"].numpy()[0], env_action)


@pytest.mark.parametrize("recipe", RECIPES)
def test_an_episode_start_inside_a_sequence_resets_the_state(recipe):
    """No masking at episode boundaries: from an `is_first` step on, a sequence's states are those of a
    sequence starting there, whatever came before (the previous action and latent forgotten too)."""
    a = agent(recipe)
    batch = make_batch(SPACE, CONT, 2, 7)
    batch["is_first"][:, 4] = True
    other = {k: v.copy() for k, v in batch.items()}
    rng = np.random.default_rng(5)
    other["image"][:, :4] = rng.integers(0, 256, other["image"][:, :4].shape, dtype=np.uint8)
    other["pos"][:, :4] = rng.normal(size=other["pos"][:, :4].shape)
    other["action"][:, :4] = rng.uniform(-1, 1, other["action"][:, :4].shape)  # a_3 drives step 4 unless reset

    def posts(b):
        torch.manual_seed(2)
        _, post, _ = a.wm.loss(a.to_inputs(b), a.initial_context(2))
        return post

    p0, p1 = posts(batch), posts(other)
    assert not torch.allclose(p0["deter"][:, 3], p1["deter"][:, 3])
    for key in ("deter", "stoch"):
        assert torch.allclose(p0[key][:, 4:], p1[key][:, 4:], atol=1e-6), key


@pytest.mark.parametrize("recipe", RECIPES)
def test_acting_normalises_inputs_as_training_does(recipe):
    """Inputs not normalised when acting: the encoder sees the same numbers from Policy.act (the exported
    policy, as a robot runs it) as from a replayed batch: images scaled to [-0.5, 0.5], vectors raw (the
    encoder symlogs them), hence the same embedding."""
    a = agent(recipe)
    batch = make_batch(SPACE, CONT, 1, 2)
    batch["pos"] *= 100.0  # large readings: a missing symlog or scaling shows
    policy = Policy.from_weights(export_policy(a.model, 1))
    policy.lean = False  # the modules' inputs; its lean path acts the same (tests/core/test_dreamer_act_path.py)
    seen = {}
    policy.encoder.register_forward_hook(lambda _m, args, out: seen.update(inp=args[0], out=out))
    obs = {"image": batch["image"][0, 0], "pos": batch["pos"][0, 0], "is_first": True, "reward": 0.0,
           "is_last": False, "is_terminal": False}
    policy.act(obs)
    data = a.to_inputs(batch)
    with torch.no_grad():
        trained = a.wm.encoder(data)[0, 0]
    image = seen["inp"]["image"][0, 0]
    assert float(image.min()) >= -0.5 and float(image.max()) <= 0.5
    assert torch.allclose(image, data["image"][0, 0])
    assert torch.allclose(seen["out"][0, 0], trained, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# The behaviour parts v1 and v2 add


def test_tanh_normal_matches_torch_and_starts_wide():
    out = torch.randn(64, 4)
    dist = TanhNormal(out)
    base = torch.distributions.Normal(dist.loc, dist.scale)
    ref = torch.distributions.TransformedDistribution(base, [torch.distributions.TanhTransform()])
    assert torch.all(dist.rsample().abs() <= 1)  # std ~5 at first: float32 samples reach +-1
    x = torch.rand(64, 2) * 1.8 - 0.9
    assert torch.allclose(dist.log_prob(x), ref.log_prob(x).sum(-1), atol=1e-3)
    assert torch.allclose(TanhNormal(torch.zeros(1, 4)).scale, torch.full((1, 2), 5.0 + 1e-4))
    assert torch.equal(dist.mode(), torch.tanh(dist.loc))


def test_v2_copies_the_slow_critic_every_100_updates():
    beh = Behavior(make_cfg("v2"), 8, CONT)
    with torch.no_grad():
        for p in beh.critic.parameters():
            p.add_(1.0)
    for updates in range(1, 100):
        beh.update_slow(updates)
    assert not any(torch.equal(s, f) for s, f in zip(beh.slow_critic.parameters(), beh.critic.parameters()))
    beh.update_slow(100)
    assert all(torch.equal(s, f) for s, f in zip(beh.slow_critic.parameters(), beh.critic.parameters()))


def test_actor_gradient_both_mixes_dynamics_and_reinforce():
    h, n, d = 3, 4, 8
    torch.manual_seed(3)
    feat = torch.randn(h + 1, n, d, requires_grad=True)
    cont = torch.ones(h + 1, n)
    grads = {}
    for mode in ("dynamics", "reinforce", "both"):
        beh = Behavior(make_cfg("v2", actor_grad_continuous=mode, entropy=0.0), d, CONT)
        policy = beh.actor(feat.detach()[:-1])
        action = policy.rsample().detach()
        reward = feat.square().sum(-1)  # as the reward head's: a function of the imagined states
        total, _, _ = beh.loss(feat, action, reward, cont, policy)
        grads[mode] = torch.autograd.grad(total, feat, allow_unused=True)[0]
    assert grads["reinforce"] is None and float(grads["dynamics"].abs().sum()) > 0
    # The REINFORCE part reaches the actor only; through the states, both = mix x dynamics.
    assert torch.allclose(grads["both"], 0.1 * grads["dynamics"], atol=1e-6)


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_recipe_acts_with_its_exploration_noise(recipe):
    a = agent(recipe)
    policy = Policy.from_model(a.model)
    policy.reset()
    action = torch.zeros(64, 2)
    noisy = policy._explore(action, a.cfg.act_noise)
    assert float(noisy.std()) == pytest.approx(a.cfg.act_noise, abs=0.08)


# ------------------------------------------------------------------------------------------------
# End to end: each recipe trains on Pendulum-v1 from the command line and exports its policy


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_pendulum_and_exports_a_policy(tmp_path: Path, recipe: str):
    code = learner_main([
        "train", "--env", "gymnasium:Pendulum-v1", "--logdir", str(tmp_path), "--quiet",
        "--set", f"dreamer.recipe={recipe}", "--set", "dreamer.size=tiny", "--set", "dreamer.imag_horizon=3",
        "--set", "train.steps=40", "--set", "train.prefill=20", "--set", "train.batch_size=2",
        "--set", "train.batch_length=8", "--set", "train.train_ratio=8", "--set", "train.eval_every=0",
        "--set", "control.episode_steps=20",
    ])
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["env_steps"] == 40 and summary["updates"] > 0
    policy = Policy.from_weights((tmp_path / "policy.safetensors").read_bytes())
    assert policy.cfg.recipe == recipe
    assert isinstance(policy.rssm, GaussianRSSM) == (recipe == "v1")
    action = policy.act({"vector": np.zeros(3, np.float32), "is_first": True, "reward": 0.0, "is_last": False,
                         "is_terminal": False}, mode="mode")
    assert action.shape == (1,) and math.isfinite(float(action[0]))
