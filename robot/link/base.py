"""What the two link variants share: checked arguments, the weights hand-over, the heartbeat stats, the checks
`submit` makes once a chunk is queued, waiting for acknowledgements, and the wire size of a chunk.

Written once here so that the thread variant and the process variant cannot drift apart on what the control
loop sees (`Link` in robot/link/contract.py).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from types import TracebackType
from typing import Any, Self

import numpy as np

from core.layout import Field, StepLayout
from core.link.protocol import BOOKKEEPING, ID_RE, Message, encode
from core.link.security import ClientKeys
from robot.link.contract import ChunkTooBig, LinkError, LinkRefused, LinkStatus, Weights
from robot.link.spool import SpoolFull

LOG_NAME = "robot.link"  # both variants log as the link, whichever carries it


def message_bytes(frames: list) -> int:
    """Size of an encoded message on the wire (what the receiver's max_bytes limit counts)."""
    return sum(memoryview(frame).nbytes for frame in frames)


def raise_unsendable(robot_id: str, frames: list, max_bytes: int) -> None:
    """ChunkTooBig when an encoded chunk exceeds `max_bytes`: the learner would refuse it (and drop the connection)."""
    size = message_bytes(frames)
    if size > max_bytes:
        raise ChunkTooBig(f"robot link {robot_id}: a chunk of {size} bytes exceeds link.max_message_mb "
                          f"({max_bytes} bytes): it is spooled but cannot be sent; raise link.max_message_mb "
                          "(robot and learner) or lower link.chunk_seconds")


def chunk_message_bytes(spec: StepLayout, steps: int, robot_id: str) -> int:
    """Wire size of one steps message of `steps` steps in this layout, counted by encoding a one-step
    message: its header grows by a few bytes per array with the step count (allowed for here)."""
    layout = {**spec, **{name: Field((), dtype) for name, dtype in BOOKKEEPING.items()}}
    one = {name: np.zeros((1, *shape), dtype) for name, (shape, dtype) in layout.items()}
    frames = encode(Message("steps", robot_id, uuid.uuid4().hex, 2**62, arrays=one))
    return memoryview(frames[0]).nbytes + 4 * len(one) + steps * sum(a.nbytes for a in one.values())


def hello_message_bytes(meta: dict, robot_id: str) -> int:
    """Wire size of this robot's hello message (its meta: the step layout and the arrays' description)."""
    frames = encode(Message("hello", robot_id, uuid.uuid4().hex, 0, meta=meta))
    return sum(memoryview(frame).nbytes for frame in frames)


class LinkBase:
    """The part of `Link` both variants implement alike; each adds start, close, submit and status.

    `run_id` is the run this link sends as (the process variant replaces it with its child's at start);
    `_check_run` is the run messages are checked with before they are queued, known from the start."""

    def __init__(
        self,
        address: str,
        robot_id: str,
        hello_meta: dict,
        *,
        keys: ClientKeys | None,
        heartbeat_s: float,
        lost_after_s: float,
        resend_after_s: float,
        max_bytes: int,
        log: logging.Logger | None,
        **positive: float,
    ) -> None:
        if not isinstance(robot_id, str) or not ID_RE.fullmatch(robot_id):
            raise ValueError(f"robot id {robot_id!r} must be 1..64 of letters, digits, '_', '.', '-'")
        timings = {"heartbeat_s": heartbeat_s, "lost_after_s": lost_after_s, "resend_after_s": resend_after_s}
        for name, value in (timings | positive).items():
            if not value > 0:
                raise ValueError(f"{type(self).__name__} {name} must be > 0, got {value}")
        self.address = address
        self.robot_id = robot_id
        self.run_id = uuid.uuid4().hex
        self._check_run = self.run_id
        self.keys = keys
        self.heartbeat_s = float(heartbeat_s)
        self.lost_after_s = float(lost_after_s)
        self.resend_after_s = float(resend_after_s)
        self.max_bytes = int(max_bytes)
        self.log = log or logging.getLogger(LOG_NAME)
        self.hello_meta = dict(hello_meta)
        self._hello = encode(Message("hello", robot_id, self.run_id, 0, meta=self.hello_meta))  # fails early if bad
        self._lock = threading.Lock()
        self._closed = False
        self._stats: dict[str, Any] = {}
        self._stats_dirty = False  # set_stats ran since the process variant last handed the stats on
        self._new_weights: Weights | None = None

    def start(self) -> None:
        raise NotImplementedError

    def close(self, timeout: float = 2.0) -> None:
        raise NotImplementedError

    def status(self) -> LinkStatus:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def take_weights(self) -> Weights | None:
        """The newest verified weights not taken yet, else None."""
        with self._lock:
            weights, self._new_weights = self._new_weights, None
        return weights

    def set_stats(self, **stats: Any) -> None:
        """Merge values (version acting, steps/s, period error...) into the robot's heartbeat meta (numpy scalars
        as plain numbers), checked to fit a heartbeat header: a ProtocolError names a bad value here, in the
        caller, rather than later in the link."""
        with self._lock:
            current = self._stats
        merged = {**current, **{k: v.item() if isinstance(v, np.generic) else v for k, v in stats.items()}}
        encode(Message("heartbeat", self.robot_id, self._check_run, 0, meta=merged))
        with self._lock:
            self._stats, self._stats_dirty = merged, True

    def wait_acked(self, limit: float) -> None:
        """Give the learner up to `limit` seconds to acknowledge every chunk: those spooled and those still
        queued in the link (its thread's queue, or the pipe and memory of its process). Bounded, so exiting
        never hangs; it returns at once when no learner is connected or it refused this robot. Whatever
        stays unacknowledged is in the spool and is sent on the next run."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            status = self.status()
            if (status.spool_count == 0 and status.queued == 0) or not status.connected or status.refused:
                return
            time.sleep(0.02)

    def _encode_chunk(self, arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list]:
        """A copy of the chunk and its frames, checked by the protocol (ProtocolError: nothing is queued)."""
        if self._closed:
            raise LinkError(f"robot link {self.robot_id}: submit() after close()")
        chunk = {name: np.array(value, copy=True) for name, value in arrays.items()}
        return chunk, encode(Message("steps", self.robot_id, self._check_run, 0, arrays=chunk))

    def _raise_unsent(self, frames: list) -> None:
        """After queueing: ChunkTooBig for a chunk over the message limit, LinkRefused when the learner refused
        this robot."""
        raise_unsendable(self.robot_id, frames, self.max_bytes)
        if refused := self.status().refused:
            raise LinkRefused(refused)

    def _raise_unspooled(self, error: BaseException | str, full: bool, waiting: int) -> None:
        """After queueing: SpoolFull or LinkError when earlier chunks could not be spooled (they wait in memory)."""
        if full:
            raise SpoolFull(f"{error}; {waiting} chunks wait in memory")
        cause = error if isinstance(error, BaseException) else None
        raise LinkError(f"robot link {self.robot_id}: cannot spool chunks ({error}); {waiting} wait in memory") \
            from cause
