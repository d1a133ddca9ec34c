"""CASCADE's population (learner/agents/dreamer/cascade.py, explore.py): the diversity term of explorer k
depends on explorers 0..k-1 and on no later one; the population trains and acts in turn. CPU, tiny, real torch."""

from __future__ import annotations

import numpy as np
import torch
from dreamer_helpers import FLAG_SPACE, make_batch, make_cfg

from core.agents.spaces import ActSpace
from core.config.explore import ExploreConfig
from learner.agents.dreamer.agent import Dreamer
from learner.agents.dreamer.cascade import diversity

SPACE = {"pos": ((5,), "float32"), **FLAG_SPACE}
ACT = ActSpace(2, False)


def make_agent(population: int = 3, alpha: float = 0.5, recipe: str = "2024") -> Dreamer:
    torch.manual_seed(0)
    return Dreamer(make_cfg(recipe, explore="cascade"), SPACE, ACT,
                   explore=ExploreConfig(population=population, alpha=alpha, ensemble=3))


def test_diversity_is_the_distance_to_the_nearest_earlier_final_state() -> None:
    final = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert torch.equal(diversity(final, []), torch.zeros(2))
    earlier = [torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 0.0], [10.0, 10.0]])]
    assert torch.allclose(diversity(final, earlier), torch.tensor([0.0, 4.0]), atol=1e-3)
    # differentiable in the explorer's own states, never in the earlier ones'
    final = final.clone().requires_grad_(True)
    reference = earlier[1].clone().requires_grad_(True)
    diversity(final, [reference]).sum().backward()
    assert final.grad is not None and reference.grad is None


def _rollouts(agent: Dreamer, batch: dict) -> list[dict]:
    torch.manual_seed(1)  # the same posterior samples and imagination noise on every call
    data = agent.to_inputs(batch)
    post = agent.wm.loss(data, agent.context_from_batch(batch))[1]
    b, t = data["action"].shape[:2]
    start = {k: post[k].detach().reshape(b * t, *post[k].shape[2:]) for k in ("deter", "stoch")}
    with torch.no_grad():
        return agent.exploration.rollouts(start, (1.0 - data["is_terminal"]).reshape(1, -1))


def _perturb(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.5 * torch.randn_like(p))


def test_diversity_of_explorer_k_changes_when_earlier_explorers_change_and_only_then() -> None:
    agent = make_agent(population=3)
    batch = make_batch(SPACE, ACT, 2, 6)
    base = _rollouts(agent, batch)
    assert base[0]["diversity"] is None  # the first explorer has no one to differ from
    assert base[1]["diversity"] is not None and bool((base[1]["diversity"] > 0).any())
    again = _rollouts(agent, batch)
    assert torch.equal(again[2]["diversity"], base[2]["diversity"])  # deterministic given the noise
    # a later explorer changes: explorer 1's trajectories, diversity and rewards stay exactly as they were
    _perturb(agent.exploration.net.behaviors[2].actor)
    later = _rollouts(agent, batch)
    assert torch.equal(later[1]["diversity"], base[1]["diversity"])
    assert torch.equal(later[1]["reward"], base[1]["reward"])
    assert not torch.equal(later[2]["final"], base[2]["final"])
    # an earlier explorer changes: explorer 1's own trajectories are the same, its diversity reward is not
    _perturb(agent.exploration.net.behaviors[0].actor)
    earlier = _rollouts(agent, batch)
    assert torch.equal(earlier[1]["final"], later[1]["final"])
    assert not torch.allclose(earlier[1]["diversity"], later[1]["diversity"])
    assert not torch.allclose(earlier[1]["reward"][-1], later[1]["reward"][-1])
    assert torch.equal(earlier[1]["reward"][:-1], later[1]["reward"][:-1])  # the bonus is on the final state
    # and explorer 2 depends on explorer 0 as well (through the set of all earlier final states)
    assert not torch.allclose(earlier[2]["diversity"], later[2]["diversity"])


def test_alpha_zero_is_a_population_of_plan2explore_explorers() -> None:
    agent = make_agent(population=2, alpha=0.0)
    out = _rollouts(agent, make_batch(SPACE, ACT, 2, 6))
    assert all(r["diversity"] is None for r in out)


def test_population_trains_every_member_and_acts_in_turn() -> None:
    for recipe in ("2024", "2023"):
        agent = make_agent(population=3, recipe=recipe)
        before = [{k: v.clone() for k, v in b.actor.state_dict().items()} for b in agent.exploration.net.behaviors]
        metrics, _ = agent.train(make_batch(SPACE, ACT, 2, 6))
        assert float(metrics["explore/diversity"]) > 0
        for b, old in zip(agent.exploration.net.behaviors, before):
            assert any(not torch.equal(v, b.actor.state_dict()[k]) for k, v in old.items())
    policy = agent.policy()
    acted = []
    obs = {"pos": np.zeros(5, np.float32), "reward": np.float32(0), "is_last": False, "is_terminal": False}
    for step in range(7):
        policy.act({**obs, "is_first": step % 2 == 0})
        acted.append(policy.index)
    assert acted == [0, 0, 1, 1, 2, 2, 0]  # one member per episode, in turn
    members = [agent.exploration.member_weights(k, 1)[0]["actor.out.weight"] for k in range(3)]
    assert not torch.equal(members[0], members[1]) and not torch.equal(members[1], members[2])


def test_deployments_act_with_frozen_members_and_record_their_versions(tmp_path) -> None:
    from core.config import config_from_dict
    from learner.deployments import member_version, run_deployments, version_member
    from learner.offline.reader import ReplayDir

    raw = {"name": "pendulum", "backend": "gym", "gym_id": "Pendulum-v1",
           "dreamer": {"size": "tiny", "device": "cpu", "threads": 1, "explore": "cascade", "imag_horizon": 3},
           "explore": {"population": 2, "ensemble": 3, "deployments": 2, "deployment_steps": 300,
                       "deployment_updates": 2},
           "train": {"batch_size": 2, "batch_length": 8}}
    cfg = config_from_dict(raw, "test")
    rows = run_deployments(cfg, tmp_path, progress=False)
    assert [r["versions"] for r in rows] == [[1, 2], [3, 4]]
    assert [r["updates"] for r in rows] == [2, 4]  # trained only between deployments
    assert [e["member"] for e in rows[0]["episodes"]] == [0, 1]  # whole episodes, members in turn
    versions = np.concatenate([ReplayDir(tmp_path / "replay").read(p)[3] for p, _ in
                               ReplayDir(tmp_path / "replay").chunks])
    assert sorted(set(versions.tolist())) == [1, 2, 3, 4]
    assert len(versions) == sum(e["length"] for r in rows for e in r["episodes"]) == 4 * 201  # reset + 200 steps
    assert version_member(member_version(3, 1, 2), 2) == (3, 1)
    assert (tmp_path / "deployments.jsonl").read_text().count("\n") == 2


def test_frozen_members_do_not_follow_later_updates() -> None:
    from learner.deployments import frozen_members

    agent = make_agent(population=2)
    members = frozen_members(agent, 0)
    obs = {"pos": np.ones(5, np.float32), "reward": np.float32(0), "is_first": True, "is_last": False,
           "is_terminal": False}
    def act(policy) -> np.ndarray:
        torch.manual_seed(5)  # the posterior's latent sample
        policy.reset()
        return policy.act(obs, mode="mode").copy()

    before = [act(m) for m in members]
    for _ in range(3):
        agent.train(make_batch(SPACE, ACT, 2, 6))
    assert [np.array_equal(act(m), old) for m, old in zip(members, before)] == [True, True]
    live = agent.exploration.member_policy(0)
    assert not np.array_equal(act(live), before[0])  # the live explorer did move
    assert [m.version for m in members] == [1, 2]
