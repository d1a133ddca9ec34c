"""Non-finite values never reach an update, and a non-finite update is never applied, published or
checkpointed (issue 20 item 1).

Real parts throughout: the replay store on disk, the link server over loopback ZeroMQ, real Dreamer
updates and a real training run in PyBullet. Faults are injected at the source (an `inf` in one
joint velocity of one step), as a glitching sensor would produce them.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from dreamer_helpers import FLAG_SPACE, make_cfg
from link_helpers import RawRobot, learner, wait_for
from test_link_server import chunk

from core.agents.spaces import ActSpace
from core.config import load_config
from core.weights import load_weights
from learner.agents.dreamer.agent import Dreamer
from learner.checkpoint import latest_checkpoint, load_checkpoint
from learner.replay import Replay, read_chunk
from learner.replay.chunk_file import is_chunk_name
from learner.serve import Server
from learner.train import Trainer

ROOT = Path(__file__).resolve().parents[2]
SPACE = {"joint_vel": ((3,), "float32"), **FLAG_SPACE}
ACT = ActSpace(2, False)


def _batch(b: int = 2, t: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    first = np.zeros((b, t), bool)
    first[:, 0] = True
    return {"joint_vel": rng.normal(size=(b, t, 3)).astype(np.float32),
            "reward": rng.normal(size=(b, t)).astype(np.float32), "is_first": first,
            "is_last": np.zeros((b, t), bool), "is_terminal": np.zeros((b, t), bool),
            "action": rng.uniform(-1, 1, (b, t, ACT.dim)).astype(np.float32)}


def _state(agent: Dreamer) -> dict:
    """Everything an update may change: parameters, buffers (return normalisation), optimiser state."""
    return {"model": {k: v.detach().clone() for k, v in agent.model.state_dict().items()},
            "optimizer": copy.deepcopy(agent.optimizer.state_dict()), "updates": agent.updates}


def _assert_same(a: object, b: object, path: str = "") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


# --- the update ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["2024", "2023"])
@pytest.mark.parametrize("fault", ["inf joint_vel", "nan reward", "overflowing head"])
def test_an_update_with_non_finite_values_changes_nothing_and_says_which(
    recipe: str, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    agent = Dreamer(make_cfg(recipe), SPACE, ACT)
    agent.train(_batch(seed=1))  # the optimiser has state to lose
    batch = _batch(seed=2)
    if fault == "inf joint_vel":
        batch["joint_vel"][1, 3, 2], expected = math.inf, "input 'joint_vel' holds NaN or inf"
    elif fault == "nan reward":
        batch["reward"][0, 4], expected = math.nan, "input 'reward' holds NaN or inf"
    else:  # finite inputs and weights, but the reward logits overflow: the losses and gradients go non-finite
        with torch.no_grad():
            agent.wm.reward_out.weight.fill_(3e38)
        expected = "non-finite losses wm/reward"
    before = _state(agent)
    with caplog.at_level(logging.WARNING):
        metrics, context = agent.train(batch)
    _assert_same(_state(agent), before)  # parameters, return normalisation, optimiser state, counter
    assert agent.skipped == 1 and context == {} and float(metrics["skipped_nonfinite"]) == 1.0
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "update 2 skipped" in message and expected in message, message
    if fault == "overflowing head":
        assert "non-finite gradients in" in message
        return
    metrics, context = agent.train(_batch(seed=3))  # training goes on with the next good batch
    assert agent.updates == 2 and context and "skipped_nonfinite" not in metrics
    changed = [k for k, v in agent.model.state_dict().items() if not torch.equal(v, before["model"][k])]
    assert changed and all(torch.isfinite(p).all() for p in agent.model.parameters())


def test_non_finite_parameters_are_named(caplog: pytest.LogCaptureFixture) -> None:
    agent = Dreamer(make_cfg(), SPACE, ACT)
    assert agent.nonfinite_parameters() == []
    name, param = next(iter(agent.model.named_parameters()))
    with torch.no_grad():
        param.view(-1)[0] = math.nan
    assert agent.nonfinite_parameters() == [name]


# --- the replay store ------------------------------------------------------------------------------------


def _step(t: int, vel: float = 0.0, first: bool = False, last: bool = False) -> dict:
    return {"joint_vel": np.array([vel, t, 0.0], np.float32), "action": np.zeros(2, np.float32),
            "reward": np.float32(1.0), "is_first": first, "is_last": last, "is_terminal": False}


def _stored(directory: Path, stream: str) -> dict[str, np.ndarray]:
    chunks = [read_chunk(p) for p in sorted(directory.iterdir()) if is_chunk_name(p.name)]
    parts = [steps for meta, steps, _, _ in chunks if meta.stream == stream]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_replay_refuses_a_non_finite_step_cuts_the_episode_and_keeps_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING), Replay(tmp_path, chunk_length=4) as replay:
        for t in range(10):
            replay.add(_step(t, vel=math.inf if t == 4 else 0.0, first=t == 0, last=t == 9), stream="arm1")
        stats = replay.stats()
    assert len(replay) == 9
    assert stats["streams"]["arm1"]["refused_steps"] == 1 and stats["totals"]["refused_steps"] == 1
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "'arm1'" in message and "'joint_vel'" in message and "step 4" in message and "refused" in message
    data = _stored(tmp_path, "arm1")
    assert np.isfinite(data["joint_vel"]).all() and data["joint_vel"][:, 1].tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    # The episode is cut before the refused step (is_last, not is_terminal) and the next step starts one.
    assert data["is_last"].tolist() == [False] * 3 + [True] + [False] * 4 + [True]
    assert data["is_first"].tolist() == [True, False, False, False, True] + [False] * 4
    assert stats["streams"]["arm1"]["abandoned"] == 1
    with Replay(tmp_path, chunk_length=4) as reloaded:
        assert len(reloaded) == 9
        batch = reloaded.sample(8, 3)
        assert np.isfinite(batch["joint_vel"]).all()


def _robot_chunk(seq: int, bad_rows: tuple[int, ...] = (), key: str = "joint_vel", n: int = 5) -> dict:
    steps = {"joint_vel": np.zeros((n, 3), np.float32), "action": np.zeros((n, 2), np.float32),
             "reward": np.ones(n, np.float32), "is_first": np.zeros(n, bool), "is_last": np.zeros(n, bool),
             "is_terminal": np.zeros(n, bool)}
    steps["joint_vel"][:, 1] = seq * n + np.arange(n)
    for row in bad_rows:
        steps[key][row, ...] = math.inf if key == "joint_vel" else math.nan
    return steps


def test_replay_add_steps_drops_only_non_finite_rows_and_keeps_the_robot_position(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING), Replay(tmp_path, chunk_length=8) as replay:
        replay.add_steps(_robot_chunk(0, (2,)), "arm1", source=0)
        assert replay.source_position("arm1") == (0, 4, 5)
        replay.add_steps(_robot_chunk(1, (4,), key="reward"), "arm1", source=1)  # the last row
        assert replay.source_position("arm1") == (1, 4, 5)  # complete: the robot is not asked again
        replay.add_steps(_robot_chunk(2, (0, 1, 2, 3, 4)), "arm1", source=2)  # every row
        assert replay.source_position("arm1") == (2, 4, 5)
        times = np.arange(5, dtype=np.float64)
        times[1] = math.nan
        replay.add_steps(_robot_chunk(3), "arm1", source=3, time=times)
        assert replay.stats()["streams"]["arm1"]["refused_steps"] == 8
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "'arm1'" in message and "robot chunk 0 row 2" in message and "'joint_vel'" in message
    data = _stored(tmp_path, "arm1")
    assert data["joint_vel"][:, 1].tolist() == [0, 1, 3, 4, 5, 6, 7, 8, 15, 17, 18, 19]
    assert np.isfinite(data["reward"]).all()
    with Replay(tmp_path, chunk_length=8) as reloaded:
        assert reloaded.source_position("arm1") == (3, 4, 5)  # survives a restart


def test_replay_does_not_load_a_chunk_file_holding_non_finite_values(tmp_path: Path) -> None:
    """A run poisoned before this check existed: its files stay on disk, unused for training."""
    with Replay(tmp_path, chunk_length=4) as replay:
        for t in range(8):
            replay.add(_step(t, first=t == 0), stream="arm1")
    path = sorted(p for p in tmp_path.iterdir() if is_chunk_name(p.name))[0]
    with np.load(path, allow_pickle=False) as npz:
        members = {k: npz[k] for k in npz.files}
    members["joint_vel"][2, 0] = math.inf
    with path.open("wb") as f:
        np.savez(f, **members)
    with pytest.warns(UserWarning, match=rf"{path.name}.*non-finite.*'joint_vel' row 2"):
        reloaded = Replay(tmp_path, chunk_length=4)
    assert len(reloaded) == 4 and path.exists()
    reloaded.close()


# --- over the wire ---------------------------------------------------------------------------------------


def test_link_server_acknowledges_a_chunk_with_an_inf_and_stores_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Refusing the whole message would leave it unacknowledged: the robot would resend it forever and
    every later chunk would wait behind it. The bad step is dropped, the chunk acknowledged."""
    with caplog.at_level(logging.WARNING), learner(tmp_path) as server:
        with RawRobot(server.endpoint, "arm-7") as peer:
            assert peer.hello().kind == "welcome"
            bad = chunk(0)
            bad["obs"] = bad["obs"].copy()
            bad["obs"][3, 1] = math.inf
            peer.steps(0, bad)
            assert peer.ack() == 0
            peer.steps(1, chunk(1))
            assert peer.ack() == 1
            wait_for(lambda: server.replay.stats()["streams"]["arm-7"]["steps"] == 9, "9 steps stored")
        stats = server.replay.stats()["streams"]["arm-7"]
        assert stats["refused_steps"] == 1 and server.rejects.total == 0
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "'arm-7'" in message and "robot chunk 0 row 3" in message and "'obs'" in message


# --- a real training run ---------------------------------------------------------------------------------

CONFIG = ROOT / "hardware_configs" / "sim_arm_reach.yaml"
FAST = [
    "dreamer.size=tiny", "dreamer.threads=1", "camera.width=32", "camera.height=32",
    "control.episode_steps=9", "train.batch_size=2", "train.batch_length=8", "train.prefill=20",
    "train.train_ratio=8", "train.log_every=10", "replay.chunk_length=16", "train.eval_every=0",
]


def test_training_with_one_inf_in_one_joint_vel_keeps_every_parameter_finite(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trainer = Trainer(load_config(CONFIG, [*FAST, "train.steps=60"]), tmp_path, progress=False)
    step, calls = trainer.env.step, [0]

    def glitching_step(action: np.ndarray) -> dict:
        obs = step(action)
        calls[0] += 1
        if calls[0] == 25:  # after the prefill: updates run on the data around it
            obs["joint_vel"] = obs["joint_vel"].copy()
            obs["joint_vel"][2] = math.inf
        return obs

    trainer.env.step = glitching_step  # type: ignore[method-assign]  # the fault, injected at the sensor
    with caplog.at_level(logging.WARNING):
        summary = trainer.run()
    assert summary["updates"] > 10 and trainer.agent.skipped == 0
    assert trainer.replay.stats()["totals"]["refused_steps"] == 1
    assert "'joint_vel'" in " ".join(r.getMessage() for r in caplog.records)
    parts, _ = load_checkpoint(latest_checkpoint(tmp_path / "checkpoints"))
    assert all(torch.isfinite(v).all() for v in parts["model"].values())
    weights, _ = load_weights(tmp_path / "policy.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_non_finite_parameters_are_never_checkpointed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    trainer = Trainer(load_config(CONFIG, [*FAST, "train.steps=30"]), tmp_path, progress=False)
    trainer.run()
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    policy = (tmp_path / "policy.safetensors").read_bytes()
    with torch.no_grad():  # the fault: a parameter gone bad by whatever route
        first = next(iter(trainer.agent.model.parameters()))  # may be channels-last: index, do not view
        first[(0,) * first.dim()] = math.inf
    trainer.counters.env_steps += 1
    with caplog.at_level(logging.ERROR):
        assert trainer.save() is None
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    assert (tmp_path / "policy.safetensors").read_bytes() == policy
    assert "NaN or inf" in caplog.text and "not written" in caplog.text and "wm.encoder" in caplog.text


def test_serve_never_publishes_or_checkpoints_non_finite_weights(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = load_config(ROOT / "hardware_configs" / "sim_arm_reach_proprio.yaml", ["link.bind=tcp://127.0.0.1:*"])
    server = Server(cfg, tmp_path, progress=False)
    try:
        server.agent = Dreamer(cfg.dreamer, SPACE, ACT)
        server.agent.train(_batch())
        param = next(iter(server.agent.model.parameters()))
        good = param.detach().clone()
        with torch.no_grad():
            param.view(-1)[0] = math.nan
        with caplog.at_level(logging.ERROR):
            server._maybe_publish(force=True)
            server._maybe_publish(force=True)  # checked once per version
            assert server.save() is None
        assert server.link._weights is None and server.published[0] == 0
        assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "policy.safetensors").exists()
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 2 and "weights version 1 not sent to the robots" in errors[0], errors
        with torch.no_grad():
            param.copy_(good)
        server.agent.train(_batch(seed=1))
        server._maybe_publish(force=True)
        assert server.published[0] == 2 and server.save() is not None
    finally:
        server.link.close()
        server.replay.close()
        server.logger.close()
