"""The learner benchmark's arithmetic: FLOP per update, the rate reached, and what a target asks for."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from core.agents.spaces import ActSpace
from core.config.agent import DreamerConfig
from learner.agents.dreamer.agent import Dreamer

BENCH = Path(__file__).resolve().parents[2] / "bench" / "learner_throughput.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("learner_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _agent(bench, obs: str) -> Dreamer:
    torch.manual_seed(0)
    cfg = DreamerConfig(recipe="2023", size="tiny", device="cpu")
    return Dreamer(cfg, bench._spaces(obs, 16), ActSpace(bench.ACT_DIM, False), torch.device("cpu"))


@pytest.mark.parametrize("obs", ["pixels", "vector"])
def test_update_flop_count_grows_with_the_batch_as_the_update_does(bench, obs: str) -> None:
    # Every product of an update (encoder, observe steps, decoder, heads, imagination from every
    # replayed state) is linear in the number of sequences: twice the batch, twice the FLOP.
    agent = _agent(bench, obs)
    rng = np.random.default_rng(0)
    small = bench._update_gflop(agent, bench._batch(rng, obs, 2, 8, 16))
    large = bench._update_gflop(agent, bench._batch(rng, obs, 4, 8, 16))
    assert small > 0
    assert large / small == pytest.approx(2.0, rel=0.02)


def test_pixels_count_the_convolutions_too(bench) -> None:
    rng = np.random.default_rng(0)
    pixels = bench._update_gflop(_agent(bench, "pixels"), bench._batch(rng, "pixels", 2, 8, 16))
    vector = bench._update_gflop(_agent(bench, "vector"), bench._batch(rng, "vector", 2, 8, 16))
    assert pixels > vector


def test_port_target_reports_the_rate_it_needs(bench) -> None:
    case = {"name": "port-defaults/2023", "preset": "size1m", "recipe": "2023", "obs": "pixels", "compile": False,
            "precision": "auto", "threads": 2, "target": "port"}
    result = {"sec_per_update_mean": 8.0, "gflop_per_update": 821.0, "matmul_peak_gflops": 180.0}
    port = bench.summarise(case, result)["port"]
    assert port["target_sec_per_update"] == pytest.approx(10.9 / 2)
    assert port["target_needs_gflops"] == pytest.approx(821.0 / 5.45, abs=0.1)
    assert port["target_needs_share_of_matmul_peak"] == pytest.approx(821.0 / 5.45 / 180.0, abs=1e-3)
    assert port["reached"] is False


def test_matmul_peak_is_a_positive_rate(bench) -> None:
    peak = bench._matmul_peak_gflops(torch.device("cpu"), torch.float32, n=256, reps=2)
    assert 0 < peak < 1e5


@pytest.mark.parametrize("chosen, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_worker_waits_as_the_learner_does(bench, monkeypatch, chosen, expected) -> None:
    """Each case's worker process gets the passive OpenMP wait policy reverie-learner sets (unless the
    user chose one): with the runtime's spinning default the benchmark measured the spinning (2 threads
    on a busy 2-core host: 9.7 CPU-s per size1m update instead of ~0.8). A real worker, a tiny case."""
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"):
        monkeypatch.delenv(name, raising=False)
    if chosen:
        monkeypatch.setenv("OMP_WAIT_POLICY", chosen)
    case = {"name": "tiny", "preset": "tiny", "recipe": "2024", "obs": "vector", "threads": 1, "compile": "off",
            "precision": "auto", "overrides": {}, "target": None}
    opts = {"batch": 2, "length": 8, "image": 16, "device": "cpu", "warmup": 0, "iters": 1, "act_calls": 0,
            "profile": 0, "compile_timeout": 0, "wait_idle": 0.0, "keep_heap": True}
    result = bench.run_isolated(case, opts, timeout=300)
    assert "error" not in result, result.get("error")
    assert result["omp_wait_policy"] == expected
