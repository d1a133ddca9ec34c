"""The data-parallel learner (issue 24, section 4), on the CPU with gloo and two real processes: two ranks
with half the batch each make the very update one process makes with the whole batch; a killed rank stops
the job with a message instead of a hang; a checkpoint written by two ranks resumes in one.

Ranks are real processes started as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); this
file is also their program (`python test_distributed.py update ...`). Every wait on a process is bounded by
DEADLINE (generous: a hang fails the test rather than blocking CI; no speed is asserted).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
DEADLINE = 240.0  # seconds any one job may take before the test fails as hung
CONFIG = ROOT / "hardware_configs" / "sim_arm_reach.yaml"
SERVE = ["--quiet", "--set", "dreamer.size=tiny", "--set", "dreamer.device=cpu", "--set", "link.heartbeat_s=0.1",
         "--set", "train.batch_size=4", "--set", "train.batch_length=8", "--set", "train.prefill=40",
         "--set", "train.train_ratio=-1", "--set", "train.log_every=5"]
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


def _setup(recipe: str, device: str = "cpu"):
    from dreamer_helpers import FLAG_SPACE, make_batch, make_cfg

    from core.agents.spaces import ActSpace

    space = {**SPACE_KEYS, **FLAG_SPACE}
    act = ActSpace(2, False)
    # No warm-up (every update moves the weights well above float resolution) and a low floor on the return
    # scale (the percentiles of the returns decide it).
    cfg = make_cfg(recipe, warmup=0, retnorm_limit=1e-3, device=device, precision="float32")
    return cfg, space, act, make_batch(space, act, BATCH, LENGTH)


def _free_port() -> int:
    from robot.demo import free_port

    return free_port()


def _env() -> dict[str, str]:
    """This environment less any torchrun variables, with the repository and tests/ importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return env | {"OMP_NUM_THREADS": "1",
                  "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")])}


def _rank_env(rank: int, size: int, port: int) -> dict[str, str]:
    return _env() | {"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank),
                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def _run_ranks(args: list[str], size: int = 2) -> list[subprocess.CompletedProcess]:
    """This file's `args` command as `size` ranks; each one's result (every wait bounded by DEADLINE)."""
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


def update_rank(recipe: str, out: str, device: str = "cpu") -> None:
    """A rank's program: the agent built from the same seed, `distribute`d, UPDATES updates on its share of
    the fixed global batch (rank 0 scatters it); rank 0 saves the weights and the gathered context."""
    from learner.distributed import close_world, distribute, gather_context, init_world, scatter_batch

    torch.set_num_threads(1)
    cfg, space, act, batch = _setup(recipe, device)
    world = init_world(device)
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
        state = {f"model.{k}": v.cpu().contiguous() for k, v in agent.model.state_dict().items()}
        state |= {f"context.{k}": v.cpu().contiguous() for k, v in context.items()}
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


@pytest.mark.gpu
def test_one_rank_on_cuda_with_nccl_updates_like_the_plain_agent(tmp_path: Path) -> None:
    """The CUDA path (NCCL, DDP with device_ids, the noise generator and the packed tensors on the GPU), on one
    GPU: a one-rank job's updates are the plain agent's (CUDA kernels need not be bitwise repeatable: a
    looser tolerance than on the CPU)."""
    out = tmp_path / "rank0.safetensors"
    (job,) = _run_ranks(["update", "2024", str(out), "cuda"], size=1)
    assert job.returncode == 0, job.stderr[-3000:]
    cfg, space, act, batch = _setup("2024", "cuda")
    agent = _agent(cfg, space, act)
    initial = {k: v.cpu() for k, v in _agent(cfg, space, act).model.state_dict().items()}
    torch.manual_seed(NOISE_SEED)
    for _ in range(UPDATES):
        agent.train(batch)
    got = safetensors.torch.load_file(out)
    for key, want in agent.model.state_dict().items():
        step = (want.cpu() - initial[key]).double()
        if step.abs().max() > 0 and not key.endswith("bins"):
            assert float((got[f"model.{key}"] - want.cpu()).double().norm() / step.norm()) < 5e-2, key


# --- serve on two ranks: a lost rank, a checkpoint resumed on one


class Job:
    """A command run as a subprocess with its output in files (read while it runs); killed if left running."""

    def __init__(self, args: list[str], out: Path, env: dict[str, str] | None = None) -> None:
        self.out, self.err = out.with_suffix(".out"), out.with_suffix(".err")
        with self.out.open("w") as stdout, self.err.open("w") as stderr:
            self.proc = subprocess.Popen([sys.executable, "-m", "learner.cli", *args], cwd=ROOT, stdout=stdout,
                                         stderr=stderr, env=env or _env())

    def text(self) -> str:
        return self.out.read_text() + self.err.read_text()

    def wait_for(self, what: str) -> None:
        end = time.monotonic() + DEADLINE
        while what not in self.text():
            assert self.proc.poll() is None, f"exited {self.proc.returncode} before {what!r}: {self.text()[-3000:]}"
            assert time.monotonic() < end, f"no {what!r} within {DEADLINE} s: {self.text()[-3000:]}"
            time.sleep(0.2)

    def finish(self) -> int:
        try:
            return self.proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"still running after {DEADLINE} s (hung): {self.text()[-3000:]}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _serve_args(logdir: Path, port: int) -> list[str]:
    return ["serve", "--config", str(CONFIG), "--logdir", str(logdir), "--bind", f"tcp://127.0.0.1:{port}", *SERVE]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"  # exited, not yet reaped


def test_a_killed_rank_stops_the_launched_job_with_a_message(tmp_path: Path) -> None:
    """`serve --gpus 2` (two CPU ranks): rank 1 killed while rank 0 waits for robots -> the launcher says which
    rank died and how, stops rank 0 and exits non-zero, instead of rank 0 waiting forever."""
    job = Job([*_serve_args(tmp_path / "run", _free_port()), "--gpus", "2"], tmp_path / "launcher")
    try:
        job.wait_for("waiting for the first robot")
        pids = [int(p) for p in job.text().split("(pids ")[1].split(";")[0].split(", ")]
        os.kill(pids[1], signal.SIGKILL)
        assert job.finish() == 1
    finally:
        job.kill()
    err = job.err.read_text()
    assert f"rank 1 (pid {pids[1]}) was killed by SIGKILL; stopping the other ranks" in err, err
    assert "Traceback" not in err, err
    assert all(_gone(pid) for pid in pids)


def test_a_killed_rank_stops_a_torchrun_rank_0_with_a_message(tmp_path: Path) -> None:
    """Ranks started as torchrun starts them, no launcher: rank 0 notices the lost rank at its next command
    and exits non-zero, saying what it was doing."""
    port, link = _free_port(), _free_port()
    ranks = [Job(_serve_args(tmp_path / "run", link), tmp_path / f"rank{r}", env=_rank_env(r, 2, port))
             for r in range(2)]
    try:
        ranks[0].wait_for("waiting for the first robot")
        ranks[1].kill()
        assert ranks[0].finish() == 1
    finally:
        for job in ranks:
            job.kill()
    err = ranks[0].err.read_text()
    assert "rank 0 of 2: another rank exited or stopped answering" in err and "Traceback" not in err, err


def robot_chunk(i: int, steps: int = 5) -> dict[str, np.ndarray]:
    """The i-th chunk of a robot with the test layout (GOOD_SPEC), one episode throughout."""
    rng = np.random.default_rng(i)
    return {"obs": rng.normal(size=(steps, 3)).astype(np.float32),
            "image": rng.integers(0, 256, (steps, 16, 16, 3), dtype=np.uint8),
            "action": rng.uniform(-1, 1, (steps, 2)).astype(np.float32),
            "reward": rng.normal(size=steps).astype(np.float32),
            "is_first": (np.arange(steps) == 0) & (i == 0), "is_last": np.zeros(steps, bool),
            "is_terminal": np.zeros(steps, bool), "policy_version": np.zeros(steps, np.int64),
            "time": i * steps + np.arange(steps, dtype=np.float64)}


def _updates(job: Job) -> int:
    """The update count of rank 0's latest status line (every STATUS_EVERY_S)."""
    counts = [int(m) for m in re.findall(r"^updates (\d+) ", job.out.read_text(), re.M)]
    return counts[-1] if counts else 0


def test_a_checkpoint_written_by_two_ranks_resumes_on_one(tmp_path: Path) -> None:
    from link_helpers import SPEC, RawRobot

    logdir, port = tmp_path / "run", _free_port()
    job = Job([*_serve_args(logdir, port), "--gpus", "2"], tmp_path / "two")
    try:
        job.wait_for("waiting for the first robot")
        with RawRobot(f"tcp://127.0.0.1:{port}", "arm-1") as robot:
            assert robot.hello(spec=SPEC | {"image": ["uint8", [16, 16, 3]]}).kind == "welcome"
            for seq in range(12):
                robot.steps(seq, robot_chunk(seq))
                assert robot.ack() == seq
            end = time.monotonic() + DEADLINE
            while _updates(job) < 2:
                assert job.proc.poll() is None and time.monotonic() < end, job.text()[-3000:]
                time.sleep(0.5)
        job.proc.send_signal(signal.SIGINT)  # rank 0 stops, checkpoints, then stops rank 1
        assert job.finish() == 0, job.text()[-3000:]
    finally:
        job.kill()
    two = json.loads(job.out.read_text().strip().splitlines()[-1])
    assert two["updates"] >= 2 and two["checkpoint"], two
    one = Job([*_serve_args(logdir, _free_port()), "--duration", "5"], tmp_path / "one")
    try:
        assert one.finish() == 0, one.text()[-3000:]
    finally:
        one.kill()
    assert f"resumed from {two['checkpoint']}" in one.text() and f"{two['updates']} updates" in one.text(), one.text()
    assert json.loads(one.out.read_text().strip().splitlines()[-1])["updates"] >= two["updates"]


if __name__ == "__main__":
    sys.path[:0] = [str(ROOT), str(TESTS)]
    command, *rest = sys.argv[1:]
    {"update": update_rank}[command](*rest)
