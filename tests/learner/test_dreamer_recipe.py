"""DreamerV3 recipe checks: one test (at least) per "mistake ports make" of
../shared/reference/dreamer_recipe.md, plus the 2023/2024 presets and the LaProp optimiser.

Everything runs on CPU with the `tiny` size, real torch, no mocks.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dreamer_helpers import FLAG_SPACE, make_batch, make_cfg

from core.agents.dreamer.dists import TwoHot, categorical_kl, make_bins, symexp, symlog, twohot, unimix_logits
from core.agents.dreamer.layers import ConvEncoder, Norm, cnn_channels
from core.agents.dreamer.policy import Policy, export_policy
from core.agents.dreamer.preprocess import ObsKeys, preprocess
from core.agents.dreamer.rssm import RSSM
from core.agents.spaces import ActSpace
from core.config.agent import RECIPES, SIZES, DreamerConfig
from learner.agents.dreamer.agent import Dreamer
from learner.agents.dreamer.behavior import Behavior, ReturnNorm
from learner.agents.dreamer.optim import LaProp, PartsAdam
from learner.agents.dreamer.world_model import WorldModel


def mixed_space(h: int = 16) -> dict:
    return {"image": ((h, h, 3), "uint8"), "pos": ((3,), "float32"), "speed": ((), "float32"), **FLAG_SPACE}


def vector_space() -> dict:
    return {"pos": ((3,), "float32"), **FLAG_SPACE}


def random_logp(shape: tuple[int, ...], scale: float | torch.Tensor = 1.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(shape, generator=g) * scale, -1)


# ------------------------------------------------------------------------------------------------
# 1. Free bits: after summing KL over latents, per (batch, time), no gradient below the floor.


def test_free_bits_on_kl_summed_over_latents_with_no_gradient_below_floor():
    cfg = make_cfg(free_nats=1.0)
    rssm = RSSM(cfg, act_dim=2, embed_dim=8)
    b, t, s, k = 4, 6, cfg.stoch, cfg.classes
    # Per-(b, t) logit scale so that some rows are below 1 nat in total and some above.
    scale = torch.linspace(0.05, 2.5, b * t).reshape(b, t, 1, 1)
    post_logits = (torch.randn(b, t, s, k, generator=torch.Generator().manual_seed(1)) * scale).requires_grad_()
    prior_logits = (torch.randn(b, t, s, k, generator=torch.Generator().manual_seed(2)) * scale).requires_grad_()
    post = {"logp": torch.log_softmax(post_logits, -1)}
    prior = {"logp": torch.log_softmax(prior_logits, -1)}
    dyn, rep = rssm.kl_losses(post, prior)
    assert dyn.shape == (b, t) and rep.shape == (b, t)

    per_latent = categorical_kl(post["logp"], prior["logp"]).detach()  # (b, t, s)
    summed = per_latent.sum(-1)
    below = summed < 1.0
    assert below.any() and (~below).any()
    torch.testing.assert_close(dyn.detach(), summed.clamp(min=1.0))
    torch.testing.assert_close(rep.detach(), summed.clamp(min=1.0))
    # Free bits per latent would give a different number wherever some latent is under 1 nat.
    assert not torch.allclose(dyn.detach(), per_latent.clamp(min=1.0).sum(-1))
    assert torch.all(dyn >= 1.0)

    (dyn + rep).sum().backward()
    for logits in (post_logits, prior_logits):
        grad_norm = logits.grad.flatten(2).abs().sum(-1)  # (b, t)
        assert torch.all(grad_norm[below] == 0), "gradient leaks below the free-bits floor"
        assert torch.all(grad_norm[~below] > 0), "no gradient above the floor"


# ------------------------------------------------------------------------------------------------
# 2. Stop-gradients: dyn trains only the prior, rep only the posterior; both are KL(post || prior).


def test_kl_stop_gradients_dyn_to_prior_rep_to_posterior():
    cfg = make_cfg(free_nats=0.0)
    rssm = RSSM(cfg, act_dim=2, embed_dim=8)
    shape = (3, 4, cfg.stoch, cfg.classes)
    post_logits = (2 * torch.randn(shape, generator=torch.Generator().manual_seed(3))).requires_grad_()
    prior_logits = (2 * torch.randn(shape, generator=torch.Generator().manual_seed(4))).requires_grad_()
    post = {"logp": torch.log_softmax(post_logits, -1)}
    prior = {"logp": torch.log_softmax(prior_logits, -1)}
    dyn, rep = rssm.kl_losses(post, prior)

    p, q = post["logp"].detach(), prior["logp"].detach()
    forward_kl = (p.exp() * (p - q)).sum((-2, -1))
    reverse_kl = (q.exp() * (q - p)).sum((-2, -1))
    assert not torch.allclose(forward_kl, reverse_kl)
    torch.testing.assert_close(dyn.detach(), forward_kl)
    torch.testing.assert_close(rep.detach(), forward_kl)

    g_post, g_prior = torch.autograd.grad(dyn.sum(), (post_logits, prior_logits), allow_unused=True)
    assert g_post is None or torch.all(g_post == 0), "dyn loss must not train the posterior"
    assert g_prior is not None and g_prior.abs().sum() > 0, "dyn loss must train the prior"
    g_post, g_prior = torch.autograd.grad(rep.sum(), (post_logits, prior_logits), allow_unused=True)
    assert g_prior is None or torch.all(g_prior == 0), "rep loss must not train the prior"
    assert g_post is not None and g_post.abs().sum() > 0, "rep loss must train the posterior"


def test_world_model_kl_scales_follow_recipe():
    """The world-model total uses kl_dyn and kl_rep as the recipe's weights of the two terms."""
    act = ActSpace(2, False)
    batch = make_batch(vector_space(), act, 2, 4)
    for recipe, dyn_scale in (("2024", 1.0), ("2023", 0.5)):
        cfg = make_cfg(recipe, dec_scale=0.0, reward_scale=0.0, cont_scale=0.0)
        assert cfg.kl_dyn == dyn_scale and cfg.kl_rep == 0.1
        torch.manual_seed(0)
        wm = WorldModel(cfg, vector_space(), _keys(cfg, vector_space()), act)
        data = _inputs(batch, wm)
        start = _start(wm, 2, act)
        total, _, metrics = wm.loss(data, start)
        expected = dyn_scale * metrics["wm/dyn"] + 0.1 * metrics["wm/rep"]
        torch.testing.assert_close(total.mean().detach(), expected)


def _keys(cfg: DreamerConfig, space: dict) -> ObsKeys:
    return ObsKeys.select(space, cfg.image_keys, cfg.vector_keys)


def _inputs(batch: dict, wm: WorldModel) -> dict:
    data = preprocess(batch, wm.keys, torch.device("cpu"))
    data["action"] = torch.as_tensor(batch["action"])
    return data


def _start(wm: WorldModel, b: int, act: ActSpace) -> dict:
    state = wm.rssm.initial(b, torch.device("cpu"))
    state["action"] = torch.zeros(b, act.dim)
    return state


# ------------------------------------------------------------------------------------------------
# 3. Two-hot: clipping to the end bins, uniform decodes to exactly 0, round trip.


@pytest.mark.parametrize("kind", ["symexp", "symlog"])
def test_bins_symmetric_and_spaced_per_recipe(kind):
    bins = make_bins(kind, 255, 20.0)
    assert bins.shape == (255,)
    assert torch.equal(bins, -bins.flip(0)), "bins must be exactly symmetric"
    assert bins[127] == 0.0
    assert torch.all(bins[1:] > bins[:-1])
    if kind == "symlog":  # 2023: evenly spaced in symlog space on [-20, 20]
        torch.testing.assert_close(bins, torch.linspace(-20, 20, 255))
    else:  # 2024: symexp(linspace(-20, 0)) mirrored, i.e. raw-space bins
        torch.testing.assert_close(bins[:128], symexp(torch.linspace(-20.0, 0.0, 128, dtype=torch.float64)).float())
        assert math.isclose(float(bins[-1]), math.expm1(20.0), rel_tol=1e-6)


@pytest.mark.parametrize("kind", ["symexp", "symlog"])
def test_twohot_targets_outside_range_go_to_end_bins(kind):
    bins = make_bins(kind, 255, 20.0)
    x = torch.tensor([-1e30, float(bins[0]) - 1.0, float(bins[-1]) + 1.0, 1e30])
    enc = twohot(x, bins)
    assert enc.shape == (4, 255)
    torch.testing.assert_close(enc.sum(-1), torch.ones(4))
    assert enc[0, 0] == 1.0 and enc[1, 0] == 1.0
    assert enc[2, -1] == 1.0 and enc[3, -1] == 1.0
    # Through the distribution (symlog kind: the target is symlog'd first, still beyond 20).
    logits = torch.randn(4, 255, generator=torch.Generator().manual_seed(0))
    logp = torch.log_softmax(logits, -1)
    lp = TwoHot(logits, bins, kind).log_prob(torch.tensor([-1e30, -1e30, 1e30, 1e30]))
    torch.testing.assert_close(lp, torch.stack([logp[0, 0], logp[1, 0], logp[2, -1], logp[3, -1]]))
    assert torch.isfinite(lp).all()


@pytest.mark.parametrize("kind", ["symexp", "symlog"])
def test_twohot_uniform_and_symmetric_decode_to_exactly_zero(kind):
    bins = make_bins(kind, 255, 20.0)
    assert torch.all(TwoHot(torch.zeros(5, 255), bins, kind).mean() == 0.0)
    assert torch.all(TwoHot(torch.full((255,), 3.7), bins, kind).mean() == 0.0)
    half = torch.randn(3, 127, generator=torch.Generator().manual_seed(0))
    symmetric = torch.cat([half, torch.randn(3, 1), half.flip(-1)], -1)
    assert torch.all(TwoHot(symmetric, bins, kind).mean() == 0.0)


@pytest.mark.parametrize("kind", ["symexp", "symlog"])
def test_twohot_round_trip(kind):
    bins = make_bins(kind, 255, 20.0)
    targets = torch.tensor([-3000.0, -45.3, -1.0, -0.2, 0.0, 1e-3, 0.37, 1.0, 7.5, 123.0, 5e4])
    space = symlog(targets) if kind == "symlog" else targets
    enc = twohot(space, bins)
    assert torch.all((enc > 0).sum(-1) <= 2)
    torch.testing.assert_close((enc * bins).sum(-1), space, rtol=1e-5, atol=1e-6)  # linear interpolation
    logits = enc.clamp(min=1e-30).log()
    dist = TwoHot(logits, bins, kind)
    torch.testing.assert_close(dist.mean(), targets, rtol=1e-4, atol=1e-5)
    # The loss uses the same encoding: the cross-entropy with its own two-hot is minimal (= its entropy).
    entropy = -(enc * enc.clamp(min=1e-30).log()).sum(-1)
    torch.testing.assert_close(-dist.log_prob(targets), entropy, rtol=1e-4, atol=1e-4)
    # And a target in the wrong space (raw vs symlog) would not be: check the recipe's space matters.
    other = symexp(targets.clamp(-20, 20)) if kind == "symlog" else symlog(targets)
    assert not torch.allclose(-dist.log_prob(other), entropy, atol=1e-2)


# ------------------------------------------------------------------------------------------------
# 4. Reward and critic output layers zero-initialised: predictions exactly 0 at init.


@pytest.mark.parametrize("recipe", ["2024", "2023"])
def test_reward_and_critic_predict_exactly_zero_at_init(recipe):
    cfg = make_cfg(recipe)
    act = ActSpace(3, True)
    torch.manual_seed(0)
    wm = WorldModel(cfg, vector_space(), _keys(cfg, vector_space()), act)
    beh = Behavior(cfg, wm.feat_dim, act)
    for layer in (wm.reward_out, beh.critic.out):
        assert torch.all(layer.weight == 0) and torch.all(layer.bias == 0)
    feat = 5 * torch.randn(7, 4, wm.feat_dim)
    assert torch.all(wm.reward(feat).mean() == 0.0)
    assert torch.all(beh.critic(feat).mean() == 0.0)
    assert torch.all(beh.slow_critic(feat).mean() == 0.0)
    # The continuation head is an ordinary layer (not zero) and the actor output is scaled.
    assert wm.cont_out.weight.abs().sum() > 0


@pytest.mark.parametrize("recipe", ["2024", "2023"])
def test_policy_output_layer_scaled_per_recipe(recipe):
    """The actor's output layer starts at `policy_out_scale` (0.01 in 2024) times the recipe's init."""
    cfg = make_cfg(recipe)
    torch.manual_seed(0)
    actor = Behavior(make_cfg(recipe, units=256), 256, ActSpace(64, False)).actor
    fan = 256 if cfg.init_fan == "in" else (256 + 128) / 2
    expected = cfg.policy_out_scale / math.sqrt(fan)
    assert abs(actor.out.weight.std().item() / expected - 1) < 0.03
    assert torch.all(actor.out.bias == 0)


# ------------------------------------------------------------------------------------------------
# 5. Return scale has the floor of 1.


@pytest.mark.parametrize("recipe", ["2024", "2023"])
def test_return_scale_floor(recipe):
    cfg = make_cfg(recipe)
    norm = ReturnNorm(cfg)
    assert float(norm.scale()) == cfg.retnorm_limit == 1.0
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        norm.update(0.01 * torch.rand(15, 64, generator=g))  # sparse, tiny returns
        assert float(norm.scale()) >= 1.0
    assert float(norm.scale()) == 1.0
    # A wide return range is measured (the floor is a floor, not a constant): P95 - P5 of U(0, 10) = 9.
    for _ in range(600):
        norm.update(10 * torch.rand(15, 64, generator=g))
    assert 8.0 < float(norm.scale()) < 9.5


def test_return_scale_floor_is_the_configured_limit():
    norm = ReturnNorm(make_cfg(retnorm_limit=2.5))
    for _ in range(50):
        norm.update(torch.linspace(0, 0.1, 100))
    assert float(norm.scale()) == 2.5


def test_small_returns_are_not_divided_up_in_behavior_loss():
    cfg = make_cfg()
    beh = Behavior(cfg, 12, ActSpace(3, True))
    h, n = 5, 8
    feat = torch.randn(h + 1, n, 12)
    action = F.one_hot(torch.randint(0, 3, (h, n)), 3).float()
    _, _, metrics = beh.loss(feat, action, 1e-3 * torch.rand(h + 1, n), torch.ones(h + 1, n))
    assert float(metrics["ac/return_scale"]) == 1.0


# ------------------------------------------------------------------------------------------------
# 6. Actor-loss weights: detached cumulative product of predicted continuation x gamma.


def _imagined(h: int = 6, n: int = 5, f: int = 12, dim: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feat = torch.randn(h + 1, n, f, generator=g)
    action = F.one_hot(torch.randint(0, dim, (h, n), generator=g), dim).float()  # taken in s_0..s_{h-1}
    reward = torch.randn(h + 1, n, generator=g)
    cont = 0.5 + 0.5 * torch.rand(h + 1, n, generator=g)
    return feat, action, reward, cont


def test_actor_loss_weights_are_cumprod_of_cont_times_gamma():
    cfg = make_cfg()
    act = ActSpace(3, True)
    torch.manual_seed(0)
    beh = Behavior(cfg, 12, act)
    feat, action, reward, cont = _imagined()
    cont[3, :2] = 0.0
    retnorm = copy.deepcopy(beh.retnorm)
    _, start_ret, metrics = beh.loss(feat, action, reward, cont)

    # Independent reference: the critic is zero-initialised, so every value is exactly 0.
    assert torch.all(beh.critic(feat).mean() == 0)
    disc = cfg.gamma * cont
    ret = [torch.zeros(cont.shape[1])]
    for t in reversed(range(cont.shape[0] - 1)):
        ret.append(reward[t + 1] + disc[t + 1] * cfg.lam * ret[-1])
    ret = torch.stack(ret[::-1][:-1])
    retnorm.update(ret)
    scale = retnorm.scale()
    weight = torch.cumprod(disc, 0)
    with torch.no_grad():
        dist = beh.actor(feat[:-1])
        per_step = -dist.log_prob(action) * ret / scale - cfg.entropy * dist.entropy()
    expected = (weight[:-1] * per_step).mean()
    torch.testing.assert_close(start_ret, ret[0])
    torch.testing.assert_close(metrics["ac/return_scale"], scale)
    torch.testing.assert_close(metrics["ac/actor_loss"], expected)
    # Not the plain continuation and not unweighted: those give other numbers here.
    assert not torch.allclose((disc[:-1] * per_step).mean(), expected)
    assert not torch.allclose(per_step.mean(), expected)


def _actor_grads(beh: Behavior, feat, action, reward, cont) -> list[torch.Tensor]:
    beh = copy.deepcopy(beh)  # the return normaliser is stateful; keep both calls on the same state
    loss, _, _ = beh.loss(feat, action, reward, cont)
    grads = torch.autograd.grad(loss, list(beh.actor.parameters()))
    return [g.clone() for g in grads]


def test_states_after_a_predicted_end_give_no_actor_gradient():
    cfg = make_cfg(critic_scale=0.0)
    torch.manual_seed(0)
    beh = Behavior(cfg, 12, ActSpace(3, True))
    feat, action, reward, cont = _imagined()
    k = 3
    cont[k] = 0.0  # predicted episode end at imagined state k; later states are predicted to continue
    base = _actor_grads(beh, feat, action, reward, cont)

    later = action.clone()
    later[k:] = F.one_hot((action[k:].argmax(-1) + 1) % 3, 3).float()
    for g0, g1 in zip(base, _actor_grads(beh, feat, later, reward, cont)):
        torch.testing.assert_close(g0, g1, rtol=0, atol=1e-9)

    earlier = action.clone()
    earlier[k - 1] = F.one_hot((action[k - 1].argmax(-1) + 1) % 3, 3).float()
    changed = _actor_grads(beh, feat, earlier, reward, cont)
    assert any(not torch.allclose(g0, g1) for g0, g1 in zip(base, changed))


def test_no_gradient_into_continuation_through_weights():
    cfg = make_cfg()
    beh = Behavior(cfg, 12, ActSpace(3, True))
    feat, action, reward, cont = _imagined()
    cont.requires_grad_(True)
    loss, _, _ = beh.loss(feat, action, reward, cont)
    loss.backward()
    assert cont.grad is None or torch.all(cont.grad == 0)


# ------------------------------------------------------------------------------------------------
# 7. is_first resets both the latent state and the previous action.


def _obs_step(rssm: RSSM, state: dict, action: torch.Tensor, embed: torch.Tensor, is_first: torch.Tensor):
    torch.manual_seed(123)  # the stochastic latents are sampled; use the same draw every time
    return rssm.obs_step(state, action, embed, is_first)


@pytest.mark.parametrize("recipe", ["2024", "2023"])
def test_is_first_resets_state_and_previous_action(recipe):
    cfg = make_cfg(recipe)
    torch.manual_seed(0)
    b, a, e = 3, 4, 10
    rssm = RSSM(cfg, act_dim=a, embed_dim=e)
    embed = torch.randn(b, e)
    zero_state = rssm.initial(b, torch.device("cpu"))
    zero_action = torch.zeros(b, a)
    rand_state = {"deter": torch.randn(b, cfg.deter),
                  "stoch": F.one_hot(torch.randint(0, cfg.classes, (b, cfg.stoch)), cfg.classes).float()}
    rand_action = torch.rand(b, a) * 2 - 1
    ones, zeros = torch.ones(b), torch.zeros(b)

    ref_post, ref_prior = _obs_step(rssm, zero_state, zero_action, embed, zeros)
    cases = {
        "state and action": (rand_state, rand_action),
        "action only": (zero_state, rand_action),
        "state only": (rand_state, zero_action),
    }
    for name, (state, action) in cases.items():
        post, prior = _obs_step(rssm, state, action, embed, ones)
        for key in ("deter", "stoch", "logp"):
            assert torch.equal(post[key], ref_post[key]), f"is_first did not reset ({name}): post {key}"
        assert torch.equal(prior["logp"], ref_prior["logp"]), f"is_first did not reset ({name}): prior"
        # Without is_first the incoming state/action matter (the reset is what removes them).
        post0, _ = _obs_step(rssm, state, action, embed, zeros)
        assert not torch.allclose(post0["deter"], ref_post["deter"]), name

    # Per row: only the rows flagged first are reset.
    post, _ = _obs_step(rssm, rand_state, rand_action, embed, torch.tensor([1.0, 0.0, 1.0]))
    assert torch.equal(post["deter"][[0, 2]], ref_post["deter"][[0, 2]])
    assert not torch.allclose(post["deter"][1], ref_post["deter"][1])


def test_policy_is_first_mid_sequence_acts_like_a_fresh_policy():
    cfg = make_cfg()
    space, act = vector_space(), ActSpace(4, True)
    torch.manual_seed(0)
    agent = Dreamer(cfg, space, act)
    rng = np.random.default_rng(0)
    obs = [{"pos": rng.normal(size=3).astype(np.float32), "reward": np.float32(0.0), "is_first": i == 0,
            "is_last": False, "is_terminal": False} for i in range(5)]
    obs[4]["is_first"] = True
    running = Policy.from_model(agent.model)
    for o in obs[:4]:
        running.act(o, mode="mode")
    torch.manual_seed(7)
    running.act(obs[4], mode="mode")
    fresh = Policy.from_model(agent.model)
    torch.manual_seed(7)
    fresh.act(obs[4], mode="mode")
    np.testing.assert_array_equal(running.last_action, fresh.last_action)
    for key in ("deter", "stoch"):
        assert torch.equal(running.state[key], fresh.state[key])


# ------------------------------------------------------------------------------------------------
# 8. Replay context: latents returned for write-back; stored latents used where valid.


def test_train_returns_posterior_latents_for_write_back():
    cfg = make_cfg()
    space, act = vector_space(), ActSpace(2, False)
    b, t = 2, 6
    batch = make_batch(space, act, b, t)
    torch.manual_seed(0)
    agent = Dreamer(cfg, space, act)
    # The posterior deter at t=0 is deterministic: GRU(initial state, zero action) with the pre-update weights.
    start = agent.context_from_batch(batch)
    with torch.no_grad():
        deter0 = agent.wm.rssm.img_step(start, start["action"] * 0)["deter"]
    _, context = agent.train(batch)
    assert set(context) == {"deter", "stoch", "action"}
    assert context["deter"].shape == (b, t, cfg.deter)
    assert context["stoch"].shape == (b, t, cfg.stoch, cfg.classes)
    assert context["action"].shape == (b, t, act.dim)
    for v in context.values():
        assert v.dtype == torch.float32 and not v.requires_grad
    torch.testing.assert_close(context["deter"][:, 0], deter0)
    torch.testing.assert_close(context["stoch"].sum(-1), torch.ones(b, t, cfg.stoch))  # one-hot samples
    np.testing.assert_array_equal(context["action"].numpy(), batch["action"])


def _with_context(batch: dict, cfg: DreamerConfig, act: ActSpace, valid: list[bool]) -> dict:
    rng = np.random.default_rng(1)
    b = len(valid)
    out = dict(batch)
    out["context/deter"] = rng.normal(size=(b, cfg.deter)).astype(np.float32)
    out["context/stoch"] = np.eye(cfg.classes, dtype=np.float32)[rng.integers(0, cfg.classes, (b, cfg.stoch))]
    out["context/action"] = rng.uniform(-1, 1, (b, act.dim)).astype(np.float32)
    out["context/valid"] = np.array(valid)
    for key in ("deter", "stoch", "action"):  # the replay zeroes invalid rows; use junk to be sure
        out[f"context/{key}"][~np.array(valid)] = 7.0
    return out


def test_context_from_batch_uses_stored_latents_where_valid():
    cfg = make_cfg()
    space, act = vector_space(), ActSpace(2, False)
    agent = Dreamer(cfg, space, act)
    batch = _with_context(make_batch(space, act, 3, 4), cfg, act, [True, False, True])
    state = agent.context_from_batch(batch)
    init = agent.initial_context(3)
    for key in ("deter", "stoch", "action"):
        stored = torch.as_tensor(batch[f"context/{key}"])
        torch.testing.assert_close(state[key][[0, 2]], stored[[0, 2]])
        torch.testing.assert_close(state[key][1], init[key][1])


def test_context_ignored_when_recipe_has_no_replay_context():
    cfg = make_cfg("2023")
    assert cfg.replay_context is False
    space, act = vector_space(), ActSpace(2, False)
    agent = Dreamer(cfg, space, act)
    batch = _with_context(make_batch(space, act, 2, 4), cfg, act, [True, True])
    state = agent.context_from_batch(batch)
    for key, value in agent.initial_context(2).items():
        torch.testing.assert_close(state[key], value)


def test_stored_context_drives_the_first_step():
    """The world model starts from the context: its deter and action (prev action at t=0) both matter."""
    cfg = make_cfg()
    space, act = vector_space(), ActSpace(2, False)
    torch.manual_seed(0)
    agent = Dreamer(cfg, space, act)
    batch = make_batch(space, act, 2, 4)
    batch["is_first"][:] = False
    ctx = _with_context(batch, cfg, act, [True, True])
    data = agent.to_inputs(batch)

    def first_deter(b):
        with torch.no_grad():
            _, post, _ = agent.wm.loss(data, agent.context_from_batch(b))
        return post["deter"][:, 0]

    d_ctx, d_init = first_deter(ctx), first_deter(batch)
    assert not torch.allclose(d_ctx, d_init)
    other_action = dict(ctx)
    other_action["context/action"] = -ctx["context/action"]
    assert not torch.allclose(first_deter(other_action), d_ctx)


def _replay_steps(rng, n: int, act: ActSpace) -> list[dict]:
    steps = []
    for i in range(n):
        steps.append({"pos": rng.normal(size=3).astype(np.float32), "reward": np.float32(rng.normal()),
                      "is_first": i == 0, "is_last": False, "is_terminal": False,
                      "action": rng.uniform(-1, 1, act.dim).astype(np.float32)})
    return steps


def _replay_or_skip():
    try:
        from learner.replay import Replay
    except ImportError as exc:  # pragma: no cover - replay is built elsewhere
        pytest.skip(f"learner.replay.Replay not available: {exc}")
    return Replay


def test_first_replay_batch_before_any_write_back_trains(tmp_path):
    """Before any write-back the replay has context/valid (all False) but no context/<key> arrays:
    the first update must start from the initial state, not fail (a KeyError once)."""
    Replay = _replay_or_skip()
    cfg = make_cfg()
    space, act = vector_space(), ActSpace(2, False)
    agent = Dreamer(cfg, space, act)
    replay = Replay(tmp_path / "replay", chunk_length=16, ram_steps=256, online=False, seed=0)
    for step in _replay_steps(np.random.default_rng(0), 24, act):
        replay.add(step)
    batch = replay.sample(2, 8)
    metrics, _ = agent.train(batch)
    assert torch.isfinite(metrics["loss"])
    replay.close()


def test_replay_context_round_trip(tmp_path):
    Replay = _replay_or_skip()
    cfg = make_cfg()
    space, act = vector_space(), ActSpace(2, False)
    torch.manual_seed(0)
    agent = Dreamer(cfg, space, act)
    replay = Replay(tmp_path / "replay", chunk_length=16, ram_steps=256, online=False, seed=0)
    for step in _replay_steps(np.random.default_rng(0), 40, act):
        replay.add(step)
    first = replay.sample(2, 8)
    assert not first["context/valid"].any()
    _, context = agent.train(first)
    replay.write_context(first["ids"], {k: v.numpy() for k, v in context.items()})
    written = {int(i): (b, t) for (b, t), i in np.ndenumerate(first["ids"])}

    seen_valid = 0
    for _ in range(8):
        batch = replay.sample(2, 8)
        for row in range(2):
            prev = int(batch["ids"][row, 0]) - 1
            if batch["context/valid"][row]:
                assert prev in written
                where = written[prev]
                for key in ("deter", "stoch", "action"):
                    np.testing.assert_array_equal(batch[f"context/{key}"][row], context[key][where].numpy())
                seen_valid += 1
            elif prev in written:
                assert batch["is_first"][row, 0]
        state = agent.context_from_batch(batch)
        valid = torch.as_tensor(batch["context/valid"])
        torch.testing.assert_close(state["deter"][valid], torch.as_tensor(batch["context/deter"])[valid])
    assert seen_valid > 0
    metrics, _ = agent.train(batch)
    assert torch.isfinite(metrics["loss"])
    replay.close()


# ------------------------------------------------------------------------------------------------
# 9. Train ratio counted per policy step.


def test_train_ratio_counts_policy_steps_not_frames(tmp_path):
    Replay = _replay_or_skip()
    from core.config import Config
    from learner.metrics import Mean
    from learner.train import Counters, Trainer

    cfg = Config.model_validate({
        "name": "ratio", "backend": "gym", "gym_id": "Pendulum-v1",
        "dreamer": {"size": "tiny", "device": "cpu", "imag_horizon": 2},
        "train": {"train_ratio": 4.0, "batch_size": 2, "batch_length": 8},
    })
    assert cfg.substeps > 1  # several physics frames per policy step: they must not count
    act = ActSpace(2, False)
    trainer = Trainer.__new__(Trainer)  # only the pieces _train uses; no environment
    trainer.cfg = cfg
    trainer.counters = Counters()
    trainer.replay = Replay(tmp_path / "replay", chunk_length=64, ram_steps=256, online=False, seed=0)
    trainer.agent = Dreamer(cfg.dreamer, vector_space(), act)
    trainer.train_stats = Mean()
    batch_steps = cfg.train.batch_size * cfg.train.batch_length
    steps = _replay_steps(np.random.default_rng(0), 19, act)
    calls = 0
    for step in steps:
        trainer.replay.add(step)
        trainer._train(batch_steps)
        if len(trainer.replay) >= cfg.train.batch_length:
            calls += 1
    assert calls == 12
    # One update per batch*length/train_ratio = 4 policy steps: 12 policy steps -> 3 updates.
    assert trainer.agent.updates == calls * cfg.train.train_ratio // batch_steps == 3
    assert trainer.counters.train_credit == pytest.approx(0.0)
    trainer._train(batch_steps)
    assert trainer.agent.updates == 3 and trainer.counters.train_credit == pytest.approx(0.25)
    # (Mistake 8, through the trainer: its updates wrote the posterior latents back into replay.)
    assert "context/deter" in trainer.replay.sample(2, 8)
    trainer.replay.close()


# ------------------------------------------------------------------------------------------------
# 10. Images scaled identically when acting and when training.


def test_acting_and_training_see_identical_encoder_inputs():
    cfg = make_cfg()
    space, act = mixed_space(16), ActSpace(3, True)
    torch.manual_seed(0)
    agent = Dreamer(cfg, space, act)
    batch = make_batch(space, act, 1, 2, seed=3)
    batch["image"][0, 0, 0, 0] = [0, 255, 128]  # include both ends of the range
    obs = {k: batch[k][0, 0] for k in ("image", "pos", "speed", "reward", "is_first", "is_last", "is_terminal")}

    data = agent.to_inputs(batch)
    image = data["image"]
    assert image.dtype == torch.float32
    assert float(image.min()) == -0.5 and float(image.max()) == 0.5
    torch.testing.assert_close(image, torch.as_tensor(batch["image"]).float() / 255.0 - 0.5, rtol=0, atol=0)
    with torch.no_grad():
        train_embed = agent.wm.encoder(data)[0, 0]

    def acting_inputs(policy: Policy) -> tuple[dict, torch.Tensor]:
        seen = {}

        def hook(module, args, output):
            seen["inputs"], seen["embed"] = {k: v.clone() for k, v in args[0].items()}, output.detach().clone()

        handle = policy.encoder.register_forward_hook(hook)
        try:
            policy.act(obs, mode="mode")
        finally:
            handle.remove()
        return seen["inputs"], seen["embed"].reshape(-1)

    blob_policy = Policy.from_weights(export_policy(agent.model, 1))
    blob_policy.lean = False  # the modules' inputs; its lean path acts the same (tests/core/test_dreamer_act_path.py)
    for policy in (Policy.from_model(agent.model), blob_policy):
        inputs, embed = acting_inputs(policy)
        for key in ("image", "pos", "speed"):
            torch.testing.assert_close(inputs[key][0, 0], data[key][0, 0], rtol=0, atol=0)
        torch.testing.assert_close(embed, train_embed, rtol=1e-6, atol=1e-6)
    # preprocess itself is the one transform, whatever the leading axes.
    image_keys = ObsKeys(images=("image",), vectors=())
    single = preprocess({"image": batch["image"][0, 0]}, image_keys, torch.device("cpu"))
    torch.testing.assert_close(single["image"], image[0, 0], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# 11. Mixed precision never reaches KL, two-hot or norms.


def test_autocast_does_not_reach_norms_kl_twohot():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 32)
    x = torch.randn(4, 16)
    bins = make_bins("symexp", 255, 20.0)
    for kind in ("rms", "layer"):
        norm = Norm(32, kind)
        with torch.no_grad():
            norm.scale.uniform_(0.5, 1.5)
        y32 = 3 * torch.randn(4, 32)
        ref = norm(y32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = lin(x)
            out32 = norm(y32)
            out16 = norm(h)
        assert h.dtype == torch.bfloat16  # autocast is really on
        assert out32.dtype == torch.float32
        torch.testing.assert_close(out32, ref, rtol=0, atol=0)
        # A bf16 activation is normalised in float32 and only then rounded back (not computed in
        # bf16): within one bf16 rounding step of the float32 result.
        ref16 = norm(h.float())
        assert out16.dtype == torch.bfloat16
        assert bool(((out16.float() - ref16).abs() <= ref16.abs() * 2**-8 + 1e-6).all()), kind

    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = torch.nn.Linear(16, 255)(x)
        assert logits.dtype == torch.bfloat16
        dist = TwoHot(logits, bins, "symexp")
        target = torch.randn(4, generator=torch.Generator().manual_seed(5)) * 100
        mean, lp = dist.mean(), dist.log_prob(target)
        lat = torch.nn.Linear(16, 8 * 4)(x).reshape(4, 8, 4)
        logp, logq = unimix_logits(lat, 0.01), unimix_logits(lat.flip(0), 0.01)
        kl = categorical_kl(logp, logq)
    for value in (mean, lp, logp, logq, kl):
        assert value.dtype == torch.float32
    reference = TwoHot(logits.float(), bins, "symexp")
    torch.testing.assert_close(lp, reference.log_prob(target), rtol=0, atol=0)
    torch.testing.assert_close(mean, reference.mean(), rtol=0, atol=0)
    # A uniform distribution stays exactly 0 even with bf16 logits.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert float(TwoHot(torch.zeros(3, 255, dtype=torch.bfloat16), bins, "symexp").mean().abs().max()) == 0.0


def test_autocast_world_model_losses_stay_float32():
    cfg = make_cfg()
    space, act = mixed_space(16), ActSpace(2, False)
    torch.manual_seed(0)
    wm = WorldModel(cfg, space, _keys(cfg, space), act)
    batch = make_batch(space, act, 2, 4)
    data = _inputs(batch, wm)
    start = _start(wm, 2, act)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embed = wm.encoder(data)
        assert embed.dtype == torch.bfloat16  # the network body does run in bf16
        post, prior = wm.rssm.observe(embed, data["action"], data["is_first"], start)
        dyn, rep = wm.rssm.kl_losses(post, prior)
        feat = wm.rssm.feat(post)
        reward = wm.reward(feat)
        total, _, metrics = wm.loss(data, start)
    assert post["logp"].dtype == prior["logp"].dtype == torch.float32
    assert dyn.dtype == rep.dtype == torch.float32
    assert reward.logits.dtype == torch.float32 and reward.mean().dtype == torch.float32
    assert total.dtype == torch.float32 and torch.isfinite(total).all()
    assert all(torch.isfinite(v) for v in metrics.values())


# ------------------------------------------------------------------------------------------------
# Presets: the 2023 and 2024 recipes differ as the table says.


def test_recipe_presets_match_the_table():
    c24 = DreamerConfig.model_validate({"recipe": "2024"})
    c23 = DreamerConfig.model_validate({"recipe": 2023})  # YAML reads the recipe as a number
    differ = {
        "kl_dyn": (0.5, 1.0), "norm": ("layer", "rms"), "bins": ("symlog", "symexp"), "gru_blocks": (1, 8),
        "gru_input_layers": (False, True), "encoder": ("stride", "pool"), "optimizer": ("adam", "laprop"),
        "repval_scale": (0.0, 0.3), "replay_context": (False, True), "actor_grad_continuous": ("dynamics", "reinforce"),
        "init_fan": ("avg", "in"), "imag_cont": ("mode", "prob"),
        "cnn_mults": ([1, 2, 4, 8], [2, 3, 4, 4]), "policy_out_scale": (1.0, 0.01),
    }
    for key, (v23, v24) in differ.items():
        assert getattr(c23, key) == v23, key
        assert getattr(c24, key) == v24, key
    same = {
        "kl_rep": 0.1, "free_nats": 1.0, "unimix": 0.01, "num_bins": 255, "bin_limit": 20.0, "lam": 0.95,
        "imag_horizon": 15, "entropy": 3e-4, "retnorm_rate": 0.01, "retnorm_limit": 1.0, "retnorm_low": 5.0,
        "retnorm_high": 95.0, "slow_critic_rate": 0.02, "slow_critic_reg": 1.0, "lr": 4e-5, "agc": 0.3,
        "agc_pmin": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-20, "warmup": 1000, "model_lr": 1e-4,
        "model_eps": 1e-8, "model_clip": 1000.0, "ac_lr": 3e-5, "ac_eps": 1e-5, "ac_clip": 100.0,
        # Both official codes bootstrap from the fast critic and keep the return range undebiased.
        "critic_bootstrap": "fast", "retnorm_debias": False,
    }
    for key, value in same.items():
        assert getattr(c23, key) == getattr(c24, key) == value, key
    assert c24.gamma == c23.gamma == pytest.approx(1 - 1 / 333)
    assert set(RECIPES["2023"]) == set(RECIPES["2024"])
    # A value set in the file wins over the recipe.
    assert DreamerConfig.model_validate({"recipe": "2023", "kl_dyn": 0.7, "norm": "rms"}).kl_dyn == 0.7


def test_size_presets_match_the_table():
    table = {  # deter, hidden, classes, cnn depth, units
        "size1m": (512, 64, 4, 4, 64), "size12m": (2048, 256, 16, 16, 256), "size25m": (3072, 384, 24, 24, 384),
        "size50m": (4096, 512, 32, 32, 512), "size100m": (6144, 768, 48, 48, 768),
        "size200m": (8192, 1024, 64, 64, 1024),
    }
    for name, (deter, hidden, classes, depth, units) in table.items():
        assert SIZES[name] == {"deter": deter, "hidden": hidden, "classes": classes, "cnn_depth": depth,
                               "units": units}
        cfg = DreamerConfig.model_validate({"size": name})
        assert (cfg.deter, cfg.hidden, cfg.classes, cfg.cnn_depth, cfg.units, cfg.stoch) == (
            deter, hidden, classes, depth, units, 32)


def test_built_models_follow_their_recipe():
    act = ActSpace(2, False)
    space = mixed_space(16)
    a24, a23 = Dreamer(make_cfg("2024"), space, act), Dreamer(make_cfg("2023"), space, act)
    norms24 = [m for m in a24.model.modules() if isinstance(m, Norm)]
    norms23 = [m for m in a23.model.modules() if isinstance(m, Norm)]
    assert norms24 and all(m.kind == "rms" and m.shift is None for m in norms24)
    assert norms23 and all(m.kind == "layer" and m.shift is not None for m in norms23)
    assert a24.wm.rssm.blocks == 8 and a23.wm.rssm.blocks == 1
    assert float(a24.wm.bins[-1]) > 1e8 and float(a23.wm.bins[-1]) == 20.0
    assert isinstance(a24.optimizer, LaProp) and isinstance(a23.optimizer, PartsAdam)
    group = a24.optimizer.param_groups[0]
    assert (group["lr"], group["agc"], group["pmin"], group["beta1"], group["beta2"], group["eps"],
            group["warmup"]) == (4e-5, 0.3, 1e-3, 0.9, 0.999, 1e-20, 1000)
    n_params = sum(1 for _ in a24.wm.parameters()) + sum(1 for _ in a24.behavior.actor.parameters()) + sum(
        1 for _ in a24.behavior.critic.parameters())
    assert len(group["params"]) == n_params  # one optimiser for everything (slow critic excluded)
    adam = a23.optimizer.optimizers
    assert {k: (o.param_groups[0]["lr"], o.param_groups[0]["eps"]) for k, o in adam.items()} == {
        "world_model": (1e-4, 1e-8), "actor": (3e-5, 1e-5), "critic": (3e-5, 1e-5)}
    assert {k: clip for k, (_, clip) in a23.optimizer.parts.items()} == {
        "world_model": 1000.0, "actor": 100.0, "critic": 100.0}
    # Encoder: 2024 stride-1 5x5 convs + 2x2 max-pool, depth x [2, 3, 4, 4]; 2023 4x4 stride-2
    # convs, channels doubling per layer (depth x [1, 2, 4, 8]).
    convs24 = [m for m in a24.wm.encoder.cnn.modules() if isinstance(m, torch.nn.Conv2d)]
    convs23 = [m for m in a23.wm.encoder.cnn.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs24] == cnn_channels(4, a24.cfg.cnn_mults) == [8, 12, 16, 16]
    assert [c.out_channels for c in convs23] == [4, 8, 16, 32]
    assert all(c.kernel_size == (5, 5) and c.stride == (1, 1) for c in convs24)
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in a24.wm.encoder.cnn.modules()) == 4
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) for c in convs23)
    assert isinstance(a24.wm.encoder.cnn, ConvEncoder) and a24.wm.encoder.cnn.out_shape == (16, 1, 1)


# ------------------------------------------------------------------------------------------------
# LaProp: adaptive gradient clipping per tensor, then RMS scaling and momentum, linear warm-up.


def test_laprop_agc_clips_each_tensor_to_agc_times_max_pmin_param_norm():
    p_zero = torch.nn.Parameter(torch.zeros(4))  # |p| = 0 -> the pmin floor applies
    p_one = torch.nn.Parameter(torch.ones(4))  # |p| = 2 -> |g| <= 0.6
    p_big = torch.nn.Parameter(10 * torch.ones(4))  # |p| = 20 -> |g| <= 6: the small grad passes
    grads = [torch.ones(4), 5 * torch.ones(4), 0.1 * torch.tensor([1.0, -1.0, 1.0, -1.0])]
    opt = LaProp([p_zero, p_one, p_big], lr=1e-3, agc=0.3, pmin=1e-3, beta1=0.9, beta2=0.999, eps=1e-20, warmup=0)
    for p, g in zip((p_zero, p_one, p_big), grads):
        p.grad = g.clone()
    opt.step()
    expected = [min(1.0, 0.3 * max(1e-3, pn) / float(g.norm())) for pn, g in zip((0.0, 2.0, 20.0), grads)]
    assert expected[0] == pytest.approx(1.5e-4) and expected[1] == pytest.approx(0.06) and expected[2] == 1.0
    for p, g, f in zip((p_zero, p_one, p_big), grads, expected):
        clipped = g * f
        torch.testing.assert_close(opt.state[p]["v"], (1 - 0.999) * clipped.square(), rtol=1e-5, atol=0)


def test_laprop_warmup_ramps_learning_rate_linearly():
    p = torch.nn.Parameter(torch.full((3,), 5.0))
    sign = torch.tensor([1.0, -1.0, 1.0])
    lr, warmup = 0.01, 4
    opt = LaProp([p], lr=lr, agc=0.3, pmin=1e-3, beta1=0.9, beta2=0.999, eps=1e-20, warmup=warmup)
    for step in range(1, 8):
        before = p.detach().clone()
        p.grad = 1e-3 * sign  # constant, well under the AGC limit
        opt.step()
        delta = p.detach() - before
        # Normalised constant gradient: momentum and RMS cancel (bias-corrected), the step is lr_t * sign.
        torch.testing.assert_close(delta, -lr * min(1.0, step / warmup) * sign, rtol=1e-4, atol=1e-9)

    q = torch.nn.Parameter(torch.full((3,), 5.0))
    opt = LaProp([q], lr=lr, agc=0.3, pmin=1e-3, beta1=0.9, beta2=0.999, eps=1e-20, warmup=0)
    q.grad = 1e-3 * sign
    opt.step()
    torch.testing.assert_close(q.detach() - 5.0, -lr * sign, rtol=1e-4, atol=1e-9)


def test_budget_presets_fill_the_optimiser_and_a_file_value_wins():
    faithful = DreamerConfig.model_validate({})
    small = DreamerConfig.model_validate({"budget": "small"})
    assert (faithful.lr, faithful.warmup) == (4e-5, 1000)
    assert (small.lr, small.warmup) == (3e-4, 100)
    assert DreamerConfig.model_validate({"budget": "small", "lr": 1e-4}).lr == 1e-4
    # The 2023 recipe's Adam rates are kept: its small preset changes nothing.
    c23 = DreamerConfig.model_validate({"recipe": "2023", "budget": "small"})
    assert c23.model_dump(exclude={"budget"}) == DreamerConfig.model_validate({"recipe": "2023"}).model_dump(
        exclude={"budget"})
