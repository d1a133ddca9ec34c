"""The robot's side of the robot <-> learner link, run in a background thread.

Why a thread and a spool: the control loop must never wait on the network (DayDreamer's actor hung
forever when the learner was down). `submit` only hands a chunk to the thread; the thread stores it
in the on-disk `Spool` first and sends it second, and deletes it only when the learner acknowledges
it, so a learner that is down, restarting or unreachable costs no experience. Everything the learner
sends is untrusted: messages are validated by the protocol, weights are checked (sha256, version,
finite tensors) before the control loop can take them.

Session: the robot says "hello" until a "welcome" names the learner process and the next seq it
expects; the robot then (re)sends every unacknowledged chunk, oldest first. Heartbeats flow every
`heartbeat_s`; silence for `lost_after_s` means the learner is lost, and the robot says hello again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import zmq

from core.link.protocol import (
    DEFAULT_MAX_BYTES,
    Message,
    ProtocolError,
    RejectLog,
    decode,
    encode,
    weights_checksum,
)
from core.link.security import ClientKeys, secure_client
from core.weights import CheckpointError, weights_from_bytes
from robot.link.base import LinkBase, message_bytes
from robot.link.contract import LinkError, LinkStatus, Weights
from robot.link.spool import Spool, SpoolCorrupt, SpoolFull

_POLL_MS = 50  # longest the thread sleeps: how fast it notices a submitted chunk or close()
_WINDOW = 64  # chunks sent and not yet acknowledged, at most (bounds what sits in zmq's queues)
_MAX_RECV_PER_TURN = 256
_MAX_REASON = 500  # characters of a learner's refusal reason kept (it is shown to the operator)


class RobotLink(LinkBase):
    """Robot <-> learner link in a thread: spool-first, non-blocking for the caller, resilient to learner restarts.

    Once started, the link thread owns `spool` and the socket; other threads use submit/take_weights/status.
    """

    def __init__(
        self,
        address: str,
        robot_id: str,
        spool: Spool,
        hello_meta: dict,
        *,
        keys: ClientKeys | None = None,
        heartbeat_s: float = 0.5,
        lost_after_s: float = 2.0,
        resend_after_s: float = 3.0,
        max_bytes: int = DEFAULT_MAX_BYTES,
        log: logging.Logger | None = None,
    ) -> None:
        super().__init__(address, robot_id, hello_meta, keys=keys, heartbeat_s=heartbeat_s,
                         lost_after_s=lost_after_s, resend_after_s=resend_after_s, max_bytes=max_bytes, log=log)
        self.spool = spool
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._inbox: deque[dict[str, np.ndarray]] = deque()  # submitted, not yet spooled (thread pops the left)
        self._put_error: BaseException | None = None  # why the last chunk could not be spooled; cleared on success
        self._fatal: BaseException | None = None  # the thread died of this
        self._rejects = RejectLog(self.log)
        self._status = LinkStatus(False, "", -1, spool.count, spool.bytes, None, 0, 0, "")

        # Thread-owned state (only the link thread touches these once it runs).
        self._connected = False
        self._server = ""  # learner process id from its welcome
        self._server_run = ""  # run field of the welcome header: later messages must carry the same
        self._acked = -1
        self._progress_at = time.monotonic()  # when an ack last advanced (or a welcome arrived)
        self._last_heard = 0.0  # monotonic
        self._heard_wall: float | None = None  # time.time() of the same, for status()
        self._sent_at: dict[int, float] = {}  # seq -> monotonic time of the last send
        self._next_hello = 0.0
        self._next_heartbeat = 0.0
        self._next_pump = 0.0
        self._weights_version = 0
        self._weights_run = ""  # learner run that sent the current weights; versions count per learner run
        self._rejected = 0
        self._last_rejection = ""
        self._last_error = ""
        self._error_logged = 0.0  # monotonic time the last unexpected error was logged
        self._refused = ""  # the learner's reason for refusing our hello; cleared by a welcome
        self._unsendable: set[int] = set()  # seqs over max_bytes, logged once each

    # --- control-loop side -----------------------------------------------------------------------

    def start(self) -> None:
        """Create and connect the socket (LinkSecurityError here if keys are needed), then start the thread."""
        if self._thread is not None or self._closed:
            raise LinkError(f"robot link {self.robot_id}: start() called twice or after close()")
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.setsockopt(zmq.SNDHWM, 1000)
            sock.setsockopt(zmq.RCVHWM, 1000)
            sock.setsockopt(zmq.RECONNECT_IVL, 100)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            sock.setsockopt(zmq.MAXMSGSIZE, self.max_bytes)
            sock.setsockopt(zmq.IDENTITY, f"{self.robot_id}/{self.run_id}".encode())
            secure_client(sock, self.address, self.keys, self.log)
            sock.connect(self.address)
        except BaseException:
            sock.close(linger=0)
            ctx.term()
            raise
        self.log.info("robot link %s (run %s) -> %s", self.robot_id, self.run_id, self.address)
        # The socket moves to the thread here; Thread.start is the memory barrier zmq asks for.
        self._thread = threading.Thread(target=self._run, args=(ctx, sock), name=f"robot-link-{self.robot_id}",
                                        daemon=True)
        self._thread.start()

    def close(self, timeout: float = 2.0) -> None:
        """Stop the thread: spool what is still in memory (past the spool's limit if it is full: the robot
        has stopped recording, and what it recorded is kept), say "bye" (best effort), drop unsent messages."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self.log.error("robot link %s: thread did not stop within %.1f s", self.robot_id, timeout)
                return
        if self._inbox:  # never started, or the thread died: it is gone, so the spool is ours
            self._spool_inbox(None, send=False, final=True)
            self._report_unspooled()

    def submit(self, arrays: dict[str, np.ndarray]) -> None:
        """Queue one chunk (copied) for the thread to spool and send; never waits on the network or the disk.

        The chunk is always queued, so nothing recorded is dropped (close() spools what is still in memory,
        past the spool's limit if need be). Raises ProtocolError for a chunk the protocol refuses (nothing
        queued); once the chunk is queued: SpoolFull / LinkError when earlier chunks could not be spooled
        (they wait in memory), ChunkTooBig for a chunk over the message limit, LinkRefused when the learner
        refused this robot, LinkError when the link thread died. The caller should stop the robot safely and
        report the message.
        """
        chunk, frames = self._encode_chunk(arrays)  # the thread's checks
        self._inbox.append(chunk)
        if self._fatal is not None:
            raise LinkError(f"robot link {self.robot_id}: link thread died: {self._fatal!r} (close() spools "
                            f"the {len(self._inbox)} chunks in memory)") from self._fatal
        self._raise_unsent(frames)
        if (err := self._put_error) is not None:
            self._raise_unspooled(err, isinstance(err, SpoolFull), len(self._inbox))

    def status(self) -> LinkStatus:
        """A consistent snapshot, safe to call from any thread: a submitted chunk is counted in `queued` until
        it is counted in `spool_count`, which it leaves only once the learner has acknowledged it."""
        with self._lock:
            status = replace(self._status)
            status.queued = len(self._inbox)
        return status

    # --- the thread ------------------------------------------------------------------------------

    def _run(self, ctx: zmq.Context, sock: zmq.Socket) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._turn(sock)
                except Exception as exc:  # noqa: BLE001 - logged, stored, surfaced by status(); the link keeps going
                    self._on_error(exc)
                    self._stop.wait(0.1)
        except BaseException as exc:
            self._fatal = exc
            self.log.critical("robot link %s: thread died: %r", self.robot_id, exc, exc_info=True)
            raise
        finally:
            self._shutdown(ctx, sock)

    def _on_error(self, exc: Exception) -> None:
        """Log with traceback; the same error repeating every turn is logged again at most every 10 s."""
        text = f"{type(exc).__name__}: {exc}"
        now = time.monotonic()
        if text != self._last_error or now - self._error_logged >= 10.0:
            self.log.error("robot link %s: unexpected error (the link keeps running): %s", self.robot_id, text,
                           exc_info=exc)
            self._error_logged = now
        self._last_error = text
        self._publish()

    def _shutdown(self, ctx: zmq.Context, sock: zmq.Socket) -> None:
        try:
            self._spool_inbox(sock, send=False, final=True)
            self._report_unspooled()
            if self._connected:
                self._send(sock, encode(Message("bye", self.robot_id, self.run_id)))
            self._publish()
        except Exception:  # noqa: BLE001 - shutdown must finish closing the socket
            self.log.exception("robot link %s: error while closing", self.robot_id)
        finally:
            sock.close(linger=0)
            ctx.term()

    def _report_unspooled(self) -> None:
        if self._inbox:
            self.log.critical("robot link %s: closing with %d chunks that could not be written to the spool %s "
                              "(lost): %s", self.robot_id, len(self._inbox), self.spool.directory, self._put_error)

    def _turn(self, sock: zmq.Socket) -> None:
        now = time.monotonic()
        due = self._next_heartbeat if self._connected else self._next_hello
        wait_ms = int(max(0.0, min(due - now, _POLL_MS / 1000)) * 1000)
        if sock.poll(wait_ms, zmq.POLLIN):
            self._receive(sock)
        self._spool_inbox(sock, send=True, limit=8)
        self._timers(sock)
        self._publish()

    def _receive(self, sock: zmq.Socket) -> None:
        for _ in range(_MAX_RECV_PER_TURN):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                msg = decode(frames, self.max_bytes)
            except ProtocolError as err:
                self._rejects.reject(err, f"learner at {self.address}")
                continue
            self._last_heard = time.monotonic()
            self._heard_wall = time.time()
            self._handle(sock, msg)

    def _handle(self, sock: zmq.Socket, msg: Message) -> None:
        if msg.kind == "welcome":
            self._on_welcome(sock, msg)
            return
        if self._connected and msg.run and self._server_run and msg.run != self._server_run:
            # Another learner process answers on this address (it restarted): start a new session.
            self.log.warning("robot link %s: %s from learner run %s, session is with run %s: saying hello again",
                             self.robot_id, msg.kind, msg.run, self._server_run)
            self._connected = False
            self._next_hello = 0.0
            if msg.kind != "weights":
                return
        if msg.kind == "ack":
            self._ack(msg.seq)
            self._pump(sock)
        elif msg.kind == "weights":
            self._on_weights(msg)
        elif msg.kind == "bye" and "reason" in msg.meta:
            self._on_refused(msg.meta["reason"])
        elif msg.kind == "bye":
            if self._connected:
                self.log.warning("robot link %s: learner %s said bye; spooling until it is back",
                                 self.robot_id, self._server)
            self._connected = False
            self._next_hello = 0.0
        elif msg.kind != "heartbeat":
            self._rejects.reject(ProtocolError("type", f"a learner does not send {msg.kind!r}"),
                                 f"learner at {self.address}")

    def _on_refused(self, reason: Any) -> None:
        """The learner answered hello with a reason to refuse: keep it for status() and submit() (the robot
        stops and says why); keep spooling, and ask again now and then (the learner may be restarted)."""
        text = "".join(c if c.isprintable() else "?" for c in str(reason))[:_MAX_REASON]
        if text != self._refused:
            self.log.error("robot link %s: the learner at %s refused this robot: %s", self.robot_id, self.address,
                           text)
        self._refused, self._connected = text, False
        self._next_hello = time.monotonic() + self.lost_after_s

    def _on_welcome(self, sock: zmq.Socket, msg: Message) -> None:
        server, next_seq = msg.meta["server"], msg.meta["next_seq"]
        self._refused = ""
        restarted = bool(self._server) and server != self._server
        if restarted:
            self.log.warning("robot link %s: learner restarted (%s -> %s): resending %d unacknowledged chunks",
                             self.robot_id, self._server, server, self.spool.count)
        fresh = restarted or not self._connected
        if not self._connected:
            self.log.info("robot link %s: connected to learner %s (it expects seq %d; %d chunks spooled)",
                          self.robot_id, server, next_seq, self.spool.count)
        self._connected = True
        self._progress_at = time.monotonic()
        self._server, self._server_run = server, msg.run
        self._next_heartbeat = 0.0
        if next_seq > self.spool.next_seq:
            # The learner already holds seqs this robot has not used (its spool was wiped): never reuse them,
            # or the learner would discard new chunks as duplicates.
            self.log.warning("robot link %s: learner expects seq %d but the spool is at %d; skipping ahead",
                             self.robot_id, next_seq, self.spool.next_seq)
            self.spool.skip_to(next_seq)
        self._ack(next_seq - 1)
        if fresh:
            self._sent_at.clear()  # whatever was in flight went to a session that is gone: send it all again
        self._pump(sock)

    def _ack(self, upto: int) -> None:
        if upto < 0:
            return
        self.spool.ack(upto)
        if upto > self._acked:
            self._progress_at = time.monotonic()
        self._acked = max(self._acked, upto)
        for seq in [s for s in self._sent_at if s <= upto]:
            del self._sent_at[seq]

    def _on_weights(self, msg: Message) -> None:
        version, blob = msg.seq, msg.arrays["blob"]
        reason = ""
        if version <= self._weights_version and msg.run == self._weights_run:
            reason = f"version {version} is not newer than the current version {self._weights_version}"
        elif (digest := weights_checksum(blob)) != msg.meta["sha256"]:
            reason = f"sha256 mismatch: blob hashes to {digest[:16]}..., header says {msg.meta['sha256'][:16]}..."
        else:
            data = bytes(blob)
            try:
                tensors, _ = weights_from_bytes(data)
            except CheckpointError as err:
                reason = f"not a weights blob: {err}"
            else:
                bad = [name for name, t in tensors.items() if not bool(torch.isfinite(t.float()).all())]
                if bad:
                    reason = f"tensor {bad[0]!r} has NaN or infinite values ({len(bad)} such tensors)"
        if reason:
            self._rejected += 1
            self._last_rejection = f"weights version {version} (step {msg.meta['step']}) refused: {reason}"
            self.log.warning("robot link %s: %s; keeping version %d", self.robot_id, self._last_rejection,
                             self._weights_version)
            return
        weights = Weights(version, msg.meta["step"], data, time.time())
        self._weights_version, self._weights_run = version, msg.run
        with self._lock:
            self._new_weights = weights
        self.log.info("robot link %s: weights version %d (step %d, %d bytes) verified", self.robot_id, version,
                      weights.step, len(data))

    def _spool_inbox(self, sock: zmq.Socket | None, send: bool, limit: int | None = None,
                     final: bool = False) -> None:
        """Spool (and send) queued chunks, at most `limit` per call so a backlog never starves the
        socket (acks and heartbeats keep flowing while it is worked off). `final` (closing): write them
        past the spool's limit, which has done its job (the robot stopped); experience is never dropped."""
        done = 0
        while self._inbox and (limit is None or done < limit):
            done += 1
            arrays = self._inbox[0]
            seq = self.spool.next_seq
            frames = encode(Message("steps", self.robot_id, self.run_id, seq, arrays=arrays))
            try:
                self.spool.put(seq, frames, past_limit=final)
            except (SpoolFull, OSError) as err:
                if self._put_error is None:
                    self.log.error("robot link %s: cannot spool seq %d: %s", self.robot_id, seq, err)
                self._put_error = err
                return
            if final and self.spool.bytes > self.spool.max_bytes:
                self.log.warning("robot link %s: seq %d written past the spool's limit (%d of %d bytes) while "
                                 "closing, so that no recorded step is lost", self.robot_id, seq, self.spool.bytes,
                                 self.spool.max_bytes)
            with self._lock:  # out of the queue and into the spool in one step, as status() sees it
                self._inbox.popleft()
                self._status.spool_count, self._status.spool_bytes = self.spool.count, self.spool.bytes
            if self._put_error is not None:
                if not final:
                    self.log.warning("robot link %s: spool has room again (seq %d stored)", self.robot_id, seq)
                self._put_error = None
            self._publish()  # status shows the chunk spooled before anything about its delivery
            # Send straight away only when every older chunk is already out (else _pump keeps oldest-first order).
            in_order = len(self._sent_at) == self.spool.count - 1
            if send and self._connected and in_order and len(self._sent_at) < _WINDOW and self._sendable(seq, frames) \
                    and self._send(sock, frames):
                self._sent_at[seq] = time.monotonic()

    def _timers(self, sock: zmq.Socket) -> None:
        now = time.monotonic()
        if self._connected and now - self._last_heard > self.lost_after_s:
            self.log.warning("robot link %s: learner lost: nothing from %s for %.1f s; spooling and saying hello",
                             self.robot_id, self._server, now - self._last_heard)
            self._connected = False
            self._next_hello = now
        if not self._connected:
            if now >= self._next_hello:
                self._send(sock, self._hello)
                self._next_hello = now + self.heartbeat_s
            return
        if now >= self._next_heartbeat:
            with self._lock:
                stats = dict(self._stats)
            meta = {**stats, "spool_count": self.spool.count, "spool_bytes": self.spool.bytes,
                    "weights_version": self._weights_version, "acked": self._acked}
            self._send(sock, encode(Message("heartbeat", self.robot_id, self.run_id, 0, meta=meta)))
            self._next_heartbeat = now + self.heartbeat_s
        if now >= self._next_pump:
            self._pump(sock)
            self._next_pump = now + min(self.heartbeat_s, self.resend_after_s)

    def _pump(self, sock: zmq.Socket) -> None:
        """Send spooled chunks never sent or unacknowledged for resend_after_s, oldest first, within the window."""
        if not self._connected:
            return
        now = time.monotonic()
        # Over one connection nothing is lost, only slow: while acks keep advancing, a busy learner
        # is working through the queue and resending would only add to its load. Resend once no
        # ack has advanced for resend_after_s (lost in flight, e.g. across a learner restart).
        stalled = now - self._progress_at >= self.resend_after_s
        in_flight = sum(1 for t in self._sent_at.values() if not stalled or now - t < self.resend_after_s)
        for seq in self.spool.pending():
            if in_flight >= _WINDOW:
                return
            sent = self._sent_at.get(seq)
            if sent is not None and (not stalled or now - sent < self.resend_after_s):
                continue
            try:
                frames = self.spool.load(seq)
            except SpoolCorrupt as err:
                self.log.error("robot link %s: %s", self.robot_id, err)
                continue
            if not self._sendable(seq, frames) or not self._send(sock, frames):
                return  # oldest first: nothing after a chunk that cannot go now
            if sent is not None:
                self.log.info("robot link %s: resending seq %d (unacknowledged for %.1f s)", self.robot_id, seq,
                              now - sent)
            self._sent_at[seq] = now
            in_flight += 1

    def _sendable(self, seq: int, frames: list) -> bool:
        """False for a chunk over max_bytes (logged once): the learner would refuse it and drop the connection.
        It stays in the spool for a run with a larger link.max_message_mb."""
        size = message_bytes(frames)
        if size <= self.max_bytes:
            return True
        if seq not in self._unsendable:
            self._unsendable.add(seq)
            self._last_error = (f"seq {seq} is {size} bytes, more than link.max_message_mb ({self.max_bytes} "
                                "bytes): kept in the spool, not sent")
            self.log.error("robot link %s: %s", self.robot_id, self._last_error)
        return False

    def _send(self, sock: zmq.Socket, frames: list) -> bool:
        """Never blocks: False when zmq cannot take the message now (no connection, queue full)."""
        try:
            sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        except zmq.ZMQError as err:
            self.log.debug("robot link %s: send failed: %s", self.robot_id, err)
            return False
        return True

    def _publish(self) -> None:
        with self._lock:
            s = self._status
            s.connected, s.server, s.acked = self._connected, self._server, self._acked
            s.spool_count, s.spool_bytes = self.spool.count, self.spool.bytes
            s.last_heard = self._heard_wall
            s.weights_version, s.weights_rejected, s.last_rejection = (
                self._weights_version, self._rejected, self._last_rejection)
            s.malformed, s.last_error = self._rejects.total, self._last_error
            s.queued, s.spool_error = len(self._inbox), "" if self._put_error is None else str(self._put_error)
            s.refused = self._refused
