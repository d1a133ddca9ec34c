"""The transformer world model in whole runs: `reverie-learner train --set dreamer.dynamics=transformer` on a real
simulated task, an exact resume (checkpoint mid-run, resume, the same parameters as the uninterrupted run), and
the exported policy acting in a real `reverie-robot run` process over the link from a real `serve` process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from dreamer_helpers import FLAG_SPACE, make_batch, make_cfg
from safetensors.torch import load_file

from core.agents.dreamer.policy import Policy
from core.agents.dreamer.transformer_policy import TransformerPolicy
from core.agents.spaces import ActSpace
from core.config import load_config
from learner.agents.dreamer.agent import Dreamer
from learner.cli import main as learner_main
from learner.train import Trainer
from robot.demo import free_port

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "hardware_configs" / "sim_arm_reach.yaml"
PROPRIO = ROOT / "hardware_configs" / "sim_arm_reach_proprio.yaml"
TRANSFORMER = ["dreamer.dynamics=transformer", "dreamer.transformer.width=32", "dreamer.transformer.heads=4",
               "dreamer.transformer.context=8", "dreamer.transformer.imag_context=4"]
FAST = [
    "dreamer.size=tiny", "dreamer.threads=1", "camera.width=32", "camera.height=32",
    "control.episode_steps=9", "train.batch_size=2", "train.batch_length=8", "train.prefill=20",
    "train.train_ratio=8", "train.log_every=10", "replay.chunk_length=16", "train.eval_every=0",
    "train.checkpoint_every=1000", *TRANSFORMER,
]


def _weights(logdir: Path) -> dict[str, np.ndarray]:
    ckpt = sorted((logdir / "checkpoints").glob("ckpt-*"))[-1]
    return {k: v.numpy() for k, v in load_file(ckpt / "model.safetensors").items()}


def test_train_cli_runs_and_a_resumed_run_continues_identically(tmp_path: Path) -> None:
    sets = [arg for item in FAST for arg in ("--set", item)]
    code = learner_main(["train", "--config", str(CONFIG), "--logdir", str(tmp_path / "straight"), "--quiet",
                         *sets, "--set", "train.steps=80"])
    assert code == 0
    straight = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert straight["env_steps"] == 80 and straight["updates"] > 0
    policy = Policy.from_file(tmp_path / "straight" / "policy.safetensors")
    assert isinstance(policy, TransformerPolicy) and policy.cfg.dynamics == "transformer"
    assert any(".rssm.blocks.1.qkv" in k for k in _weights(tmp_path / "straight"))
    for steps in (40, 80):
        summary = Trainer(load_config(CONFIG, [*FAST, f"train.steps={steps}"]), tmp_path / "resumed",
                          progress=False).run()
    assert summary["env_steps"] == 80 and summary["updates"] == straight["updates"]
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_openloop_predicts_images_from_the_kv_cache() -> None:
    space = {"image": ((16, 16, 3), "uint8"), "pos": ((3,), "float32"), **FLAG_SPACE}
    act = ActSpace(2, False)
    torch.manual_seed(0)
    cfg = make_cfg(dynamics="transformer", cnn_mults=[1, 1],
                   transformer={"width": 32, "heads": 4, "context": 6, "imag_context": 3})
    agent = Dreamer(cfg, space, act)
    batch = make_batch(space, act, 2, 12)
    batch["is_first"][1, 9] = True
    truth, pred = agent.openloop(batch, 5)
    assert truth.shape == pred.shape == (2, 12, 16, 16, 3) and pred.dtype == np.uint8


def test_a_robot_process_acts_with_the_exported_transformer_policy(tmp_path: Path) -> None:
    port = free_port()
    common = ["--set", "control.hz=20", "--set", "sim.physics_hz=240", "--set", "link.robot_lost_s=3",
              *[a for item in TRANSFORMER for a in ("--set", item)], "--set", "dreamer.size=tiny"]
    learner_cmd = [sys.executable, "-m", "learner.cli", "serve", "--config", str(PROPRIO), "--logdir",
                   str(tmp_path / "learner"), "--bind", f"tcp://127.0.0.1:{port}", "--quiet", *common,
                   "--set", "train.prefill=40", "--set", "train.train_ratio=16", "--set", "train.batch_size=2",
                   "--set", "train.batch_length=8", "--set", "link.weights_every_updates=1",
                   "--set", "link.weights_every_s=1", "--set", "dreamer.threads=1"]
    log = (tmp_path / "learner.log").open("w")
    server = subprocess.Popen(learner_cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    robot = None
    try:
        robot = subprocess.Popen([sys.executable, "-m", "robot.cli", "run", "--config", str(PROPRIO), "--learner",
                                  f"tcp://127.0.0.1:{port}", "--robot-id", "arm1", "--spool",
                                  str(tmp_path / "spool"), "--duration", "14", *common],
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out, _ = robot.communicate(timeout=180)
        assert robot.returncode == 0, out[-3000:]
        summary = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
        assert summary["acting_version"] > 0 and summary["weights_swaps"] >= 1, summary  # it acted with ours
    finally:
        for proc in (robot, server):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        server.wait(120)
        log.close()
    blob = Policy.from_file(tmp_path / "learner" / "policy.safetensors")
    assert isinstance(blob, TransformerPolicy)
