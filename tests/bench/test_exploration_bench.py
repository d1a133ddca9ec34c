"""bench/exploration.py's task table (FourRooms named by its installed module, learner/fourrooms.py, whose own tests
are tests/learner/test_fourrooms.py) and the cost mode on the quick preset."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):
    """bench/exploration.py as a module, with the repository root importable (it imports `bench.*`)."""
    monkeypatch.syspath_prepend(str(ROOT))
    spec = importlib.util.spec_from_file_location("exploration_bench", ROOT / "bench" / "exploration.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "exploration_bench", module)
    spec.loader.exec_module(module)
    return module


def test_fourrooms_task_names_the_installed_module(bench) -> None:
    # the env and the goals resolve outside the repository (learner/fourrooms.py; its own tests: tests/learner/)
    env, coverage, goals = bench.TASKS["fourrooms"]
    assert env == "gymnasium:learner.fourrooms:ReverieFourRooms-v0"
    assert goals == ("learner.fourrooms:goal_far", "learner.fourrooms:goal_top_right")
    assert coverage is bench.fourrooms.room_coverage


def test_cost_mode_projects_each_case_from_measured_updates(bench) -> None:
    p = bench.PRESETS["quick"]
    out = bench.update_cost(p, updates=1)
    assert set(out["per_update"]) == {"plan2explore", "adapt", "plain", "cascade"}
    assert all(v["cpu_s"] > 0 and v["wall_s"] > 0 for v in out["per_update"].values())
    runs = out["updates_per_seed"]
    assert runs["mountaincar"]["plan2explore"] == (p["steps"] - p["prefill"]) * 16 / (2 * 16)  # ratio / (B x T)
    assert runs["cascade"]["cascade"] == 2 * p["deployments"] * p["deployment_updates"]  # two populations
    assert out["cpu_hours_3_seeds"]["mountaincar"] >= 0
