"""LinkServer in-process with a real Replay in tmp_path: real zmq sockets on loopback, real RobotLinks with spool
files, hand-driven DEALER sockets for exact control of what is sent, no mocks.

Timings are shortened (heartbeat 0.1 s); every wait is for an event with a generous deadline, never a speed claim.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
from link_helpers import HELLO, ROBOT, SPEC, RawRobot, learner, wait_for

from core.link.protocol import weights_checksum
from core.link.security import ClientKeys, ServerKeys, create_keypair
from core.weights import weights_from_bytes, weights_to_bytes
from learner.link.server import SPEC_FILE, LinkServer
from learner.replay import Replay
from learner.replay.chunk_file import NAME_RE, read_chunk
from robot.link.spool import Spool
from robot.link.thread import RobotLink

T = 5  # steps per robot chunk
CHUNK_LENGTH = 16  # steps per replay chunk file: robot chunks straddle replay files


def chunk(i: int, mark: float = 0.0, steps: int = T) -> dict[str, np.ndarray]:
    """Robot chunk number i; its `time` values identify it, `obs` carries `mark` (which robot made it)."""
    return {
        "obs": np.full((steps, 3), mark, np.float32),
        "image": np.full((steps, 8, 8, 3), i % 256, np.uint8),
        "action": np.zeros((steps, 2), np.float32),
        "reward": np.full(steps, 0.5 * i, np.float32),
        "is_first": (np.arange(steps) == 0) & (i == 0),
        "is_last": np.zeros(steps, bool),
        "is_terminal": np.zeros(steps, bool),
        "policy_version": np.zeros(steps, np.int64),
        "time": i * steps + np.arange(steps, dtype=np.float64),
    }


def times(*seqs: int) -> np.ndarray:
    return np.concatenate([chunk(i)["time"] for i in seqs])



@contextmanager
def robot_link(server: LinkServer, spool_dir: Path, robot: str = ROBOT, **kw: Any) -> Iterator[RobotLink]:
    opts = {"heartbeat_s": 0.1, "lost_after_s": 5.0, "resend_after_s": 2.0} | kw
    link = RobotLink(server.endpoint, robot, Spool(spool_dir, 1 << 26), HELLO, **opts)
    try:
        link.start()
        yield link
    finally:
        link.close(timeout=10.0)


class ChunkRobot(RawRobot):
    """A RawRobot whose steps are this file's `chunk(seq)` unless told otherwise."""

    def steps(self, seq: int, arrays: dict | None = None) -> None:
        super().steps(seq, chunk(seq) if arrays is None else arrays)


@contextmanager
def raw_robot(server: LinkServer, robot: str = "raw-1", **kw: Any) -> Iterator[ChunkRobot]:
    peer = ChunkRobot(server.endpoint, robot, **kw)
    try:
        yield peer
    finally:
        peer.close()


def stream_steps(server: LinkServer) -> dict[str, int]:
    return {name: s["steps"] for name, s in server.replay.stats()["streams"].items()}


def on_disk(replay: Replay, stream: str) -> dict[str, Any]:
    """Flush, then read back every chunk file of `stream`, oldest first, concatenated (abandoned: absolute rows)."""
    replay.flush()
    files = []
    for path in replay.directory.iterdir():
        if NAME_RE.match(path.name):
            meta, steps, stamps, _ = read_chunk(path)
            if meta.stream == stream:
                files.append((meta.seq, meta, steps, stamps))
    files.sort(key=lambda f: f[0])
    assert files, f"no chunk file of stream {stream!r}"
    out: dict[str, Any] = {k: np.concatenate([f[2][k] for f in files]) for k in files[0][2]}
    out["time"] = np.concatenate([f[3] for f in files])
    offsets = np.cumsum([0] + [f[1].length for f in files])
    out["abandoned"] = [int(offsets[n] + row) for n, f in enumerate(files) for row in f[1].abandoned]
    out["source"] = files[-1][1].source
    return out


def _header(**over: Any) -> bytes:
    header = {"v": 1, "k": "heartbeat", "r": "bad-1", "u": "", "s": 0, "m": {}, "a": []} | over
    return msgpack.packb(header, use_bin_type=True)


# --- malformed input ------------------------------------------------------------------------------------------


def test_malformed_messages_are_counted_while_a_good_robot_is_served(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    with learner(tmp_path, max_message_mb=0.05) as server, robot_link(server, tmp_path / "spool") as link, \
            raw_robot(server, "bad-1") as bad, raw_robot(server, "ghost-1") as ghost:
        for i in range(3):
            link.submit(chunk(i))
        assert bad.hello().kind == "welcome"

        bad.send_raw([rng.bytes(100)])  # random bytes: header
        bad.send_raw([rng.bytes(50), rng.bytes(300), rng.bytes(7)])  # random multipart: header
        promised = [["obs", "float32", [T, 3]], ["time", "float64", [T]]]
        bad.send_raw([_header(k="steps", a=promised), np.zeros((T, 3), np.float32).tobytes()])  # frames
        bad.send_raw([_header(v=2)])  # version
        bad.send_raw([_header(k="gossip")])  # type
        wrong_dtype = chunk(0) | {"obs": np.zeros((T, 3), np.float64)}
        bad.steps(0, wrong_dtype)  # dtype (versus the hello spec)
        wrong_shape = chunk(0) | {"image": np.zeros((T, 4, 4, 3), np.uint8)}
        bad.steps(0, wrong_shape)  # shape (versus the hello spec)
        # size: 80 kB in two frames, over the 0.05 MiB limit (each frame stays under zmq's MAXMSGSIZE)
        two = [["a", "uint8", [40_000]], ["b", "uint8", [40_000]]]
        bad.send_raw([_header(k="steps", a=two), bytes(40_000), bytes(40_000)])
        ghost.steps(0)  # field: steps before any hello

        expected = {"header": 2, "frames": 1, "version": 1, "type": 1, "dtype": 1, "shape": 1, "size": 1, "field": 1}
        wait_for(lambda: server.rejects.total >= sum(expected.values()), "every malformed message counted")
        for i in range(3, 6):
            link.submit(chunk(i))
        wait_for(lambda: link.status().acked == 5 and link.status().spool_count == 0,
                 "the good robot's six chunks acknowledged and its spool empty")
        assert server.rejects.counts == expected
        assert server.replay.source_position(ROBOT) == (5, T - 1, T)
        assert stream_steps(server) == {ROBOT: 6 * T}  # nothing from bad-1 or ghost-1
        np.testing.assert_array_equal(on_disk(server.replay, ROBOT)["time"], times(*range(6)))

        bad.steps(0)  # junk earlier does not poison bad-1's session: a valid chunk is still taken
        assert bad.ack() == 0
        assert stream_steps(server) == {ROBOT: 6 * T, "bad-1": T}
        assert server.rejects.counts == expected


# --- ordering -------------------------------------------------------------------------------------------------


def test_duplicates_are_stored_once_and_acknowledged_again_and_gaps_wait(tmp_path: Path) -> None:
    with learner(tmp_path) as server, raw_robot(server, ROBOT) as robot:
        welcome = robot.hello()
        assert welcome.kind == "welcome" and welcome.meta["next_seq"] == 0 and welcome.meta["version"] == 0
        robot.steps(0)
        assert robot.ack() == 0
        robot.steps(1)
        assert robot.ack() == 1
        robot.steps(1)  # the same chunk again
        assert robot.ack() == 1
        robot.steps(0)  # an older one
        assert robot.ack() == 1
        assert stream_steps(server) == {ROBOT: 2 * T}
        assert server.robot_table()[0]["duplicates"] == 2

        robot.steps(3)  # a gap: 2 is missing
        assert [m.seq for m in robot.listen(1.0) if m.kind == "ack"] == []
        assert server.replay.source_position(ROBOT) == (1, T - 1, T)
        assert stream_steps(server) == {ROBOT: 2 * T}
        robot.steps(2)
        assert robot.ack() == 2  # 3 was dropped, not stored behind the gap
        robot.steps(3)
        assert robot.ack() == 3
        assert server.replay.source_position(ROBOT) == (3, T - 1, T)
        stored = on_disk(server.replay, ROBOT)
        np.testing.assert_array_equal(stored["time"], times(0, 1, 2, 3))
        np.testing.assert_array_equal(stored["image"][:, 0, 0, 0], np.repeat([0, 1, 2, 3], T))
        assert stored["source"] == (3, T - 1, T) and server.rejects.total == 0


def test_restarted_learner_knows_what_it_has(tmp_path: Path) -> None:
    with learner(tmp_path) as server, raw_robot(server, ROBOT) as robot:
        robot.hello()
        for seq in range(3):
            robot.steps(seq)
        while (acked := robot.ack()) < 2:  # cumulative: one ack may cover several chunks
            assert acked in (0, 1)
    assert (tmp_path / "run" / SPEC_FILE).is_file()

    with learner(tmp_path) as server, raw_robot(server, ROBOT) as robot:
        assert server.spec is not None and server.spec.layout["image"] == ((8, 8, 3), "uint8")  # layout reloaded
        assert server.replay.source_position(ROBOT) == (2, T - 1, T)
        welcome = robot.hello()
        assert welcome.kind == "welcome" and welcome.meta["next_seq"] == 3
        robot.steps(2)  # resent after the restart: already stored
        assert robot.ack() == 2
        assert stream_steps(server) == {ROBOT: 3 * T}
        assert server.robot_table()[0]["duplicates"] == 1
        robot.steps(3)
        assert robot.ack() == 3
        assert server.replay.source_position(ROBOT) == (3, T - 1, T)
        np.testing.assert_array_equal(on_disk(server.replay, ROBOT)["time"], times(0, 1, 2, 3))


# --- robots coming and going ----------------------------------------------------------------------------------


def test_silent_robot_episode_closed_as_abandoned_while_another_continues(tmp_path: Path) -> None:
    with learner(tmp_path, robot_lost_s=0.8) as server, raw_robot(server, "quiet-1") as quiet, \
            robot_link(server, tmp_path / "spool") as link:
        quiet.hello()
        quiet.steps(0)
        assert quiet.ack() == 0
        quiet.steps(1)
        assert quiet.ack() == 1
        sent, next_submit = 0, 0.0

        def abandoned() -> bool:
            nonlocal sent, next_submit
            if time.monotonic() >= next_submit:  # the other robot keeps streaming meanwhile, 10 chunks/s
                link.submit(chunk(sent))
                sent, next_submit = sent + 1, time.monotonic() + 0.1
            return server.replay.stats()["streams"]["quiet-1"]["abandoned"] == 1

        wait_for(abandoned, "the silent robot's episode closed as abandoned")
        link.submit(chunk(sent))
        sent += 1
        wait_for(lambda: link.status().acked == sent - 1 and link.status().spool_count == 0,
                 "the other robot's chunks all acknowledged")
        table = {row["robot"]: row for row in server.robot_table()}
        assert not table["quiet-1"]["connected"] and table[ROBOT]["connected"]
        streams = server.replay.stats()["streams"]
        assert streams[ROBOT]["abandoned"] == 0 and streams[ROBOT]["steps"] == sent * T
        assert streams["quiet-1"]["steps"] == 2 * T

        stored = on_disk(server.replay, "quiet-1")
        assert stored["is_last"][-1] and not stored["is_terminal"][-1]
        assert not stored["is_last"][:-1].any()
        assert stored["abandoned"] == [2 * T - 1]
        assert not on_disk(server.replay, ROBOT)["is_last"].any()


def test_two_robots_each_get_their_own_stream(tmp_path: Path) -> None:
    with learner(tmp_path) as server, robot_link(server, tmp_path / "spool-a", "arm-a") as a, \
            robot_link(server, tmp_path / "spool-b", "arm-b") as b:
        for i in range(3):
            a.submit(chunk(i, mark=1.0))
            b.submit(chunk(i, mark=2.0))
        b.submit(chunk(3, mark=2.0))
        wait_for(lambda: a.status().acked == 2 and b.status().acked == 3, "both robots' chunks acknowledged")
        wait_for(lambda: a.status().spool_count == 0 and b.status().spool_count == 0, "both spools empty")
        assert stream_steps(server) == {"arm-a": 3 * T, "arm-b": 4 * T}
        assert server.replay.source_position("arm-a") == (2, T - 1, T)
        assert server.replay.source_position("arm-b") == (3, T - 1, T)
        for name, mark, n in (("arm-a", 1.0, 3), ("arm-b", 2.0, 4)):
            stored = on_disk(server.replay, name)
            np.testing.assert_array_equal(stored["time"], times(*range(n)))
            assert (stored["obs"] == mark).all()
        assert {row["robot"] for row in server.robot_table()} == {"arm-a", "arm-b"}


def test_hello_with_another_step_layout_is_refused(tmp_path: Path) -> None:
    with learner(tmp_path) as server, robot_link(server, tmp_path / "spool") as link, \
            raw_robot(server, "odd-1") as odd:
        link.submit(chunk(0))
        wait_for(lambda: link.status().acked == 0, "the first robot fixes the run's layout")
        reply = odd.hello(spec=SPEC | {"image": ["uint8", [16, 16, 3]]})
        assert reply.kind == "bye" and "image" in reply.meta["reason"] and "16" in reply.meta["reason"]
        wait_for(lambda: server.rejects.total == 1, "the refusal counted")  # counted just after the bye is sent
        assert server.rejects.counts == {"field": 1}
        odd.steps(0, chunk(0) | {"image": np.zeros((T, 16, 16, 3), np.uint8)})
        wait_for(lambda: server.rejects.total == 2, "its steps refused too")
        assert server.rejects.counts == {"field": 2}
        assert [m.kind for m in odd.heard].count("welcome") == 0
        link.submit(chunk(1))
        wait_for(lambda: link.status().acked == 1, "the first robot is still served")
        assert stream_steps(server) == {ROBOT: 2 * T}
        assert "odd-1" not in {row["robot"] for row in server.robot_table()}


def test_hello_with_a_layout_the_replay_cannot_store_is_refused(tmp_path: Path) -> None:
    with learner(tmp_path) as server, raw_robot(server, "odd-1") as odd:
        reply = odd.hello(spec=SPEC | {"is_first": ["float32", []]})
        odd.steps(0, chunk(0) | {"is_first": np.zeros(T, np.float32)})
        time.sleep(0.5)
        server.check()
        assert reply.kind == "bye" and server.spec is None


def test_hello_declaring_a_step_too_big_to_allocate_is_refused_and_the_server_lives(tmp_path: Path) -> None:
    """Dimensions numpy accepts but no machine can allocate (issue 20 item 7) get a bye with the reason."""
    with learner(tmp_path) as server, raw_robot(server, "huge-1") as huge:
        for dims in ([2**34], [2**40], [2**48], [2**20, 2**20, 2**20], [0, 2**62]):
            meta = HELLO | {"spec": SPEC | {"obs": ["float32", dims]}}
            huge.send_raw([_header(k="hello", r="huge-1", u=huge.run, m=meta)])  # `encode` would refuse it here
            reply = huge.expect({"welcome", "bye"})
            assert reply.kind == "bye" and "limit" in reply.meta["reason"], (dims, reply.meta)
            server.check()
        assert server.spec is None and not (tmp_path / "run" / SPEC_FILE).exists()
        with robot_link(server, tmp_path / "spool") as link:
            link.submit(chunk(0))
            wait_for(lambda: link.status().acked == 0, "a good robot is served after the refusals")
        assert stream_steps(server) == {ROBOT: T}


def test_hello_whose_single_step_exceeds_the_message_limit_is_refused(tmp_path: Path) -> None:
    with learner(tmp_path, max_message_mb=1.0) as server, raw_robot(server, "big-1") as big:
        reply = big.hello(spec=SPEC | {"image": ["uint8", [1024, 1024, 3]]})  # 3 MiB a step, 1 MiB a message
        assert reply.kind == "bye" and "link.max_message_mb" in reply.meta["reason"], reply.meta
        assert server.spec is None


def test_a_forged_hello_cannot_make_a_robot_delete_its_unsent_chunks(tmp_path: Path) -> None:
    """Issue 20 item 2: a hello's `first_pending` (no Reverie robot sends it) moved the learner's position for
    that robot id, so the real robot's next welcome told it to skip ahead and it deleted spooled chunks."""
    spool_dir = tmp_path / "spool"
    with learner(tmp_path) as server:
        with robot_link(server, spool_dir) as link:
            link.submit(chunk(0))
            wait_for(lambda: link.status().acked == 0 and link.status().spool_count == 0, "chunk 0 stored")
        offline = RobotLink(server.endpoint, ROBOT, Spool(spool_dir, 1 << 26), HELLO)  # never started: spools only
        for i in range(1, 5):
            offline.submit(chunk(i))
        offline.close()
        assert Spool(spool_dir, 1 << 26).pending() == [1, 2, 3, 4]
        with raw_robot(server, ROBOT) as forger:
            reply = forger.hello(first_pending=25)
            assert reply.kind == "welcome" and reply.meta["next_seq"] == 1  # only what the learner stored counts
        with robot_link(server, spool_dir) as link:
            wait_for(lambda: link.status().acked == 4 and link.status().spool_count == 0,
                     "the real robot's spooled chunks delivered")
        assert server.replay.source_position(ROBOT) == (4, T - 1, T)
        np.testing.assert_array_equal(on_disk(server.replay, ROBOT)["time"], times(*range(5)))


def test_heartbeat_metadata_is_kept_as_short_plain_values(tmp_path: Path) -> None:
    """msgpack bin values in a heartbeat used to reach summary.json (not JSON: no summary at shutdown, issue 20
    item 10) and long or multi-line values reached the status table in full (item 15)."""
    meta = {"version": b"\x00\xff", "spool_count": "7\nWARNING reverie.link: forged", "steps": 12, "rate": 1.5,
            "ok": True, "none": None, "big": "x" * 50_000, "nested": {"a": [1, b"2"]}}
    meta |= {f"extra{i}": i for i in range(100)}
    with learner(tmp_path) as server, raw_robot(server, "hb-1") as robot:
        robot.hello()
        robot.say("heartbeat", meta=meta)
        wait_for(lambda: "hb-1" in server.robots and server.robots["hb-1"].stats, "the heartbeat received")
        stats = server.robots["hb-1"].stats
        json.dumps(server.robot_table())  # what summary.json holds
        assert (stats["steps"], stats["rate"], stats["ok"], stats["none"]) == (12, 1.5, True, None)
        assert all(isinstance(v, str | int | float | bool | type(None)) for v in stats.values())
        assert all(len(str(k)) <= 64 and len(str(v)) <= 100 for k, v in stats.items())
        assert "\n" not in stats["spool_count"] and stats["spool_count"].startswith("7")
        assert len(stats) <= 32


def test_peer_identities_and_names_cannot_forge_log_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 20 item 15: a connection identity, run id or spec name with a newline wrote a line of its own."""
    caplog.set_level(logging.INFO, logger="reverie.link")
    forged = "\nWARNING reverie.link: robot rover-1 lost"
    with learner(tmp_path) as server, raw_robot(server, "odd-1", routing_id=f"evil{forged}".encode()) as evil:
        evil.send_raw([b"\x93junk"])  # malformed header: logged with the peer's identity
        evil.run = f"r{forged}"
        assert evil.hello(spec=SPEC | {f"cam{forged}": ["float32", [1]]}).kind == "welcome"
        wait_for(lambda: server.rejects.total == 1, "the malformed message counted")
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("reverie.link")]
    assert any("evil\\n" in line for line in lines), lines  # shown, escaped
    assert any("r\\nWARN" in line for line in lines) and any("cam\\nWARN" in line for line in lines), lines
    assert not [line for line in lines if "\n" in line or "\r" in line]


# --- security and weights -------------------------------------------------------------------------------------


def test_curve_allowed_robot_is_stored_and_unknown_key_gets_nothing(tmp_path: Path) -> None:
    learner_pub, learner_sec = create_keypair(tmp_path / "keys", "learner")
    r1_pub, r1_sec = create_keypair(tmp_path / "keys", "r1")
    _, r2_sec = create_keypair(tmp_path / "keys", "r2")
    allow = tmp_path / "allow"
    allow.mkdir()
    shutil.copy(r1_pub, allow / "r1.key")
    with learner(tmp_path, keys=ServerKeys(learner_sec, allow)) as server, \
            robot_link(server, tmp_path / "spool-1", "r1", keys=ClientKeys(r1_sec, learner_pub)) as allowed, \
            robot_link(server, tmp_path / "spool-2", "r2", keys=ClientKeys(r2_sec, learner_pub)) as stranger, \
            raw_robot(server, "plain-1") as plain:
        plain.say("hello", meta=HELLO)  # no keys at all
        for i in range(2):
            allowed.submit(chunk(i))
            stranger.submit(chunk(i))
        wait_for(lambda: allowed.status().acked == 1 and allowed.status().spool_count == 0,
                 "the allowed robot's chunks acknowledged")
        assert plain.listen(1.0) == []
        status = stranger.status()
        assert not status.connected and status.acked == -1 and status.spool_count == 2
        assert stream_steps(server) == {"r1": 2 * T}
        assert {row["robot"] for row in server.robot_table()} == {"r1"}
        np.testing.assert_array_equal(on_disk(server.replay, "r1")["time"], times(0, 1))


def two_allowed_robots(tmp_path: Path) -> tuple[ServerKeys, ClientKeys, ClientKeys]:
    """The learner's keys allowing robots r1 and r2, and each robot's client keys."""
    learner_pub, learner_sec = create_keypair(tmp_path / "keys", "learner")
    allow = tmp_path / "allow"
    allow.mkdir()
    secrets = {}
    for name in ("r1", "r2"):
        public, secrets[name] = create_keypair(tmp_path / "keys", name)
        shutil.copy(public, allow / f"{name}.key")
    return (ServerKeys(learner_sec, allow), ClientKeys(secrets["r1"], learner_pub),
            ClientKeys(secrets["r2"], learner_pub))


def test_curve_binds_a_robot_id_to_the_first_key_that_used_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 20 item 2 with CURVE: any allowed key could claim another robot's id, store its own chunks under
    that robot's numbers and so make the real robot's chunks duplicates (acknowledged, deleted, never stored)."""
    caplog.set_level(logging.WARNING, logger="reverie.link")
    server_keys, own, other = two_allowed_robots(tmp_path)
    with learner(tmp_path, keys=server_keys) as server, \
            robot_link(server, tmp_path / "spool", "r1", keys=own) as real:
        real.submit(chunk(0, mark=1.0))
        wait_for(lambda: real.status().acked == 0, "the real r1's first chunk stored")
        with raw_robot(server, "r1", keys=other) as forger:
            reply = forger.hello()
            assert reply.kind == "bye" and "key" in reply.meta["reason"], reply.meta
            forger.steps(1, chunk(1, mark=9.0))  # taken, it would make the real chunk 1 a "duplicate"
            wait_for(lambda: server.rejects.total >= 2, "the forger's hello and steps refused")
        for i in (1, 2):
            real.submit(chunk(i, mark=1.0))
        wait_for(lambda: real.status().acked == 2 and real.status().spool_count == 0, "the real chunks stored")
        stored = on_disk(server.replay, "r1")
        np.testing.assert_array_equal(stored["time"], times(0, 1, 2))
        assert (stored["obs"] == 1.0).all()
        with raw_robot(server, "r2", keys=other) as honest:
            assert honest.hello().kind == "welcome"  # r2's key may use its own id
    assert any("r1" in r.getMessage() and "key" in r.getMessage() for r in caplog.records)

    with learner(tmp_path, keys=server_keys) as server:  # the binding outlives a learner restart
        with raw_robot(server, "r1", keys=other) as forger:
            assert forger.hello().kind == "bye"
        with raw_robot(server, "r1", keys=own) as again:
            assert again.hello().kind == "welcome"


def test_curve_a_connection_taking_over_a_robots_identity_with_another_key_is_not_that_robot(tmp_path: Path) -> None:
    """ROUTER_HANDOVER lets a new connection take over a routing identity; with another key it is not the robot
    that said hello, so its steps are refused (they used to be stored under the robot's chunk numbers)."""
    server_keys, own, other = two_allowed_robots(tmp_path)
    with learner(tmp_path, keys=server_keys) as server, raw_robot(server, "r1", keys=own, routing_id=b"r1/x") as real:
        assert real.hello().kind == "welcome"
        with raw_robot(server, "r1", keys=other, routing_id=b"r1/x") as thief:
            thief.steps(0, chunk(0, mark=9.0))
            wait_for(lambda: server.rejects.total == 1, "the steps from the other key refused")
        assert stream_steps(server) == {}


def _blob(value: float) -> bytes:
    return weights_to_bytes({"w": torch.full((64, 32), value), "b": torch.zeros(32)}, {"source": "test"})


def test_published_weights_reach_connected_and_later_robots(tmp_path: Path) -> None:
    blob1, blob2 = _blob(1.0), _blob(2.0)
    with learner(tmp_path) as server, robot_link(server, tmp_path / "spool-a", "arm-a") as early:
        early.submit(chunk(0))
        wait_for(lambda: early.status().acked == 0, "connected and acknowledged")
        assert early.take_weights() is None
        server.publish(blob1, version=1, step=10)
        wait_for(lambda: early.status().weights_version == 1, "version 1 verified by the connected robot")
        got = early.take_weights()
        assert got is not None and (got.version, got.step, got.blob) == (1, 10, blob1)
        assert weights_checksum(got.blob) == hashlib.sha256(blob1).hexdigest()
        tensors, _ = weights_from_bytes(got.blob)
        assert torch.equal(tensors["w"], torch.ones(64, 32))

        with robot_link(server, tmp_path / "spool-b", "arm-b") as late:
            wait_for(lambda: late.status().weights_version == 1, "the current weights sent with the welcome")
            late_got = late.take_weights()
            assert late_got is not None and late_got.blob == blob1
            server.publish(blob2, version=2, step=20, dtype="float16")
            for link in (early, late):
                wait_for(lambda link=link: link.status().weights_version == 2, f"version 2 at {link.robot_id}")
                got = link.take_weights()
                assert got is not None and (got.version, got.step, got.blob) == (2, 20, blob2)
            assert early.status().weights_rejected == 0 and late.status().weights_rejected == 0
