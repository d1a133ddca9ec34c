"""DreamerV3 model checks: shapes and dtypes over observation/action kinds and both recipes,
gradient isolation between world model, actor and critic, seeded determinism, and the standalone
policy (export -> load gives the same actions; importing it stays light).

CPU, `tiny` size, real torch, no mocks.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import dreamer_helpers
import numpy as np
import pytest
import torch
from dreamer_helpers import FLAG_SPACE, make_cfg, randomise_biases

from core.agents.dreamer.policy import Policy, export_policy
from core.agents.spaces import ActSpace
from learner.agents.dreamer.agent import Dreamer
from learner.agents.dreamer.optim import LaProp

REPO = Path(__file__).resolve().parents[2]

SPACES = {
    "image": {"image": ((16, 16, 3), "uint8"), **FLAG_SPACE},
    "vector": {"pos": ((5,), "float32"), "speed": ((), "float32"), **FLAG_SPACE},
    "mixed": {"image": ((32, 16, 3), "uint8"), "pos": ((5,), "float32"), "speed": ((), "float32"), **FLAG_SPACE},
}


def make_act(discrete: bool) -> ActSpace:
    return ActSpace(3, True) if discrete else ActSpace(2, False)


def make_batch(space: dict, act: ActSpace, b: int = 2, t: int = 6, seed: int = 0) -> dict:
    """A replay-like batch (B, T, ...) with an episode end and a new start inside the first row (the same random
    arrays as `dreamer_helpers.make_batch`: the flags draw nothing)."""
    batch = dreamer_helpers.make_batch(space, act, b, t, seed)
    batch["is_last"][0, t // 2] = batch["is_terminal"][0, t // 2] = True
    batch["is_first"][0, t // 2 + 1] = True
    return batch


def observations(space: dict, n: int, firsts: tuple[int, ...], seed: int = 0) -> list[dict]:
    """Single (unbatched) observations as an environment gives them."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        obs = {}
        for key, (shape, dtype) in space.items():
            if key in FLAG_SPACE:
                continue
            if dtype == "uint8":
                obs[key] = rng.integers(0, 256, shape, dtype=np.uint8)
            else:
                obs[key] = np.asarray(rng.normal(size=shape), np.float32)
        obs.update(reward=np.float32(rng.normal()), is_first=i in firsts, is_last=False, is_terminal=False)
        out.append(obs)
    return out


def no_grad_or_zero(params) -> bool:
    return all(p.grad is None or torch.all(p.grad == 0) for p in params)


def some_grad(params) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


# ------------------------------------------------------------------------------------------------
# Shapes, dtypes and a full update for every observation kind, action kind and recipe.


@pytest.mark.parametrize("recipe", ["2024", "2023"])
@pytest.mark.parametrize("obs", ["image", "vector", "mixed"])
@pytest.mark.parametrize("discrete", [True, False], ids=["discrete", "continuous"])
def test_train_runs_with_finite_metrics_and_context(recipe, obs, discrete):
    cfg, space, act = make_cfg(recipe), SPACES[obs], make_act(discrete)
    b, t = 2, 6
    torch.manual_seed(0)
    agent = Dreamer(cfg, space, act)
    keys = agent.model.keys
    assert keys.images == (("image",) if obs != "vector" else ())
    assert keys.vectors == (("pos", "speed") if obs != "image" else ())
    assert keys.scalars == (("speed",) if obs != "image" else ())

    batch = make_batch(space, act, b, t)
    data = agent.to_inputs(batch)
    for key in keys.vectors:
        assert data[key].shape == (b, t, 5 if key == "pos" else 1) and data[key].dtype == torch.float32
    for key in ("reward", "is_first", "is_last", "is_terminal"):
        assert data[key].shape == (b, t) and data[key].dtype == torch.float32
    embed = agent.wm.encoder(data)
    assert embed.shape == (b, t, agent.wm.encoder.out_dim)
    feat = torch.randn(b, t, agent.wm.feat_dim)
    recon = agent.wm.decoder(feat)
    assert set(recon) == set(keys.images + keys.vectors)
    for key in keys.images:
        assert recon[key].shape == (b, t, *space[key][0])
    for key in keys.vectors:
        assert recon[key].shape == (b, t, 5 if key == "pos" else 1)

    before = {n: p.detach().clone() for n, p in agent.model.named_parameters()}
    slow_before = [p.detach().clone() for p in agent.behavior.slow_critic.parameters()]
    metrics, context = agent.train(batch)

    expected = {"loss", "wm/dec", "wm/reward", "wm/cont", "wm/kl", "wm/dyn", "wm/rep", "wm/post_entropy",
                "ac/actor_loss", "ac/critic_loss", "ac/entropy", "ac/return", "ac/value", "ac/return_scale"}
    expected |= {f"wm/image/{k}" for k in keys.images} | {f"wm/vector/{k}" for k in keys.vectors}
    assert expected <= set(metrics)
    assert ("ac/repval_loss" in metrics) == (recipe == "2024")
    assert any(k.startswith("grad_norm/") for k in metrics) == (recipe == "2023")
    for key, value in metrics.items():
        value = torch.as_tensor(value)
        assert value.numel() == 1 and torch.isfinite(value).all(), key
    assert float(metrics["wm/dyn"]) >= cfg.free_nats and float(metrics["ac/return_scale"]) >= 1.0

    assert context["deter"].shape == (b, t, cfg.deter)
    assert context["stoch"].shape == (b, t, cfg.stoch, cfg.classes)
    assert context["action"].shape == (b, t, act.dim)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in context.values())

    assert agent.updates == 1
    params = dict(agent.model.named_parameters())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in params.values())
    for prefix in ("wm.encoder.", "wm.rssm.", "wm.decoder.", "wm.reward_out.", "behavior.actor.",
                   "behavior.critic."):
        assert any(not torch.equal(p, before[n]) for n, p in params.items() if n.startswith(prefix)), prefix
    # The slow critic trails the critic (it moved, and by a small fraction only).
    slow = list(agent.behavior.slow_critic.parameters())
    assert any(not torch.equal(s, s0) for s, s0 in zip(slow, slow_before))
    assert all(not p.requires_grad for p in slow)

    # Acting with the trained model.
    policy = Policy.from_model(agent.model)
    obs_list = observations(space, 2, firsts=(0,))
    for o in obs_list:
        action = policy.act(o)
        if discrete:
            assert isinstance(action, np.integer | int) and 0 <= int(action) < act.dim
            assert policy.last_action.shape == (1, act.dim) and policy.last_action.sum() == 1.0
        else:
            assert action.shape == (act.dim,) and action.dtype == np.float32
            assert np.all(np.abs(action) <= 1.0)


def test_batched_acting_shapes():
    cfg, space, act = make_cfg(), SPACES["mixed"], make_act(False)
    agent = Dreamer(cfg, space, act)
    policy = Policy.from_model(agent.model)
    obs = observations(space, 3, firsts=(0, 1, 2))
    batched = {k: np.stack([o[k] for o in obs]) for k in obs[0]}
    actions = policy.act(batched, mode="mode", batched=True)
    assert actions.shape == (3, act.dim) and actions.dtype == np.float32
    assert policy.state["deter"].shape == (3, cfg.deter)


# ------------------------------------------------------------------------------------------------
# Gradient isolation.


def _wm_pass(agent: Dreamer, batch: dict):
    data = agent.to_inputs(batch)
    start = agent.context_from_batch(batch)
    wm_loss, post, _ = agent.wm.loss(data, start)
    return data, wm_loss, post


def _imagine_with_graph(agent: Dreamer, post: dict):
    """Imagination with gradients enabled everywhere (no freezing): the test sees every path."""
    wm, beh = agent.wm, agent.behavior
    flat = {k: post[k].detach().reshape(-1, *post[k].shape[2:]) for k in ("deter", "stoch")}
    states, actions = wm.rssm.imagine(flat, lambda s: beh.actor(wm.rssm.feat(s)).rsample(), agent.cfg.imag_horizon)
    feat = wm.rssm.feat(states)
    reward = wm.reward(feat).mean()
    cont = torch.sigmoid(wm.cont_logit(feat))
    assert feat.requires_grad and reward.requires_grad and cont.requires_grad
    return feat, actions, reward, cont


REINFORCE_CASES = [("2024", True), ("2024", False), ("2023", True)]


@pytest.mark.parametrize(("recipe", "discrete"), REINFORCE_CASES)
def test_actor_loss_alone_gives_world_model_and_critic_no_gradient(recipe, discrete):
    cfg = make_cfg(recipe, critic_scale=0.0)
    space, act = SPACES["vector"], make_act(discrete)
    torch.manual_seed(0)
    agent = Dreamer(cfg, space, act)
    _move_critic_off_zero_init(agent)  # a zero output layer would block any leak through the critic
    assert not agent.behavior.uses_dynamics_grad()
    _, _, post = _wm_pass(agent, make_batch(space, act))
    feat, actions, reward, cont = _imagine_with_graph(agent, post)
    loss, _, _ = agent.behavior.loss(feat, actions, reward, cont)
    loss.backward()
    assert no_grad_or_zero(agent.wm.parameters()), "actor loss leaked into the world model"
    assert no_grad_or_zero(agent.behavior.critic.parameters()), "actor loss leaked into the critic"
    assert some_grad(agent.behavior.actor.parameters())


@pytest.mark.parametrize(("recipe", "discrete"), [*REINFORCE_CASES, ("2023", False)])
def test_critic_loss_does_not_move_actor_or_world_model(recipe, discrete):
    cfg = make_cfg(recipe, actor_scale=0.0)
    space, act = SPACES["vector"], make_act(discrete)
    torch.manual_seed(0)
    agent = Dreamer(cfg, space, act)
    _move_critic_off_zero_init(agent)  # a zero output layer would block any leak through the critic
    _, _, post = _wm_pass(agent, make_batch(space, act))
    feat, actions, reward, cont = _imagine_with_graph(agent, post)
    loss, _, _ = agent.behavior.loss(feat, actions, reward, cont)
    agent.model.zero_grad(set_to_none=True)
    loss.backward()
    actor = list(agent.behavior.actor.parameters())
    critic = list(agent.behavior.critic.parameters())
    assert no_grad_or_zero(actor)
    assert no_grad_or_zero(agent.wm.parameters())
    assert some_grad(critic)
    # And literally: an optimiser step on this loss leaves the actor where it was.
    opt = LaProp(actor + critic, lr=1e-2, agc=0.3, pmin=1e-3, beta1=0.9, beta2=0.999, eps=1e-20, warmup=0)
    actor_before = [p.detach().clone() for p in actor]
    critic_before = [p.detach().clone() for p in critic]
    opt.step()
    assert all(torch.equal(p, p0) for p, p0 in zip(actor, actor_before))
    assert any(not torch.equal(p, p0) for p, p0 in zip(critic, critic_before))


@pytest.mark.parametrize(
    ("recipe", "over"),
    [
        ("2023", {"critic_bootstrap": "fast"}),
        ("2024", {"actor_grad_continuous": "dynamics"}),
    ],
    ids=["2023-fast-bootstrap", "2024-dynamics"],
)
def test_dynamics_actor_loss_does_not_train_the_critic(recipe, over):
    cfg = make_cfg(recipe, critic_scale=0.0, **over)
    space, act = SPACES["vector"], make_act(False)
    torch.manual_seed(0)
    agent = Dreamer(cfg, space, act)
    assert agent.behavior.uses_dynamics_grad() and cfg.critic_bootstrap == "fast"
    _move_critic_off_zero_init(agent)  # (at zero init, and with symexp'(0) = 0 in 2023, the leak is hidden)
    _, _, post = _wm_pass(agent, make_batch(space, act))
    feat, actions, reward, cont = _imagine_with_graph(agent, post)
    agent.model.zero_grad(set_to_none=True)
    loss, _, _ = agent.behavior.loss(feat, actions, reward, cont)
    loss.backward()
    assert some_grad(agent.behavior.actor.parameters())
    assert no_grad_or_zero(agent.behavior.critic.parameters()), "actor loss trains the critic"


@pytest.mark.parametrize("recipe", ["2024", "2023"])
def test_world_model_loss_does_not_touch_actor_or_critic(recipe):
    cfg, space, act = make_cfg(recipe), SPACES["mixed"], make_act(True)
    torch.manual_seed(0)
    agent = Dreamer(cfg, space, act)
    _, wm_loss, _ = _wm_pass(agent, make_batch(space, act))
    wm_loss.mean().backward()
    assert all(p.grad is None for p in agent.behavior.parameters())
    assert some_grad(agent.wm.encoder.parameters()) and some_grad(agent.wm.rssm.parameters())


def _move_critic_off_zero_init(agent: Dreamer) -> None:
    """The critic's output layer starts at zero, so at init no gradient passes back through it."""
    with torch.no_grad():
        agent.behavior.critic.out.weight.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(9))


def test_replay_value_loss_reaches_the_world_model():
    cfg, space, act = make_cfg("2024"), SPACES["mixed"], make_act(False)
    assert cfg.repval_scale == 0.3
    torch.manual_seed(0)
    agent = Dreamer(cfg, space, act)
    _move_critic_off_zero_init(agent)
    data, _, post = _wm_pass(agent, make_batch(space, act))
    boot = torch.randn(data["reward"].shape)
    loss = agent.behavior.replay_value_loss(agent.wm.rssm.feat(post), data["reward"], data["is_terminal"],
                                            data["is_first"], data["is_last"], boot)
    loss.backward()
    assert some_grad(agent.wm.encoder.parameters()), "repval must reach the encoder"
    assert some_grad(agent.wm.rssm.parameters()), "repval must reach the sequence model"
    assert some_grad(agent.behavior.critic.parameters())
    assert no_grad_or_zero(agent.behavior.actor.parameters())
    assert no_grad_or_zero(agent.wm.decoder.parameters())


def _wm_grads(agent: Dreamer, loss: torch.Tensor) -> list[torch.Tensor]:
    params = list(agent.wm.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


@pytest.mark.parametrize(
    ("recipe", "discrete", "over"),
    [("2024", True, {"repval_scale": 0.0}), ("2023", True, {}), ("2023", False, {})],
    ids=["2024-discrete-norepval", "2023-discrete", "2023-continuous-dynamics"],
)
def test_full_update_gives_world_model_only_its_own_gradient(recipe, discrete, over):
    """The whole update's single loss: world-model gradients equal those of the world-model loss alone
    (actor and critic terms contribute nothing, including 2023's backprop through the dynamics)."""
    cfg, space, act = make_cfg(recipe, **over), SPACES["mixed"], make_act(discrete)
    torch.manual_seed(0)
    agent = Dreamer(cfg, space, act)
    _move_critic_off_zero_init(agent)
    with torch.no_grad():
        agent.wm.reward_out.weight.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(8))
    batch = make_batch(space, act)
    data, start = agent.to_inputs(batch), agent.context_from_batch(batch)
    torch.manual_seed(1)
    total, _, metrics = agent._update(data, start)
    assert float(metrics["ac/actor_loss"]) != 0.0
    torch.manual_seed(1)  # the same latent samples in the world-model pass
    wm_loss, _, _ = agent.wm.loss(data, start)
    for g_full, g_wm in zip(_wm_grads(agent, total), _wm_grads(agent, wm_loss.mean())):
        torch.testing.assert_close(g_full, g_wm, rtol=1e-5, atol=1e-7)


def test_full_update_with_repval_adds_world_model_gradient():
    cfg, space, act = make_cfg("2024"), SPACES["mixed"], make_act(True)
    torch.manual_seed(0)
    agent = Dreamer(cfg, space, act)
    _move_critic_off_zero_init(agent)
    batch = make_batch(space, act)
    data, start = agent.to_inputs(batch), agent.context_from_batch(batch)
    torch.manual_seed(1)
    total, _, _ = agent._update(data, start)
    torch.manual_seed(1)
    wm_loss, _, _ = agent.wm.loss(data, start)
    diff = [(a - b).abs().sum() for a, b in zip(_wm_grads(agent, total), _wm_grads(agent, wm_loss.mean()))]
    assert sum(diff) > 0


@pytest.mark.parametrize(("recipe", "discrete"), [("2024", False), ("2024", True), ("2023", False)],
                         ids=["2024-reinforce-continuous", "2024-reinforce-discrete", "2023-dynamics"])
def test_update_reuses_imagination_actor_outputs_exactly(recipe, discrete):
    """The update hands the actor outputs of imagination to the loss instead of running the actor
    again: the loss and every gradient must equal those of a second actor pass on sg(feat)
    (imagination's actor must see the stop-gradient states, and the outputs of s_0..s_{H-1})."""
    # A large entropy bonus: a gradient of it leaking into the dynamics would show in the actor's.
    cfg, space, act = make_cfg(recipe, entropy=1.0), SPACES["vector"], make_act(discrete)
    torch.manual_seed(0)
    agent = Dreamer(cfg, space, act)
    _move_critic_off_zero_init(agent)
    batch = make_batch(space, act)
    data, start = agent.to_inputs(batch), agent.context_from_batch(batch)
    again = copy.deepcopy(agent)  # the return normaliser is stateful: each run gets its own
    loss_fn = again.behavior.loss
    again.behavior.loss = lambda *args, policy=None: loss_fn(*args)  # drops the handed-over outputs

    def grads(a: Dreamer) -> tuple[torch.Tensor, dict, list[torch.Tensor]]:
        torch.manual_seed(1)
        total, _, metrics = a._update(data, start)
        params = [p for p in a.model.parameters() if p.requires_grad]
        got = torch.autograd.grad(total, params, allow_unused=True)
        return total, metrics, [torch.zeros_like(p) if g is None else g for p, g in zip(params, got)]

    (t1, m1, g1), (t2, m2, g2) = grads(agent), grads(again)
    assert float(m1["ac/actor_loss"]) != 0.0 and agent.behavior.uses_dynamics_grad() == (recipe == "2023")
    torch.testing.assert_close(t1, t2)
    torch.testing.assert_close(m1["ac/entropy"], m2["ac/entropy"])
    names = [n for n, p in agent.model.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


# ------------------------------------------------------------------------------------------------
# Seeded determinism on CPU.


@pytest.mark.parametrize("recipe", ["2024", "2023"])
def test_seeded_training_is_bitwise_deterministic(recipe):
    cfg, space, act = make_cfg(recipe), SPACES["mixed"], make_act(False)
    batch = make_batch(space, act)

    def run() -> tuple[dict, list]:
        torch.manual_seed(42)
        agent = Dreamer(cfg, space, act)
        contexts = []
        for _ in range(3):
            _, context = agent.train(batch)
            contexts.append(context)
        return agent.model.state_dict(), contexts

    (s1, c1), (s2, c2) = run(), run()
    assert s1.keys() == s2.keys()
    for key in s1:
        assert torch.equal(s1[key], s2[key]), key
    for a, b in zip(c1, c2):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # And the updates did something (a different seed gives different weights).
    torch.manual_seed(43)
    other = Dreamer(cfg, space, act)
    assert not torch.equal(other.model.state_dict()["wm.rssm.prior_out.weight"], s1["wm.rssm.prior_out.weight"])


# ------------------------------------------------------------------------------------------------
# The standalone policy.


@pytest.mark.parametrize("discrete", [True, False], ids=["discrete", "continuous"])
def test_exported_policy_acts_like_the_trainer_policy(discrete):
    cfg, space, act = make_cfg(), SPACES["mixed"], make_act(discrete)
    torch.manual_seed(0)
    agent = Dreamer(cfg, space, act)
    agent.train(make_batch(space, act))
    randomise_biases(agent.model)  # biases the fast acting paths must carry
    with torch.no_grad():  # a sharper actor than the 0.01-scaled init, so actions are not all ties
        agent.behavior.actor.out.weight.mul_(100.0)
    blob = export_policy(agent.model, version=7)
    assert isinstance(blob, bytes)
    loaded = Policy.from_weights(blob)
    assert loaded.version == 7 and loaded.act_space == act and loaded.space == agent.model.space
    assert loaded.cfg == cfg
    obs = observations(space, 7, firsts=(0, 4))

    def rollout(policy: Policy, mode: str, seed: int) -> tuple[list, list]:
        torch.manual_seed(seed)
        policy.reset()
        envs, model = [], []
        for o in obs:
            envs.append(np.asarray(policy.act(o, mode=mode)))
            model.append(policy.last_action.copy())
        return envs, model

    for mode in ("mode", "sample"):
        live_env, live_model = rollout(Policy.from_model(agent.model), mode, seed=5)
        blob_env, blob_model = rollout(loaded, mode, seed=5)
        for a, b in zip(live_env, blob_env):  # the blob's policy acts through the lean path: float rounding apart
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
        for a, b in zip(live_model, blob_model):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    # Sampling really samples (a different seed gives a different sequence); the mode does not depend on it.
    sampled = rollout(loaded, "sample", seed=5)[1]
    resampled = rollout(loaded, "sample", seed=6)[1]
    assert any(not np.array_equal(a, b) for a, b in zip(sampled, resampled))
    if not discrete:
        mode_actions = rollout(loaded, "mode", seed=5)[1]
        assert any(not np.allclose(a, b) for a, b in zip(sampled, mode_actions))


@pytest.mark.parametrize("discrete", [True, False], ids=["discrete", "continuous"])
def test_prepare_between_steps_gives_the_same_actions_and_is_used(discrete):
    """The control loop calls prepare() after each step: the GRU update runs then, not in act()."""
    cfg, space, act = make_cfg(), SPACES["mixed"], make_act(discrete)
    torch.manual_seed(0)
    agent = Dreamer(cfg, space, act)
    randomise_biases(agent.model)
    with torch.no_grad():
        agent.behavior.actor.out.weight.mul_(100.0)
    policy = Policy.from_weights(export_policy(agent.model, version=1))
    obs = observations(space, 9, firsts=(0, 4))

    def rollout(prepare: bool) -> tuple[list, list]:
        torch.manual_seed(3)
        policy.reset()
        actions, deters = [], []
        for o in obs:
            policy.act(o, mode="sample")
            actions.append(policy.last_action.copy())
            deters.append(policy.state["deter"].clone())
            if prepare:
                policy.prepare()
        return actions, deters

    plain, prepared = rollout(False), rollout(True)
    for a, b in zip(plain[0], prepared[0]):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(plain[1], prepared[1]):
        assert torch.equal(a, b)
    # act() really takes the prepared deter: a wrong one changes the next state.
    policy.reset()
    policy.act(obs[0], mode="mode")
    policy.prepare()
    assert policy._prepared is not None
    policy._prepared = policy._parts(torch.zeros_like(policy._prepared.deter))
    policy.act(obs[1], mode="mode")
    assert not bool(policy.state["deter"].any())


@pytest.mark.parametrize("recipe", ["2024", "2023"])
@pytest.mark.parametrize("discrete", [True, False], ids=["discrete", "continuous"])
def test_split_first_layers_match_the_training_forward(recipe, discrete):
    """Acting splits the posterior's and the actor's first layers into a deter half (computed in
    prepare()) and the rest; the two halves must add up to the layer the trainer trains."""
    cfg, space, act = make_cfg(recipe=recipe), SPACES["mixed"], make_act(discrete)
    torch.manual_seed(0)
    model = Dreamer(cfg, space, act).model
    randomise_biases(model)  # 2024: the split layers have biases; each must be counted once
    rssm, actor = model.wm.rssm, model.behavior.actor
    with torch.no_grad():
        actor.out.weight.mul_(100.0)
        deter = torch.randn(5, cfg.deter)
        embed = torch.randn(5, model.wm.encoder.out_dim)
        whole = rssm._logp(rssm.post_out(rssm.post_net(torch.cat([deter, embed], -1))))
        torch.manual_seed(1)
        split = rssm.post_from_parts(deter, rssm.post_deter_part(deter), rssm.post_embed_part(embed))
        torch.testing.assert_close(split["logp"], whole, rtol=1e-5, atol=1e-5)
        stoch = split["stoch"]
        feat = rssm.feat({"deter": deter, "stoch": stoch})
        expected = actor(feat).mode()
        got = actor.from_part(actor.deter_part(deter), stoch.flatten(1)).mode()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        # Either half alone is not the layer: a wrong deter half changes the result.
        wrong = actor.from_part(actor.deter_part(torch.zeros_like(deter)), stoch.flatten(1))
        right = actor(feat)
        params = (lambda d: d.logp) if discrete else (lambda d: d.mean)
        assert not torch.allclose(params(wrong), params(right))


@pytest.mark.parametrize("recipe", ["2024", "2023"])
def test_observe_equals_stepping_the_posterior_one_step_at_a_time(recipe):
    """observe() runs the posterior's embedding half over the whole sequence and the prior after
    the loop; posts, priors, samples and every gradient must equal obs_step() run step by step."""
    cfg, space, act = make_cfg(recipe=recipe), SPACES["mixed"], make_act(False)
    torch.manual_seed(0)
    rssm = Dreamer(cfg, space, act).model.wm.rssm
    b, t = 3, 7
    embed = torch.randn(b, t, rssm.post_net[0].in_features - cfg.deter, requires_grad=True)
    action = torch.randn(b, t, act.dim)
    is_first = torch.zeros(b, t)
    is_first[1, 3] = is_first[2, 0] = 1.0
    start = {"deter": torch.randn(b, cfg.deter), "stoch": rssm.initial(b, torch.device("cpu"))["stoch"]}

    def run(whole: bool) -> tuple[dict, dict, dict]:
        rssm.zero_grad()
        embed.grad = None
        torch.manual_seed(1)
        if whole:
            post, prior = rssm.observe(embed, action, is_first, start)
        else:
            state, posts, priors = start, [], []
            for i in range(t):
                state, prior = rssm.obs_step(state, action[:, i], embed[:, i], is_first[:, i])
                posts.append(state)
                priors.append(prior)
            post, prior = ({k: torch.stack([s[k] for s in seq], 1) for k in seq[0]} for seq in (posts, priors))
        loss = (post["logp"].exp() * torch.linspace(-1, 1, cfg.classes)).sum() + prior["logp"].square().mean()
        feat = rssm.feat(post)
        loss = loss + (feat * torch.randn(feat.shape, generator=torch.Generator().manual_seed(2))).sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in rssm.named_parameters() if p.grad is not None}
        grads["embed"] = embed.grad.clone()
        return post, prior, grads

    post, prior, grads = run(True)
    ref_post, ref_prior, ref_grads = run(False)
    assert torch.equal(post["stoch"], ref_post["stoch"])  # same samples from the same seed
    for key in ("deter", "logp"):
        torch.testing.assert_close(post[key], ref_post[key], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(prior[key], ref_prior[key], rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and "post_net.0.weight" in grads and "prior_out.weight" in grads
    for name in grads:
        # Relative to the tensor's largest entry: gradients into a bias before an RMSNorm of a reset
        # (all-zero) input are ~500, where float32 rounding alone differs by 1e-4.
        atol = max(1e-5, 1e-6 * ref_grads[name].abs().max().item())
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=atol, msg=name)


def test_policy_import_is_light(tmp_path):
    """A robot imports the policy (and acts) without optimiser, loss, agent or replay code: nothing of learner/."""
    cfg, space, act = make_cfg(), SPACES["mixed"], make_act(False)
    agent = Dreamer(cfg, space, act)
    (tmp_path / "policy.safetensors").write_bytes(export_policy(agent.model, 3))
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        from core.agents import load_policy
        policy = load_policy(open({str(tmp_path / "policy.safetensors")!r}, "rb").read())
        obs = {{"image": np.zeros((32, 16, 3), np.uint8), "pos": np.zeros(5, np.float32),
               "speed": np.float32(0), "reward": np.float32(0), "is_first": True, "is_last": False,
               "is_terminal": False}}
        action = policy.act(obs)
        assert action.shape == (2,), action
        loaded = sorted(m for m in sys.modules if m == "learner" or m.startswith("learner."))
        print("LOADED", loaded)
        sys.exit(1 if loaded else 0)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "LOADED []" in result.stdout


def test_policy_state_does_not_alias_trainer_updates():
    """`from_model` shares live weights (it acts with the newest model); `from_weights` is a snapshot."""
    cfg, space, act = make_cfg(), SPACES["vector"], make_act(True)
    torch.manual_seed(0)
    agent = Dreamer(cfg, space, act)
    snapshot = Policy.from_weights(export_policy(agent.model, 0))
    live = Policy.from_model(agent.model)
    assert live.actor is agent.behavior.actor
    before = copy.deepcopy(dict(snapshot.actor.named_parameters()))
    agent.train(make_batch(space, act))
    for name, p in snapshot.actor.named_parameters():
        assert torch.equal(p, before[name])


def test_onehot_samples_follow_the_probabilities_with_straight_through_gradient():
    from core.agents.dreamer.dists import sample_onehot

    probs = torch.tensor([0.5, 0.0, 0.2, 0.3])
    logits = torch.log(probs.clamp(min=1e-30)).expand(40_000, 4).clone().requires_grad_()
    logp = torch.log_softmax(logits, -1)
    sample = sample_onehot(logp, torch.Generator().manual_seed(0))
    assert torch.equal(sample.detach().sum(-1), torch.ones(40_000))  # exactly one-hot in value
    freq = sample.detach().mean(0)
    assert freq[1] == 0  # a zero-probability class is never drawn
    assert torch.allclose(freq, probs, atol=0.01), freq
    (sample[:, 0]).sum().backward()  # the gradient is that of the probabilities
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("batch", [1, 5, 100])
def test_block_linear_is_a_block_diagonal_linear_map_at_any_batch(batch):
    from core.agents.dreamer.layers import BlockLinear

    torch.manual_seed(0)
    layer = BlockLinear(6, 4, blocks=3)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(batch, 3, 6)
    dense = torch.block_diag(*layer.weight.detach())  # (3*4, 3*6)
    expected = (x.reshape(batch, -1) @ dense.T + layer.bias.detach().reshape(-1)).reshape(batch, 3, 4)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_rms_norm_hand_written_backward_matches_the_formula():
    """RMSNorm's forward/backward are written out for speed; both must be those of
    x * rsqrt(mean(x^2) + eps) * scale, for any layout (ChannelNorm passes a permuted view)."""
    from core.agents.dreamer.layers import ChannelNorm, Norm, RMSNormFn

    def formula(x, scale, eps):
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * scale

    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: RMSNormFn.apply(a, b, 1e-4), (x, scale))

    torch.manual_seed(0)
    norm = ChannelNorm(5, "rms")
    with torch.no_grad():
        norm.scale.uniform_(0.5, 1.5)
    image = (3 * torch.randn(2, 5, 4, 3)).requires_grad_()  # NCHW: the norm sees a strided view
    grad = torch.randn(2, 5, 4, 3)
    for needs_x in (True, False):
        image.requires_grad_(needs_x)
        outs = []
        by_formula = lambda v: formula(v.permute(0, 2, 3, 1), norm.scale, norm.eps).permute(0, 3, 1, 2)  # noqa: E731
        for fn in (norm, by_formula):
            image.grad, norm.scale.grad = None, None
            out = fn(image)
            out.backward(grad)
            outs.append((out.detach(), None if image.grad is None else image.grad.clone(), norm.scale.grad.clone()))
        (out, gx, gs), (ref, ref_gx, ref_gs) = outs
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        with torch.inference_mode():  # acting's path, without the autograd.Function
            torch.testing.assert_close(norm(image.detach()), out, rtol=0, atol=0)
        torch.testing.assert_close(gs, ref_gs, rtol=1e-5, atol=1e-5)
        if needs_x:
            torch.testing.assert_close(gx, ref_gx, rtol=1e-5, atol=1e-5)
        else:
            assert gx is None
    assert type(Norm(5, "rms")(torch.randn(2, 5).requires_grad_()).grad_fn).__name__ == "RMSNormFnBackward"


@pytest.mark.parametrize("recipe", ["2024", "2023"])
@pytest.mark.parametrize("rows", [6, 80])  # below and above onehot.MIN_ROWS: multiplied or gathered
def test_heads_in_one_product_equal_the_separate_heads(recipe, rows, monkeypatch):
    """`WorldModel.heads` runs the reward and continuation heads' first layers as one product; its
    outputs and every gradient (to the input and to each head's weights) are those of the two heads
    run one after the other."""
    import core.agents.dreamer.onehot as onehot

    monkeypatch.setattr(onehot, "MIN_CLASSES", 1)  # the tiny model's 4 classes gather too
    torch.manual_seed(0)
    agent = Dreamer(make_cfg(recipe), SPACES["vector"], make_act(False))
    wm = agent.wm
    for p in wm.parameters():  # off the zero-initialised output layers, so every gradient is non-zero
        p.data.add_(0.1 * torch.randn_like(p))
    cols = wm.rssm.feat_cols
    deter = torch.randn(rows, cols.lo)
    groups = (cols.hi - cols.lo) // cols.classes
    stoch = torch.nn.functional.one_hot(torch.randint(0, cols.classes, (rows, groups)), cols.classes).float()
    feat = torch.cat([deter, stoch.reshape(rows, -1)], -1)
    heads = list(wm.reward_net.parameters()) + list(wm.reward_out.parameters()) \
        + list(wm.cont_net.parameters()) + list(wm.cont_out.parameters())
    target = torch.randn(rows)

    def run(fn):
        x = feat.clone().requires_grad_()
        reward, cont = fn(x)
        loss = (reward.mean() * target).sum() + (cont * target.flip(0)).sum()
        return reward.mean(), cont, torch.autograd.grad(loss, [x, *heads])

    calls = []  # the first layers as modules: skipped when their product is shared
    for net in (wm.reward_net, wm.cont_net):
        net[0][0].register_forward_hook(lambda *_: calls.append(1))
    fused = run(wm.heads)
    assert not calls
    separate = run(lambda x: (wm.reward(x), wm.cont_logit(x)))
    assert len(calls) == 2
    torch.testing.assert_close(fused[0], separate[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused[1], separate[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(fused[2], separate[2], strict=True):
        assert float(b.norm()) > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)



def test_mlps_with_unlike_first_layers_give_what_each_gives_alone(monkeypatch):
    """`mlps_on` on MLPs that differ in their first layer (plain or one-hot, other one-hot columns,
    a bias, no layers at all) gives each MLP's own output."""
    import core.agents.dreamer.onehot as onehot
    from core.agents.dreamer.layers import MLP, Norm, mlps_on
    from core.agents.dreamer.onehot import OneHotCols

    monkeypatch.setattr(onehot, "MIN_CLASSES", 1)  # 4 classes gather too
    torch.manual_seed(0)
    rows = 80  # above onehot.MIN_ROWS: one-hot layers gather
    hot = torch.nn.functional.one_hot(torch.randint(0, 4, (rows, 2)), 4).float().flatten(1)
    x = torch.cat([torch.randn(rows, 4), hot], -1)
    plain, onehot = MLP(12, 2, 8, "layer"), MLP(12, 2, 8, "layer", OneHotCols(4, 12, 4))
    other_cols = MLP(12, 2, 8, "layer", OneHotCols(0, 8, 4))
    biased = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(12, 8), Norm(8, "layer"), torch.nn.SiLU()))
    with torch.no_grad():
        biased[0][0].bias.uniform_(1.0, 3.0)  # unequal: the norm would cancel a constant
    empty = MLP(12, 0, 8, "layer")
    for mlps in ([plain, onehot], [onehot, other_cols], [onehot, biased], [plain, onehot, empty], [plain]):
        outs = mlps_on(x, mlps)
        assert len(outs) == len(mlps)
        for out, ref in zip(outs, [m(x) for m in mlps], strict=True):
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
