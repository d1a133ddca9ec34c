"""The data-parallel learner (issue 24, section 4), on the CPU with gloo and two real processes: two ranks
with half the batch each make the very update one process makes with the whole batch; a killed rank stops
the job with a message instead of a hang; a checkpoint written by two ranks resumes in one.

Ranks are real processes started as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); this
file is also their program (`python test_distributed.py update ...`). Every wait on a process is bounded by
DEADLINE (generous: a hang fails the test rather than blocking CI; no speed is asserted).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
DEADLINE = 240.0  # seconds any one job may take before the test fails as hung
SPACE_KEYS = {"obs": ((5,), "float32"), "image": ((16, 16, 3), "uint8")}
BATCH, LENGTH, UPDATES, NOISE_SEED = 4, 8, 3, 7  # the global batch; each of two ranks trains on 2 rows


def _agent(cfg, space, act):
    """The agent every run starts from: seed 0, and reward and critic outputs that are not zero (as at init)
    so that imagined returns, and so their percentiles, differ between states."""
    from learner.agents.dreamer.agent import Dreamer

    torch.manual_seed(0)
    agent = Dreamer(cfg, space, act)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for out in (agent.wm.reward_out, agent.behavior.critic.out, agent.behavior.slow_critic.out):
            out.weight.copy_(0.5 * torch.randn(out.weight.shape, generator=g))
    return agent


def _setup(recipe: str):
    from dreamer_helpers import FLAG_SPACE, make_batch, make_cfg

    from core.agents.spaces import ActSpace

    space = {**SPACE_KEYS, **FLAG_SPACE}
    act = ActSpace(2, False)
    # No warm-up (every update moves the weights well above float resolution) and a low floor on the return
    # scale (the percentiles of the returns decide it).
    return make_cfg(recipe, warmup=0, retnorm_limit=1e-3), space, act, make_batch(space, act, BATCH, LENGTH)


def _free_port() -> int:
    from robot.demo import free_port

    return free_port()


def _rank_env(rank: int, size: int, port: int) -> dict[str, str]:
    return {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")])}


def _run_ranks(args: list[str], size: int = 2) -> list[subprocess.CompletedProcess]:
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, __file__, *args], env=_rank_env(r, size, port), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(size)]
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=DEADLINE)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return done


def update_rank(recipe: str, out: str) -> None:
    """A rank's program: the agent built from the same seed, `distribute`d, UPDATES updates on its share of
    the fixed global batch (rank 0 scatters it); rank 0 saves the weights and the gathered context."""
    from learner.distributed import close_world, distribute, gather_context, init_world, scatter_batch

    torch.set_num_threads(1)
    cfg, space, act, batch = _setup(recipe)
    world = init_world("cpu")
    agent = _agent(cfg, space, act)
    distribute(agent, world, seed=NOISE_SEED)
    context = None
    for _ in range(UPDATES):
        local = scatter_batch(world, batch if world.is_main else None)
        assert local["action"].shape[0] == BATCH // world.size
        metrics, ctx = agent.train(local)
        assert "skipped_nonfinite" not in metrics
        context = gather_context(world, ctx)
    if world.is_main:
        assert context is not None
        state = {f"model.{k}": v.contiguous() for k, v in agent.model.state_dict().items()}
        state |= {f"context.{k}": v.contiguous() for k, v in context.items()}
        safetensors.torch.save_file(state, out)
    close_world()


@pytest.mark.parametrize("recipe", ["2024", "2023"])
def test_two_ranks_with_half_the_batch_update_like_one_process_with_the_whole(tmp_path: Path, recipe: str) -> None:
    """2024: LaProp's adaptive clipping; 2023: Adam per part with global-norm clipping and, for continuous
    actions, gradients through the dynamics. Both clip the averaged gradient, and the return normaliser and
    the sampling noise are those of the whole batch, so the weights agree to float tolerance."""

    out = tmp_path / "rank0.safetensors"
    for job in _run_ranks(["update", recipe, str(out)]):
        assert job.returncode == 0, job.stderr[-3000:]
    cfg, space, act, batch = _setup(recipe)
    agent = _agent(cfg, space, act)
    torch.manual_seed(NOISE_SEED)
    for _ in range(UPDATES):
        metrics, context = agent.train(batch)
    got = safetensors.torch.load_file(out)
    initial = _agent(cfg, space, act).model.state_dict()
    worst = {}
    for key, want in agent.model.state_dict().items():
        step = (want - initial[key]).double()
        if key.endswith("bins") or not step.abs().max() > 0:  # constants and the untrained slow critic's copy
            continue
        worst[key] = float((got[f"model.{key}"] - want).double().norm() / step.norm())
    assert worst and max(worst.values()) < 1e-3, sorted(worst.items(), key=lambda kv: -kv[1])[:5]
    for key, want in context.items():
        np.testing.assert_allclose(got[f"context.{key}"].numpy(), want.numpy(), rtol=1e-4, atol=1e-5, err_msg=key)

if __name__ == "__main__":
    sys.path[:0] = [str(ROOT), str(TESTS)]
    command, *rest = sys.argv[1:]
    {"update": update_rank}[command](*rest)
