"""LinkProcess (the robot link in a child process) against a real LinkServer + Replay: real 'spawn' processes,
real zmq on loopback, real spool files, no mocks.

Timings are shortened (heartbeat 0.1 s); every wait is for an event with a generous deadline, never a speed claim.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from link_helpers import DEADLINE, HELLO, ROBOT, learner, wait_for

from core.link.protocol import Message, ProtocolError, decode, encode
from core.link.security import ClientKeys, LinkSecurityError
from core.weights import weights_to_bytes
from learner.link.server import LinkServer
from robot.demo import free_port
from robot.link.contract import ChunkTooBig, LinkError, LinkRefused, Weights
from robot.link.process import LinkProcess
from robot.link.spool import Spool, SpoolFull

T = 5
REPO = Path(__file__).resolve().parents[2]


def chunk(i: int) -> dict[str, np.ndarray]:
    """Chunk number i; its `time` values identify it."""
    return {
        "obs": np.full((T, 3), i, np.float32),
        "image": np.full((T, 8, 8, 3), i % 256, np.uint8),
        "action": np.zeros((T, 2), np.float32),
        "reward": np.full(T, 0.5 * i, np.float32),
        "is_first": (np.arange(T) == 0) & (i == 0),
        "is_last": np.zeros(T, bool),
        "is_terminal": np.zeros(T, bool),
        "policy_version": np.zeros(T, np.int64),
        "time": i * T + np.arange(T, dtype=np.float64),
    }




def make_link(address: str, spool_dir: Path, max_bytes: int = 1 << 24, **kw: Any) -> LinkProcess:
    opts = {"heartbeat_s": 0.1, "lost_after_s": 5.0, "resend_after_s": 2.0} | kw
    return LinkProcess(address, ROBOT, (spool_dir, max_bytes), HELLO, **opts)


@contextmanager
def started(address: str, spool_dir: Path, **kw: Any) -> Iterator[LinkProcess]:
    link = make_link(address, spool_dir, **kw)
    try:
        link.start()
        yield link
    finally:
        link.close(timeout=10.0)


def delivered(server: LinkServer, n: int) -> bool:
    """The learner holds chunks 0..n-1 of ROBOT, complete, and nothing more."""
    return server.replay.source_position(ROBOT) == (n - 1, T - 1, T)


def assert_exactly_once(server: LinkServer, n: int) -> None:
    assert server.replay.stats()["streams"][ROBOT]["steps"] == n * T
    assert server.replay.source_position(ROBOT) == (n - 1, T - 1, T)
    assert [row["duplicates"] for row in server.robot_table() if row["robot"] == ROBOT] == [0]
    assert server.rejects.total == 0


def gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaped yet counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def test_chunks_reach_the_learner_exactly_once_and_the_spool_empties(tmp_path: Path) -> None:
    with learner(tmp_path) as server, started(server.endpoint, tmp_path / "spool") as link:
        assert link.pid is not None and link.pid != os.getpid() and len(link.run_id) == 32
        os.kill(link.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole group: the child leaves it to us
        link.set_stats(version=np.int64(3), steps=60)
        for i in range(4):
            link.submit(chunk(i))
        wait_for(lambda: link.status().acked == 3 and link.status().spool_count == 0,
                 "4 chunks acknowledged and the child's spool empty")
        assert delivered(server, 4)
        assert_exactly_once(server, 4)
        assert server.robots[ROBOT].run == link.run_id
        wait_for(lambda: server.robot_table()[0]["version"] == 3, "the stats reach the learner in a heartbeat")
        status = link.status()
        assert status.connected and status.server == server.server_id
        assert (status.queued, status.spool_bytes, status.malformed, status.spool_error) == (0, 0, 0, "")
        assert status.last_heard is not None and status.last_error == ""
    assert link.exitcode == 0
    assert Spool(tmp_path / "spool", 1 << 24).next_seq == 4


def take(link: LinkProcess, what: str) -> Weights:
    """The next weights handed over by take_weights (polled)."""
    got: list[Weights] = []
    wait_for(lambda: (w := link.take_weights()) is not None and not got.append(w), what)
    return got[0]


def _blob(value: float) -> bytes:
    return weights_to_bytes({"x": torch.full((3,), value), "b": torch.zeros(2)}, {"source": "test"})


class _BornInterrupted(multiprocessing.get_context("spawn").Process):
    """A spawned child that gets SIGINT the moment it exists: still importing, long before its own
    code could ignore the signal (a Ctrl-C while the robot starts)."""

    def start(self) -> None:
        super().start()
        os.kill(self.pid, signal.SIGINT)


class _BornKilled(multiprocessing.get_context("spawn").Process):
    """A spawned child killed outright the moment it exists (out of memory, a crash at import)."""

    def start(self) -> None:
        super().start()
        os.kill(self.pid, signal.SIGKILL)


class _CtrlCAtBirth:
    """The spawn context with children of the given class."""

    def __init__(self, ctx: Any, process: type = _BornInterrupted) -> None:
        self.ctx = ctx
        self.Process = process

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ctx, name)


def test_ctrl_c_while_the_child_starts_leaves_it_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import robot.link.process as link_process

    monkeypatch.setattr(link_process, "_CTX", _CtrlCAtBirth(link_process._CTX))
    handler = signal.getsignal(signal.SIGINT)
    with learner(tmp_path) as server, started(server.endpoint, tmp_path / "spool") as link:
        assert signal.getsignal(signal.SIGINT) is handler  # ours is back once the child exists
        link.submit(chunk(0))
        wait_for(lambda: link.status().acked == 0, "the chunk acknowledged")
        assert delivered(server, 1)
    assert link.exitcode == 0


def test_reverie_robot_run_reports_a_link_that_cannot_start_and_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import robot.link.process as link_process
    from robot.cli import main as robot_main

    monkeypatch.setattr(link_process, "_CTX", _CtrlCAtBirth(link_process._CTX, _BornKilled))
    config = Path(__file__).resolve().parents[2] / "hardware_configs" / "sim_arm_reach.yaml"
    code = robot_main(["run", "--config", str(config), "--learner", f"tcp://127.0.0.1:{free_port()}",
                       "--spool", str(tmp_path / "spool"), "--steps", "5", "--set", "camera.enabled=false"])
    err = capsys.readouterr().err
    assert code == 2 and "link process died while starting (exit code -9" in err, err
    assert "Traceback" not in err


def test_weights_published_by_the_learner_arrive_through_take_weights(tmp_path: Path) -> None:
    with learner(tmp_path) as server, started(server.endpoint, tmp_path / "spool") as link:
        wait_for(lambda: link.status().connected, "connected")
        assert link.take_weights() is None
        blob = _blob(1.0)
        before = time.time()
        server.publish(blob, version=1, step=10)
        taken = take(link, "version 1 verified in the child and handed over")
        assert (taken.version, taken.step, taken.blob) == (1, 10, blob)
        assert link.status().weights_version == 1
        assert before <= taken.received <= time.time()
        assert link.take_weights() is None  # taken once
        server.publish(b"not a weights blob", version=2, step=20)
        wait_for(lambda: link.status().weights_rejected == 1, "garbage refused by the child's checks")
        assert "version 2" in link.status().last_rejection and link.take_weights() is None
        newer = _blob(5.0)
        server.publish(newer, version=3, step=30)
        taken = take(link, "version 3 verified and handed over")
        assert (taken.version, taken.step, taken.blob) == (3, 30, newer)


def test_learner_down_chunks_spool_in_the_child_then_arrive(tmp_path: Path) -> None:
    port = free_port()
    with started(f"tcp://127.0.0.1:{port}", tmp_path / "spool") as link:
        for i in range(4):
            link.submit(chunk(i))
        wait_for(lambda: link.status().spool_count == 4, "4 chunks spooled by the child with no learner")
        assert not link.status().connected and link.status().queued == 0
        assert Spool(tmp_path / "spool", 1 << 24).pending() == [0, 1, 2, 3]  # on disk, read by another Spool
        with learner(tmp_path, port=port) as server:
            wait_for(lambda: link.status().acked == 3 and link.status().spool_count == 0,
                     "spooled chunks delivered once the learner is up")
            assert_exactly_once(server, 4)


def _chunk_file_size(tmp_path: Path) -> int:
    probe = Spool(tmp_path / "probe", 1 << 24)
    probe.put(0, encode(Message("steps", ROBOT, "f" * 32, 0, arrays=chunk(0))))
    return probe.bytes


def test_spool_full_raises_spool_full_from_submit_and_nothing_is_dropped(tmp_path: Path) -> None:
    size = _chunk_file_size(tmp_path)
    limit = 2 * size + size // 2  # room for two chunks
    port = free_port()
    with started(f"tcp://127.0.0.1:{port}", tmp_path / "spool", max_bytes=limit) as link:
        for i in range(3):
            link.submit(chunk(i))
        wait_for(lambda: link.status().spool_error != "", "the third chunk fails to spool in the child")
        assert (link.status().spool_count, link.status().queued) == (2, 1)
        with pytest.raises(SpoolFull) as info:
            link.submit(chunk(3))
        assert str(tmp_path / "spool") in str(info.value) and str(limit) in str(info.value)
        assert "wait in memory" in str(info.value)
        wait_for(lambda: link.status().queued == 2, "both chunks wait in the child's memory")
        with learner(tmp_path, port=port) as server:
            wait_for(lambda: link.status().acked == 3, "queued chunks spooled and delivered once acks free space")
            assert_exactly_once(server, 4)
            assert link.status().spool_error == ""
            link.submit(chunk(4))  # no longer raises


def test_chunks_that_did_not_fit_a_full_spool_are_written_when_the_link_closes(tmp_path: Path) -> None:
    """The robot stops on SpoolFull; the chunks recorded until then (in the child's memory, the pipe, here)
    are written on the way out, past the spool's limit: experience is never dropped."""
    size = _chunk_file_size(tmp_path)
    limit = 2 * size + size // 2  # room for two chunks
    link = make_link(f"tcp://127.0.0.1:{free_port()}", tmp_path / "spool", max_bytes=limit)  # nobody acknowledges
    link.start()
    try:
        for i in range(3):
            link.submit(chunk(i))
        wait_for(lambda: link.status().spool_error != "", "the third chunk fails to spool in the child")
        for i in (3, 4):  # what the robot records while it stops
            with pytest.raises(SpoolFull):
                link.submit(chunk(i))
    finally:
        link.close(timeout=10.0)
    assert link.exitcode == 0
    spool = Spool(tmp_path / "spool", limit)
    assert spool.pending() == [0, 1, 2, 3, 4]
    for i in range(5):
        np.testing.assert_array_equal(decode(spool.load(i)).arrays["time"], chunk(i)["time"])
    assert link.status().queued == 0


def test_a_chunk_over_the_message_limit_is_spooled_and_the_link_process_lives_on(tmp_path: Path) -> None:
    """A link.max_message_mb below one chunk (the config check normally refuses it): the chunk is spooled, not
    sent, and the child survives; a later link with a large enough limit delivers it."""
    too_big = sum(memoryview(f).nbytes for f in encode(Message("steps", ROBOT, "f" * 32, 0, arrays=chunk(0)))) - 1
    with learner(tmp_path) as server:
        with started(server.endpoint, tmp_path / "spool", max_bytes=1 << 24) as probe:  # learner's layout set
            wait_for(lambda: probe.status().connected, "connected")
        link = LinkProcess(server.endpoint, ROBOT, (tmp_path / "spool", 1 << 24), HELLO, heartbeat_s=0.1,
                           lost_after_s=5.0, max_bytes=too_big)
        link.start()
        try:
            wait_for(lambda: link.status().connected, "connected")
            with pytest.raises(ChunkTooBig, match=rf"exceeds link.max_message_mb \({too_big} bytes\)"):
                link.submit(chunk(0))
            wait_for(lambda: "not sent" in link.status().last_error, "the child spools it and declines to send it")
            assert link.status().spool_count == 1 and link.exitcode is None
        finally:
            link.close(timeout=10.0)
        assert link.exitcode == 0
        assert Spool(tmp_path / "spool", 1 << 24).pending() == [0]
        with started(server.endpoint, tmp_path / "spool") as again:
            wait_for(lambda: again.status().acked == 0 and again.status().spool_count == 0, "delivered later")
        assert_exactly_once(server, 1)


def test_a_refusal_reaches_the_parent_with_the_learners_reason(tmp_path: Path) -> None:
    with learner(tmp_path) as server:
        with started(server.endpoint, tmp_path / "first") as first:  # fixes the run's step layout
            wait_for(lambda: first.status().connected, "connected")
        other = {**HELLO, "spec": {**HELLO["spec"], "obs": ["float32", [4]]}}
        link = LinkProcess(server.endpoint, "other-robot", (tmp_path / "spool", 1 << 24), other, heartbeat_s=0.1)
        link.start()
        try:
            wait_for(lambda: link.status().refused != "", "the refusal reaches the parent")
            assert link.status().refused.startswith("step layout differs from the run's: obs:")
            assert not link.status().connected
            arrays = {**chunk(0), "obs": np.zeros((T, 4), np.float32)}
            with pytest.raises(LinkRefused, match="step layout differs"):
                link.submit(arrays)
        finally:
            link.close(timeout=10.0)
        assert link.exitcode == 0 and Spool(tmp_path / "spool", 1 << 24).pending() == [0]


def test_close_leaves_pending_chunks_in_the_spool_for_the_next_link(tmp_path: Path) -> None:
    port = free_port()
    link = make_link(f"tcp://127.0.0.1:{port}", tmp_path / "spool")
    link.start()
    try:
        for i in range(3):
            link.submit(chunk(i))  # close at once: they may still be here, in the pipe or in the child's memory
    finally:
        link.close(timeout=10.0)
    assert link.exitcode == 0
    assert Spool(tmp_path / "spool", 1 << 24).pending() == [0, 1, 2]
    assert link.status().queued == 0
    with pytest.raises(LinkError, match="after close"):
        link.submit(chunk(3))
    with learner(tmp_path, port=port) as server, started(server.endpoint, tmp_path / "spool") as again:
        wait_for(lambda: again.status().acked == 2 and again.status().spool_count == 0,
                 "the next link process sends what the first one spooled")
        assert_exactly_once(server, 3)


def test_killed_link_process_surfaces_in_submit_and_close_keeps_the_rest(tmp_path: Path) -> None:
    link = make_link(f"tcp://127.0.0.1:{free_port()}", tmp_path / "spool")
    link.start()
    try:
        link.submit(chunk(0))
        wait_for(lambda: link.status().spool_count == 1, "chunk 0 spooled")
        assert link.pid is not None
        os.kill(link.pid, signal.SIGKILL)
        wait_for(lambda: link.exitcode is not None, "the link process reaped")
        with pytest.raises(LinkError) as info:
            link.submit(chunk(1))
        text = str(info.value)
        assert ROBOT in text and "link process" in text and "died" in text and "-9" in text and "SIGKILL" in text
        assert not link.status().connected
    finally:
        link.close(timeout=5.0)
    assert link.exitcode == -signal.SIGKILL
    assert Spool(tmp_path / "spool", 1 << 24).pending() == [0, 1]  # chunk 1 was spooled by close() here


def test_link_process_exits_when_its_parent_dies(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        import time

        from link_helpers import HELLO, ROBOT
        from robot.link.process import LinkProcess

        if __name__ == "__main__":  # 'spawn' imports this file again in the child
            link = LinkProcess("tcp://127.0.0.1:{free_port()}", ROBOT, ({str(tmp_path / "spool")!r}, 1 << 24), HELLO)
            link.start()
            print(link.pid, flush=True)
            time.sleep(600)
    """))
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    child = 0
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line.strip().isdigit(), f"parent script printed {line!r}, exit code {parent.poll()}"
        child = int(line)
        assert not gone(child)
        parent.kill()
        parent.wait(DEADLINE)
        wait_for(lambda: gone(child), "the link process exits after its parent was killed")
    finally:
        parent.kill()
        parent.wait(DEADLINE)
        if child and not gone(child):
            os.kill(child, signal.SIGKILL)


def test_start_errors_are_raised_by_start(tmp_path: Path) -> None:
    keys = ClientKeys(tmp_path / "missing.key_secret", tmp_path / "learner.key")
    link = make_link(f"tcp://127.0.0.1:{free_port()}", tmp_path / "spool", keys=keys)
    with pytest.raises(LinkSecurityError, match="missing.key_secret"):
        link.start()
    assert link.pid is None
    link.close()


def test_bad_inputs_are_refused_at_the_caller_and_close_without_start_spools(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="robot id"):
        LinkProcess("tcp://127.0.0.1:1", "no spaces allowed", (tmp_path / "spool", 1 << 24), HELLO)
    with pytest.raises(ValueError, match="hello"):
        LinkProcess("tcp://127.0.0.1:1", ROBOT, (tmp_path / "spool", 1 << 24), {"task": "t", "hz": 1.0})
    with pytest.raises(ValueError, match="heartbeat_s"):
        make_link("tcp://127.0.0.1:1", tmp_path / "spool", heartbeat_s=0)
    link = make_link("tcp://127.0.0.1:1", tmp_path / "spool")
    bad = chunk(0)
    del bad["time"]
    with pytest.raises(ProtocolError, match="time"):
        link.submit(bad)
    with pytest.raises(ValueError, match="when"):
        link.set_stats(when=object())
    assert link.status().queued == 0
    link.submit(chunk(0))
    link.submit(chunk(1))
    assert link.status().queued == 2
    link.close()  # never started: spooled in this process
    assert Spool(tmp_path / "spool", 1 << 24).pending() == [0, 1]
    assert link.status().queued == 0 and link.status().spool_count == 2
