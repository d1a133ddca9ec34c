"""The learner's side of the link: one ROUTER socket, served by one background thread.

It takes experience from any number of robots into the replay store and acknowledges a chunk
only once it is on disk (`Replay.flush` after each batch of received chunks: a group commit).
Chunks are numbered per robot; the replay store records, with every chunk file, the robot chunk
and row its last step came from, so a restarted learner still knows what it has and drops
duplicates. Chunks must arrive in order: a gap (a chunk lost in flight while the learner
restarted) is not acknowledged, and the robot resends from its oldest unacknowledged chunk.

The thread also sends heartbeats and policy weights, and closes the episode of a robot that went
silent as abandoned. Malformed messages are rejected, counted and logged rate-limited per peer;
nothing a peer sends can stop the thread, and what a peer says about itself never moves another
robot's position: a hello only learns where the stored stream ends. With CURVE, each robot id
belongs to the first key that used it in the run (`robot_keys.json`); other keys are refused.

Weights go to every robot (`publish`), or to one robot in place of those (`publish_to`: CASCADE's deployments
give each robot its own frozen explorer, learner/serve_deployments.py); `on_steps` hears what was stored.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from core.atomic import atomic_write_bytes
from core.config.link import LinkConfig
from core.layout import StepLayout
from core.link.protocol import (
    BOOKKEEPING,
    Message,
    ProtocolError,
    RejectLog,
    check_steps,
    decode,
    encode,
    printable,
    spec_of,
    step_bytes,
    weights_checksum,
)
from core.link.security import BINDINGS_FILE, KeyBindings, LinkSecurityError, ServerKeys, secure_server
from learner.replay import Replay
from learner.replay.validation import StepSpec

log = logging.getLogger("reverie.link")

SPEC_FILE = "link_spec.json"  # the run's step layout, fixed by the first robot (a restart reads it)
DRAIN_LIMIT = 512  # messages handled before the next group commit
POLL_MS = 20
FLUSH_EVERY_S = 0.05
MAX_STATS = 32  # heartbeat figures kept per robot
STAT_CHARS = 64  # longest heartbeat key or text value kept


class LinkServerError(RuntimeError):
    """The server cannot start (address in use, bad keys, a run layout that cannot be trained)."""


LayoutCheck = Callable[["RunSpec"], "str | None"]  # why the trainer could not use a step layout, or None
# Called in the server thread with a robot id and the policy_version and is_last of the rows just stored.
StepsHook = Callable[[str, np.ndarray, np.ndarray], None]


@dataclass
class RunSpec:
    """What every robot of a run must send: the step layout (`spec_of` of the hello's: what each chunk is
    checked against), whether actions are discrete, the task."""

    layout: StepLayout
    discrete: bool
    task: str
    hz: float

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.layout.to_wire(), "discrete": self.discrete, "task": self.task, "hz": self.hz}

    @staticmethod
    def from_json(data: dict[str, Any]) -> RunSpec:
        return RunSpec(spec_of(data["spec"]), bool(data["discrete"]), str(data["task"]), float(data["hz"]))

    def mismatch(self, other: RunSpec) -> str | None:
        if self.layout != other.layout:
            keys = sorted(set(self.layout) | set(other.layout))
            diff = [f"{k}: {_entry(self.layout, k)} vs {_entry(other.layout, k)}" for k in keys
                    if self.layout.get(k) != other.layout.get(k)]
            return "step layout differs from the run's: " + "; ".join(diff)
        if self.discrete != other.discrete:
            return f"action kind differs (discrete {other.discrete}, the run's {self.discrete})"
        return None


def _entry(layout: StepLayout, key: str) -> str:
    entry = layout.get(key)
    return "none" if entry is None else f"{entry.dtype.name}{list(entry.shape)}"


@dataclass
class RobotState:
    """What the learner knows about one connected robot process."""

    robot: str
    identity: bytes
    run: str
    task: str
    key: str = ""  # its CURVE public key (Z85), "" on a plain link
    connected: bool = True
    last_heard: float = field(default_factory=time.monotonic)
    steps: int = 0
    duplicates: int = 0
    rate: float = 0.0  # steps/s, smoothed
    lag: float = 0.0  # learner receive time - the robot's time of its newest step, s
    stats: dict[str, Any] = field(default_factory=dict)  # the robot's own heartbeat figures
    _rate_t: float = field(default_factory=time.monotonic)
    _rate_n: int = 0


@dataclass
class Position:
    """Where a robot's stored stream ends: its chunk `seq`, row `index` of `total` rows."""

    seq: int
    index: int
    total: int

    @property
    def complete(self) -> bool:
        return self.index >= self.total - 1


class LinkServer:
    """Serve robots in a background thread; the trainer reads `spec`, `received` and publishes weights."""

    def __init__(self, cfg: LinkConfig, replay: Replay, run_dir: Path, *, address: str | None = None,
                 keys: ServerKeys | None = None, layout_check: LayoutCheck | None = None) -> None:
        """`layout_check` says why the trainer could not use a step layout (None if it can): a robot's layout
        becomes the run's only if it passes, and a saved one that fails stops the start with LinkServerError."""
        self.cfg, self.replay, self.run_dir = cfg, replay, Path(run_dir)
        self.address = address or cfg.bind
        self.keys = keys if keys is not None else _server_keys(cfg)
        self.layout_check = layout_check
        self.server_id = uuid.uuid4().hex
        self.max_bytes = int(cfg.max_message_mb * 2**20)
        self.rejects = RejectLog(log)
        try:
            self.bindings = KeyBindings(self.run_dir / BINDINGS_FILE) if self.keys is not None else None
        except LinkSecurityError as exc:
            raise LinkServerError(str(exc)) from None
        self.robots: dict[str, RobotState] = {}  # by robot id (one live process per robot id)
        self.positions: dict[str, Position | None] = {}
        self.received = 0  # new steps stored since this process started
        self.endpoint = ""
        self._spec: RunSpec | None = self._load_spec()
        self._weights: tuple[list[Any], int] | None = None  # encoded frames, version
        self._weights_new = False
        self._robot_weights: dict[str, tuple[list[Any], int]] = {}  # a robot's own weights, over the run's
        self._robot_weights_new: set[str] = set()
        self.on_steps: StepsHook | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="link-server", daemon=True)

    # --- public, any thread
    @property
    def spec(self) -> RunSpec | None:
        return self._spec

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(10.0)
        if self._error is not None:
            raise self._error

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def publish(self, blob: bytes, version: int, step: int, dtype: str = "float32") -> None:
        """Send these policy weights to every robot (now, and to robots that connect later)."""
        frames = self._weights_frames(blob, version, step, dtype)
        with self._lock:
            self._weights = (frames, version)
            self._weights_new = True

    def publish_to(self, robot: str, blob: bytes, version: int, step: int, dtype: str = "float32") -> None:
        """Send these policy weights to `robot` only (now, and again at each of its hellos), in place of what
        `publish` sends everyone. A robot takes only versions newer than the one it acts with."""
        frames = self._weights_frames(blob, version, step, dtype)
        with self._lock:
            self._robot_weights[robot] = (frames, version)
            self._robot_weights_new.add(robot)

    def _weights_frames(self, blob: bytes, version: int, step: int, dtype: str) -> list[Any]:
        meta = {"step": int(step), "sha256": weights_checksum(blob), "dtype": dtype}
        return encode(Message("weights", run=self.server_id, seq=version, meta=meta,
                              arrays={"blob": np.frombuffer(blob, np.uint8)}))

    def _weights_of(self, robot: str) -> tuple[list[Any], int] | None:
        with self._lock:
            return self._robot_weights.get(robot, self._weights)

    def robot_table(self, limit: int | None = None) -> list[dict[str, Any]]:
        """One row per robot seen, for the status display, metrics and the summary; with `limit`, only the
        `limit` most recently heard (any peer can make up robot ids, so a display must not list them all)."""
        now = time.monotonic()
        with self._lock:
            robots = list(self.robots.values())
            if limit is not None:
                robots = sorted(robots, key=lambda r: r.last_heard, reverse=True)[:limit]
            return [{"robot": r.robot, "connected": r.connected, "steps": r.steps, "steps_s": round(r.rate, 1),
                     "lag_s": round(r.lag, 3), "silent_s": round(now - r.last_heard, 1),
                     "spool": r.stats.get("spool_count"), "version": r.stats.get("version"),
                     "duplicates": r.duplicates} for r in robots]

    def robot_counts(self) -> tuple[int, int]:
        """(robots seen, robots connected now)."""
        with self._lock:
            return len(self.robots), sum(r.connected for r in self.robots.values())

    def check(self) -> None:
        """Re-raise an error that stopped the server thread."""
        if self._error is not None:
            raise RuntimeError(f"link server stopped: {self._error}") from self._error

    # --- the thread
    def _run(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        auth = None
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, self.max_bytes + 2**16)
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted robot process may reuse an identity
            sock.setsockopt(zmq.SNDHWM, 100)
            sock.setsockopt(zmq.RCVHWM, 10_000)
            auth = secure_server(ctx, sock, self.address, self.keys, log)
            try:
                sock.bind(self.address)
            except zmq.ZMQError as exc:
                raise LinkServerError(f"cannot listen on {self.address}: {exc.strerror}; is another learner "
                                      f"running there? choose another port with --bind or link.bind") from None
            self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            log.info("link server %s listening on %s", self.server_id[:8], self.endpoint)
        except BaseException as exc:  # noqa: BLE001  (reported to the caller of start)
            self._error = exc
            self._ready.set()
            sock.close(0)
            ctx.term()
            return
        self._ready.set()
        next_beat = time.monotonic()
        pending: set[str] = set()
        last_flush = 0.0
        try:
            while not self._stop.is_set():
                pending |= self._drain(sock)
                now = time.monotonic()
                # Group commit: one flush (it rewrites each open chunk) for everything received in
                # the last FLUSH_EVERY_S, then the acks; durable before acknowledged.
                if pending and now - last_flush >= FLUSH_EVERY_S:
                    self.replay.flush()
                    for robot in pending:
                        self._ack(sock, robot)
                    pending.clear()
                    last_flush = time.monotonic()
                if now >= next_beat:
                    next_beat = now + self.cfg.heartbeat_s
                    self._beat(sock)
                    self._check_lost(now)
                self._send_weights(sock)
        except BaseException as exc:  # noqa: BLE001
            log.exception("link server thread failed")
            self._error = exc
        finally:
            try:
                self.replay.flush()
            except Exception:  # noqa: BLE001
                log.exception("final replay flush failed")
            sock.close(0)
            if auth is not None:
                auth.stop()
            ctx.term()

    def _drain(self, sock: zmq.Socket) -> set[str]:
        """Handle waiting messages (up to DRAIN_LIMIT); returns robots whose new chunks need acks."""
        acks: set[str] = set()
        if not sock.poll(POLL_MS):
            return acks
        for _ in range(DRAIN_LIMIT):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            if len(frames) < 2:
                self.rejects.reject(ProtocolError("frames", "no message after the peer identity"), "?")
                continue
            identity = frames[0].bytes
            try:
                msg = decode(frames[1:], self.max_bytes)
                robot = self._handle(sock, identity, self._peer_key(frames[0]), msg)
            except ProtocolError as err:
                if err.message_kind == "hello":  # tell a robot why, instead of leaving it to wait
                    self._send(sock, identity, Message("bye", meta={"reason": str(err)}))
                self.rejects.reject(err, printable(identity, 80))
                continue
            except (ValueError, TypeError, KeyError) as err:  # e.g. steps the replay store refuses
                self.rejects.reject(ProtocolError("field", f"message not stored: {err}"), printable(identity, 80))
                continue
            if robot:
                acks.add(robot)
        return acks

    def _peer_key(self, frame: zmq.Frame) -> str:
        """The CURVE public key (Z85) the peer authenticated with, "" on a plain link (ZAP's User-Id)."""
        if self.keys is None:
            return ""
        try:
            return str(frame.get("User-Id"))
        except zmq.ZMQError:  # no ZAP metadata on this message: never matches a bound key
            return ""

    def _handle(self, sock: zmq.Socket, identity: bytes, key: str, msg: Message) -> str | None:
        if msg.kind == "hello":
            self._hello(sock, identity, key, msg)
            return None
        state = self.robots.get(msg.robot)
        if state is None or state.identity != identity or state.key != key:
            # Not (or no longer) registered: ask it to say hello again (e.g. after a learner restart). A connection
            # that took over the identity (ROUTER_HANDOVER) with another key is not that robot either.
            raise ProtocolError("field", f"{msg.kind} from robot {msg.robot!r} before its hello; ignored")
        state.last_heard = time.monotonic()
        state.connected = True
        if msg.kind == "steps":
            return msg.robot if self._steps(state, msg) else None
        if msg.kind == "heartbeat":
            stats = plain_stats(msg.meta)
            with self._lock:
                state.stats = stats
        elif msg.kind == "bye":
            log.info("robot %s said bye", msg.robot)
            self._lost(state, "said bye")
        else:
            raise ProtocolError("type", f"a robot may not send {msg.kind!r} messages")
        return None

    def _hello(self, sock: zmq.Socket, identity: bytes, key: str, msg: Message) -> None:
        meta = msg.meta
        offered = RunSpec(spec_of(meta["spec"]), bool(meta.get("discrete", False)), str(meta["task"]),
                          float(meta["hz"]))
        problem = self._refusal(offered, msg.robot, key)
        if problem:
            self._send(sock, identity, Message("bye", meta={"reason": problem}))
            raise ProtocolError("field", f"robot {msg.robot!r} refused: {problem}")
        if self._spec is None:
            self._adopt(offered)
        old = self.robots.get(msg.robot)
        run = printable(msg.run[:8])
        if old is not None and old.run != msg.run:
            self._lost(old, f"replaced by a new process (run {run})")
        if old is None or old.run != msg.run or old.identity != identity or old.key != key:
            log.info("robot %s connected (run %s)", msg.robot, run)
            with self._lock:
                self.robots[msg.robot] = RobotState(msg.robot, identity, msg.run, offered.task, key)
        state = self.robots[msg.robot]
        state.last_heard, state.connected = time.monotonic(), True
        if isinstance(meta.get("describe"), dict):  # checked with the hello; streams.json keeps it
            self.replay.describe(msg.robot, {**meta["describe"], "task": offered.task, "control_hz": offered.hz})
        # Only what this learner stored decides where the robot goes on: a welcome's next_seq makes the robot
        # delete every spooled chunk below it, so nothing a peer claims in a hello may move it.
        pos = self._position(msg.robot)
        next_seq = 0 if pos is None else (pos.seq + 1 if pos.complete else pos.seq)
        weights = self._weights_of(msg.robot)
        self._send(sock, identity, Message("welcome", meta={"server": self.server_id, "next_seq": next_seq,
                                                            "version": weights[1] if weights else 0}))
        if weights is not None:
            self._send(sock, identity, frames=weights[0])

    def _refusal(self, offered: RunSpec, robot: str, key: str) -> str | None:
        """Why this hello is refused (None if it is not): a robot id bound to another key, a layout this run
        cannot store, send or train on, or one that differs from the run's. Checked before anything is kept."""
        if self.bindings is not None and (problem := self.bindings.claim(robot, key)):
            return problem
        bookkeeping = sum(np.dtype(d).itemsize for d in BOOKKEEPING.values())
        if (size := step_bytes(offered.layout)) + bookkeeping > self.max_bytes:
            return (f"one step is {size} bytes, so no chunk fits in a message of link.max_message_mb "
                    f"({self.cfg.max_message_mb:g} MiB) on this learner")
        if self._spec is not None:
            return self._spec.mismatch(offered)
        if problem := _storable(offered, robot):
            return problem
        if self.layout_check is not None and (problem := self.layout_check(offered)):
            return problem
        return None

    def _adopt(self, spec: RunSpec) -> None:
        self._spec = spec
        path = self.run_dir / SPEC_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(spec.to_json(), indent=1).encode())
        log.info("run step layout fixed by the first robot: %s",
                 printable(", ".join(f"{k} {f.dtype.name}{list(f.shape)}" for k, f in spec.layout.items()), 2000))

    def _load_spec(self) -> RunSpec | None:
        path = self.run_dir / SPEC_FILE
        if not path.is_file():
            return None
        try:
            spec = RunSpec.from_json(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError, ProtocolError) as exc:
            raise LinkServerError(f"{path}: unreadable run layout ({printable(str(exc))}); move it away to start "
                                  f"a new run") from None
        problem = _storable(spec, "the saved layout") or (self.layout_check(spec) if self.layout_check else None)
        # (spec_of, under from_json, has bounded its step size: nothing here allocates a peer-chosen size)
        if problem:
            raise LinkServerError(f"{path}: the run's step layout cannot be trained ({printable(problem, 400)}); "
                                  f"move it away to start a new run")
        return spec

    def _position(self, robot: str) -> Position | None:
        if robot not in self.positions:
            pos = self.replay.source_position(robot)
            self.positions[robot] = None if pos is None else Position(*pos)
        return self.positions[robot]

    def _steps(self, state: RobotState, msg: Message) -> bool:
        assert self._spec is not None
        total = check_steps(msg, self._spec.layout)
        pos = self._position(state.robot)
        if pos is None or msg.seq == pos.seq + 1 and pos.complete:
            first = 0
        elif msg.seq < pos.seq or (msg.seq == pos.seq and pos.complete):
            state.duplicates += 1
            return True  # already stored: acknowledge again
        elif msg.seq == pos.seq:
            first = pos.index + 1  # the learner died mid-chunk: store the rest
        else:
            return False  # a gap: wait for the robot to resend in order
        steps = {k: msg.arrays[k][first:] for k in self._spec.layout}
        self.replay.add_steps(steps, state.robot, task=state.task, policy_version=msg.arrays["policy_version"][first:],
                              time=msg.arrays["time"][first:], source=msg.seq, first_index=first, total=total)
        self.positions[state.robot] = Position(msg.seq, total - 1, total)
        if self.on_steps is not None:
            self.on_steps(state.robot, msg.arrays["policy_version"][first:], msg.arrays["is_last"][first:])
        n = total - first
        self.received += n
        now = time.monotonic()
        with self._lock:
            state.steps += n
            state.lag = time.time() - float(msg.arrays["time"][-1])
            state._rate_n += n
            if now - state._rate_t >= 1.0:
                inst = state._rate_n / (now - state._rate_t)
                state.rate = inst if state.rate == 0 else 0.7 * state.rate + 0.3 * inst
                state._rate_t, state._rate_n = now, 0
        return True

    def _ack(self, sock: zmq.Socket, robot: str) -> None:
        state, pos = self.robots.get(robot), self.positions.get(robot)
        if state is None or pos is None:
            return
        upto = pos.seq if pos.complete else pos.seq - 1
        if upto >= 0:
            self._send(sock, state.identity, Message("ack", robot=robot, seq=upto))

    def _beat(self, sock: zmq.Socket) -> None:
        meta = {"server": self.server_id, "version": self._weights[1] if self._weights else 0}
        for state in list(self.robots.values()):
            if state.connected:
                self._send(sock, state.identity, Message("heartbeat", meta=meta))

    def _check_lost(self, now: float) -> None:
        for state in list(self.robots.values()):
            if state.connected and now - state.last_heard > self.cfg.robot_lost_s:
                self._lost(state, f"silent for {now - state.last_heard:.1f} s")

    def _lost(self, state: RobotState, why: str) -> None:
        with self._lock:
            state.connected = False
        if self.replay.close_episode(state.robot):
            log.warning("robot %s lost (%s): its running episode is closed as abandoned", state.robot, why)
        else:
            log.info("robot %s gone (%s)", state.robot, why)

    def _send_weights(self, sock: zmq.Socket) -> None:
        with self._lock:
            everyone = self._weights if self._weights_new else None
            self._weights_new = False
            own = {robot: self._robot_weights[robot] for robot in self._robot_weights_new}
            self._robot_weights_new.clear()
            mine = set(self._robot_weights)  # robots with their own weights: `publish` no longer reaches them
        for state in list(self.robots.values()):
            weights = own.get(state.robot) or (everyone if state.robot not in mine else None)
            if state.connected and weights is not None:
                self._send(sock, state.identity, frames=weights[0])
                log.debug("weights v%d sent to %s", weights[1], state.robot)

    def _send(self, sock: zmq.Socket, identity: bytes, msg: Message | None = None,
              frames: list[Any] | None = None) -> None:
        if msg is not None:
            msg.run = self.server_id  # lets a robot tell this learner process from a restarted one
        parts = frames if frames is not None else encode(msg)  # type: ignore[arg-type]
        # A robot whose queue is full gets the next heartbeat/ack/weights instead.
        with contextlib.suppress(zmq.Again):
            sock.send_multipart([identity, *parts], zmq.NOBLOCK, copy=False)


def plain_stats(meta: dict[str, Any]) -> dict[str, Any]:
    """A robot's heartbeat figures as a few short plain values, made at receipt: they go to the status table,
    metrics and summary.json, so msgpack bytes, containers and long or multi-line text become escaped strings."""
    stats: dict[str, Any] = {}
    for key, value in list(meta.items())[:MAX_STATS]:
        if value is None or isinstance(value, bool | int | float):
            stats[printable(key, STAT_CHARS)] = value
        else:
            text = value if isinstance(value, str | bytes) else repr(value)
            stats[printable(key, STAT_CHARS)] = printable(text, STAT_CHARS)
    return stats


def _storable(spec: RunSpec, robot: str) -> str | None:
    """Why the replay store could not hold steps of this layout (None if it can): checked at hello,
    before the layout is adopted for the run."""
    # Zero-stride views: the layout is checked without allocating a step (a peer chose its size).
    example = {k: np.broadcast_to(np.zeros((), f.dtype), f.shape) for k, f in spec.layout.items()}
    try:
        StepSpec.from_step(example, robot)
    except (ValueError, TypeError) as err:
        return str(err)
    return None


def _server_keys(cfg: LinkConfig) -> ServerKeys | None:
    if cfg.server_secret is None or cfg.allow_dir is None:
        return None
    return ServerKeys(Path(cfg.server_secret), Path(cfg.allow_dir))
