"""World Models end to end, tiny: `reverie-learner train --set agent=world_models` on the real simulated ArmReach
(PyBullet, 64 x 64 camera) runs every stage (random rollouts, V, M, C in the dream), writes the dream video,
resumes inside a stage exactly, and its exported policy blob drives a real `reverie-robot run` process loop
that streams to a real learner link server over loopback ZeroMQ."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from link_helpers import learner
from safetensors.torch import load_file

from core.agents import policy_from_file
from core.agents.world_models.policy import Policy
from core.config import load_config
from learner.cli import main as learner_main
from learner.metrics import read_metrics
from learner.train import Trainer
from robot.cli import main as robot_main

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "hardware_configs" / "sim_arm_reach.yaml"
WM_CONFIG = ROOT / "hardware_configs" / "sim_arm_reach_world_models.yaml"
# Tiny V, M and C; 10-step episodes; 2 x 8 batches; one train() call per 2 steps after a 20-step prefill:
# V for calls 1-4, M for 5-8, C for 9-14 (steps ~36-48), then done.
TINY = [
    "dreamer.threads=1", "control.episode_steps=10", "train.batch_size=2", "train.batch_length=8",
    "train.prefill=20", "train.train_ratio=8", "train.log_every=10", "replay.chunk_length=16",
    "world_models.z=4", "world_models.lstm=8", "world_models.vae_depth=2", "world_models.mixtures=2",
    "world_models.vae_batch=8", "world_models.vae_updates=4", "world_models.mdn_updates=4",
    "world_models.generations=6", "world_models.population=6", "world_models.rollouts=3",
    "world_models.dream_horizon=5",
]


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def _run(logdir: Path, *extra: str) -> dict:
    cfg = load_config(WM_CONFIG, [*TINY, *extra])
    return Trainer(cfg, logdir, progress=False).run()


def test_train_with_agent_world_models_runs_every_stage_and_exports_its_policy(tmp_path: Path, capsys) -> None:
    code = learner_main(["train", "--config", str(CONFIG), "--logdir", str(tmp_path), "--quiet",
                         *_sets(["agent=world_models", *TINY, "train.steps=60", "train.eval_every=60",
                                 "train.eval_episodes=1", "train.checkpoint_every=30"])])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["updates"] == 14  # 4 V + 4 M + 6 C, then the pipeline is done
    rows = read_metrics(tmp_path / "metrics.jsonl")
    keys = set().union(*rows)
    assert {"v/loss", "v/kl", "m/nll", "m/reward_mse", "c/fitness_mean", "c/sigma"} <= keys
    assert max(r.get("c/generation", 0) for r in rows) > 0
    assert list((tmp_path / "videos").glob("openloop_*.mp4"))  # M's dream decoded by V beside the truth
    policy = policy_from_file(tmp_path / "policy.safetensors")
    assert isinstance(policy, Policy) and policy.version == 14 and bool(policy.controller.evolved)
    assert "eval/success" in rows[-1]


def test_a_run_stopped_inside_the_evolution_stage_resumes_exactly(tmp_path: Path) -> None:
    extra = ("train.eval_every=0", "train.checkpoint_every=1000")
    _run(tmp_path / "straight", "train.steps=48", *extra)
    first = _run(tmp_path / "resumed", "train.steps=42", *extra)
    assert 8 < first["updates"] < 14  # stopped with CMA-ES half way
    _run(tmp_path / "resumed", "train.steps=48", *extra)
    for part in ("vae", "mdn", "controller", "evolution", "vae_opt"):
        a = load_file(sorted((tmp_path / "straight" / "checkpoints").glob("ckpt-*"))[-1] / f"{part}.safetensors")
        b = load_file(sorted((tmp_path / "resumed" / "checkpoints").glob("ckpt-*"))[-1] / f"{part}.safetensors")
        assert a.keys() == b.keys() and a, part
        for key in a:
            np.testing.assert_array_equal(a[key].numpy(), b[key].numpy(), err_msg=f"{part} {key}")


def test_the_exported_policy_drives_a_simulated_robot_over_the_link(tmp_path: Path, capsys) -> None:
    _run(tmp_path / "run", "train.steps=48", "train.eval_every=0")
    weights = tmp_path / "run" / "policy.safetensors"
    with learner(tmp_path) as server:
        code = robot_main(["run", "--config", str(WM_CONFIG), "--learner", server.endpoint, "--robot-id", "wm-arm",
                           "--spool", str(tmp_path / "spool"), "--steps", "23",
                           *_sets(["control.hz=20", "link.chunk_seconds=0.25", "link.heartbeat_s=0.1",
                                   f"link.initial_weights={weights}"])])
        out, err = capsys.readouterr()
        assert code == 0, err
        summary = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
        assert summary["steps"] == 23 and summary["acting_version"] == 14
        assert server.replay.stats()["streams"]["wm-arm"]["steps"] == 23
