"""The offline toolbox on a replay recorded by `reverie-robot run` (a real simulated robot, the real link on
loopback) against a learner's link server, and on directories that are not whole replays. No mocks.

A train run's replay goes through every verb in test_offline_doc.py (the doc's own commands)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from link_helpers import learner

from learner.cli import main as learner_main
from learner.offline.reader import ReplayDir
from learner.replay import Replay
from learner.replay.chunk_file import read_chunk
from learner.replay.describe import read_descriptions
from learner.replay_cli import main as replay_main
from robot.cli import main as robot_main

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "hardware_configs" / "sim_arm_reach_proprio.yaml"
ROBOT = "arm-off"
# 20 Hz, 8-step episodes, 4-step link chunks: 30 steps make 3 complete episodes and one the learner cut
# (abandoned) when the robot said bye.
FAST = ["--set", "control.hz=20", "--set", "sim.physics_hz=240", "--set", "link.chunk_seconds=0.2",
        "--set", "link.heartbeat_s=0.1", "--set", "control.episode_steps=7"]
TINY = ["--set", "dreamer.size=tiny", "--set", "dreamer.threads=1", "--set", "train.batch_size=2",
        "--set", "train.batch_length=8"]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The replay a learner's link server stored from `reverie-robot run` (30 steps)."""
    tmp = tmp_path_factory.mktemp("served")
    with learner(tmp, chunk_length=8) as server:
        code = robot_main(["run", "--config", str(CONFIG), "--learner", server.endpoint, "--robot-id", ROBOT,
                           "--spool", str(tmp / "spool"), "--steps", "30", *FAST])
        assert code == 0
        assert server.replay.stats()["streams"][ROBOT]["steps"] == 30
    return tmp / "replay"


def test_the_robot_stream_describes_itself(served: Path) -> None:
    """The hello's description (from the robot's specs) is in streams.json: names, units, bounds, rate."""
    desc = read_descriptions(served)[ROBOT]
    assert desc["control_hz"] == 20.0 and desc["task"] == "arm_reach"
    joints = desc["observations"]["joint_pos"]
    assert joints["unit"] == "rad" and len(joints["names"]) == 6 and len(joints["low"]) == 6
    assert desc["action"]["names"] == ["dx", "dy", "dz"] and desc["action"]["low"] == -1.0
    assert desc["success"]["kind"] == "last_reward_above"


def test_episodes_table_and_json(served: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert replay_main(["episodes", str(served), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    eps = report["episodes"]
    assert [e["length"] for e in eps] == [8, 8, 8, 6] and sum(e["length"] for e in eps) == 30
    assert [e["end"] for e in eps] == ["time limit"] * 3 + ["abandoned"]  # the robot left mid-episode (bye)
    assert all(e["success"] in (True, False) for e in eps[:3]) and eps[3]["success"] is None
    assert eps[0]["start_time"] <= eps[0]["end_time"] <= eps[1]["start_time"]
    assert replay_main(["episodes", str(served), "--complete", "--episodes", f"{ROBOT}:1-2"]) == 0
    out = capsys.readouterr().out
    assert "2 episode(s)" in out and "time limit" in out and "open" not in out.split("\n", 2)[2]


def test_plot_and_video_without_a_camera(served: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert replay_main(["plot", str(served), "--out", str(tmp_path / "plots")]) == 0
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == ["episode_arm-off_2.png", "lengths.png", "observations.png", "returns.png"]
    assert replay_main(["video", str(served), "--out", str(tmp_path / "v.mp4"), "--episodes", "0-1"]) == 0
    assert "16 frames at 20 fps" in capsys.readouterr().out


def test_filter_split_merge_keep_rows_exactly_and_leave_the_source(served: Path, tmp_path: Path) -> None:
    before = sorted((p.name, p.stat().st_mtime_ns) for p in served.iterdir())
    assert replay_main(["filter", str(served), "--out", str(tmp_path / "f"), "--episodes", "1",
                        "--chunk-length", "3"]) == 0
    src, out = ReplayDir(served), ReplayDir(tmp_path / "f")
    (ep,) = out.episodes()
    original = src.episodes()[1]
    a, b = src.steps(original), out.steps(ep)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert read_descriptions(tmp_path / "f") == {ROBOT: read_descriptions(served)[ROBOT]}
    assert replay_main(["split", str(served), "--into", str(tmp_path / "a"), str(tmp_path / "b"),
                        "--complete"]) == 0
    assert [e.length for e in ReplayDir(tmp_path / "a").episodes()] == [8, 8, 8]
    assert [e.length for e in ReplayDir(tmp_path / "b").episodes()] == [6]
    assert replay_main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")]) == 0
    merged = ReplayDir(tmp_path / "m")
    assert sum(e.length for e in merged.episodes()) == 30
    with Replay(tmp_path / "m", chunk_length=8) as replay:  # the learner's own store opens it
        assert len(replay) == 30 and replay.sample(2, 4)["reward"].shape == (2, 4)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in served.iterdir()) == before
    assert replay_main(["filter", str(served), "--out", str(tmp_path / "f")]) == 2  # never overwritten


def test_offline_training_and_eval_on_the_robots_data(served: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    logdir = tmp_path / "offline"
    assert learner_main(["train", "--offline", str(served), "--config", str(CONFIG), "--logdir", str(logdir),
                         "--quiet", "--updates", "2", *TINY]) == 0
    summary = json.loads((logdir / "summary.json").read_text())
    assert summary["updates"] == 2 and (logdir / "metrics.jsonl").is_file() and (logdir / "losses.png").is_file()
    capsys.readouterr()
    assert replay_main(["eval", str(logdir), str(served), "--out", str(tmp_path / "eval"), "--horizon", "3",
                        "--sequences", "3"]) == 0
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert set(result["entries"]) == {"joint_pos", "joint_vel", "tool_pos", "reward", "continuation"}
    assert all(len(e["imagined"]) == 3 and np.isfinite(e["imagined"]).all() for e in result["entries"].values())
    assert (tmp_path / "eval" / "openloop_error.png").is_file()


VERBS = [["info"], ["episodes"], ["plot", "--out", "P"], ["video", "--out", "P/v.mp4"], ["filter", "--out", "P/f"]]


@pytest.mark.parametrize("verb", VERBS, ids=[v[0] for v in VERBS])
def test_clear_errors_on_what_is_not_a_whole_replay(served: Path, tmp_path: Path, verb: list[str],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    def call(directory: Path) -> tuple[int, str]:
        args = [a.replace("P", str(tmp_path / f"out-{directory.name}")) for a in verb[1:]]
        code = replay_main([verb[0], str(directory), *args])
        return code, capsys.readouterr().err

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello")
    code, err = call(plain)
    assert code == 2 and "not a replay directory" in err and "Traceback" not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "index.json").write_text('{"format": 1, "chunks": []}')
    code, err = call(empty)
    assert code == 2 and "empty" in err
    half = tmp_path / "half"  # a copy whose newest chunk file was cut off mid-write
    half.mkdir()
    chunks = sorted(p for p in served.iterdir() if p.suffix == ".npz")
    for p in chunks:
        (half / p.name).write_bytes(p.read_bytes())
    cut = half / chunks[-1].name
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    code, err = call(half)
    assert code == 0, err
    assert "skipping" in err and str(cut) in err and "Traceback" not in err
    only = tmp_path / "only-half"
    only.mkdir()
    (only / cut.name).write_bytes(cut.read_bytes())
    code, err = call(only)
    assert code == 2 and "empty" in err and cut.name in err


def test_a_replay_without_streams_json_still_reads(served: Path, tmp_path: Path) -> None:
    """Replays written before streams.json existed: everything works, names fall back to key[i]."""
    old = tmp_path / "old"
    old.mkdir()
    for p in served.iterdir():
        if p.suffix == ".npz":
            (old / p.name).write_bytes(p.read_bytes())
    replay = ReplayDir(old)
    assert replay.descriptions == {} and not replay.discrete_actions()
    assert [e.success for e in replay.episodes()] == [None] * 4
    assert replay_main(["plot", str(old), "--out", str(tmp_path / "plots")]) == 0
    meta, *_ = read_chunk(sorted(old.iterdir())[0])
    assert meta.stream == ROBOT


def test_keyboard_demonstrations_from_a_terminal(tmp_path: Path) -> None:
    """`record --controller keyboard` in a real pseudo-terminal: held `q` pushes the first action dimension to +1,
    `n` cuts the episode, `x` stops; the terminal's settings come back."""
    import os
    import pty
    import subprocess
    import sys
    import termios
    import time

    leader, follower = pty.openpty()
    before = termios.tcgetattr(follower)
    out = tmp_path / "kb"
    cmd = [sys.executable, "-m", "learner.replay_cli", "record", "--config", str(CONFIG), "--controller", "keyboard",
           "--episodes", "5", "--out", str(out), *FAST, "--set", "control.episode_steps=200"]  # 10 s: keys end it
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=follower, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out / "streams.json").exists():  # recording has started (the env is built)
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        for keys in ("q", "q", "q", "n", "x"):
            os.write(leader, keys.encode())
            time.sleep(0.3)
        stdout, stderr = proc.communicate(timeout=120)
        after = termios.tcgetattr(follower)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
        os.close(follower)
    assert proc.returncode == 0, stderr.decode()
    assert "demo-keyboard" in stdout.decode()
    assert after == before
    replay = ReplayDir(out)
    first, second = replay.episodes()  # n cut the first, x the second
    steps = replay.steps(first)
    assert (steps["action"][:, 0] == 1.0).any() and (steps["action"][:, 1:] == 0.0).all()
    assert first.end == second.end == "abandoned" and first.length < 200
    assert read_descriptions(out)["demo-keyboard"]["source"].startswith("keyboard demonstrations")


def test_a_peer_description_is_checked() -> None:
    from core.describe import check_description
    from core.link.protocol import Message, ProtocolError, decode, encode

    with pytest.raises(ValueError, match="names must be a list"):
        check_description({"observations": {"q": {"names": "joint1"}}}, "hello")
    bad = Message("hello", "r", "x" * 32, 0, {"spec": {"action": ["float32", [1]], "reward": ["float32", []],
                                                       "is_first": ["bool", []], "is_last": ["bool", []],
                                                       "is_terminal": ["bool", []]},
                                              "task": "t", "hz": 10.0, "describe": {"control_hz": -1}})
    with pytest.raises(ProtocolError, match="control_hz"):
        decode(encode(bad))


def test_serve_prefill_fixes_the_runs_layout(served: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`serve --prefill-from`: the recorded steps are in the run's replay before any robot, and a robot of
    another step layout is refused at its hello with the difference named."""
    from link_helpers import RawRobot

    from core.config import load_config
    from core.config.link import LinkConfig
    from learner.link.server import LinkServer
    from learner.offline.prefill import prefill_serve

    logdir = tmp_path / "serve"
    prefill_serve(load_config(CONFIG), logdir, served)
    with Replay(logdir / "replay", chunk_length=8) as replay:
        assert replay.stats()["streams"][ROBOT]["steps"] == 30
        assert replay.source_position(ROBOT) is None  # a robot of that name starts afresh, nothing taken as sent
        server = LinkServer(LinkConfig(bind="tcp://127.0.0.1:*", heartbeat_s=0.1), replay, logdir)
        try:
            server.start()
            with RawRobot(server.endpoint, "other-1") as robot:
                answer = robot.hello()
            assert answer.kind == "bye" and "step layout differs" in answer.meta["reason"]
        finally:
            server.close()
