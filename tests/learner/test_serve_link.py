"""The serve loop's side of the link, in process over real loopback sockets: a layout the agent cannot train
is refused before it becomes the run's, heartbeat values reach summary.json as JSON, and the status table
stays short whatever peers send (issue 20 items 8, 10 and 15); a restarted serve reports only the episodes
that finish after it started (issue 23 item 3)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from link_helpers import SPEC, RawRobot, serve_with_robot, wait_for

from core.config import load_config
from learner.cli import main as learner_main
from learner.link.server import SPEC_FILE
from learner.metrics import read_metrics
from learner.serve import STATUS_ROBOTS, Server
from robot.demo import free_port

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "hardware_configs" / "sim_arm_reach.yaml"  # its agent has a CNN: images must be 16k x 16k
TINY = ["dreamer.size=tiny", "link.heartbeat_s=0.1"]
GOOD_SPEC = SPEC | {"image": ["uint8", [16, 16, 3]]}
BAD_SPEC = SPEC  # an 8x8 image: the CNN halves it four times


def make_server(logdir: Path) -> Server:
    return Server(load_config(CONFIG, TINY), logdir, bind="tcp://127.0.0.1:*", progress=False)


@contextmanager
def serving(logdir: Path) -> Iterator[Server]:
    """A Server whose link thread runs, without the training loop."""
    server = make_server(logdir)
    server.link.start()
    try:
        yield server
        server.link.check()
    finally:
        server.link.close()
        server.replay.close()
        server.logger.close()


def test_first_hello_with_a_layout_the_agent_cannot_build_is_refused_and_not_saved(tmp_path: Path) -> None:
    """Item 8: an unbuildable first layout was adopted and saved, so the learner crashed at every start."""
    logdir = tmp_path / "run"
    with serving(logdir) as server, RawRobot(server.link.endpoint, "cam-1") as robot:
        reply = robot.hello(spec=BAD_SPEC)
        assert reply.kind == "bye" and "8x8" in reply.meta["reason"], reply.meta
        assert server.link.spec is None and not (logdir / SPEC_FILE).exists()
        assert robot.hello(spec=SPEC | {"action": ["float32", [2, 2]]}).kind == "bye"  # the agent acts with a vector
        assert robot.hello(spec=GOOD_SPEC).kind == "welcome"
        assert (logdir / SPEC_FILE).is_file() and server.link.spec is not None
    make_server(logdir).replay.close()  # the saved layout passes the same check at the next start


@pytest.mark.parametrize("saved", [json.dumps({"spec": BAD_SPEC, "discrete": False, "task": "t", "hz": 20.0}),
                                   "{not json"], ids=["unbuildable", "unreadable"])
def test_a_saved_layout_that_cannot_be_trained_is_a_one_line_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], saved: str) -> None:
    logdir = tmp_path / "run"
    logdir.mkdir()
    (logdir / SPEC_FILE).write_text(saved)
    code = learner_main(["serve", "--config", str(CONFIG), "--logdir", str(logdir), "--quiet", "--duration", "5",
                         "--bind", f"tcp://127.0.0.1:{free_port()}", *[a for s in TINY for a in ("--set", s)]])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(logdir / SPEC_FILE) in lines[0] and "Traceback" not in err, err


def test_heartbeat_bytes_do_not_stop_the_summary_being_written(tmp_path: Path) -> None:
    """Item 10: msgpack bin values in a heartbeat made summary.json unwritable at shutdown (exit 1)."""
    server = make_server(tmp_path / "run")

    def robot(server: Server) -> None:
        with RawRobot(server.link.endpoint, "hb-1") as peer:
            assert peer.hello(spec=GOOD_SPEC).kind == "welcome"
            peer.say("heartbeat", meta={"version": b"\x00\x01", "spool_count": b"\xff" * 3, "steps": 5})
            wait_for(lambda: "hb-1" in server.link.robots and server.link.robots["hb-1"].stats, "the heartbeat")

    summary = serve_with_robot(server, robot)
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary)) and written["stopped"] == "test done"
    (row,) = written["robots"]
    assert row["robot"] == "hb-1" and row["version"] == "0x0001" and isinstance(row["spool"], str)


def test_status_table_lists_a_bounded_number_of_robots_with_short_values(tmp_path: Path) -> None:
    """Item 15: 200 made-up robot ids with long heartbeat values made 36 MB of log in 32 s."""
    robots = STATUS_ROBOTS + 25
    with serving(tmp_path / "run") as server, RawRobot(server.link.endpoint) as peer:
        for i in range(robots):
            peer.robot = f"fake-{i:03d}"
            assert peer.hello(spec=GOOD_SPEC).kind == "welcome"
            peer.say("heartbeat", meta={"spool_count": "9" * 5000 + "\nforged line", "version": i})
        wait_for(lambda: all(r.stats for r in server.link.robots.values()) and len(server.link.robots) == robots,
                 "every heartbeat received")
        text = server.status_line()
    lines = text.splitlines()
    assert len(lines) == 1 + STATUS_ROBOTS + 1, text
    assert "25 more" in lines[-1]
    assert max(map(len, lines)) < 200 and "forged line" not in text
    assert f"fake-{robots - 1:03d}" in text and "fake-000" not in text  # the most recently heard are shown


PROPRIO = ROOT / "hardware_configs" / "sim_arm_reach_proprio.yaml"
ARM_SPEC = {"joint_pos": ["float32", [3]], "action": ["float32", [2]], "reward": ["float32", []],
            "is_first": ["bool", []], "is_last": ["bool", []], "is_terminal": ["bool", []]}


def _serve_episodes(logdir: Path, returns: list[float]) -> dict:
    """One `serve` run in process (real link, real replay, real agent): a robot sends 10-step episodes with
    these returns in one chunk; once the replay holds them, the run is stopped. Its summary."""
    # No update is needed here: the prefill is never reached.
    cfg = load_config(PROPRIO, ["train.prefill=100000", "link.heartbeat_s=0.1"])
    server = Server(cfg, logdir, bind="tcp://127.0.0.1:*", progress=False)

    def robot(server: Server) -> None:
        with RawRobot(server.link.endpoint, "arm-1") as peer:
            welcome = peer.hello(spec=ARM_SPEC, task="arm_reach", hz=10.0)
            assert welcome.kind == "welcome", welcome.meta
            before = server.replay.stats()["totals"]["episodes"]
            rows = np.arange(10 * len(returns)) % 10
            peer.steps(welcome.meta["next_seq"], {
                "joint_pos": np.zeros((rows.size, 3), np.float32), "action": np.zeros((rows.size, 2), np.float32),
                "reward": np.repeat(np.float32(returns) / 10, 10), "is_first": rows == 0, "is_last": rows == 9,
                "is_terminal": np.zeros(rows.size, bool), "policy_version": np.zeros(rows.size, np.int64),
                "time": np.arange(rows.size, dtype=np.float64)})
            wait_for(lambda: server.replay.stats()["totals"]["episodes"] == before + len(returns),
                     "the episodes stored")

    summary = serve_with_robot(server, robot)
    return summary


def test_a_resumed_serve_reports_the_returns_of_its_new_episodes_only(tmp_path: Path) -> None:
    """Issue 23 item 3: after a restart the first `train/return` averaged every episode in the replay, so
    each re-run of `make demo` dragged the curve back to the early returns (-1.2 to -3.0)."""
    logdir = tmp_path / "run"
    first = _serve_episodes(logdir, [-5.0] * 4)
    rows = read_metrics(logdir)
    assert [r["train/return"] for r in rows if "train/return" in r] == [-5.0]
    resumed = _serve_episodes(logdir, [-1.25, -3.75])
    after = [r["train/return"] for r in read_metrics(logdir)[len(rows):] if "train/return" in r]
    assert after == [-2.5], after  # the mean of the two new episodes, not of all six
    # The summary's episode count and means span the restart (they are checkpointed).
    assert first["episodes"] == 4 and resumed["episodes"] == 6
    assert first["received_steps"] == 40 and resumed["received_steps"] == 60  # the final checkpoint's step
    assert resumed["return_first10"] == resumed["return_last10"] == pytest.approx((4 * -5.0 - 5.0) / 6)
