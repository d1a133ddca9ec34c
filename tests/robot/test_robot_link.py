"""RobotLink against a test-owned learner stand-in: real zmq sockets on loopback, real spool files, no mocks.

Timings are shortened (heartbeat 0.1 s); every wait is for an event with a generous deadline, never a speed claim.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
import zmq
from link_helpers import DEADLINE, HELLO, ROBOT, SPEC, wait_for

from core.config.link import LinkConfig
from core.link.protocol import Message, check_steps, decode, encode, spec_of
from core.weights import weights_to_bytes
from robot.demo import free_port
from robot.link.contract import ChunkTooBig, LinkError, LinkRefused
from robot.link.factory import make_link
from robot.link.process import LinkProcess
from robot.link.spool import Spool, SpoolFull
from robot.link.thread import RobotLink

T = 5


def chunk(i: int, steps: int = T, image: tuple[int, int, int] = (8, 8, 3)) -> dict[str, np.ndarray]:
    """Chunk number i; its `time` values identify it."""
    return {
        "obs": np.full((steps, 3), i, np.float32),
        "image": np.full((steps, *image), i % 256, np.uint8),
        "action": np.zeros((steps, 2), np.float32),
        "reward": np.full(steps, 0.5 * i, np.float32),
        "is_first": np.arange(steps) == 0,
        "is_last": np.zeros(steps, bool),
        "is_terminal": np.zeros(steps, bool),
        "policy_version": np.zeros(steps, np.int64),
        "time": i * steps + np.arange(steps, dtype=np.float64),
    }




class StandIn:
    """A learner stand-in: a ROUTER bound on loopback, driven from the test thread by `serve`.

    It answers hello with welcome (next_seq = first seq it lacks), stores steps by seq (checked against the
    hello spec), acks the contiguous prefix when `acks`, and echoes heartbeats, all while `replies`.
    """

    def __init__(self, server: str, port: int | None = None, stored: dict | None = None, acks: bool = True,
                 rcvhwm: int = 1000) -> None:
        self.server = server
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        if rcvhwm < 10:
            self.sock.setsockopt(zmq.RCVBUF, 4096)
        try:
            self.sock.bind(f"tcp://127.0.0.1:{port if port is not None else '*'}")
        except BaseException:
            self.close()
            raise
        self.port = int(self.sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        self.stored: dict[int, dict[str, np.ndarray]] = dict(stored or {})
        self.received: list[int] = []  # steps seqs in arrival order, duplicates included
        self.unsolicited: list[int] = []  # steps seqs that arrived before any hello
        self.kinds: list[str] = []
        self.heartbeats: list[dict] = []
        self.peer: bytes | None = None
        self.spec: dict | None = None
        self.acks = acks
        self.replies = True

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()

    def contiguous(self) -> int:
        n = 0
        while n in self.stored:
            n += 1
        return n

    def send(self, kind: str, seq: int = 0, meta: dict | None = None, arrays: dict | None = None) -> None:
        self.send_raw(encode(Message(kind, "", self.server, seq, meta or {}, arrays or {})))

    def send_raw(self, frames: list) -> None:
        assert self.peer is not None, "no robot has spoken yet"
        self.sock.send_multipart([self.peer, *frames], copy=False)

    def send_weights(self, version: int, blob: bytes, sha: str | None = None) -> None:
        meta = {"step": 10 * version, "sha256": sha or hashlib.sha256(blob).hexdigest(), "dtype": "float32"}
        self.send("weights", version, meta, {"blob": np.frombuffer(blob, np.uint8)})

    def serve(self, until: Callable[[], bool], what: str, deadline: float = DEADLINE) -> None:
        end = time.monotonic() + deadline
        while not until():
            if time.monotonic() > end:
                raise AssertionError(f"stand-in {self.server}: not within {deadline} s: {what}; "
                                     f"last kinds {self.kinds[-6:]}, stored {sorted(self.stored)}")
            if self.sock.poll(20):
                ident, *frames = self.sock.recv_multipart(copy=False)
                self._handle(ident.bytes, decode(frames))

    def _handle(self, ident: bytes, msg: Message) -> None:
        self.peer = ident
        self.kinds.append(msg.kind)
        assert msg.robot == ROBOT
        if msg.kind == "hello":
            self.spec = spec_of(msg.meta["spec"])
        elif msg.kind == "steps":
            if self.spec is None:  # no session yet (this learner restarted): ignored, as a learner would
                self.unsolicited.append(msg.seq)
                return
            check_steps(msg, self.spec)
            self.received.append(msg.seq)
            self.stored.setdefault(msg.seq, {k: np.array(v) for k, v in msg.arrays.items()})
        elif msg.kind == "heartbeat":
            self.heartbeats.append(dict(msg.meta))
        if not self.replies:
            return
        if msg.kind == "hello":
            self.send("welcome", meta={"server": self.server, "next_seq": self.contiguous(), "version": 0})
        elif msg.kind == "steps" and self.acks and self.contiguous() > 0:
            self.send("ack", self.contiguous() - 1)
        elif msg.kind == "heartbeat":
            self.send("heartbeat")


@contextmanager
def stand_in(server: str, **kw) -> Iterator[StandIn]:
    learner = StandIn(server, **kw)
    try:
        yield learner
    finally:
        learner.close()


@contextmanager
def robot_link(spool: Spool, port: int, **kw) -> Iterator[RobotLink]:
    opts = {"heartbeat_s": 0.1, "lost_after_s": 1.5, "resend_after_s": 2.0} | kw
    link = RobotLink(f"tcp://127.0.0.1:{port}", ROBOT, spool, HELLO, **opts)
    try:
        link.start()
        yield link
    finally:
        link.close(timeout=10.0)


def assert_same(stored: dict[str, np.ndarray], i: int) -> None:
    expected = chunk(i)
    assert sorted(stored) == sorted(expected)
    for name, arr in expected.items():
        np.testing.assert_array_equal(stored[name], arr, err_msg=f"chunk {i} array {name}")


def test_hello_welcome_steps_ack_empties_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 1 << 24)
    with stand_in("learner-A") as learner, robot_link(spool, learner.port) as link:
        link.set_stats(steps_per_s=np.float32(19.5), version_acting=0)
        for i in range(3):
            link.submit(chunk(i))
        learner.serve(lambda: link.status().acked == 2, "3 chunks stored and acknowledged")
        assert learner.kinds[0] == "hello"
        assert learner.peer == f"{ROBOT}/{link.run_id}".encode()
        for i in range(3):
            assert_same(learner.stored[i], i)
        learner.serve(lambda: any("steps_per_s" in h for h in learner.heartbeats), "a heartbeat with the stats")
        beat = next(h for h in learner.heartbeats if "steps_per_s" in h)
        assert beat["steps_per_s"] == pytest.approx(19.5) and beat["version_acting"] == 0
        status = link.status()
        assert status.connected and status.server == "learner-A" and status.acked == 2
        assert (status.spool_count, status.spool_bytes, status.queued, status.malformed) == (0, 0, 0, 0)
        assert status.last_heard is not None and status.last_error == ""
    assert spool.next_seq == 3 and Spool(tmp_path / "spool", 1 << 24).next_seq == 3


def test_unacknowledged_chunk_is_resent(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 1 << 24)
    with stand_in("learner-A", acks=False) as learner, robot_link(spool, learner.port, resend_after_s=0.5) as link:
        link.submit(chunk(0))
        learner.serve(lambda: learner.received.count(0) >= 2, "seq 0 sent again while unacknowledged")
        assert link.status().spool_count == 1  # not acknowledged: still on disk
        learner.send("ack", 0)
        learner.serve(lambda: link.status().acked == 0, "the ack arrives")
        assert link.status().spool_count == 0


def test_learner_down_at_start_then_delivered(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 1 << 24)
    port = free_port()
    with robot_link(spool, port) as link:
        for i in range(4):
            link.submit(chunk(i))
        wait_for(lambda: link.status().spool_count == 4, "4 chunks spooled with no learner")
        assert not link.status().connected and spool.pending() == [0, 1, 2, 3]
        with stand_in("learner-late", port=port) as learner:
            learner.serve(lambda: link.status().acked == 3,
                          "spooled chunks delivered once the learner appears")
            assert learner.received[:4] == [0, 1, 2, 3]  # oldest first
            for i in range(4):
                assert_same(learner.stored[i], i)


def test_learner_restart_gets_every_unacknowledged_chunk(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 1 << 24)
    first = StandIn("learner-A", acks=False)
    try:
        port = first.port
        with robot_link(spool, port) as link:
            for i in range(3):
                link.submit(chunk(i))
            first.serve(lambda: first.contiguous() == 3, "3 chunks reach the first learner")
            first.send("ack", 0)  # only seq 0 was made durable before the crash
            first.serve(lambda: link.status().acked == 0, "ack of seq 0 arrives")
            first.close()
            durable = {0: first.stored[0]}
            for i in range(3, 5):
                link.submit(chunk(i))
            with stand_in("learner-B", port=port, stored=durable) as second:
                second.serve(lambda: link.status().acked == 4,
                             "the restarted learner gets everything unacknowledged")
                assert sorted(set(second.received)) == [1, 2, 3, 4]  # seq 0 was acked: not resent
                assert first.received[:3] == [0, 1, 2]
                for i in range(5):
                    assert_same(second.stored[i], i)
                assert link.status().server == "learner-B"
    finally:
        if not first.sock.closed:
            first.close()


def test_lost_learner_is_detected_and_hello_resumes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool = Spool(tmp_path / "spool", 1 << 24)
    caplog.set_level(logging.INFO, logger="robot.link")
    with stand_in("learner-A") as learner, robot_link(spool, learner.port, lost_after_s=0.5) as link:
        learner.serve(lambda: link.status().connected, "connected")
        wait_for(lambda: not link.status().connected, "connected flips to False while the learner is silent")
        hellos = learner.kinds.count("hello")
        link.submit(chunk(0))  # keeps spooling while lost
        wait_for(lambda: link.status().spool_count == 1, "chunk spooled while the learner is lost")
        learner.serve(lambda: learner.kinds.count("hello") > hellos and link.status().acked == 0,
                      "hello again, then the spooled chunk delivered")
        lost = [r for r in caplog.records if "learner lost" in r.getMessage()]
        assert len(lost) == 1 and lost[0].levelno == logging.WARNING


def _blob(tensor: torch.Tensor) -> bytes:
    return weights_to_bytes({"x": tensor, "b": torch.zeros(2)}, {"source": "test"})


def test_weights_are_verified_before_the_robot_can_take_them(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 1 << 24)
    good1, good5, good4 = _blob(torch.ones(3)), _blob(torch.full((3,), 5.0)), _blob(torch.full((3,), 4.0))
    with stand_in("learner-A") as learner, robot_link(spool, learner.port) as link:
        learner.serve(lambda: link.status().connected, "connected")
        assert link.take_weights() is None
        learner.send_weights(1, good1)
        learner.serve(lambda: link.status().weights_version == 1, "version 1 accepted")
        taken = link.take_weights()
        assert taken is not None and (taken.version, taken.step, taken.blob) == (1, 10, good1)
        assert link.take_weights() is None  # taken once

        def refused(n: int) -> Callable[[], bool]:
            return lambda: link.status().weights_rejected == n

        learner.send_weights(2, _blob(torch.ones(3)), sha=hashlib.sha256(b"something else").hexdigest())
        learner.serve(refused(1), "bad checksum refused")
        reason = link.status().last_rejection
        assert "version 2" in reason and "sha256" in reason

        learner.send_weights(3, _blob(torch.tensor([1.0, float("nan"), 0.0])))
        learner.serve(refused(2), "NaN tensor refused")
        reason = link.status().last_rejection
        assert "version 3" in reason and "'x'" in reason and "NaN" in reason

        learner.send_weights(4, b"not safetensors at all")
        learner.serve(refused(3), "garbage blob refused")
        assert "version 4" in link.status().last_rejection and "not a weights blob" in link.status().last_rejection

        learner.send_weights(5, good5)
        learner.send_weights(4, good4)  # older than what the robot has
        learner.serve(refused(4), "older version refused")
        status = link.status()
        assert "version 4" in status.last_rejection and "not newer" in status.last_rejection
        assert status.weights_version == 5
        taken = link.take_weights()
        assert taken is not None and taken.version == 5 and taken.blob == good5
        assert link.take_weights() is None


def test_malformed_messages_do_not_kill_the_link(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 1 << 24)
    with stand_in("learner-A", acks=False) as learner, robot_link(spool, learner.port) as link:
        learner.serve(lambda: link.status().connected, "connected")
        header = {"v": 1, "k": "ack", "r": "", "u": "learner-A", "s": 0, "m": {}, "a": [["x", "float32", [4]]]}
        learner.send_raw([b"\xc1 definitely not msgpack"])
        learner.send_raw([msgpack.packb({**header, "a": []}, use_bin_type=True) + b"trailing"])
        learner.send_raw([msgpack.packb(header, use_bin_type=True)])  # announces an array frame that is missing
        learner.send_raw([msgpack.packb({**header, "k": "format-disk"}, use_bin_type=True), b"\0" * 16])
        learner.send_raw(encode(Message("hello", ROBOT, "learner-A", 0, HELLO)))  # valid, but no learner sends it
        learner.serve(lambda: link.status().malformed == 5, "5 malformed messages counted")
        link.submit(chunk(0))
        learner.serve(lambda: learner.contiguous() == 1, "chunk still delivered")
        learner.send("ack", 0)
        learner.serve(lambda: link.status().acked == 0, "ack still handled")
        status = link.status()
        assert status.connected and status.malformed == 5 and status.last_error == ""


def test_spool_full_surfaces_and_the_chunk_waits_in_memory(tmp_path: Path) -> None:
    probe = Spool(tmp_path / "probe", 1 << 24)
    probe.put(0, encode(Message("steps", ROBOT, "f" * 32, 0, arrays=chunk(0))))  # same size as the robot's
    size = probe.bytes
    spool = Spool(tmp_path / "spool", 2 * size + size // 2)  # room for two chunks
    port = free_port()
    with robot_link(spool, port) as link:
        for i in range(3):
            link.submit(chunk(i))
        wait_for(lambda: link.status().spool_error != "", "the third chunk fails to spool")
        status = link.status()
        assert (status.spool_count, status.queued) == (2, 1)
        with pytest.raises(SpoolFull) as info:
            link.submit(chunk(3))
        assert str(tmp_path / "spool") in str(info.value) and str(2 * size + size // 2) in str(info.value)
        wait_for(lambda: link.status().queued == 2, "both chunks wait in memory")  # nothing dropped
        with stand_in("learner-A", port=port) as learner:
            learner.serve(lambda: link.status().acked == 3,
                          "queued chunks spooled and delivered once acks free space")
            for i in range(4):
                assert_same(learner.stored[i], i)
            assert link.status().spool_error == ""
            link.submit(chunk(4))  # no longer raises


def test_chunks_that_did_not_fit_a_full_spool_are_written_when_the_link_closes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The robot stops on SpoolFull; what it recorded until then waits in memory and is written on the way
    out, past the spool's limit: experience is never dropped."""
    probe = Spool(tmp_path / "probe", 1 << 24)
    probe.put(0, encode(Message("steps", ROBOT, "f" * 32, 0, arrays=chunk(0))))
    size = probe.bytes
    limit = 2 * size + size // 2  # room for two chunks
    with robot_link(Spool(tmp_path / "spool", limit), free_port()) as link:  # no learner: nothing is acknowledged
        for i in range(3):
            link.submit(chunk(i))
        wait_for(lambda: link.status().spool_error != "", "the third chunk fails to spool")
        for i in (3, 4):  # what the robot records while it stops
            with pytest.raises(SpoolFull):
                link.submit(chunk(i))
    spool = Spool(tmp_path / "spool", limit)
    assert spool.pending() == [0, 1, 2, 3, 4]
    for i in range(5):
        assert_same(decode(spool.load(i)).arrays, i)
    assert link.status().queued == 0 and link.status().spool_count == 5
    assert "written past the spool's limit" in caplog.text and "(lost)" not in caplog.text


def test_a_chunk_over_the_message_limit_is_spooled_not_sent(tmp_path: Path) -> None:
    too_big = sum(memoryview(f).nbytes for f in encode(Message("steps", ROBOT, "f" * 32, 0, arrays=chunk(0)))) - 1
    spool = Spool(tmp_path / "spool", 1 << 24)
    with stand_in("learner-A") as learner, robot_link(spool, learner.port, max_bytes=too_big) as link:
        learner.serve(lambda: link.status().connected, "connected")
        with pytest.raises(ChunkTooBig, match=rf"exceeds link.max_message_mb \({too_big} bytes\)"):
            link.submit(chunk(0))
        learner.serve(lambda: "not sent" in link.status().last_error, "the link declines to send it")
        assert "seq 0" in link.status().last_error and link.status().spool_count == 1
        assert learner.received == []  # a learner with that limit would refuse it and drop the connection
    assert Spool(tmp_path / "spool", 1 << 24).pending() == [0]  # kept for a run with a larger limit


def test_a_refusing_learner_is_reported_with_its_reason(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 1 << 24)
    with stand_in("learner-A") as learner, robot_link(spool, learner.port) as link:
        learner.replies = False
        learner.serve(lambda: "hello" in learner.kinds, "hello")
        learner.send("bye", meta={"reason": "step layout differs from the run's: obs\nforged line"})
        wait_for(lambda: link.status().refused != "", "the refusal is kept")
        status = link.status()
        assert status.refused == "step layout differs from the run's: obs?forged line" and not status.connected
        with pytest.raises(LinkRefused, match="step layout differs"):
            link.submit(chunk(0))
        wait_for(lambda: link.status().spool_count == 1, "the chunk is spooled all the same")
        learner.replies = True
        learner.serve(lambda: link.status().connected, "a later hello is welcomed (the learner was restarted)")
        assert link.status().refused == ""
        link.submit(chunk(1))  # no longer raises
        learner.serve(lambda: link.status().acked == 1, "both chunks delivered")


def test_disk_errors_surface_and_the_link_recovers(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 1 << 24)
    with stand_in("learner-A", acks=False) as learner, robot_link(spool, learner.port) as link:
        link.submit(chunk(0))
        learner.serve(lambda: learner.contiguous() == 1, "chunk 0 delivered")
        shutil.rmtree(tmp_path / "spool")  # the disk goes away under the robot
        learner.send("ack", 0)
        learner.serve(lambda: link.status().last_error != "", "the failed ack is reported")
        assert "FileNotFoundError" in link.status().last_error
        link.submit(chunk(1))
        learner.serve(lambda: link.status().spool_error != "", "the failed put is reported")
        with pytest.raises(LinkError, match="cannot spool"):
            link.submit(chunk(2))
        (tmp_path / "spool").mkdir()
        learner.acks = True
        learner.serve(lambda: link.status().acked == 2, "chunks 1 and 2 spooled, delivered and acknowledged")
        assert link.status().spool_error == "" and link.status().spool_count == 0
        for i in range(3):
            assert_same(learner.stored[i], i)


def test_close_is_prompt_with_unsent_messages_queued(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 1 << 28)
    n = 20
    learner = StandIn("learner-A", acks=False, rcvhwm=1)
    try:
        link = RobotLink(f"tcp://127.0.0.1:{learner.port}", ROBOT, spool, {**HELLO, "spec": {
            **SPEC, "image": ["uint8", [64, 64, 3]]}}, heartbeat_s=0.1, lost_after_s=30.0)
        try:
            link.start()
            learner.serve(lambda: link.status().connected, "connected")
            for i in range(n):  # ~1.2 MB each: far more than the socket buffers of a learner that stopped reading
                link.submit(chunk(i, steps=100, image=(64, 64, 3)))
            wait_for(lambda: link.status().spool_count == n, "all chunks spooled")
        finally:
            link.close(timeout=DEADLINE)
        assert link._thread is not None and not link._thread.is_alive(), "close() did not finish"
        with pytest.raises(LinkError, match="after close"):
            link.submit(chunk(0))
        assert Spool(tmp_path / "spool", 1 << 28).pending() == list(range(n))  # nothing lost
    finally:
        learner.close()


def test_close_spools_chunks_still_in_memory(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 1 << 24)
    link = RobotLink(f"tcp://127.0.0.1:{free_port()}", ROBOT, spool, HELLO)
    try:
        for i in range(3):
            link.submit(chunk(i))  # before start: only in memory
        link.start()
    finally:
        link.close(timeout=DEADLINE)
    assert Spool(tmp_path / "spool", 1 << 24).pending() == [0, 1, 2]


def test_close_without_start_still_spools_submitted_chunks(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 1 << 24)
    link = RobotLink("tcp://127.0.0.1:1", ROBOT, spool, HELLO)
    link.submit(chunk(0))
    link.submit(chunk(1))
    link.close()
    assert Spool(tmp_path / "spool", 1 << 24).pending() == [0, 1]


def test_bad_inputs_are_refused_at_the_caller(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 1 << 24)
    with pytest.raises(ValueError, match="robot id"):
        RobotLink("tcp://127.0.0.1:1", "no spaces allowed", spool, HELLO)
    with pytest.raises(ValueError, match="hello"):
        RobotLink("tcp://127.0.0.1:1", ROBOT, spool, {"task": "t", "hz": 1.0})
    link = RobotLink("tcp://127.0.0.1:1", ROBOT, spool, HELLO)
    try:
        bad = chunk(0)
        del bad["time"]
        with pytest.raises(ValueError, match="time"):
            link.submit(bad)
        with pytest.raises(ValueError, match="when"):
            link.set_stats(when=object())
        assert link.status().queued == 0
    finally:
        link.close()


def test_make_link_builds_the_variant_link_process_names_with_the_config_s_limits(tmp_path: Path) -> None:
    """One factory for both variants: link.process (the default) a child process, else a thread in this one."""
    for process, variant in ((True, LinkProcess), (False, RobotLink)):
        cfg = LinkConfig(process=process, heartbeat_s=0.1, lost_after_s=0.7, max_message_mb=4, spool_max_mb=2)
        link = make_link(cfg, "tcp://127.0.0.1:9", ROBOT, tmp_path / variant.__name__, HELLO)
        assert type(link) is variant
        assert (link.robot_id, link.heartbeat_s, link.lost_after_s, link.max_bytes) == (ROBOT, 0.1, 0.7, 4 * 2**20)
        link.close()  # never started: nothing to stop, nothing submitted to spool
