"""`reverie-replay record --source leader`: an SO-101 follower teleoperated from a leader arm, both on emulated
Feetech buses (pseudo-terminals), the follower driven by a real `reverie-robot run --leader` process that
streams to the recorder's own link server over loopback ZeroMQ; the episodes land in a replay directory that
the offline tools read, described as leader demonstrations, the follower having copied the leader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from teleop_helpers import LEADER, SO101, Pair

from learner.offline.reader import ReplayDir
from learner.replay_cli import main as replay_main

EPISODE_STEPS = 12


def _record(pair: Pair, out: Path, episodes: int, *extra: str) -> int:
    return replay_main(["record", "--source", "leader", "--config", str(SO101), "--leader", str(LEADER),
                        "--episodes", str(episodes), "--out", str(out),
                        *[w for s in [*pair.follower_sets, f"control.episode_steps={EPISODE_STEPS}",
                                      "link.chunk_seconds=0.25"] for w in ("--set", s)],
                        *[w for s in pair.leader_sets for w in ("--leader-set", s)], *extra])


def test_leader_demonstrations_are_recorded_into_a_replay(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pair = Pair(tmp_path)
    try:
        target = pair.leader_home.copy()
        target[0], target[2] = 0.5, 0.3  # where a person holds the leader: shoulder_pan and elbow moved
        pair.leader_plant.move(0, target[0])
        pair.leader_plant.move(2, target[2])
        out = tmp_path / "demos"
        assert _record(pair, out, 2) == 0, capsys.readouterr().err[-3000:]
        printed = capsys.readouterr().out
        assert "stream 'demo-leader'" in printed
        assert not any(pair.follower_bus.torque_enabled().values())  # the robot stopped safely
        assert not any(pair.leader_bus.torque_enabled().values())
    finally:
        pair.close()
    replay = ReplayDir(out)
    assert replay.streams == ["demo-leader"]
    desc = replay.descriptions["demo-leader"]
    assert desc["source"] == "leader arm demonstrations (so101_leader leading so101_arm)"
    assert desc["action"]["names"][0] == "shoulder_pan"
    complete = [ep for ep in replay.episodes() if ep.complete]
    assert len(complete) >= 2 and all(ep.length == EPISODE_STEPS + 1 for ep in complete)
    assert all(ep.versions == (0, 0) for ep in complete)  # no policy acted
    for ep in complete:
        s = replay.steps(ep)
        first = s["action"][0]
        assert first[0] > 0.9 and first[2] < -0.9  # delta mode: toward the leader at the full step
        # Each episode starts at home (its reset) and moves toward where the leader is held, 0.05 rad a step.
        moved = s["joint_pos"][-1] - s["joint_pos"][0]
        assert moved[0] > 0.3 and moved[2] < -0.3, moved
        assert np.abs(moved[[1, 3, 4, 5]]).max() < 0.05, moved  # the joints the leader left alone stayed


def test_record_leader_errors_are_one_line(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    assert replay_main(["record", "--source", "leader", "--config", str(SO101), "--out", str(tmp_path / "d")]) == 2
    assert "--source leader needs --leader CONFIG" in capfd.readouterr().err
    sim = str(Path(SO101).parent / "sim_arm_reach.yaml")
    assert replay_main(["record", "--source", "leader", "--config", sim, "--leader", str(LEADER),
                        "--out", str(tmp_path / "d")]) == 2
    assert "the follower must be a servo robot" in capfd.readouterr().err
    pair = Pair(tmp_path)
    try:
        pair.leader_bus.faults.silent.add(3)
        assert _record(pair, tmp_path / "d2", 1) == 2
        err = capfd.readouterr().err
        assert "servo 3 (elbow_flex) does not answer" in err and "exited with status 2" in err, err[-2000:]
        assert "Traceback" not in err
        assert not any(pair.follower_bus.torque_enabled().values())
    finally:
        pair.close()
    assert not list(tmp_path.glob(".record-leader-*"))  # the link's working directory is gone
