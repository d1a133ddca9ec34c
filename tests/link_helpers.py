"""What the link tests share: a small robot step layout and its hello, a learner's link server on loopback, a
hand-driven robot socket, and waiting for something."""

from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import zmq

from core.config.link import LinkConfig
from core.link.protocol import Message, decode, encode
from core.link.security import ClientKeys, ServerKeys, secure_client
from learner.link.server import LinkServer
from learner.replay import Replay

DEADLINE = 30.0  # generous wait for an event over loopback (not a speed assertion)
ROBOT = "rover-1"
SPEC = {
    "obs": ["float32", [3]],
    "image": ["uint8", [8, 8, 3]],
    "action": ["float32", [2]],
    "reward": ["float32", []],
    "is_first": ["bool", []],
    "is_last": ["bool", []],
    "is_terminal": ["bool", []],
}
HELLO = {"spec": SPEC, "task": "test-task", "hz": 20.0}


@contextmanager
def learner(tmp_path: Path, keys: ServerKeys | None = None, port: int | None = None, chunk_length: int = 16,
            **cfg: Any) -> Iterator[LinkServer]:
    """A LinkServer on loopback (a free port unless given) over a Replay in tmp_path/replay (run dir
    tmp_path/run); `cfg` overrides LinkConfig fields. On leaving, the server thread must still be alive."""
    opts = {"bind": f"tcp://127.0.0.1:{'*' if port is None else port}", "heartbeat_s": 0.1,
            "robot_lost_s": 30.0} | cfg
    replay = Replay(tmp_path / "replay", chunk_length=chunk_length)
    server = LinkServer(LinkConfig(**opts), replay, tmp_path / "run", keys=keys)
    try:
        server.start()
        assert server.endpoint.startswith("tcp://127.0.0.1:") and not server.endpoint.endswith(":*")
        yield server
        server.check()  # the thread survived everything the test sent it
    finally:
        server.close()
        replay.close()


def wait_for(cond: Callable[[], bool], what: str, deadline: float = DEADLINE) -> None:
    """Poll until `cond()` holds; fail naming `what` after `deadline` seconds (a generous wait, not a timing test)."""
    end = time.monotonic() + deadline
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"not within {deadline} s: {what}")
        time.sleep(0.02)


class RawRobot:
    """A DEALER that speaks the protocol by hand (or breaks it on purpose)."""

    def __init__(self, endpoint: str, robot: str = "raw-1", keys: ClientKeys | None = None,
                 routing_id: bytes | None = None) -> None:
        self.robot, self.run = robot, uuid.uuid4().hex
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if routing_id is not None:
            self.sock.setsockopt(zmq.ROUTING_ID, routing_id)
        secure_client(self.sock, endpoint, keys, logging.getLogger("test.raw-robot"))
        self.sock.connect(endpoint)
        self.heard: list[Message] = []

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()

    def __enter__(self) -> RawRobot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_raw(self, frames: list) -> None:
        self.sock.send_multipart(frames, copy=False)

    def say(self, kind: str, seq: int = 0, meta: dict | None = None, arrays: dict | None = None) -> None:
        self.send_raw(encode(Message(kind, self.robot, self.run, seq, meta or {}, arrays or {})))

    def hello(self, **over: Any) -> Message:
        self.say("hello", meta=HELLO | over)
        return self.expect({"welcome", "bye"})

    def steps(self, seq: int, arrays: dict) -> None:
        self.say("steps", seq, arrays=arrays)

    def _next(self, timeout: float) -> Message | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        msg = decode(self.sock.recv_multipart(copy=False))
        self.heard.append(msg)
        return msg

    def expect(self, kinds: set[str], deadline: float = DEADLINE) -> Message:
        """The next message of one of these kinds (heartbeats and the rest are skipped)."""
        end = time.monotonic() + deadline
        while (left := end - time.monotonic()) > 0:
            msg = self._next(left)
            if msg is not None and msg.kind in kinds:
                return msg
        raise AssertionError(f"{self.robot}: no {sorted(kinds)} within {deadline} s; heard "
                             f"{[m.kind for m in self.heard[-8:]]}")

    def ack(self) -> int:
        return self.expect({"ack"}).seq

    def listen(self, seconds: float) -> list[Message]:
        """Everything that arrives in the next `seconds`."""
        end, got = time.monotonic() + seconds, []
        while (left := end - time.monotonic()) > 0:
            msg = self._next(left)
            if msg is not None:
                got.append(msg)
        return got


def serve_with_robot(server: Any, robot: Callable[[Any], None], duration: float = 120) -> dict:
    """Run `serve`'s loop (`server.run`) in this thread while `robot(server)` plays a robot in another one, then
    stop the server; the summary. The robot's failure is raised here, and the signal handlers `run` installs are
    put back (pytest's own Ctrl-C stays)."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    failure: list[BaseException] = []

    def play() -> None:
        try:
            wait_for(lambda: bool(server.link.endpoint), "the link listening")
            robot(server)
        except BaseException as exc:  # noqa: BLE001  (reported by the main thread)
            failure.append(exc)
        finally:
            server.stop("test done")

    thread = threading.Thread(target=play)
    thread.start()
    try:
        summary = server.run(duration=duration)  # stopped by the robot thread long before
    finally:
        thread.join()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if failure:
        raise failure[0]
    return summary
