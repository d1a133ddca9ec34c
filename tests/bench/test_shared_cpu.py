"""The shared-CPU benchmark: each policy's environment reaches its worker, the competitor runs and is cleaned
up, and the summary's arithmetic. Timings are printed by the benchmark, never asserted here."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "shared_cpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("shared_cpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_summary_sets_busy_against_idle_and_separates_the_competitor(bench) -> None:
    rows = {"idle": [{"s": 2.0, "cpu_s": 3.0, "threads": 2, "others_cpu_share": 0.05},
                     {"s": 1.0, "cpu_s": 2.0, "threads": 2, "others_cpu_share": 0.02},
                     {"s": 4.0, "cpu_s": 2.5, "threads": 2, "others_cpu_share": None}],
            "busy": [{"s": 3.0, "cpu_s": 3.0, "threads": 2, "others_cpu_share": 0.40, "competitor_cpu_share": 0.35},
                     {"s": 5.0, "cpu_s": 3.5, "threads": 2, "others_cpu_share": 0.50, "competitor_cpu_share": 0.30}]}
    out = bench.summarise("default", {"rows": rows, "threads": 2, "omp_wait_policy": "PASSIVE",
                                      "gomp_spincount": None})
    assert (out["idle_s"], out["busy_s"], out["ratio_busy_idle"]) == (2.0, 4.0, 2.0)  # medians
    assert out["others_cpu_share"] == out["idle_others_cpu_share"] == 0.05  # the worst, as the other benchmarks
    assert out["competitor_cpu_share"] == 0.35 and out["busy_background_cpu_share"] == 0.2
    assert bench.summarise("one", {"error": "worker exited with 1"})["error"] == "worker exited with 1"


def _competitors() -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    return {int(line.split()[0]) for line in out.splitlines() if "while True: pass" in line}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and SIGSTOP")
def test_a_smoke_run_gives_each_policy_its_own_openmp_environment(tmp_path: Path) -> None:
    before = _competitors()
    env = {**os.environ, "OMP_WAIT_POLICY": "ACTIVE"}  # a user's setting must not leak into the policies
    cmd = [sys.executable, str(BENCH), "--policy", "default", "torch", "spin_short", "--preset", "tiny",
           "--batch", "2", "--length", "8", "--updates", "1", "--warmup", "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900, check=True)
    doc = json.loads(out.stdout)
    rows = {row["policy"]: row for row in doc["policies"]}
    assert all("error" not in row for row in rows.values()), rows
    assert rows["default"]["omp_wait_policy"] == "PASSIVE" and rows["default"]["gomp_spincount"] is None
    assert rows["torch"]["omp_wait_policy"] is None and rows["spin_short"]["gomp_spincount"] == "10000"
    assert rows["default"]["threads"] == doc["machine"]["usable_cpus"]
    assert doc["machine"]["parallel_backend"] == "OpenMP"
    for row in rows.values():
        assert row["ratio_busy_idle"] > 0 and len(row["idle_s_all"]) == len(row["busy_s_all"]) == 1
        assert "others_cpu_share" in row and "competitor_cpu_share" in row
    assert doc["target"]["ratio_busy_idle_max"] == 2.5 and isinstance(doc["target"]["reached"], bool)
    assert _competitors() <= before, "a competitor process outlived the benchmark"
