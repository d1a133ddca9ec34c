"""`reverie-robot run` against a real learner link server in this process: a real simulated robot
(PyBullet ArmReach from proprioception), the real link (thread and child-process variants), real zmq
on loopback and a real Replay in tmp_path. No mocks.

What is checked: a normal exit leaves nothing unacknowledged (the learner has every step), a robot
refused by the learner says why and exits non-zero, and a `link.max_message_mb` too small for one
chunk is refused before anything moves (at config load where the config alone shows it, else when
the robot's step layout is known).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from link_helpers import HELLO, learner, wait_for

from core.config import Config, ConfigError, load_config
from robot.cli import main as robot_main
from robot.link.spool import Spool
from robot.link.thread import RobotLink

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "hardware_configs" / "sim_arm_reach_proprio.yaml"
ROBOT = "arm-run"
# 20 Hz, 5 steps per chunk: 23 steps are four full chunks and a last one of three.
FAST = ["--set", "control.hz=20", "--set", "sim.physics_hz=240", "--set", "link.chunk_seconds=0.25",
        "--set", "link.heartbeat_s=0.1"]
VARIANTS = pytest.mark.parametrize("process", [False, True], ids=["link-thread", "link-process"])


def run_robot(server_endpoint: str, tmp_path: Path, process: bool, *extra: str) -> int:
    return robot_main(["run", "--config", str(CONFIG), "--learner", server_endpoint, "--robot-id", ROBOT,
                       "--spool", str(tmp_path / "spool"), *FAST, "--set", f"link.process={str(process).lower()}",
                       *extra])


def summary(out: str) -> dict:
    return json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])


@VARIANTS
def test_after_a_normal_exit_the_learner_has_every_step(tmp_path: Path, capsys, process: bool) -> None:
    """The last chunk is submitted as the loop ends; the robot waits (within its budget) until the learner
    acknowledged it, wherever it still was (the link's queue, the pipe, the child, the spool)."""
    with learner(tmp_path) as server:
        code = run_robot(server.endpoint, tmp_path, process, "--steps", "23")
        out, err = capsys.readouterr()
        assert code == 0, err
        assert summary(out)["steps"] == 23
        # Read at once: the robot has exited, so whatever the learner lacks now waits for the next run.
        assert server.replay.stats()["streams"][ROBOT]["steps"] == 23
        assert summary(out)["spool_pending"] == 0
    assert Spool(tmp_path / "spool", 1 << 24).pending() == []


@VARIANTS
def test_a_robot_refused_for_its_step_layout_says_why_and_exits_non_zero(tmp_path: Path, capsys,
                                                                       process: bool) -> None:
    with learner(tmp_path) as server:
        first = RobotLink(server.endpoint, "first", Spool(tmp_path / "first", 1 << 24), HELLO, heartbeat_s=0.1)
        with first:  # another robot fixes the run's step layout
            wait_for(lambda: first.status().connected, "the first robot is welcomed")
        code = run_robot(server.endpoint, tmp_path, process, "--steps", "60")
        out, err = capsys.readouterr()
    assert code == 5, err
    assert "refused by the learner" in err and "step layout differs from the run's" in err, err
    assert "not reachable" not in err and "Traceback" not in err
    assert summary(out)["stopped"].startswith("refused by the learner: step layout differs")
    assert Spool(tmp_path / "spool", 1 << 24).count == summary(out)["spool_pending"] > 0  # kept for a right learner


def test_max_message_mb_below_one_camera_chunk_is_refused_at_load(tmp_path: Path) -> None:
    path = tmp_path / "robot.yaml"
    path.write_text("name: r\ntask: arm_reach\ncontrol: {hz: 10}\ncamera: {width: 64, height: 64}\n"
                    "link: {max_message_mb: 0.1}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    # 10 steps per chunk (1 s at 10 Hz), each with a 64x64x3 image: at least 122880 bytes, 0.118 MiB.
    assert "link.max_message_mb: expected at least 0.118 (one chunk: 10 steps" in text, text
    assert "found 0.1" in text
    ok = Config.model_validate({"name": "r", "task": "arm_reach", "control": {"hz": 10},
                                "link": {"max_message_mb": 0.2}})
    assert ok.link.max_message_mb == 0.2


@VARIANTS
def test_max_message_mb_below_one_chunk_of_this_robot_is_refused_before_it_moves(tmp_path: Path, capsys,
                                                                                 process: bool) -> None:
    """No camera: the config alone cannot show the chunk size; the robot's step layout can, before the link starts.
    The minimum it names is enough: with it, every step reaches a learner that has the same limit. Without a
    camera the hello (layout + description of every array) is larger than a chunk: the minimum must cover it."""
    code = run_robot("tcp://127.0.0.1:9", tmp_path, process, "--steps", "23", "--set", "link.max_message_mb=0.0005")
    out, err = capsys.readouterr()
    assert code == 2, err
    assert "Traceback" not in err and not out
    match = re.search(r"link\.max_message_mb: expected at least ([0-9.]+) \(one chunk of this robot: 5 steps, "
                      r"(\d+) bytes; its hello: (\d+) bytes\), found 0\.0005", err)
    assert match, err
    minimum, size = float(match[1]), max(int(match[2]), int(match[3]))
    assert 0.0005 * 2**20 < size <= minimum * 2**20
    assert not (tmp_path / "spool").exists()  # refused before the link started
    with learner(tmp_path, max_message_mb=minimum) as server:
        code = run_robot(server.endpoint, tmp_path, process, "--steps", "23", "--set", f"link.max_message_mb={minimum}")
        out, err = capsys.readouterr()
        assert code == 0, err
        assert server.replay.stats()["streams"][ROBOT]["steps"] == 23
        assert server.rejects.total == 0
