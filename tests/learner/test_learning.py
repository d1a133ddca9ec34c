"""Evidence that Dreamer learns. The short check runs in CI (a few minutes on 2 cores); the long
ones are marked slow (`make test PYTEST_ARGS=--run-slow`) and leave learning curves in
`runs/learning/` for the record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from learner.cli import main as learner_main

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "hardware_configs"


def _train(logdir: Path, *args: str) -> dict:
    assert learner_main(["train", "--logdir", str(logdir), "--quiet", *args]) == 0
    return json.loads((logdir / "summary.json").read_text())


def test_short_run_beats_random_on_proprio_reach(tmp_path: Path) -> None:
    """Tiny model, CPU, ArmReach from proprioception with a fixed target (hardware_configs/sim_arm_reach_proprio.yaml).

    The random-policy return comes from the prefill episodes of the same run; the learned return is
    the mean over 5 evaluation episodes at the end.
    """
    summary = _train(tmp_path, "--config", str(CONFIGS / "sim_arm_reach_proprio.yaml"))
    random_return, learned = summary["random_return"], summary["final_eval_return"]
    # Returns are negative distances summed over the episode: a clear margin is halving the random cost.
    assert learned > 0.5 * random_return, summary


LONG = [
    # Budgets sized to finish within an hour or so on the 2-core machine (the pixel run in bf16
    # autocast, which this CPU's AVX512-BF16 makes ~1.9x faster); see the closing notes for results.
    ("arm_reach_pixels", ["--config", str(CONFIGS / "sim_arm_reach.yaml"), "--set", "dreamer.size=size1m",
                          "--set", "dreamer.precision=bfloat16", "--set", "train.steps=10000",
                          "--set", "train.prefill=1000", "--set", "train.train_ratio=64",
                          "--set", "train.eval_every=2500"]),
    ("quadruped_walk", ["--config", str(CONFIGS / "sim_quadruped_walk.yaml"), "--set", "camera.enabled=false",
                        "--set", "train.steps=30000", "--set", "train.train_ratio=64", "--set", "dreamer.threads=1"]),
    # The 2023 recipe on the quadruped, from its back, proprioception only: ~67 min here. Evaluation
    # 0.00 / 0.00 / 0.01 / 1.10 at 5k / 7.5k / 10k / 12.5k steps and 0.80 at 14k (random 0.037); the
    # training return climbs from 0.12 at 10k to 0.54 at 14k, where the 2024 recipe stays at random.
    # Resumed with train.steps=22000 (~56 min more): evaluation 4.15 / 4.53 / 3.08 / 6.03 at 15.3k / 17.8k /
    # 20.3k / 22k, training return (last 10 episodes) 3.1.
    ("quadruped_walk_2023", ["--config", str(CONFIGS / "sim_quadruped_walk.yaml"), "--set", "camera.enabled=false",
                             "--set", "dreamer.recipe=2023", "--set", "train.steps=14000",
                             "--set", "train.prefill=2500", "--set", "train.train_ratio=256",
                             "--set", "train.eval_every=2500", "--set", "dreamer.threads=2"]),
    ("pendulum", ["--env", "gymnasium:Pendulum-v1", "--set", "dreamer.size=size1m", "--set", "train.steps=20000",
                  "--set", "train.prefill=1000", "--set", "train.train_ratio=128", "--set", "train.eval_every=2000",
                  "--set", "dreamer.threads=1"]),
    # The 2023 recipe (Adam at 1e-4 / 3e-5, gradients through the dynamics) at a higher train ratio,
    # ~46 min here: evaluation -1246 / -176 / -344 / -716 at 2k / 4k / 6k / 8k steps (random -1201),
    # where the 2024 recipe's 4e-5 barely moves in 20k steps.
    ("pendulum_2023", ["--env", "gymnasium:Pendulum-v1", "--set", "dreamer.recipe=2023", "--set", "dreamer.size=size1m",
                       "--set", "train.steps=8000", "--set", "train.prefill=1000", "--set", "train.train_ratio=320",
                       "--set", "train.eval_every=2000", "--set", "dreamer.threads=2"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,args", LONG, ids=[n for n, _ in LONG])
def test_long_run_learning_curve(name: str, args: list[str]) -> None:
    logdir = ROOT / "runs" / "learning" / name
    summary = _train(logdir, *args)
    assert (logdir / "learning_curve.png").is_file()
    assert summary["final_eval_return"] > summary["random_return"], summary
