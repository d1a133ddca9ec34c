"""What the control loop may rely on from a robot <-> learner link, whichever variant carries it.

Two variants keep one contract: `RobotLink` (robot/link/thread.py) runs the link in a thread of the robot
process, `LinkProcess` (robot/link/process.py) in a child process that never holds the control loop's GIL.
Callers type against `Link` and build one with `make_link` (robot/link/factory.py), so neither the control
loop nor the command line ever asks which variant it holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

import numpy as np


class LinkError(RuntimeError):
    """The link cannot keep the control loop's data safe (thread died, spool unwritable, link closed)."""


class LinkRefused(LinkError):
    """The learner refused this robot (another step layout, a key that may not use this id...): its message
    is the learner's reason. Chunks are still spooled, for a learner that will take them."""


class ChunkTooBig(LinkError):
    """A chunk larger than the link's message limit (link.max_message_mb): spooled, never sent."""


@dataclass
class Weights:
    """Verified policy weights from the learner; `blob` is a Reverie weights blob (`weights_from_bytes`)."""

    version: int
    step: int
    blob: bytes
    received: float  # time.time() when verified


@dataclass
class LinkStatus:
    """A snapshot of the link for displays and logs; `last_heard` is time.time() of the last valid message."""

    connected: bool
    server: str
    acked: int
    spool_count: int
    spool_bytes: int
    last_heard: float | None
    weights_version: int
    weights_rejected: int
    last_rejection: str
    malformed: int = 0  # messages from the network that broke the protocol
    last_error: str = ""  # the last unexpected error inside the link thread (logged with its traceback)
    queued: int = 0  # chunks submitted but not yet in the spool
    spool_error: str = ""  # why the oldest queued chunk cannot be spooled (spool full, disk error); "" when fine
    refused: str = ""  # the learner's reason for refusing this robot's hello; "" unless refused


class Link(Protocol):
    """The robot's side of the link: spool-first, never waiting on the network, resilient to learner restarts.

    `submit` queues a chunk and raises (SpoolFull, LinkError and its kinds) when the robot must stop safely;
    `take_weights` hands over the newest verified weights once; `status` is safe from any thread."""

    robot_id: str

    def start(self) -> None: ...

    def close(self, timeout: float = 2.0) -> None: ...

    def submit(self, arrays: dict[str, np.ndarray]) -> None: ...

    def take_weights(self) -> Weights | None: ...

    def set_stats(self, **stats: Any) -> None: ...

    def status(self) -> LinkStatus: ...

    def wait_acked(self, limit: float) -> None: ...

    def __enter__(self) -> Link: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...
