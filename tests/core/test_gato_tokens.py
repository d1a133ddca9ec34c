"""Gato's tokeniser and network, real torch: continuous values round-trip within one bin and discrete ones
exactly, every kind has its own id range, the loss reads action slots only, attention is causal, KV-cache
decoding equals the full pass, and a blob whose tensors do not fit its config is refused naming them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.agents import read_policy
from core.agents.gato.model import GatoNet, action_loss, pack
from core.agents.gato.policy import Policy, policy_weights
from core.agents.gato.tokens import Body, mu_law
from core.agents.spaces import ActSpace
from core.config.gato import GatoConfig
from core.layout import StepLayout
from core.weights import weights_to_bytes

CFG = GatoConfig(layers=2, width=32, heads=4, context=128, prompt_tokens=40, patch_channels=4, step_tokens=64)
FLAGS = {"reward": ((), "float32"), "is_first": ((), "bool"), "is_last": ((), "bool"), "is_terminal": ((), "bool")}
SPACE = StepLayout({"image": ((32, 16, 3), "uint8"), "pos": ((3,), "float32"), "mode": ((2,), "int32"), **FLAGS})


def _steps(body: Body, t: int, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    obs = {"image": rng.integers(0, 256, (t, 32, 16, 3), dtype=np.uint8),
           "pos": rng.normal(0, 3, (t, 3)).astype(np.float32), "mode": rng.integers(0, 5, (t, 2)).astype(np.int32)}
    if body.act.discrete:
        return obs, np.eye(body.act.dim, dtype=np.float32)[rng.integers(body.act.dim, size=t)]
    return obs, rng.uniform(-1, 1, (t, body.act.dim)).astype(np.float32)


def test_continuous_values_round_trip_within_one_bin_and_discrete_ones_exactly() -> None:
    body = Body.of(SPACE, ActSpace(3, False), CFG)
    x = np.concatenate([np.linspace(-256, 256, 20001), np.geomspace(1e-4, 256, 2000), -np.geomspace(1e-4, 256, 2000)])
    tokens = body.continuous_tokens(x, encode=True)
    back = body.continuous_values(tokens, encoded=True)
    np.testing.assert_array_equal(body.continuous_tokens(back, encode=True), tokens)  # the same bin
    half_bin = 1.0 / CFG.bins  # bins are 2 / bins wide in the mu-law domain; the centre is within half of one
    assert np.abs(mu_law(back, CFG.mu, CFG.mu_max) - mu_law(x, CFG.mu, CFG.mu_max)).max() <= half_bin + 1e-12
    actions = np.random.default_rng(0).uniform(-1, 1, (500, 3)).astype(np.float32)
    assert np.abs(body.action_of(body.action_tokens(actions)) - actions).max() <= half_bin + 1e-6
    discrete = Body.of(SPACE, ActSpace(6, True), CFG)
    onehot = np.eye(6, dtype=np.float32)[np.arange(30) % 6]
    np.testing.assert_array_equal(discrete.action_of(discrete.action_tokens(onehot)), onehot)
    obs, _ = _steps(discrete, 4)
    tokens, _ = discrete.tokenise(obs)
    at = next(i for i, e in enumerate(discrete.entries) if e.key == "mode")
    start = sum(e.slots for e in discrete.entries[:at])
    np.testing.assert_array_equal(tokens[:, start:start + 2] - CFG.bins, obs["mode"])


def test_each_kind_of_token_has_its_own_range_and_a_step_is_obs_separator_action() -> None:
    body = Body.of(SPACE, ActSpace(3, False), CFG)
    vocab = body.vocab
    ranges = [set(vocab.continuous), set(vocab.discrete), {vocab.separator}]
    assert sum(map(len, ranges)) == len(set().union(*ranges)) == vocab.size  # disjoint, and all of the vocabulary
    obs, actions = _steps(body, 5)
    tokens, patches = body.tokenise(obs, actions)
    assert [e.key for e in body.entries] == ["image", "mode", "pos"]  # by key, as Gato orders them
    assert tokens.shape == (5, 2 + 2 + 3 + 1 + 3) and patches.shape == (5, 2, 16, 16, 3)  # 32 x 16: 2 x 1 patches
    np.testing.assert_array_equal(patches[:, 1], obs["image"][:, 16:32])  # row-major patches
    np.testing.assert_array_equal(body.patch_slots(), [0, 1])
    assert set(tokens[:, 2:4].ravel()) <= set(vocab.discrete)
    assert set(tokens[:, 4:7].ravel()) <= set(vocab.continuous)
    assert (tokens[:, 7] == vocab.separator).all() and set(tokens[:, 8:].ravel()) <= set(body.action_range())
    np.testing.assert_array_equal(body.action_slots(), [8, 9, 10])
    assert set(Body.of(SPACE, ActSpace(4, True), CFG).action_range()) <= set(vocab.discrete)


def test_the_loss_reads_the_action_slots_only() -> None:
    body = Body.of(SPACE, ActSpace(3, False), CFG)
    obs, actions = _steps(body, 4)
    tokens, patches = body.tokenise(obs, actions)
    batch = pack([[(body, tokens, patches)], [(body, tokens[:1], patches[:1])]])  # the second row padded
    logits = torch.randn(*batch.tokens.shape, body.vocab.size, requires_grad=True)
    action_loss(logits, batch).backward()
    touched = logits.grad.abs().sum(-1) > 0
    expected = torch.zeros_like(touched)
    expected[:, :-1] = batch.action[:, 1:]  # the logits before each action slot, and nothing else
    assert torch.equal(touched, expected) and expected.sum() == 4 * 3 + 3
    assert not batch.action[1, batch.lengths[1]:].any()  # padding is no target


def test_attention_is_causal_and_kv_cache_decoding_equals_the_full_pass() -> None:
    torch.manual_seed(0)
    body = Body.of(SPACE, ActSpace(3, False), CFG)
    net = GatoNet(CFG).eval()
    obs, actions = _steps(body, 3)
    tokens, patches = body.tokenise(obs, actions)
    full, _ = net(pack([[(body, tokens, patches)]]))
    t = body.step_len + 5  # a continuous observation slot of the second step
    changed = tokens.copy()
    changed[1, 5] = (changed[1, 5] + 7) % CFG.bins
    other_patches = patches.copy()
    other_patches[2] = 255 - other_patches[2]  # the third step's image
    for tok, pat, at in ((changed, patches, t), (tokens, other_patches, 2 * body.step_len)):
        out, _ = net(pack([[(body, tok, pat)]]))
        torch.testing.assert_close(out[:, :at], full[:, :at], rtol=0, atol=0)
        assert not torch.allclose(out[:, at], full[:, at])
    # the last step's action slots one at a time through the cache, as acting decodes
    head = pack([[(body, tokens[:2], patches[:2]), (body, tokens[2:, : body.obs_len + 1], patches[2:])]])
    _, cache = net(head)
    start = head.tokens.shape[1]
    for j, slot in enumerate(body.action_slots()):
        policy = Policy(CFG, SPACE, body.act, net, torch.device("cpu"))
        step, cache = net(policy._one_slot(int(tokens[2, slot]), int(slot)), cache, start + j)
        torch.testing.assert_close(step[0, 0], full[0, 2 * body.step_len + slot], rtol=1e-5, atol=1e-5)


def test_a_blob_whose_tensors_do_not_fit_its_config_is_refused_naming_the_tensor() -> None:
    body = Body.of(SPACE, ActSpace(3, False), CFG)
    obs, actions = _steps(body, 6)
    tensors, meta = policy_weights(GatoNet(CFG), CFG, SPACE, body.act, 3, {**obs, "action": actions})
    policy = Policy.from_blob(read_policy(weights_to_bytes(tensors, meta)))
    assert policy.version == 3 and policy.prompt is not None and policy.prompt[1].shape[0] == 40 // body.step_len
    bad = dict(tensors, **{"net.head.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=r"net\.head\.weight"):
        Policy.from_blob(read_policy(weights_to_bytes(bad, meta)))
    short = dict(tensors, **{"prompt.pos": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match=r"prompt\.pos"):
        Policy.from_blob(read_policy(weights_to_bytes(short, meta)))
    with pytest.raises(ValueError, match="discrete_values"):
        read_policy(weights_to_bytes(tensors, {**meta, "gato": {**meta["gato"], "discrete_values": 2},
                                               "act_space": {"dim": 3, "discrete": True}}))
