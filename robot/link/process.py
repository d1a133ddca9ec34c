"""The robot <-> learner link run in a child process, so that it never holds the control loop's GIL.

Why a process: from a thread, the link's disk and socket work stalls the control loop's process
now and then when the machine's disk is busy (measured with the robot on its own CPU beside 8
flooding robots: p99 period error 74 % at 50 Hz with the link in a thread, 2.4-2.9 % in a process).
Here a child process (multiprocessing 'spawn': the parent has torch threads and must never be
forked) owns the `Spool` and a `RobotLink`; this side keeps the `Link` contract and only moves bytes
through two one-way pipes, with two threads that spend their time blocked in I/O (GIL released).

Nothing is pickled: a pipe message is a frame count, then frames; frame 0 is a small msgpack
envelope, chunks travel as the wire protocol's frames (`encode`), weights as one raw blob frame.
The child exits when this side closes it (spooling everything, then "bye"), on EOF of its pipe or
when its parent pid changes (the parent died), and on SIGTERM, spooling what it holds in each case;
it ignores SIGINT, which a terminal sends to the whole process group: the parent decides.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import multiprocessing as mp
import os
import signal
import struct
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, fields, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from core.link.protocol import DEFAULT_MAX_BYTES, MAX_FRAMES, decode
from core.link.security import ClientKeys, LinkSecurityError
from robot.link.base import LinkBase, message_bytes
from robot.link.contract import ChunkTooBig, LinkError, LinkRefused, LinkStatus, Weights
from robot.link.spool import Spool, SpoolFull
from robot.link.thread import RobotLink

_CTX = mp.get_context("spawn")
_COUNT = struct.Struct("<I")
_MAX_PIPE_FRAMES = MAX_FRAMES + 1  # a protocol message plus the envelope
_STATUS_EVERY_S = 0.1  # the child reports its status at least this often (and whenever it changes)
_CHILD_TURN_S = 0.02  # longest the child waits on its pipe: how fast weights and status changes go up
_KILL_WAIT_S = 2.0
_STATUS_FIELDS = frozenset(f.name for f in fields(LinkStatus))
_LOG_FORMAT = "%(asctime)s %(processName)s %(name)s %(levelname)s %(message)s"


# --- framing: no pickle in either direction ---------------------------------------------------------------------


def _send(conn: Connection, envelope: dict[str, Any], frames: Sequence[bytes | memoryview] = ()) -> None:
    """One pipe message: the frame count, the msgpack envelope, then each frame as is (no copy)."""
    conn.send_bytes(_COUNT.pack(1 + len(frames)))
    conn.send_bytes(msgpack.packb(envelope, use_bin_type=True))
    for frame in frames:
        conn.send_bytes(frame)


def _recv(conn: Connection) -> tuple[dict[str, Any], list[bytes]]:
    """The next pipe message (envelope, frames); EOFError when the other process is gone."""
    (count,) = _COUNT.unpack(conn.recv_bytes(_COUNT.size))
    if not 1 <= count <= _MAX_PIPE_FRAMES:
        raise LinkError(f"link pipe: message of {count} frames (out of step)")
    envelope = msgpack.unpackb(conn.recv_bytes(), raw=False)
    return envelope, [conn.recv_bytes() for _ in range(count - 1)]


def _status_dict(status: LinkStatus) -> dict[str, Any]:
    return asdict(status)


def _status_from(data: dict[str, Any]) -> LinkStatus:
    return LinkStatus(**{k: v for k, v in data.items() if k in _STATUS_FIELDS})


# --- the child process -------------------------------------------------------------------------------------------


class _WatchedSpool(Spool):
    """A Spool that remembers why its last put failed, so the child can tell SpoolFull from a disk error."""

    put_error: BaseException | None = None

    def put(self, seq: int, frames: Sequence[bytes | memoryview], *, past_limit: bool = False) -> None:
        try:
            super().put(seq, frames, past_limit=past_limit)
        except BaseException as exc:
            self.put_error = exc
            raise
        self.put_error = None


class _Fatal(Exception):
    """The child's RobotLink cannot go on (its thread died)."""


class _Child:
    """The child's main loop: pipe -> RobotLink (chunks, stats), RobotLink -> pipe (weights, status)."""

    def __init__(self, down: Connection, up: Connection, cfg: dict[str, Any], stop: threading.Event) -> None:
        self.down, self.up, self.cfg, self.stop = down, up, cfg, stop
        self.log = logging.getLogger(cfg["log_name"])
        self.spool = _WatchedSpool(Path(cfg["spool_dir"]), cfg["spool_max_bytes"], self.log)
        keys = ClientKeys(Path(cfg["keys"][0]), Path(cfg["keys"][1])) if cfg["keys"] else None
        self.link = RobotLink(cfg["address"], cfg["robot_id"], self.spool, cfg["hello"], keys=keys,
                              heartbeat_s=cfg["heartbeat_s"], lost_after_s=cfg["lost_after_s"],
                              resend_after_s=cfg["resend_after_s"], max_bytes=cfg["max_bytes"], log=self.log)
        self.received = 0  # chunks taken from the pipe and submitted
        self.close_timeout = 2.0
        self.closing = False
        self.last: dict[str, Any] | None = None
        self.reported_at = 0.0

    def serve(self) -> None:
        """Move data until told to close, the parent is gone, or SIGTERM."""
        while not (self.closing or self.stop.is_set()):
            if os.getppid() != self.cfg["parent_pid"]:
                self.log.warning("robot link %s: parent process gone; closing the link", self.cfg["robot_id"])
                return
            try:
                if self.down.poll(_CHILD_TURN_S):
                    self._drain()
                self._forward_weights()
                self._report()
            except (EOFError, BrokenPipeError, ConnectionResetError):
                self.log.warning("robot link %s: parent closed the pipe; closing the link", self.cfg["robot_id"])
                return

    def close(self) -> None:
        """Spool what is in memory, say bye, tell the parent (best effort: it may be gone)."""
        self.link.close(self.close_timeout)
        self._report(kind="closed")

    def _drain(self) -> None:
        for _ in range(64):  # then weights and status get a turn
            envelope, frames = _recv(self.down)
            kind = envelope["k"]
            if kind == "chunk":
                self._submit(frames)
            elif kind == "stats":
                self.link.set_stats(**envelope["m"])
            elif kind == "close":
                self.close_timeout, self.closing = float(envelope["timeout"]), True
                return
            if not self.down.poll(0):
                return

    def _submit(self, frames: list[bytes]) -> None:
        # The parent encoded (and checked) these frames: decode them whatever their size. A chunk over
        # link.max_message_mb is still spooled (the parent says why it cannot be sent); it must never
        # kill this process with recorded steps in it.
        arrays = decode(frames, message_bytes(frames)).arrays
        self.received += 1
        try:
            self.link.submit(arrays)  # always queued; the errors are in the status the parent gets
        except (SpoolFull, ChunkTooBig, LinkRefused):
            pass
        except LinkError as exc:
            if not isinstance(exc.__cause__, OSError):  # not a spool error: the link thread died
                raise _Fatal(str(exc)) from exc

    def _forward_weights(self) -> None:
        weights = self.link.take_weights()
        if weights is not None:
            meta = {"k": "weights", "version": weights.version, "step": weights.step, "received": weights.received}
            _send(self.up, meta, [weights.blob])

    def _report(self, kind: str = "status") -> None:
        """Send the status when it changed or every _STATUS_EVERY_S (always for 'closed')."""
        status = _status_dict(self.link.status())
        now = time.monotonic()
        if kind == "status" and status == self.last and now - self.reported_at < _STATUS_EVERY_S:
            return
        full = isinstance(self.spool.put_error, SpoolFull)
        _send(self.up, {"k": kind, "s": status, "received": self.received, "full": full})
        self.last, self.reported_at = status, now


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored while a child is spawned: an ignored signal stays ignored across exec and Python
    then installs no KeyboardInterrupt handler, so a Ctrl-C while the child is still importing
    (before `_child_main` can ignore it) does not kill it. Only the main thread may set handlers;
    elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _child_main(down: Connection, up: Connection, cfg: dict[str, Any]) -> None:
    """Entry point of the link process ('spawn' imports this module and calls it by name)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C hits the whole group: the parent decides
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # terminate(): close gracefully, keeping the data
    logging.basicConfig(level=cfg["log_level"], format=_LOG_FORMAT)
    import torch

    torch.set_num_threads(1)  # weight checks must not spread over the control loop's cores
    try:
        child = _Child(down, up, cfg, stop)
        child.link.start()
    except BaseException as exc:  # noqa: BLE001 - reported to start() in the parent
        family = "security" if isinstance(exc, LinkSecurityError) else "os" if isinstance(exc, OSError) else "other"
        _send(up, {"k": "failed", "family": family, "error": f"{type(exc).__name__}: {exc}"})
        _exit(2)
    _send(up, {"k": "started", "run_id": child.link.run_id, "s": _status_dict(child.link.status())})
    code = 0
    try:
        child.serve()
    except _Fatal as exc:
        child.log.critical("robot link %s: %s", cfg["robot_id"], exc)
        _try_send(up, {"k": "fatal", "error": str(exc)})
        code = 3
    except BaseException as exc:
        child.log.critical("robot link %s: link process failed: %r", cfg["robot_id"], exc, exc_info=True)
        _try_send(up, {"k": "fatal", "error": f"{type(exc).__name__}: {exc}"})
        code = 3
    finally:
        with contextlib.suppress(OSError):  # the parent is gone: nobody to tell
            child.close()
    _exit(code)


def _exit(code: int) -> None:
    """Exit now: the link is closed and its data spooled; tearing down torch's interpreter state would only
    make the parent's close() wait."""
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)


def _try_send(conn: Connection, envelope: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        _send(conn, envelope)


# --- the parent side ---------------------------------------------------------------------------------------------


def _close_at_exit(ref: weakref.ref[LinkProcess]) -> None:
    """Runs before multiprocessing's own exit hook (atexit is LIFO): close cleanly, keeping the data."""
    link = ref()
    if link is not None:
        link.close()


class LinkProcess(LinkBase):
    """The `Link` contract with the link in a child process.

    Same semantics as RobotLink: `submit` never waits on the network, the disk or the pipe, always queues
    the chunk and raises SpoolFull / LinkError as RobotLink does; nothing recorded is dropped (chunks the
    child never got are spooled by `close()` in this process once the child has exited). The spool is
    given as (directory, max_bytes): the child owns the Spool. `run_id` is the child's, known after start().
    """

    def __init__(
        self,
        address: str,
        robot_id: str,
        spool: tuple[str | Path, int],
        hello_meta: dict,
        *,
        keys: ClientKeys | None = None,
        heartbeat_s: float = 0.5,
        lost_after_s: float = 2.0,
        resend_after_s: float = 3.0,
        max_bytes: int = DEFAULT_MAX_BYTES,
        log: logging.Logger | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        super().__init__(address, robot_id, hello_meta, keys=keys, heartbeat_s=heartbeat_s,
                         lost_after_s=lost_after_s, resend_after_s=resend_after_s, max_bytes=max_bytes, log=log,
                         start_timeout=start_timeout)
        self.run_id = ""  # the child RobotLink's run id, set by start()
        self.spool_dir, self.spool_max_bytes = Path(spool[0]), int(spool[1])
        self.start_timeout = float(start_timeout)
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._child_gone = threading.Event()  # the child's pipe reached EOF
        self._proc: Any = None
        self._down: Connection | None = None
        self._up: Connection | None = None
        self._threads: list[threading.Thread] = []
        self._at_exit: Any = None
        self._outbox: deque[list[bytes | memoryview]] = deque()  # encoded chunks the child has not got yet
        self._sent = 0  # chunks written to the pipe
        self._child_received = 0  # chunks the child reports it took from the pipe
        self._spool_full = False
        self._fatal = ""
        self._closed_clean = False  # the child said it spooled everything and exited
        self._close_timeout = 2.0
        self._status = LinkStatus(False, "", -1, 0, 0, None, 0, 0, "")

    # --- control-loop side -----------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The link process's pid (None before start)."""
        return None if self._proc is None else self._proc.pid

    @property
    def exitcode(self) -> int | None:
        """The link process's exit code once it has exited (negative: killed by that signal), else None."""
        return None if self._proc is None else self._proc.exitcode

    def start(self) -> None:
        """Start the child and wait until its RobotLink runs (LinkSecurityError here if keys are needed)."""
        if self._proc is not None or self._closed:
            raise LinkError(f"robot link {self.robot_id}: start() called twice or after close()")
        down_r, down_w = _CTX.Pipe(duplex=False)
        up_r, up_w = _CTX.Pipe(duplex=False)
        proc = _CTX.Process(target=_child_main, args=(down_r, up_w, self._child_config()),
                            name=f"robot-link-{self.robot_id}", daemon=True)
        try:
            with _sigint_ignored():
                proc.start()
        finally:
            down_r.close()  # only the child holds these ends now, so either side's death is EOF for the other
            up_w.close()
        try:
            started = self._await_start(proc, up_r)
        except BaseException:
            self._kill(proc)
            down_w.close()
            up_r.close()
            raise
        self.run_id, self._status = str(started["run_id"]), _status_from(started["s"])
        self._proc, self._down, self._up = proc, down_w, up_r
        self._threads = [threading.Thread(target=self._send_loop, name=f"link-send-{self.robot_id}", daemon=True),
                         threading.Thread(target=self._receive_loop, name=f"link-recv-{self.robot_id}", daemon=True)]
        for thread in self._threads:
            thread.start()
        self._at_exit = functools.partial(_close_at_exit, weakref.ref(self))
        atexit.register(self._at_exit)
        self.log.info("robot link %s: link process pid %d (run %s) -> %s", self.robot_id, proc.pid, self.run_id,
                      self.address)

    def close(self, timeout: float = 2.0) -> None:
        """Hand the child every chunk, let it spool them and say bye; kill it if it takes longer than
        `timeout` (plus a short grace); spool here whatever it never got. Never hangs."""
        if self._closed:
            return
        self._closed = True
        if self._proc is None:  # never started: still keep what was submitted
            self._spool_here()
            return
        self._close_timeout = timeout
        self._closing.set()
        self._wake.set()
        self._proc.join(timeout + 0.5)
        if self._proc.exitcode is None:
            self.log.error("robot link %s: link process did not stop within %.1f s; stopping it", self.robot_id,
                           timeout)
            self._kill(self._proc)
        for thread in self._threads:
            thread.join(1.0)
        self._report_lost()
        if not any(thread.is_alive() for thread in self._threads):
            for conn in (self._down, self._up):
                if conn is not None:
                    conn.close()
        if self._outbox:
            self._spool_here()
        if self._at_exit is not None:
            atexit.unregister(self._at_exit)

    def submit(self, arrays: dict[str, np.ndarray]) -> None:
        """Queue one chunk (copied) for the child; never waits on the network, the disk or the pipe.

        The chunk is always queued, so nothing recorded is dropped. Raises ProtocolError for a chunk the
        protocol refuses (nothing queued); once the chunk is queued: SpoolFull / LinkError when earlier chunks
        could not be spooled (they wait in memory), ChunkTooBig for a chunk over the message limit, LinkRefused
        when the learner refused this robot, and LinkError when the link process has died (this chunk waits
        here and is spooled by close()): the caller should stop the robot safely and report the message.
        """
        _, frames = self._encode_chunk(arrays)
        self._outbox.append(frames)
        self._wake.set()
        if self._proc is None:
            return
        if self._child_gone.is_set() or self._proc.exitcode is not None:
            raise LinkError(self._death())
        self._raise_unsent(frames)
        with self._lock:
            error, full = self._status.spool_error, self._spool_full
        if error:
            self._raise_unspooled(error, full, self.status().queued)

    def set_stats(self, **stats: Any) -> None:
        """Merge values into the robot's heartbeat meta (`LinkBase.set_stats`) and wake the sender thread."""
        super().set_stats(**stats)
        self._wake.set()

    def status(self) -> LinkStatus:
        """The child's newest status; `queued` also counts chunks still here or in the pipe."""
        with self._lock:
            status = replace(self._status)
            status.queued += len(self._outbox) + max(0, self._sent - self._child_received)
        return status

    # --- internals -------------------------------------------------------------------------------

    def _child_config(self) -> dict[str, Any]:
        keys = [str(self.keys.secret_file), str(self.keys.server_public_file)] if self.keys else None
        return {"address": self.address, "robot_id": self.robot_id, "spool_dir": str(self.spool_dir),
                "spool_max_bytes": self.spool_max_bytes, "hello": self.hello_meta, "keys": keys,
                "heartbeat_s": float(self.heartbeat_s), "lost_after_s": float(self.lost_after_s),
                "resend_after_s": float(self.resend_after_s), "max_bytes": self.max_bytes,
                "parent_pid": os.getpid(), "log_name": self.log.name, "log_level": self.log.getEffectiveLevel()}

    def _await_start(self, proc: Any, up: Connection) -> dict[str, Any]:
        """The child's 'started' message (run id, status) once its RobotLink runs; its start error raised here."""
        end = time.monotonic() + self.start_timeout
        while time.monotonic() < end:
            if not up.poll(0.1):
                if proc.exitcode is not None:
                    break
                continue
            try:
                envelope, _ = _recv(up)
            except EOFError:
                break
            if envelope["k"] == "started":
                return envelope
            if envelope["k"] == "failed":
                text = f"robot link {self.robot_id}: link process could not start: {envelope['error']}"
                errors = {"security": LinkSecurityError, "os": OSError}
                raise errors.get(envelope["family"], LinkError)(text)
        else:
            raise LinkError(f"robot link {self.robot_id}: link process did not start within {self.start_timeout} s")
        proc.join(1.0)
        raise LinkError(f"robot link {self.robot_id}: link process died while starting (exit code {proc.exitcode})")

    def _kill(self, proc: Any) -> None:
        """SIGTERM (the child closes gracefully), then SIGKILL."""
        if proc.exitcode is None:
            proc.terminate()
            proc.join(1.0)
        if proc.exitcode is None:
            proc.kill()
            proc.join(_KILL_WAIT_S)

    def _report_lost(self) -> None:
        """Chunks the child had (its memory, the pipe) when it died without closing cleanly are lost: say so."""
        with self._lock:
            lost = 0 if self._closed_clean else self._status.queued + max(0, self._sent - self._child_received)
        if lost:
            self.log.error("robot link %s: the link process ended (exit code %s) holding %d chunks not yet spooled "
                           "(lost)", self.robot_id, self._proc.exitcode, lost)

    def _death(self) -> str:
        code = self._proc.exitcode
        if code is None:
            how = "its pipe closed (exit code not known yet)"
        elif code < 0:
            how = f"exit code {code} ({signal.Signals(-code).name})"
        else:
            how = f"exit code {code}"
        why = f": {self._fatal}" if self._fatal else ""
        return (f"robot link {self.robot_id}: link process (pid {self._proc.pid}) died with {how}{why}; "
                f"{len(self._outbox)} chunks wait in memory (close() spools them)")

    def _send_loop(self) -> None:
        """Parent sender thread: outbox and stats -> pipe; blocks in pipe writes, never in submit()."""
        assert self._down is not None
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                closing = self._closing.is_set()
                self._send_pending(self._down)
                if closing:
                    _send(self._down, {"k": "close", "timeout": float(self._close_timeout)})
                    return
        except (OSError, EOFError, ValueError):
            pass  # the child is gone; the receiver thread notices, close() spools what is left here

    def _send_pending(self, down: Connection) -> None:
        while self._outbox:
            _send(down, {"k": "chunk"}, self._outbox[0])
            with self._lock:
                self._sent += 1
                self._outbox.popleft()
        with self._lock:
            stats, dirty, self._stats_dirty = self._stats, self._stats_dirty, False
        if dirty:
            _send(down, {"k": "stats", "m": stats})

    def _receive_loop(self) -> None:
        """Parent receiver thread: weights and status from the child; blocks in pipe reads."""
        assert self._up is not None
        try:
            while True:
                envelope, frames = _recv(self._up)
                self._on_message(envelope, frames)
        except (OSError, EOFError):
            pass
        except Exception:  # noqa: BLE001 - a bug here must not look like a live link
            self.log.exception("robot link %s: cannot read from the link process", self.robot_id)
        finally:
            self._child_gone.set()
            with self._lock:
                if not self._closed:
                    self._status.connected = False
                    self._status.last_error = "link process died"

    def _on_message(self, envelope: dict[str, Any], frames: list[bytes]) -> None:
        kind = envelope["k"]
        if kind in ("status", "closed"):
            with self._lock:
                self._status = _status_from(envelope["s"])
                self._child_received, self._spool_full = int(envelope["received"]), bool(envelope["full"])
                self._closed_clean = kind == "closed"
        elif kind == "weights":
            weights = Weights(int(envelope["version"]), int(envelope["step"]), frames[0], float(envelope["received"]))
            with self._lock:
                self._new_weights = weights
        elif kind == "fatal":
            self._fatal = str(envelope["error"])

    def _spool_here(self) -> None:
        """Spool, in this process, chunks the child never got (not started, or it died): the child has exited,
        so the spool directory is ours; RobotLink's close-without-start does exactly this."""
        if not self._outbox:
            return
        if self._proc is not None and self._proc.exitcode is None:
            self.log.error("robot link %s: link process still running; %d chunks in memory are lost", self.robot_id,
                           len(self._outbox))
            return
        chunks = [decode(frames, message_bytes(frames)).arrays for frames in self._outbox]
        self._outbox.clear()
        try:
            spool = Spool(self.spool_dir, self.spool_max_bytes, self.log)
        except OSError as exc:
            self.log.error("robot link %s: cannot open the spool %s: %d chunks lost: %s", self.robot_id,
                           self.spool_dir, len(chunks), exc)
            return
        first = spool.next_seq
        link = RobotLink(self.address, self.robot_id, spool, self.hello_meta, max_bytes=self.max_bytes, log=self.log)
        for arrays in chunks:
            with contextlib.suppress(SpoolFull, LinkError):  # queued all the same; close() writes them
                link.submit(arrays)
        link.close()
        with self._lock:
            self._status.spool_count, self._status.spool_bytes = spool.count, spool.bytes
            self._status.queued = len(chunks) - (spool.next_seq - first)
