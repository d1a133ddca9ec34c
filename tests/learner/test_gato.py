"""Gato end to end, tiny: the prompt selects the task (two toy tasks of one body with conflicting actions,
real torch training, seconds), and `reverie-learner gato data | train` on the real simulated ArmReach
(PyBullet, its scripted expert) exports a policy blob that drives a real `reverie-robot run` loop streaming to
a real learner link server over loopback ZeroMQ. `train --set agent=gato` says what to run instead."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from link_helpers import learner

from core.agents import policy_from_file
from core.agents.gato.policy import Policy
from core.agents.spaces import ActSpace
from core.config import RESOLVED_NAME
from core.config.gato import GatoConfig
from learner.cli import main as learner_main
from learner.gato.episodes import TaskData, read_episodes
from learner.gato.train import GatoRun
from robot.cli import main as robot_main

ROOT = Path(__file__).resolve().parents[2]
REACH = ROOT / "hardware_configs" / "sim_arm_reach_state.yaml"
TINY = ["layers=1", "width=32", "heads=2", "context=96", "prompt_tokens=48", "patch_channels=4", "batch_size=4",
        "updates=6", "log_every=3", "checkpoint_every=3", "threads=1", "warmup=2"]


def _toy_task(name: str, action: float, cfg: GatoConfig, episodes: int = 8, steps: int = 4) -> TaskData:
    """Episodes whose observations are noise and whose action is always `action`: only a prompt (or the
    episode's own earlier actions) can tell two such tasks apart."""
    rng = np.random.default_rng(len(name))
    flags = {"reward": np.zeros(steps, np.float32), "is_first": np.arange(steps) == 0,
             "is_last": np.arange(steps) == steps - 1, "is_terminal": np.zeros(steps, bool)}
    data = [{"pos": rng.normal(0, 1, (steps, 2)).astype(np.float32), "action": np.full((steps, 1), action, np.float32),
             **flags} for _ in range(episodes)]
    return TaskData.from_episodes(name, data, ActSpace(1, False), cfg)


def test_the_prompt_selects_the_task(tmp_path: Path) -> None:
    cfg = GatoConfig(layers=1, width=32, heads=2, context=32, prompt_tokens=16, patch_channels=4, batch_size=16,
                     lr=3e-3, warmup=10, updates=150, log_every=50, checkpoint_every=1000, prompt_fraction=1.0,
                     threads=1)
    a, b = _toy_task("a", 0.8, cfg), _toy_task("bb", -0.8, cfg)
    assert a.body == b.body  # one body: nothing but the prompt says which task it is
    run = GatoRun(cfg, [a, b], tmp_path, progress=False)
    run.run()
    obs = {"pos": np.zeros(2, np.float32), "reward": np.float32(0), "is_first": np.bool_(True),
           "is_last": np.bool_(False), "is_terminal": np.bool_(False)}
    for prompt, want in ((a, 0.8), (b, -0.8)):
        policy = Policy(cfg, a.space, a.body.act, run.net, torch.device("cpu"), prompt=prompt.best_episode())
        policy.reset()
        assert abs(float(policy.act(obs, mode="mode")[0]) - want) < 0.1, prompt.name  # the first step: no history


def test_recorded_experts_train_a_policy_blob_that_a_robot_runs_over_the_link(tmp_path: Path, capsys) -> None:
    data, run = tmp_path / "data", tmp_path / "run"
    code = learner_main(["gato", "data", "--config", str(REACH), "--set", "control.episode_steps=6", "--episodes", "2",
                         "--random-episodes", "1", "--out", str(data)])
    out, err = capsys.readouterr()
    assert code == 0, err
    task = data / "sim_arm_reach_state"
    report = json.loads(out.strip().splitlines()[-1])["sim_arm_reach_state"]
    assert report["expert_success"] == 1.0 and report["expert_return"] > report["random_return"]
    episodes = read_episodes(task / "replay")
    assert [len(e["action"]) for e in episodes] == [7, 7]  # reset plus 6 steps, each with the expert's action
    code = learner_main(["gato", "train", "--data", str(data), "--logdir", str(run), "--quiet",
                         *[arg for item in TINY for arg in ("--set", item)]])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["updates"] == 6
    blob = run / "policies" / "sim_arm_reach_state.safetensors"
    policy = policy_from_file(blob)
    assert isinstance(policy, Policy) and policy.version == 6 and policy.prompt is not None
    with learner(tmp_path) as server:
        code = robot_main(["run", "--config", str(task / RESOLVED_NAME), "--learner", server.endpoint, "--robot-id",
                           "gato-arm", "--spool", str(tmp_path / "spool"), "--steps", "13",
                           *[arg for item in ("control.hz=20", "link.chunk_seconds=0.25", "link.heartbeat_s=0.1",
                                              f"link.initial_weights={blob}") for arg in ("--set", item)]])
        out, err = capsys.readouterr()
        assert code == 0, err
        summary = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
        assert summary["steps"] == 13 and summary["acting_version"] == 6
        assert server.replay.stats()["streams"]["gato-arm"]["steps"] == 13


def test_train_and_serve_refuse_agent_gato_naming_the_commands_to_use(tmp_path: Path, capsys) -> None:
    code = learner_main(["train", "--config", str(REACH), "--logdir", str(tmp_path), "--set", "agent=gato"])
    assert code == 2 and "reverie-learner gato train" in capsys.readouterr().err
