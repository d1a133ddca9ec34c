"""PlaNet's training with real torch, and end to end: `reverie-learner train --set agent=planet` on a real
simulated task, its exported policy acting in a real `reverie-robot run` against a real link server, and the
robot refusing a planner too slow for its control period."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from link_helpers import learner

from core.agents import read_policy
from core.agents.planet.policy import policy_weights
from core.agents.spaces import ActSpace
from core.config.planet import PlanetConfig
from core.interface import flag_specs
from core.layout import StepLayout
from core.weights import weights_to_bytes
from learner.agents.planet.agent import Planet
from learner.agents.planet.model import overshooting_kl
from learner.cli import main as learner_main
from robot.cli import main as robot_main

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "hardware_configs" / "sim_arm_reach_proprio.yaml"
SPACE = StepLayout({"vector": ((3,), "float32"), **{k: (s.shape, s.dtype) for k, s in flag_specs().items()}})
TINY = {"deter": 16, "hidden": 16, "stoch": 4, "units": 16, "candidates": 20, "top_k": 2, "iterations": 2,
        "horizon": 3}


def batch(b: int = 4, t: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    """Sequences of a linear system the model can learn: the next vector adds the action, reward = -|x|^2."""
    rng = np.random.default_rng(seed)
    action = rng.uniform(-1, 1, (b, t, 1)).astype(np.float32)
    x = np.zeros((b, t, 3), np.float32)
    for i in range(1, t):
        x[:, i] = 0.9 * x[:, i - 1] + 0.3 * action[:, i - 1]
    first = np.zeros((b, t), bool)
    first[:, 0] = True
    return {"vector": x, "action": action, "reward": -(x ** 2).sum(-1), "is_first": first,
            "is_last": np.zeros((b, t), bool), "is_terminal": np.zeros((b, t), bool)}


def agent(**overrides: object) -> Planet:
    torch.manual_seed(0)
    return Planet(PlanetConfig(**{**TINY, **overrides}), SPACE, ActSpace(1, False), torch.device("cpu"))


def test_updates_lower_the_loss_and_the_exported_policy_is_the_trained_one() -> None:
    planet, data = agent(), batch()
    first, _ = planet.train(data)
    for _ in range(40):
        last, context = planet.train(data)
    assert context is None and planet.updates == 41 and planet.skipped == 0
    assert float(last["wm/reward"]) < float(first["wm/reward"]) and float(last["loss"]) < float(first["loss"])
    tensors, meta = planet.policy_weights()
    assert meta["version"] == 41 and meta["algorithm"] == "planet"
    assert torch.equal(tensors["reward.out.weight"], planet.model.reward.out.weight)
    assert read_policy(weights_to_bytes(tensors, meta)).config == planet.cfg


def test_checkpoint_state_restores_model_optimiser_and_count() -> None:
    planet = agent()
    planet.train(batch())
    copy = agent(lr=5e-4)
    copy.load_state_dict(planet.state_dict())
    assert copy.updates == 1
    assert all(torch.equal(a, b) for a, b in zip(planet.model.state_dict().values(), copy.model.state_dict().values()))
    moments = [(s["exp_avg"], c["exp_avg"]) for s, c in zip(planet.optimizer.state.values(),
                                                           copy.optimizer.state.values())]
    assert moments and all(torch.equal(a, b) for a, b in moments)


def test_latent_overshooting_compares_multi_step_priors_within_episodes_only() -> None:
    planet, data = agent(), batch(t=10)
    model = planet.model
    inputs = planet.to_inputs(data)
    post, _, prev = model.observe(inputs)
    torch.manual_seed(1)
    within = overshooting_kl(model, post, prev, inputs["is_first"], 4)
    assert within.ndim == 0 and float(within.detach()) >= 3.0  # free nats per term
    # An episode starting at every step leaves no pair of steps to compare: nothing is added.
    torch.manual_seed(1)
    cut = overshooting_kl(model, post, prev, torch.ones_like(inputs["is_first"]), 4)
    assert float(cut.detach()) == 0.0
    one = overshooting_kl(model, post, prev, inputs["is_first"], 1)
    assert float(one.detach()) == 0.0  # distance 1 is the KL itself
    metrics, _ = agent(overshooting=4).train(data)
    assert "wm/overshooting" in metrics and torch.isfinite(metrics["loss"])


def test_a_batch_holding_nan_is_skipped_with_the_parameters_unchanged() -> None:
    planet, data = agent(), batch()
    data["vector"][1, 3, 0] = np.nan
    before = [p.detach().clone() for p in planet.model.parameters()]
    metrics, _ = planet.train(data)
    assert metrics == {"skipped_nonfinite": 1.0} and planet.skipped == 1 and planet.updates == 0
    assert all(torch.equal(a, b) for a, b in zip(before, planet.model.parameters()))


def test_discrete_actions_are_refused_with_the_reason() -> None:
    from core.config import Config

    cfg = Config.model_validate({"name": "d", "backend": "gym", "gym_id": "CartPole-v1", "agent": "planet"})
    with pytest.raises(ValueError, match="planet plans continuous actions .* 2 discrete choices"):
        Planet.parameter_count(cfg, SPACE, ActSpace(2, True))


def _sets(prefix: str, values: dict) -> list[str]:
    return [arg for k, v in values.items() for arg in ("--set", f"{prefix}.{k}={v}")]


@pytest.mark.parametrize("process", [False])
def test_train_exports_a_planner_a_simulated_robot_acts_with_and_refuses_when_too_slow(tmp_path: Path, capsys,
                                                                                      process: bool) -> None:
    """`reverie-learner train --set agent=planet` on ArmReach (PyBullet, proprioception): training, evaluation,
    checkpoint and the policy file; then `reverie-robot run` acts with that file over a real link. A planner
    whose act() cannot fit the control period is refused at start-up, naming the time and the settings."""
    run = tmp_path / "run"
    code = learner_main(["train", "--config", str(CONFIG), "--logdir", str(run), "--quiet", "--set", "agent=planet",
                         *_sets("planet", {**TINY, "action_repeat": 2}),
                         *_sets("train", {"steps": 60, "prefill": 40, "batch_size": 4, "batch_length": 8,
                                          "train_ratio": 32, "eval_every": 60, "eval_episodes": 1,
                                          "checkpoint_every": 60, "log_every": 20})])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["env_steps"] == 60 and summary["updates"] > 0 and summary["final_eval_return"] is not None
    policy_file = run / "policy.safetensors"
    blob = read_policy(policy_file.read_bytes())
    assert blob.algorithm == "planet" and blob.version == summary["updates"]
    robot = ["run", "--config", str(CONFIG), "--robot-id", "planet-arm", "--spool", str(tmp_path / "spool"),
             "--set", "control.hz=20", "--set", "link.chunk_seconds=0.25", "--set", "link.heartbeat_s=0.1",
             "--set", f"link.process={str(process).lower()}"]
    with learner(tmp_path) as server:
        code = robot_main([*robot, "--learner", server.endpoint, "--steps", "23",
                           "--set", f"link.initial_weights={policy_file}"])
        out, err = capsys.readouterr()
        assert code == 0, err
        acted = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
        assert acted["steps"] == 23 and acted["acting_version"] == blob.version
        assert server.replay.stats()["streams"]["planet-arm"]["steps"] == 23

    # The model at its official width with 1000 candidates (2 iterations of horizon 3, to keep the test short:
    # tens of ms per plan on a CPU) at 80 Hz, a 12.5 ms period.
    slow = Planet(PlanetConfig(candidates=1000, iterations=2, horizon=3), blob.space, blob.act_space,
                  torch.device("cpu"))
    slow_file = tmp_path / "slow.safetensors"
    slow_file.write_bytes(weights_to_bytes(*policy_weights(slow.model, 3)))
    code = robot_main([*robot, "--learner", "tcp://127.0.0.1:9", "--steps", "5", "--set", "control.hz=80",
                       "--set", f"link.initial_weights={slow_file}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "link.initial_weights" in err and "act() takes" in err and "control period of 12.5 ms" in err, err
    assert "planet.candidates (1000)" in err and "planet.iterations (2)" in err and "planet.horizon (3)" in err
    assert "Traceback" not in err
