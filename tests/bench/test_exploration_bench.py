"""bench/exploration.py's task table and bench/fourrooms.py: MiniGrid's FourRooms as the learner sees it (real
minigrid, stepped through learner.envs.Env), its coverage and goals, and the cost mode on the quick preset."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):
    """bench/exploration.py as a module, with the repository root importable (gym ids name `bench.fourrooms`)."""
    monkeypatch.syspath_prepend(str(ROOT))
    spec = importlib.util.spec_from_file_location("exploration_bench", ROOT / "bench" / "exploration.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "exploration_bench", module)
    spec.loader.exec_module(module)
    return module


def test_fourrooms_steps_as_a_box_env_from_its_corner(bench) -> None:
    from core.config import config_from_dict
    from learner.envs import Env

    fourrooms = bench.fourrooms
    env_id = bench.TASKS["fourrooms"][0]
    cfg = config_from_dict({"name": "fr", "backend": "gym", "gym_id": env_id.split(":", 1)[1], "seed": 0}, "test")
    env = Env(cfg, seed=3)
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


def test_fourrooms_coverage_and_goals_count_cells(bench) -> None:
    fourrooms = bench.fourrooms

    def at(*xy: tuple[int, int]) -> np.ndarray:
        v = np.zeros((len(xy), 55), np.float32)
        v[:, :2] = np.asarray(xy, np.float32) / (fourrooms.SIZE - 1)
        return v

    # a wall line (x = 9) and a repeated cell count nothing / once; 256 cells in the rooms
    assert fourrooms.room_coverage(at((1, 1), (1, 1), (9, 4), (17, 17))) == 2 / 256
    batch = {"vector": at((17, 17), (1, 1), (17, 1), (17, 17)).reshape(2, 2, 55)}
    assert fourrooms.goal_far(batch).tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert fourrooms.goal_top_right(batch).tolist() == [[0.0, 0.0], [1.0, 0.0]]


def test_cost_mode_projects_each_case_from_measured_updates(bench) -> None:
    p = bench.PRESETS["quick"]
    out = bench.update_cost(p, updates=1)
    assert set(out["per_update"]) == {"plan2explore", "adapt", "plain", "cascade"}
    assert all(v["cpu_s"] > 0 and v["wall_s"] > 0 for v in out["per_update"].values())
    runs = out["updates_per_seed"]
    assert runs["mountaincar"]["plan2explore"] == (p["steps"] - p["prefill"]) * 16 / (2 * 16)  # ratio / (B x T)
    assert runs["cascade"]["cascade"] == 2 * p["deployments"] * p["deployment_updates"]  # two populations
    assert out["cpu_hours_3_seeds"]["mountaincar"] >= 0
