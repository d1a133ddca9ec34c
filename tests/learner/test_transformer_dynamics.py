"""The transformer world model (`dreamer.dynamics: transformer`, core/agents/dreamer/transformer.py): the causal
mask, the KV cache against the full forward, bf16 autocast, an update, imagination's caches, the policy a robot
builds from its blob, and refusals. Real torch on the CPU, tiny sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dreamer_helpers import FLAG_SPACE, make_batch, make_cfg, randomise_biases

from core.agents.attention import Block
from core.agents.dreamer.policy import Policy, export_policy
from core.agents.dreamer.transformer import TransformerDynamics
from core.agents.dreamer.transformer_policy import TransformerPolicy
from core.agents.spaces import ActSpace
from core.config.agent import DreamerConfig
from learner.agents.dreamer.agent import Dreamer

SPACE = {"pos": ((3,), "float32"), **FLAG_SPACE}
SMALL = {"width": 32, "heads": 4, "layers": 2, "context": 6, "imag_context": 3}


def tcfg(recipe: str = "2024", **over) -> DreamerConfig:
    return make_cfg(recipe, dynamics="transformer", transformer={**SMALL, **over.pop("transformer", {})}, **over)


def dyn(seed: int = 0, **over) -> TransformerDynamics:
    torch.manual_seed(seed)
    model = TransformerDynamics(tcfg(**over), act_dim=2, embed_dim=5)
    randomise_biases(model)
    return model.eval()


def tokens(b: int, t: int, width: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, t, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("t_changed", [0, 3, 7])
def test_changing_token_t_changes_no_output_before_t(t_changed):
    model, x = dyn(transformer={"context": 16}), tokens(2, 10)
    first = torch.zeros(2, 10, dtype=torch.bool)
    first[:, 0] = True
    with torch.no_grad():
        before, _ = model.forward_tokens(x, first)
        changed = x.clone()
        changed[:, t_changed] = -changed[:, t_changed]
        after, _ = model.forward_tokens(changed, first)
    assert torch.equal(before[:, :t_changed], after[:, :t_changed])
    assert not torch.allclose(before[:, t_changed:], after[:, t_changed:])


def test_a_step_sees_only_its_own_episode_and_context():
    model, x = dyn(transformer={"layers": 1}), tokens(1, 12)  # context 6 (one layer: deeper ones see further)
    first = torch.zeros(1, 12, dtype=torch.bool)
    first[0, [0, 4]] = True
    with torch.no_grad():
        base, _ = model.forward_tokens(x, first)
        changed = x.clone()
        changed[0, 3] = -changed[0, 3]  # the first episode's last step: the second episode (4..) must not see it
        out, _ = model.forward_tokens(changed, first)
        assert torch.equal(base[0, 4:], out[0, 4:])
        changed = x.clone()
        changed[0, 4] = -changed[0, 4]  # seen by steps 4..9 (context 6), not by 10 and 11
        out, _ = model.forward_tokens(changed, first)
    assert not torch.allclose(base[0, 9], out[0, 9]) and torch.equal(base[0, 10:], out[0, 10:])


def test_kv_cache_decoding_equals_the_full_forward():
    """Acting one token at a time with the sliding cache (context - 1 entries kept) gives the full masked
    forward's outputs, episode starts included, past the context length."""
    model, x = dyn(), tokens(3, 20)
    first = torch.zeros(3, 20, dtype=torch.bool)
    first[:, 0] = True
    first[1, 9] = first[2, 13] = True
    with torch.no_grad():
        full, _ = model.forward_tokens(x, first)
        memory, outs = model.empty_memory(3, torch.device("cpu")), []
        for t in range(20):
            memory["valid"] = memory["valid"] & ~first[:, t, None]
            out, memory = model.step(x[:, t], memory, keep=model.tcfg.context - 1)
            outs.append(out)
            assert memory["kv"].shape[-2] <= model.tcfg.context - 1
    torch.testing.assert_close(torch.stack(outs, 1), full, rtol=0, atol=1e-5)


def test_imagination_windows_continue_the_sequence_as_the_full_forward():
    """An imagination start at step t, with its window of keys and values, predicts the next step as the full
    forward over the real steps up to t followed by the new token does when that token's attention is cut to
    the window's last `imag_context` real steps (of its episode)."""
    model = dyn(transformer={"context": 16, "imag_context": 4})
    b, t, w = 2, 7, 4
    embed = torch.randn(b, t, 5)
    prev_action = torch.rand(b, t, 2) * 2 - 1
    first = torch.zeros(b, t, dtype=torch.bool)
    first[:, 0] = True
    first[1, 5] = True
    start = {"stoch": torch.zeros(b, 8, 4), "deter": torch.zeros(b, 64)}
    with torch.no_grad():
        post, _ = model.observe(embed, prev_action, first, start)
        flat, memory = model.starts(post)
        action = torch.rand(b * t, 2) * 2 - 1
        nxt, grown = model.step(model.token(flat["stoch"], action), memory)
        assert grown["kv"].shape[-2] == w + 1
        keep = 1.0 - first.float()
        prev_stoch = torch.cat([start["stoch"][:, None], post["stoch"][:, :-1]], 1)
        real = model.token(prev_stoch * keep[..., None, None], prev_action * keep[..., None])
        for i in range(b):
            for s in range(t):
                n = i * t + s
                x = torch.cat([real[i, : s + 1], model.token(flat["stoch"][n], action[n])[None]])[None]
                bias = model.attention_bias(torch.cat([first[i, : s + 1], torch.zeros(1, dtype=torch.bool)])[None])
                bias[..., -1, : max(0, s + 1 - w)] = float("-inf")
                for block in model.blocks:
                    x, _ = block(x, mask=bias)
                ref = model.out(model.out_norm(x))[0, -1]
                torch.testing.assert_close(nxt[n], ref, rtol=0, atol=1e-5)


def test_block_is_gatos_and_its_mask_argument_overrides_the_causal_one():
    from core.agents.gato import model as gato_model

    assert gato_model.Block is Block
    torch.manual_seed(0)
    block = Block(16, 4, 2).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        causal, _ = block(x)
        masked, _ = block(x, mask=torch.ones(5, 5, dtype=torch.bool).tril())
        full, _ = block(x, mask=torch.ones(5, 5, dtype=torch.bool))
    torch.testing.assert_close(causal, masked, rtol=0, atol=1e-6)
    assert not torch.allclose(causal[:, 0], full[:, 0])


def test_bf16_autocast_update_shapes_and_dtypes():
    """Under CPU bf16 autocast the blocks' products run in bf16, the cache keeps bf16 keys, and the KL and
    losses stay float32; an update is finite."""
    act = ActSpace(2, False)
    torch.manual_seed(0)
    agent = Dreamer(tcfg(precision="bfloat16"), SPACE, act)
    model = agent.wm.rssm
    b, t = 2, 5
    batch = make_batch(SPACE, act, b, t)
    data = agent.to_inputs(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embed = agent.wm.encoder(data)
        prev = torch.cat([torch.zeros(b, 1, 2), data["action"][:, :-1]], 1)
        post, prior = model.observe(embed, prev, data["is_first"], agent.initial_context(b))
        flat, memory = model.starts(post)
        nxt, memory = model.img_step(flat, torch.zeros(b * t, 2), memory)
        dyn_loss, rep_loss = model.kl_losses(post, prior)
    assert post["deter"].shape == (b, t, 64) and post["deter"].dtype == torch.bfloat16
    assert post["kv"].shape == (b, 2, 2, 4, t, 8) and post["kv"].dtype == torch.bfloat16
    assert memory["kv"].shape == (b * t, 2, 2, 4, 3 + 1, 8) and memory["kv"].dtype == torch.bfloat16
    assert nxt["deter"].shape == (b * t, 64) and nxt["stoch"].shape == (b * t, 8, 4)
    assert post["logp"].dtype == torch.float32 and dyn_loss.dtype == rep_loss.dtype == torch.float32
    metrics, context = agent.train(batch)
    assert "skipped_nonfinite" not in metrics and np.isfinite(float(metrics["loss"]))
    assert context["deter"].dtype == torch.float32


@pytest.mark.parametrize("recipe", ["2024", "2023"])
def test_update_trains_every_transformer_weight(recipe):
    act = ActSpace(3, True)
    torch.manual_seed(0)
    agent = Dreamer(tcfg(recipe), SPACE, act)
    before = {k: v.clone() for k, v in agent.wm.rssm.state_dict().items()}
    for seed in range(2):
        metrics, context = agent.train(make_batch(SPACE, act, 2, 8, seed=seed))
        assert "skipped_nonfinite" not in metrics and np.isfinite(float(metrics["loss"]))
    after = agent.wm.rssm.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert set(moved) == set(before), f"unchanged: {set(before) - set(moved)}"
    assert context["deter"].shape == (2, 8, 64)


def test_exported_policy_acts_like_the_trainer_with_its_kv_cache():
    act = ActSpace(2, False)
    torch.manual_seed(0)
    agent = Dreamer(tcfg(), SPACE, act)
    agent.train(make_batch(SPACE, act, 2, 8))
    randomise_biases(agent.model)
    with torch.no_grad():
        agent.behavior.actor.out.weight.mul_(100.0)
    loaded = Policy.from_weights(export_policy(agent.model, version=3))
    assert isinstance(loaded, TransformerPolicy) and isinstance(agent.policy(), TransformerPolicy)
    rng = np.random.default_rng(0)
    obs = [{"pos": rng.normal(size=3).astype(np.float32), "reward": np.float32(0), "is_first": t in (0, 9),
            "is_last": False, "is_terminal": False} for t in range(14)]

    def rollout(policy: Policy, prepare: bool) -> list[np.ndarray]:
        torch.manual_seed(4)
        policy.reset()
        out = []
        for o in obs:
            out.append(np.asarray(policy.act(o, mode="sample")))
            if prepare:
                policy.prepare()
        return out

    live = rollout(agent.policy(), False)
    for a, b in zip(live, rollout(loaded, False)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    for a, b in zip(live, rollout(loaded, True)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert loaded.state["kv"].shape[-2] == SMALL["context"] - 1  # the cache slides
    # the cache is what acting reads: the deter after 8 steps is the full forward's over the last 6 tokens
    assert loaded.cache_bytes() > 0


def test_config_refusals_name_the_field():
    with pytest.raises(ValueError, match="compile"):
        tcfg(compile="cell")
    with pytest.raises(ValueError, match="width"):
        tcfg(transformer={"width": 30, "heads": 4})
    with pytest.raises(ValueError, match="imag_context"):
        tcfg(transformer={"context": 4, "imag_context": 5})
    assert tcfg(compile="auto").compile == "auto"
    assert make_cfg().dynamics == "rssm"  # old configs and blobs: the RSSM
    with pytest.raises(ValueError, match="explore"):
        tcfg(explore="plan2explore")
