"""learner/fourrooms.py: MiniGrid's FourRooms as the learner sees it (real minigrid, stepped through
learner.envs.Env), its coverage and goals, the error when minigrid is missing, and `reverie-learner train` and
`adapt` on it from a directory outside the repository (the id resolves in an installed Reverie, not only with the
repository root importable)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.config import config_from_dict
from learner import fourrooms
from learner.envs import Env, EnvError

ROOT = Path(__file__).resolve().parents[2]
LEARNER = Path(sys.executable).with_name("reverie-learner")  # the installed console script
TINY = ["dreamer.size=tiny", "dreamer.threads=1", "train.batch_size=2", "train.batch_length=8", "train.prefill=20",
        "train.train_ratio=8", "train.log_every=10", "train.eval_every=0", "replay.chunk_length=16"]


def _env(seed: int = 0) -> Env:
    cfg = config_from_dict({"name": "fr", "backend": "gym", "gym_id": fourrooms.GYM_ID, "seed": 0}, "test")
    return Env(cfg, seed=seed)


def test_the_gym_id_names_the_package() -> None:
    assert fourrooms.GYM_ID == "learner.fourrooms:ReverieFourRooms-v0"


def test_fourrooms_steps_as_a_box_env_from_its_corner() -> None:
    env = _env(seed=3)
    try:
        assert env.obs_space["vector"] == ((55,), "float32")
        assert env.act_space.discrete and env.act_space.dim == 3
        obs = env.reset()
        assert fourrooms.cells(obs["vector"]).tolist() == [list(fourrooms.START)]
        assert obs["vector"][2:6].sum() == 1.0  # the direction, one-hot
        rng = np.random.default_rng(0)
        seen, steps = [obs["vector"]], 0
        while not obs["is_last"]:
            obs = env.step(env.random_action(rng))
            seen.append(obs["vector"])
            steps += 1
        assert steps == 100  # MiniGrid's episode; a random walk from the corner does not reach the far goal
        seen = np.stack(seen)
        assert 0 < fourrooms.room_coverage(seen) < 0.5
        assert len({tuple(c) for c in fourrooms.cells(seen).tolist()}) > 1  # it moved
    finally:
        env.close()


def test_fourrooms_coverage_and_goals_count_cells() -> None:
    def at(*xy: tuple[int, int]) -> np.ndarray:
        v = np.zeros((len(xy), 55), np.float32)
        v[:, :2] = np.asarray(xy, np.float32) / (fourrooms.SIZE - 1)
        return v

    # a wall line (x = 9) and a repeated cell count nothing / once; 256 cells in the rooms
    assert fourrooms.room_coverage(at((1, 1), (1, 1), (9, 4), (17, 17))) == 2 / 256
    batch = {"vector": at((17, 17), (1, 1), (17, 1), (17, 17)).reshape(2, 2, 55)}
    assert fourrooms.goal_far(batch).tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert fourrooms.goal_top_right(batch).tolist() == [[0.0, 0.0], [1.0, 0.0]]


def test_missing_minigrid_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "minigrid", None)  # `import minigrid` fails as if it were not installed
    monkeypatch.setitem(sys.modules, "minigrid.envs", None)
    with pytest.raises(EnvError) as err:
        _env()
    assert str(err.value) == f"cannot make Gymnasium env {fourrooms.GYM_ID!r}: {fourrooms.MISSING}"
    assert "reverie[learner]" in fourrooms.MISSING


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The installed `reverie-learner` in `cwd`, with nothing of the repository on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(LEARNER), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_train_and_adapt_run_on_fourrooms_outside_the_repository(tmp_path: Path) -> None:
    work = tmp_path / "elsewhere"
    work.mkdir()
    # the old home is not importable from here: what made a config naming bench.fourrooms fail outside the repo
    probe = subprocess.run([sys.executable, "-c", "import bench"], cwd=work, capture_output=True, text=True,
                           env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert probe.returncode != 0, "the repository root is importable from the temporary directory"

    sets = [x for s in [*TINY, "train.steps=40", "train.checkpoint_every=40"] for x in ("--set", s)]
    train = _cli(work, "train", "--env", f"gymnasium:{fourrooms.GYM_ID}", "--logdir", "run", "--quiet", *sets)
    assert train.returncode == 0, train.stderr
    summary = json.loads(train.stdout.strip().splitlines()[-1])
    assert summary["env_steps"] == 40 and summary["updates"] > 0
    assert f"gym_id: {fourrooms.GYM_ID}" in (work / "run" / "config.yaml").read_text()

    adapt = _cli(work, "adapt", "--from", "run", "--logdir", "far", "--updates", "2", "--episodes", "1", "--quiet",
                 "--reward", "learner.fourrooms:goal_far")
    assert adapt.returncode == 0, adapt.stderr
    result = json.loads(adapt.stdout.strip().splitlines()[-1])
    assert result["reward"] == "learner.fourrooms:goal_far" and result["adapt_updates"] == 2
    assert "eval/goal_return" in result


def test_an_id_whose_module_is_gone_is_a_clear_error() -> None:
    # FourRooms' old id (bench/ is not installed, and bench/fourrooms.py moved): an EnvError, not a traceback
    cfg = config_from_dict({"name": "fr", "backend": "gym", "gym_id": "bench.fourrooms:ReverieFourRooms-v0"}, "test")
    with pytest.raises(EnvError, match=r"^cannot make Gymnasium env 'bench\.fourrooms:ReverieFourRooms-v0': No module"):
        Env(cfg)
