"""The learning benchmark's report: targets are judged per seed from what the runs logged, and the
table, JSON and PNG are written from whatever runs exist (a half-done run counts as not met yet)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "learning.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("learning_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _write_run(root: Path, case: str, seed: int, evals: list[tuple[int, float]], steps: int) -> None:
    logdir = root / case / f"seed{seed}"
    logdir.mkdir(parents=True)
    rows = [{"step": s, "env_steps": s, "updates": s // 2} for s in range(1000, steps + 1, 1000)]
    rows += [{"step": s, "eval/return": v, "eval/return_mode": v - 5, "random/return": -1200.0, "updates": s // 2}
             for s, v in evals]
    (logdir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (logdir / "summary.json").write_text(json.dumps({"env_steps": steps, "seconds": 10.0}))


def test_a_case_is_met_only_when_every_seed_reaches_the_target_in_budget(bench, tmp_path: Path) -> None:
    for seed, last in ((0, -150.0), (1, -180.0), (2, -190.0)):
        _write_run(tmp_path, "pendulum_2024", seed, [(2000, -900.0), (8000, last)], 10_000)
    report = bench.case_report("pendulum_2024", tmp_path)
    assert report["met"] and report["seeds_met"] == 3 and report["final_min"] == -190.0
    assert report["seeds"][0]["target_met_at"] == 8000 and report["random_return"] == -1200.0
    assert report["seeds"][0]["curve_updates"] == [(1000, -900.0), (4000, -150.0)]


def test_a_seed_late_or_short_of_the_target_fails_the_case(bench, tmp_path: Path) -> None:
    _write_run(tmp_path, "pendulum_2024", 0, [(5000, -150.0)], 10_000)
    _write_run(tmp_path, "pendulum_2024", 1, [(12000, -150.0)], 12_000)  # past the 10k budget
    _write_run(tmp_path, "pendulum_2024", 2, [(5000, -250.0)], 10_000)
    report = bench.case_report("pendulum_2024", tmp_path)
    assert not report["met"] and report["seeds_met"] == 1


def test_the_2023_case_also_needs_no_later_collapse(bench, tmp_path: Path) -> None:
    for seed in range(3):
        _write_run(tmp_path, "pendulum_2023", seed, [(4000, -170.0), (8000, -700.0 if seed == 1 else -160.0)], 10_000)
    report = bench.case_report("pendulum_2023", tmp_path)
    assert report["seeds_met"] == 2 and not report["met"]


def test_report_writes_table_json_and_png_from_partial_runs(bench, tmp_path: Path) -> None:
    _write_run(tmp_path, "pendulum_2024", 0, [(1000, -1100.0), (2000, -700.0)], 2000)
    summary = bench.report(["pendulum_2024", "arm_reach_proprio"], tmp_path)
    assert summary["cases"]["pendulum_2024"]["seeds_run"] == 1
    table = (tmp_path / "learning.md").read_text()
    assert "`pendulum_2024`" in table and "not met (yet)" in table and "not run" in table
    assert json.loads((tmp_path / "learning.json").read_text())[0]["case"] == "pendulum_2024"
    assert (tmp_path / "learning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quadruped_stand_reads_the_walk_runs_with_a_smoothed_metric(bench, tmp_path: Path) -> None:
    assert bench.run_dir(tmp_path, "quadruped_stand", 1) == tmp_path / "quadruped_walk" / "seed1"
    assert bench._smoothed([(1, 0.0), (2, 3.0), (3, 6.0), (4, 9.0)], 3) == [(1, 0.0), (2, 1.5), (3, 3.0), (4, 6.0)]
