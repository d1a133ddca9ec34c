"""Config block of the robot <-> learner link (`link:` in a hardware config).

Both processes read the same block: the learner binds `bind`, a robot connects to `learner`.
Key files are zmq.auth certificates made by `reverie-keys create`; CURVE is required whenever
an address is not loopback.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from core.config.base import Block, FieldError

# tcp://[SOURCE;]HOST:PORT, HOST a name, an IPv4 address, [IPv6] or * (bind only); PORT a number or * (bind only).
_TCP = re.compile(r"tcp://(?:[^;]+;)?(?P<host>\[[0-9A-Fa-f:.]+\]|[^:;/\[\]]+):(?P<port>\*|\d+)")


# A robot id names the robot on the wire (core.link.protocol.ID_RE), in its key files and its spool directory.
ROBOT_ID_PATTERN = r"[A-Za-z0-9_.\-]{1,64}"
ROBOT_ID_RULE = "1..64 of letters, digits, '_', '.', '-'"


def robot_id_problem(robot_id: str) -> str | None:
    """What a robot id should have been (the "expected" part of an error), or None when it is usable."""
    return None if re.fullmatch(ROBOT_ID_PATTERN, robot_id) else ROBOT_ID_RULE


def default_spool_dir(robot_id: str) -> Path:
    """Where a robot keeps its unacknowledged chunks when neither --spool nor link.spool_dir says:
    $XDG_STATE_HOME/reverie/spool/<robot id>, else ~/.local/state/reverie/spool/<robot id>. Per user and
    machine, not per working directory: a robot started from another directory must find its unsent
    experience again (and keep its chunk numbers), and it must not land in a source checkout."""
    state = os.environ.get("XDG_STATE_HOME", "")
    root = Path(state) if os.path.isabs(state) else Path.home() / ".local" / "state"  # XDG: ignore relative
    return root / "reverie" / "spool" / robot_id


def address_problem(address: str, *, bind: bool) -> str | None:
    """What a link address should have been (the "expected" part of an error), or None when it is usable.

    ZeroMQ takes some bad addresses without complaint (a port above 65535 binds another port), so they
    are checked here, for the config keys and for the --bind / --learner flags alike."""
    if re.fullmatch(r"(ipc|inproc)://.+", address):
        return None
    match = _TCP.fullmatch(address)
    wanted = "tcp://HOST:PORT" + (" (HOST and PORT may be *)" if bind else "") + " or ipc://PATH"
    if match is None:
        return wanted
    if "*" in (match["host"], match["port"]) and not bind:
        return "a host and port to connect to (* only in a learner's bind address)"
    if match["port"] != "*" and not 1 <= int(match["port"]) <= 65535:
        return f"{wanted}, with PORT in 1..65535"
    return None


# Per step, besides the observations: action (float32, at least one), reward (float32), is_first/is_last/
# is_terminal (bool), and the bookkeeping every steps message carries: policy_version (int64), time (float64).
MIN_STEP_EXTRA_BYTES = 4 + 4 + 3 + 8 + 8


def chunk_steps(chunk_seconds: float, hz: float) -> int:
    """Steps in one robot chunk, the unit the robot sends as one message (`link.chunk_seconds` of control)."""
    return max(1, round(chunk_seconds * hz))


def message_room_problem(max_message_mb: float, need_bytes: int, why: str) -> str | None:
    """The "expected" part of an error when `link.max_message_mb` cannot carry one chunk of `need_bytes`
    (`why` says how that was counted), else None. The minimum named is rounded up to 0.001 MiB."""
    if max_message_mb * 2**20 >= need_bytes:
        return None
    return f"at least {math.ceil(need_bytes / 2**20 * 1000) / 1000} ({why})"


class LinkConfig(Block):
    bind: str = Field("tcp://127.0.0.1:5555", description="learner: address its server binds (tcp://HOST:PORT)")
    learner: str = Field("tcp://127.0.0.1:5555", description="robot: address of the learner to connect to")
    robot_id: str | None = Field(
        None, description=f"robot: id on the link ({ROBOT_ID_RULE}); null = the config's name"
    )
    chunk_seconds: float = Field(1.0, gt=0, le=60, description="robot: experience sent in chunks of this many seconds")
    heartbeat_s: float = Field(0.5, gt=0, le=10, description="heartbeat period, both ways, s")
    lost_after_s: float = Field(2.0, gt=0, le=60, description="robot: learner counts as lost after this silence, s")
    resend_after_s: float = Field(3.0, gt=0, le=600, description="robot: resend a chunk unacknowledged this long, s")
    robot_lost_s: float = Field(
        5.0, gt=0, le=600, description="learner: a silent robot is lost after this, s; its episode closes as abandoned"
    )
    process: bool = Field(
        True, description="robot: run the link (sockets, spool, weight checks) in a child process, so that its disk "
        "and network work never stalls the control loop (which it does from a thread when the machine is busy); "
        "false = a thread in the robot process"
    )
    spool_dir: str | None = Field(
        None, description="robot: unacknowledged chunks on disk; null = $XDG_STATE_HOME/reverie/spool/<robot_id> "
        "(~/.local/state/reverie/spool/<robot_id> when XDG_STATE_HOME is unset)"
    )
    spool_max_mb: float = Field(
        1024.0, gt=0, description="robot: spool size limit, MiB; full = the robot stops (what it records while "
        "stopping is still written, past the limit)"
    )
    max_message_mb: float = Field(
        256.0, gt=0, description="largest message either side accepts, MiB; at least one chunk (checked at load "
        "and, with the robot's exact step layout, before it moves)"
    )
    weights_every_updates: int = Field(20, ge=1, description="learner: publish weights after this many updates")
    weights_every_s: float = Field(60.0, gt=0, description="learner: ... or after this many seconds, if updated")
    weights_dtype: Literal["float32", "float16"] = Field("float32", description="weights precision on the wire")
    initial_weights: str | None = Field(
        None, description="robot: policy weights file acted with until the learner's first weights; null = random"
    )
    server_secret: str | None = Field(None, description="learner: its *.key_secret file (CURVE)")
    allow_dir: str | None = Field(None, description="learner: directory of allowed robot public *.key files")
    client_secret: str | None = Field(None, description="robot: its *.key_secret file (CURVE)")
    server_public: str | None = Field(None, description="robot: the learner's public *.key file")

    @model_validator(mode="after")
    def _checks(self) -> LinkConfig:
        for key, value, bind in (("bind", self.bind, True), ("learner", self.learner, False)):
            if problem := address_problem(value, bind=bind):
                raise FieldError(key, problem, value)
        if self.robot_id is not None and (problem := robot_id_problem(self.robot_id)):
            raise FieldError("robot_id", problem, self.robot_id)
        if (self.server_secret is None) != (self.allow_dir is None):
            raise FieldError("allow_dir", "set together with link.server_secret (or neither)", self.allow_dir)
        if (self.client_secret is None) != (self.server_public is None):
            raise FieldError("server_public", "set together with link.client_secret (or neither)",
                             self.server_public)
        return self
