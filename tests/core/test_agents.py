"""The agent registry and the policy blob every algorithm writes: a blob names its algorithm, one written
before it did is Dreamer's, an unknown one is refused before anything is built, and the trainer a config
names is the one built."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dreamer_helpers import FLAG_SPACE, make_cfg

from core.agents import ALGORITHMS, build_policy, load_policy, policy_class, read_policy, resolve
from core.agents.dreamer.policy import Policy, policy_weights
from core.agents.spaces import ActSpace
from core.config import Config
from core.weights import weights_to_bytes
from learner.agents import agent_class, make_agent
from learner.agents.dreamer.agent import Dreamer, DreamerModel

SPACE = {"pos": ((3,), "float32"), **FLAG_SPACE}
ACT = ActSpace(2, False)


def _obs() -> dict[str, np.ndarray]:
    return {"pos": np.ones(3, np.float32), "reward": np.float32(0), "is_first": np.bool_(True),
            "is_last": np.bool_(False), "is_terminal": np.bool_(False)}


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_every_registry_entry_resolves(name: str) -> None:
    assert resolve(ALGORITHMS[name].policy) is policy_class(name)
    assert agent_class(name) is resolve(ALGORITHMS[name].agent)


def test_a_blob_names_its_algorithm_and_one_without_a_name_is_dreamers() -> None:
    torch.manual_seed(0)
    model = DreamerModel(make_cfg(), SPACE, ACT)
    tensors, meta = policy_weights(model, 5)
    assert meta["algorithm"] == "dreamer"
    named = read_policy(weights_to_bytes(tensors, meta))
    assert (named.algorithm, named.version, named.act_space, named.space) == ("dreamer", 5, ACT, model.space)
    old = {k: v for k, v in meta.items() if k != "algorithm"}  # as written before there was a registry
    policies = [build_policy(named), load_policy(weights_to_bytes(tensors, old))]
    assert all(isinstance(p, Policy) and p.version == 5 for p in policies)
    actions = []
    for policy in policies:
        torch.manual_seed(1)  # the posterior's latent is sampled
        actions.append(policy.act(_obs(), mode="mode"))
    np.testing.assert_array_equal(actions[0], actions[1])


def test_a_blob_of_an_unknown_algorithm_is_refused_naming_it() -> None:
    tensors, meta = policy_weights(DreamerModel(make_cfg(), SPACE, ACT), 1)
    with pytest.raises(ValueError, match="unknown algorithm 'no_such_algorithm'"):
        read_policy(weights_to_bytes(tensors, {**meta, "algorithm": "no_such_algorithm", "no_such_algorithm": {}}))


def test_the_config_names_the_trainer_built() -> None:
    cfg = Config.model_validate({"name": "t", "task": "arm_reach", "dreamer": make_cfg().model_dump()})
    assert cfg.agent == "dreamer"
    agent = make_agent(cfg, SPACE, ACT)
    assert isinstance(agent, Dreamer) and agent.cfg == cfg.dreamer
    params = sum(p.numel() for p in agent.model.parameters())
    assert type(agent).parameter_count(cfg, SPACE, ACT) == params
    with pytest.raises(ValueError, match="agent"):
        Config.model_validate({"name": "t", "task": "arm_reach", "agent": "no_such_algorithm"})
