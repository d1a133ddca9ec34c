"""Where our DreamerV3 once differed from the official code (danijar/dreamerv3: the 2024 code at its
head, the 2023 code at its last commit before the rewrite). One test per divergence; each failed on
the code before the fix.

CPU, `tiny` size, real torch, no mocks.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from dreamer_helpers import FLAG_SPACE, make_batch, make_cfg, randomise_biases

from core.agents.dreamer.layers import BlockLinear, ChannelNorm, ConvDecoder, ConvEncoder, Norm, fans
from core.agents.spaces import ActSpace
from learner.agents.dreamer.agent import Dreamer
from learner.agents.dreamer.behavior import Behavior, lambda_return

IMAGE_SPACE = {"image": ((64, 64, 3), "uint8"), "pos": ((3,), "float32"), **FLAG_SPACE}
VECTOR_SPACE = {"pos": ((3,), "float32"), **FLAG_SPACE}


def negative_batch(space: dict, act: ActSpace) -> dict:
    """A replay-like batch whose rewards are all negative, as Pendulum's."""
    batch = make_batch(space, act, 2, 8)
    batch["reward"] = -np.abs(batch["reward"])
    return batch


# ------------------------------------------------------------------------------------------------
# 1. Every Linear and Conv before an RMSNorm keeps its bias (2024); before a LayerNorm it drops it.


def _layers_before_norms(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, layer) of every Linear/Conv/BlockLinear directly followed by a norm in a Sequential."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Sequential):
            kids = list(module.named_children())
            for (n1, a), (_, b) in zip(kids, kids[1:]):
                if isinstance(b, Norm | ChannelNorm) and isinstance(a, torch.nn.Linear | torch.nn.Conv2d):
                    found.append((f"{name}.{n1}", a))
                if isinstance(a, torch.nn.Conv2d) and isinstance(b, torch.nn.MaxPool2d):
                    found.append((f"{name}.{n1}", a))  # conv -> pool -> norm
    return found


@pytest.mark.parametrize("recipe", ["2024", "2023"])
def test_layers_before_a_norm_keep_their_bias_only_under_rmsnorm(recipe):
    cfg = make_cfg(recipe)
    model = Dreamer(cfg, IMAGE_SPACE, ActSpace(2, False)).model
    layers = _layers_before_norms(model)
    assert len(layers) > 20  # the encoder, decoder, GRU inputs, prior, posterior, heads, actor, critic
    for name, layer in layers:
        assert (layer.bias is not None) == (recipe == "2024"), name
    rssm = model.wm.rssm
    if recipe == "2024":
        assert rssm.in_action[0].bias is not None and rssm.core_hidden.bias is not None


def test_one_gru_step_tells_action_magnitudes_apart():
    """The action reaches the GRU through Linear -> RMSNorm -> SiLU. Without a bias, a 1-D action of
    +0.2 and +1.0 give the same state (only the sign of Pendulum's torque was seen: measured 0.0036
    apart against 1.17 for +1 and -1). With biases (non-zero, as training makes them) they differ."""
    cfg = make_cfg("2024", size="size1m")
    torch.manual_seed(0)
    rssm = Dreamer(cfg, VECTOR_SPACE, ActSpace(1, False)).model.wm.rssm
    randomise_biases(rssm)
    deter, stoch = torch.randn(1, cfg.deter), torch.zeros(1, cfg.stoch, cfg.classes)
    stoch[..., 0] = 1.0

    def step(a: float) -> torch.Tensor:
        with torch.no_grad():
            return rssm._gru(deter, stoch, torch.tensor([[a]]))

    size = (step(0.2) - step(1.0)).norm()
    sign = (step(1.0) - step(-1.0)).norm()
    assert size > 0.2 * sign, (size, sign)


# ------------------------------------------------------------------------------------------------
# 2. Initialisation: truncated normal, std 1/sqrt(fan_in) (2024; fan_avg in 2023), biases 0; a
# block-diagonal layer's fan_in is its whole input.


@pytest.mark.parametrize("recipe", ["2024", "2023"])
def test_weights_start_truncated_normal_with_the_recipes_fan(recipe):
    cfg = make_cfg(recipe, size="size1m")
    torch.manual_seed(0)
    model = Dreamer(cfg, VECTOR_SPACE, ActSpace(2, False)).model
    checked = 0
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.all(p == 0), name
            continue
        if p.ndim < 2 or p.numel() < 4000 or "out." in name or name.endswith("_out.weight"):
            continue  # norms' scales; output layers have their own scales; small ones are noisy
        fan_in, fan_out = fans(p)
        fan = fan_in if cfg.init_fan == "in" else (fan_in + fan_out) / 2
        std = 1 / math.sqrt(fan)
        assert p.std().item() == pytest.approx(std, rel=0.05), name
        assert p.abs().max().item() <= 2 * std / 0.8796 + 1e-6, name  # truncated at 2 std
        checked += 1
    assert checked >= 10
    gates = model.wm.rssm.gates
    if recipe == "2024":
        assert isinstance(gates, BlockLinear) and gates.blocks == 8
        whole_input = gates.blocks * gates.weight.shape[2]  # 512, not one block's 64
        assert gates.weight.std().item() == pytest.approx(1 / math.sqrt(whole_input), rel=0.05)


# ------------------------------------------------------------------------------------------------
# 3. The GRU's hidden block-linear output is normalised over all of deter, one deter-wide scale.


def test_gru_hidden_layer_is_normalised_over_all_of_deter():
    cfg = make_cfg("2024")
    torch.manual_seed(0)
    rssm = Dreamer(cfg, VECTOR_SPACE, ActSpace(2, False)).model.wm.rssm
    assert rssm.core_norm.scale.shape == (cfg.deter,)
    seen = {}
    rssm.core_norm.register_forward_hook(lambda m, i, o: seen.update(out=o))
    deter = torch.randn(4, cfg.deter)
    deter[:, : cfg.deter // cfg.gru_blocks] *= 50  # one block's input far larger than the others'
    rssm._gru(deter, torch.zeros(4, cfg.stoch, cfg.classes), torch.zeros(4, 2))
    out = seen["out"].reshape(4, cfg.gru_blocks, -1)
    whole = out.square().mean((-2, -1)).sqrt()
    per_block = out.square().mean(-1).sqrt()
    torch.testing.assert_close(whole, torch.ones(4), rtol=1e-3, atol=1e-3)
    assert (per_block.max(-1).values / per_block.min(-1).values > 1.5).all()  # blocks keep their relative size


# ------------------------------------------------------------------------------------------------
# 4. Pixels: conv -> pool -> norm -> SiLU; the decoder projects deter block-wise plus an MLP of stoch
# and ends in a sigmoid.


def test_2024_encoder_pools_before_the_norm():
    enc = ConvEncoder(3, [8, 12], "pool", "rms", (16, 16))
    kinds = [type(m).__name__ for m in enc.net]
    assert kinds == ["Conv2d", "MaxPool2d", "ChannelNorm", "SiLU"] * 2
    assert enc(torch.randn(2, 3, 16, 16)).shape == (2, 12 * 4 * 4)


def test_2024_decoder_projects_deter_block_wise_and_ends_in_a_sigmoid():
    cfg = make_cfg("2024", size="size1m")
    torch.manual_seed(0)
    model = Dreamer(cfg, IMAGE_SPACE, ActSpace(2, False)).model
    dec = model.wm.decoder.cnn
    proj = dec.linear
    assert isinstance(proj.from_deter, BlockLinear) and proj.from_deter.blocks == 8
    assert proj.from_deter.weight.shape[0] * proj.from_deter.weight.shape[2] == cfg.deter
    # Deter alone moves block k's channel group only: the projection is block-diagonal.
    feat = torch.zeros(1, model.wm.feat_dim)
    feat[0, 0] = 1.0  # a unit in deter's first block
    with torch.no_grad():
        x0 = proj.from_deter(feat[:, : cfg.deter].reshape(1, 8, -1)).reshape(1, *dec.start)
    group = dec.start[0] // 8
    assert x0[0, group:].abs().sum() == 0 and x0[0, :group].abs().sum() > 0
    # Whatever the features, the image mean lies inside the pixel range ([-0.5, 0.5] input space).
    with torch.no_grad():
        img = model.wm.decoder(1e3 * torch.randn(3, model.wm.feat_dim))["image"]
    assert img.shape == (3, 64, 64, 3) and img.min() >= -0.5 and img.max() <= 0.5
    assert not any(isinstance(m, torch.nn.Linear) and m.in_features == model.wm.feat_dim for m in dec.modules())


def test_2023_decoder_keeps_its_dense_start_and_unbounded_output():
    dec = ConvDecoder(40, 3, [4, 8], "stride", "layer", (16, 16))
    assert isinstance(dec.linear, torch.nn.Linear) and not dec.sigmoid


# ------------------------------------------------------------------------------------------------
# 5. The replay value loss is masked at is_last steps.


def test_replay_value_loss_has_no_target_at_the_last_step_of_an_episode():
    cfg = make_cfg("2024")
    torch.manual_seed(0)
    beh = Behavior(cfg, 40, ActSpace(2, False))
    with torch.no_grad():
        beh.critic.out.weight.normal_(0, 0.1)
    b, t, k = 2, 8, 4
    feat = torch.randn(b, t, 40, requires_grad=True)
    reward, boot = torch.randn(b, t), torch.randn(b, t)
    is_first, is_last, is_terminal = torch.zeros(b, t), torch.zeros(b, t), torch.zeros(b, t)
    is_last[:, k] = is_terminal[:, k] = is_first[:, k + 1] = 1.0
    loss = beh.replay_value_loss(feat, reward, is_terminal, is_first, is_last, boot)
    (grad,) = torch.autograd.grad(loss, feat)
    assert grad[:, k].abs().sum() == 0  # the terminal step trains nothing
    assert grad[:, k - 1].abs().sum() > 0 and grad[:, k + 1].abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# 2023 recipe: 7. continuation as the head's mode; 8. bootstrap from the fast critic; 9. no
# debiasing; 10. the backprop actor loss has the baseline v(s_t).


def _actor_grads(agent: Dreamer, data: dict, start: dict) -> list[torch.Tensor]:
    torch.manual_seed(3)
    loss = agent._update(data, start)[0]
    params = list(agent.behavior.actor.parameters())
    return [g if g is not None else torch.zeros_like(p)
            for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True))]


def test_2023_imagined_continuation_is_the_heads_mode_without_gradient():
    """Doubling the continuation head's logits keeps its mode and changes its probability: the
    2023 actor's gradient must not change (no gradient can steer imagination into 'ending')."""
    cfg = make_cfg("2023")
    act = ActSpace(2, False)
    torch.manual_seed(0)
    agent = Dreamer(cfg, VECTOR_SPACE, act)
    with torch.no_grad():
        agent.wm.cont_out.weight.normal_(0, 1.0)
        agent.wm.cont_out.bias.fill_(0.5)
    data = agent.to_inputs(negative_batch(VECTOR_SPACE, act))
    start = agent.context_from_batch(negative_batch(VECTOR_SPACE, act))
    before = _actor_grads(agent, data, start)
    with torch.no_grad():
        agent.wm.cont_out.weight.mul_(2.0)
        agent.wm.cont_out.bias.mul_(2.0)
    after = _actor_grads(agent, data, start)
    assert any(g.abs().sum() > 0 for g in before)
    for g1, g2 in zip(before, after):  # gradients are ~1e-5: compare relative to them, not to 1e-5
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-10)


def _imagined(cfg, seed: int = 0):
    torch.manual_seed(seed)
    h, n, f = 5, 6, 40
    beh = Behavior(cfg, f, ActSpace(2, False))
    with torch.no_grad():
        beh.critic.out.weight.normal_(0, 0.1)
        beh.slow_critic.out.weight.normal_(0, 0.1)
    feat = torch.randn(h + 1, n, f, requires_grad=True)
    action = torch.randn(h, n, 2)
    reward = -torch.rand(h + 1, n)
    cont = torch.ones(h + 1, n)
    return beh, feat, action, reward, cont


def test_2023_returns_bootstrap_from_the_fast_critic():
    cfg = make_cfg("2023")
    beh, feat, action, reward, cont = _imagined(cfg)
    _, ret0, m0 = beh.loss(feat, action, reward, cont)
    with torch.no_grad():  # the slow critic is only the critic's regulariser
        beh.slow_critic.out.weight.normal_(0, 0.5)
    _, ret1, m1 = beh.loss(feat, action, reward, cont)
    torch.testing.assert_close(ret0, ret1)
    torch.testing.assert_close(m0["ac/actor_loss"], m1["ac/actor_loss"])
    assert not torch.allclose(m0["ac/critic_loss"], m1["ac/critic_loss"])


def test_2023_return_scale_is_not_debiased():
    cfg = make_cfg("2023", retnorm_rate=0.01)
    beh = Behavior(cfg, 40, ActSpace(2, False))
    beh.retnorm.update(torch.linspace(0, 1000, 101))
    # low -> 0.01 * 50 (P5), high -> 0.01 * 950 (P95): span 9, no division by 1 - 0.99.
    assert beh.retnorm.scale().item() == pytest.approx(9.0, rel=1e-4)


def test_2023_backprop_actor_loss_subtracts_the_value_baseline():
    cfg = make_cfg("2023", retnorm_rate=1.0, entropy=0.0)
    beh, feat, action, reward, cont = _imagined(cfg)
    _, _, metrics = beh.loss(feat, action, reward, cont)
    with torch.no_grad():
        disc = cfg.gamma * cont
        value = beh.critic(feat).mean()
        ret = lambda_return(reward, disc, value, cfg.lam)
        weight = torch.cumprod(disc, 0)[:-1]
        expected = (weight * -(ret - value[:-1]) / beh.retnorm.scale()).mean()
    torch.testing.assert_close(metrics["ac/actor_loss"], expected)
