"""Plan2Explore on Dreamer (learner/agents/dreamer/explore.py): the ensemble's disagreement, the intrinsic
reward's normalisation, explorer and task heads kept apart, the explorer acting, and a tiny real
`reverie-learner train --set dreamer.explore=plan2explore` run. CPU, `tiny` size, real torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from dreamer_helpers import FLAG_SPACE, make_batch, make_cfg

from core.agents.spaces import ActSpace
from core.config import ConfigError, load_config
from core.config.explore import ExploreConfig
from core.weights import load_weights
from learner.agents.dreamer.agent import Dreamer
from learner.agents.dreamer.explore import Ensemble, RewardNorm
from learner.cli import main as learner_main

SPACE = {"pos": ((5,), "float32"), **FLAG_SPACE}
ACT = ActSpace(2, False)


def make_agent(recipe: str = "2024", mode: str = "plan2explore", **explore) -> Dreamer:
    torch.manual_seed(0)
    return Dreamer(make_cfg(recipe, explore=mode), SPACE, ACT, explore=ExploreConfig(**explore))


def grads(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in module.parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)]


def test_disagreement_is_zero_when_the_members_agree_and_positive_otherwise() -> None:
    torch.manual_seed(0)
    ens = Ensemble(members=5, inp=7, out=3, layers=2, units=16)
    x = torch.randn(11, 7)
    spread = ens.disagreement(x)
    assert spread.shape == (11,) and bool((spread > 0).all())
    with torch.no_grad():  # every member becomes member 0
        for w in [*ens.weights, *ens.biases]:
            w.copy_(w[:1].expand_as(w))
    assert float(ens.disagreement(x).detach().max()) < 1e-6  # zero up to the float rounding of the std
    with torch.no_grad():  # one member differs: the others agree, the std is positive everywhere
        ens.biases[-1][2] += 1.0
    assert bool((ens.disagreement(x) > 0).all())
    # the std across members, averaged over dimensions, by hand
    preds = ens(x)
    assert torch.allclose(ens.disagreement(x), preds.std(0, correction=0).mean(-1))


def test_ensemble_is_its_members_run_one_by_one() -> None:
    """The batched products (the first layer as one product for all members) give what each member's own MLP
    gives, and the same gradients; the disagreement is the population std (torch.std) averaged over dims."""
    torch.manual_seed(0)
    ens = Ensemble(members=4, inp=9, out=5, layers=3, units=16)
    x = torch.randn(2, 7, 9)  # leading axes are kept

    def member(k: int, inp: torch.Tensor) -> torch.Tensor:
        h = inp
        for i, (w, b) in enumerate(zip(ens.weights, ens.biases)):
            h = h @ w[k] + b[k, 0]
            h = torch.nn.functional.elu(h) if i < len(ens.weights) - 1 else h
        return h

    batched = ens(x)
    looped = torch.stack([member(k, x) for k in range(4)])
    assert batched.shape == (4, 2, 7, 5) and torch.allclose(batched, looped, atol=1e-6)
    got = torch.autograd.grad(batched.square().sum(), list(ens.parameters()))
    want = torch.autograd.grad(looped.square().sum(), list(ens.parameters()))
    assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want))
    assert torch.allclose(ens.disagreement(x), looped.std(0, correction=0).mean(-1), atol=1e-6)


def test_ensemble_learns_where_it_has_data_and_stays_uncertain_elsewhere() -> None:
    """Disagreement is the signal: after fitting a function on a region, the members agree there far more
    than far away from it."""
    torch.manual_seed(0)
    ens = Ensemble(members=8, inp=2, out=2, layers=2, units=32)
    opt = torch.optim.Adam(ens.parameters(), lr=1e-2)
    x = torch.rand(256, 2)  # the seen region [0, 1]^2
    y = torch.stack([x.sum(-1), x[:, 0] * x[:, 1]], -1)
    for _ in range(300):
        opt.zero_grad()
        ens.loss(x, y, torch.ones(256)).backward()
        opt.step()
    seen, unseen = ens.disagreement(torch.rand(64, 2)), ens.disagreement(torch.rand(64, 2) * 4 + 6)
    assert unseen.mean() > 5 * seen.mean()


def test_ensemble_pairs_across_an_episode_boundary_are_left_out() -> None:
    agent = make_agent()
    batch = make_batch(SPACE, ACT, 2, 6)
    data = agent.to_inputs(batch)
    post = agent.wm.loss(data, agent.context_from_batch(batch))[1]
    base = agent.exploration.ensemble_loss(data, post)
    assert float(base) > 0
    data["is_first"] = torch.ones_like(data["is_first"])  # every step starts an episode: no pair is a transition
    assert float(agent.exploration.ensemble_loss(data, post)) == 0.0


@pytest.mark.parametrize("kind", ["mag", "std"])
def test_intrinsic_reward_normalisation_removes_the_scale(kind: str) -> None:
    norm = RewardNorm(kind, rate=0.1)
    rng = np.random.default_rng(0)
    out = []
    for scale in (1e-3, 1.0, 1e3):
        norm = RewardNorm(kind, rate=0.1)
        for _ in range(30):
            r = torch.as_tensor(rng.gamma(2.0, scale, 500), dtype=torch.float32)
            normed = norm(r)
        out.append(normed)
        if kind == "mag":
            assert 0.8 < float(normed.abs().mean()) < 1.25 and bool((normed >= 0).all())  # sign and zero kept
        else:
            assert abs(float(normed.mean())) < 0.25 and 0.8 < float(normed.std()) < 1.25
    # the same distribution at scales a million apart normalises to the same range
    assert abs(float(out[0].mean()) - float(out[2].mean())) < 0.3
    none = RewardNorm("none", rate=0.1)
    r = torch.rand(10)
    assert torch.equal(none(r), r)


def test_normalisation_follows_training_only() -> None:
    norm = RewardNorm("mag", rate=0.5)
    norm(torch.full((4,), 2.0))
    assert float(norm.mag) == pytest.approx(2.0)  # the first batch sets the statistics
    with torch.no_grad():  # acting or evaluating does not move them
        norm(torch.full((4,), 100.0))
    assert float(norm.mag) == pytest.approx(2.0)
    norm(torch.full((4,), 4.0))
    assert float(norm.mag) == pytest.approx(3.0)


@pytest.mark.parametrize("recipe", ["2024", "2023"])
def test_explorer_and_task_heads_are_separate(recipe: str) -> None:
    """The explorers' loss gives the task actor and critic (and the world model) no gradient; the task's
    update gives the explorers' actor, critic and the ensemble none."""
    agent = make_agent(recipe, reward_free=False)
    x = agent.exploration.net
    batch = make_batch(SPACE, ACT, 2, 6)
    data, start = agent.to_inputs(batch), agent.context_from_batch(batch)
    post = agent.wm.loss(data, start)[1]
    loss, metrics = agent.exploration.loss(data, post)
    loss.backward()
    assert grads(x.ensemble) and grads(x.behaviors[0].actor) and grads(x.behaviors[0].critic)
    assert not grads(agent.behavior.actor) and not grads(agent.behavior.critic) and not grads(agent.wm)
    assert float(metrics["explore/disagreement"]) > 0
    agent.optimizer.zero_grad(set_to_none=True)
    loss, _, _ = agent._update(data, start)  # the world model and the task actor-critic alone
    loss.backward()
    assert grads(agent.behavior.actor) and grads(agent.behavior.critic) and grads(agent.wm)
    assert not grads(x)


def test_reward_free_update_trains_world_model_and_explorer_but_not_the_task() -> None:
    agent = make_agent()
    task = {k: v.clone() for k, v in agent.behavior.state_dict().items()}
    explorer = {k: v.clone() for k, v in agent.exploration.net.state_dict().items()}
    reward_out = agent.wm.reward_out.weight.clone()
    batch = make_batch(SPACE, ACT, 2, 6)
    metrics, _ = agent.train(batch)
    assert "explore/disagreement" in metrics and "ac/actor_loss" not in metrics
    assert all(torch.equal(v, agent.behavior.state_dict()[k]) for k, v in task.items())
    assert any(not torch.equal(v, agent.exploration.net.state_dict()[k]) for k, v in explorer.items())
    # the world model saw zero rewards: its reward head learns 0, whatever the batch's rewards were
    assert float(metrics["wm/reward"]) > 0 and not torch.equal(reward_out, agent.wm.reward_out.weight)
    other = make_agent()
    zero = {**batch, "reward": np.zeros_like(batch["reward"])}
    other.train(zero)
    assert torch.equal(other.wm.reward_out.weight, agent.wm.reward_out.weight)


def test_the_explorer_acts_and_is_exported() -> None:
    agent = make_agent()
    tensors, meta = agent.policy_weights()
    explorer_actor = agent.exploration.net.behaviors[0].actor.state_dict()
    for key, value in explorer_actor.items():
        assert torch.equal(tensors[f"actor.{key}"], value.float())
    task_out = agent.behavior.actor.out.weight
    assert not torch.equal(tensors["actor.out.weight"], task_out)
    assert agent.policy().actor is agent.exploration.net.behaviors[0].actor
    assert meta["dreamer"]["explore"] == "plan2explore"


def test_checkpoint_state_round_trips_and_refuses_a_plain_one() -> None:
    agent = make_agent()
    agent.train(make_batch(SPACE, ACT, 2, 6))
    state = agent.state_dict()
    other = make_agent()
    other.load_state_dict(state)
    for (k, a), b in zip(agent.model.state_dict().items(), other.model.state_dict().values()):
        assert torch.equal(a, b), k
    plain = Dreamer(make_cfg(), SPACE, ACT)
    with pytest.raises(RuntimeError, match="explore"):
        other.load_state_dict(plain.state_dict())


def test_config_switch_and_bad_settings() -> None:
    cfg = load_config(Path(__file__).parents[2] / "hardware_configs" / "sim_arm_reach.yaml",
                      ["dreamer.explore=plan2explore", "explore.ensemble=4", "explore.target=deter"])
    assert cfg.dreamer.explore == "plan2explore" and cfg.explore.ensemble == 4
    with pytest.raises(ConfigError, match="dreamer.explore"):
        load_config(Path(__file__).parents[2] / "hardware_configs" / "sim_arm_reach.yaml",
                    ["dreamer.explore=curiosity"])
    with pytest.raises(ConfigError, match="explore.intrinsic"):
        load_config(Path(__file__).parents[2] / "hardware_configs" / "sim_arm_reach.yaml",
                    ["explore.intrinsic=0"])


@pytest.mark.parametrize("target", ["stoch", "deter", "embed"])
def test_every_target_trains(target: str) -> None:
    agent = make_agent(target=target, action_cond=target != "deter")
    metrics, _ = agent.train(make_batch(SPACE, ACT, 2, 6))
    assert np.isfinite(float(metrics["explore/ensemble_loss"])) and float(metrics["explore/ensemble_loss"]) > 0


def test_train_with_plan2explore_end_to_end(tmp_path: Path) -> None:
    code = learner_main([
        "train", "--env", "gymnasium:Pendulum-v1", "--logdir", str(tmp_path), "--quiet",
        "--set", "dreamer.size=tiny", "--set", "dreamer.threads=1", "--set", "dreamer.explore=plan2explore",
        "--set", "explore.ensemble=3", "--set", "train.steps=40", "--set", "train.prefill=20",
        "--set", "train.batch_size=2", "--set", "train.batch_length=8", "--set", "train.train_ratio=8",
        "--set", "train.eval_every=0", "--set", "control.episode_steps=20",
    ])
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["env_steps"] == 40 and summary["updates"] > 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("explore/disagreement" in r for r in rows) and any("explore/ensemble_loss" in r for r in rows)
    tensors, meta = load_weights(tmp_path / "policy.safetensors")
    assert meta["dreamer"]["explore"] == "plan2explore" and "actor.out.weight" in tensors
    # zero-shot: the reward head and task policy learn from the recorded data, then act with no collection
    out = tmp_path / "adapted"
    code = learner_main(["adapt", "--from", str(tmp_path), "--logdir", str(out), "--updates", "3", "--episodes", "1",
                         "--quiet"])
    assert code == 0
    adapted = json.loads((out / "summary.json").read_text())
    assert adapted["adapt_updates"] == 3 and np.isfinite(adapted["eval/return"]) and adapted["reward"] == "recorded"
    task, _ = load_weights(out / "policy.safetensors")
    assert not torch.equal(task["actor.out.weight"], tensors["actor.out.weight"])  # the task actor, not the explorer
    assert torch.equal(task["rssm.gates.weight"], tensors["rssm.gates.weight"])  # the same world model
    code = learner_main(["adapt", "--from", str(tmp_path), "--logdir", str(out), "--reward", "nosuch.module:fn"])
    assert code == 2


def test_adaptation_trains_reward_head_and_task_policy_only() -> None:
    from learner.agents.dreamer.adapt import Adapter

    agent = make_agent()
    batch = make_batch(SPACE, ACT, 2, 6)
    agent.train(batch)  # exploring: the reward head learned zeros
    before = {k: v.clone() for k, v in agent.model.state_dict().items()}
    adapter = Adapter(agent, reward_fn=lambda b: np.full(np.shape(b["reward"]), 3.0, np.float32))
    for _ in range(3):
        metrics = adapter.step(batch)
    after = agent.model.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(v, after[k])}
    assert any(k.startswith("wm.reward_") for k in changed)
    assert any(k.startswith("behavior.actor.") for k in changed)
    assert any(k.startswith("behavior.critic.") for k in changed)
    allowed = ("wm.reward_", "behavior.")
    assert not [k for k in changed if not k.startswith(allowed)], "only the reward head and the task actor-critic"
    assert float(metrics["adapt/reward_loss"]) > 0
    wrong = Adapter(agent, reward_fn=lambda b: np.zeros(3))
    with pytest.raises(ValueError, match=r"reward function returned shape \[3\], expected \[2, 6\]"):
        wrong.step(batch)


def _equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_explorer_and_adaptation_keep_the_slow_critic_schedule() -> None:
    """`slow_critic_every` (v2: a copy every 100 updates) holds for the explorer's slow critic and for the task's
    trained by `adapt`, as for the task's in `Dreamer.train`: copied at updates 0, 3, 6 ... only, not at each."""
    from learner.agents.dreamer.adapt import Adapter

    torch.manual_seed(0)
    agent = Dreamer(make_cfg("v2", explore="plan2explore", slow_critic_every=3), SPACE, ACT,
                    explore=ExploreConfig(ensemble=3))
    explorer = agent.exploration.net.behaviors[0]
    batch = make_batch(SPACE, ACT, 2, 6)
    copied = []
    for _ in range(4):
        agent.train(batch)
        copied.append(_equal(explorer.slow_critic, explorer.critic))
    assert agent.updates == 4 and copied == [True, False, False, True]
    task = agent.behavior
    adapter = Adapter(agent)
    copied = []
    for _ in range(3):  # the schedule goes on from the agent's 4 updates: the next copy is at 6
        adapter.step(batch)
        copied.append(_equal(task.slow_critic, task.critic))
    assert copied == [False, False, True]
