"""The safety layer between every policy output and the motors, independent of any bus.

- `CommandFilter` clamps each goal to the joint limits and caps its change per control step, so a
  policy (or a bug) can never command a jump, a NaN, or an angle outside the calibrated range.
- `Watchdog` fires from its own thread when fresh commands stop arriving (a stalled policy, a hung
  link), so the backend can put the motors in a safe state without the control loop's help.
- `EStop` is a software e-stop fed by a signal, a file appearing, or a key press; it is no substitute
  for a physical switch that cuts servo power. Keys may first go to an operator prompt
  (`robot.operator.OperatorPrompt`): the few it knows pause or reset, every other key stops.
- `SafetyLog` keeps every safety event until the control loop takes it (for episode metadata).

The servo backend reads `cfg.safety` and passes plain values here, so this module imports no config.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import select
import signal
import sys
import termios
import threading
import time
import tty
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

import numpy as np

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- command filter


class CommandFilter:
    """Clamp to joint limits, then cap the change per control step (vectorised numpy, float64).

    The result is always inside [lower, upper] once the last command is, and never more than
    `max_step` from the last command. A last command outside the limits (the robot was powered up
    there) moves toward the range by at most `max_step` per step: it never jumps.
    """

    def __init__(
        self, lower: np.ndarray, upper: np.ndarray, max_step: float | np.ndarray, names: Sequence[str]
    ) -> None:
        self.names = tuple(str(n) for n in names)
        if not self.names:
            raise ValueError("CommandFilter needs at least one joint name")
        self.lower = self._vector(lower, "lower")
        self.upper = self._vector(upper, "upper")
        self.max_step = self._vector(np.full(len(self.names), max_step) if np.ndim(max_step) == 0 else max_step,
                                     "max_step")
        self._check_limits()
        self._last: np.ndarray | None = None
        self._warned: set[int] = set()
        self.clamped = 0  # steps where at least one joint's goal was outside its limits
        self.rate_limited = 0  # steps where at least one joint was slowed to max_step
        self.nonfinite = 0  # steps where at least one joint's goal was NaN or inf

    @property
    def last(self) -> np.ndarray | None:
        """The last command sent (a copy), or None before `reset`."""
        return None if self._last is None else self._last.copy()

    def reset(self, present: np.ndarray) -> None:
        """Start from the present position: the next command moves at most `max_step` from it."""
        present = self._vector(present, "present position")
        bad = np.flatnonzero(~np.isfinite(present))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"present position of joint {self.names[i]!r} is {present[i]}: cannot start from it")
        self._last = present

    def __call__(self, goal: np.ndarray) -> np.ndarray:
        """Return the goal actually sent (a new float64 array); it becomes the last command."""
        if self._last is None:
            raise RuntimeError("CommandFilter: call reset(present) before the first command")
        goal = self._vector(goal, "goal")
        last = self._last
        finite = np.isfinite(goal)
        if not finite.all():
            self._note_nonfinite(goal, finite)
        target = np.where(finite, goal, last)  # a NaN/inf joint holds its last command
        inside = np.clip(target, self.lower, self.upper)
        if np.any(finite & (inside != target)):
            self.clamped += 1
        delta = inside - last
        limited = np.abs(delta) > self.max_step
        if limited.any():
            self.rate_limited += 1
        # Where the step is small enough the target passes bit-exact; otherwise move exactly max_step.
        out = np.where(limited, last + np.sign(delta) * self.max_step, inside)
        self._last = out.copy()
        return out

    def _vector(self, value: Any, what: str) -> np.ndarray:
        n = len(self.names)
        try:
            arr = np.array(value, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{what}: expected {n} numbers (one per joint), got {value!r}") from e
        if arr.shape != (n,):
            raise ValueError(
                f"{what}: expected shape ({n},), one value per joint {list(self.names)}, got shape {arr.shape}"
            )
        return arr

    def _check_limits(self) -> None:
        for i, name in enumerate(self.names):
            lo, hi, step = self.lower[i], self.upper[i], self.max_step[i]
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError(f"joint {name!r}: limits must be finite, got lower={lo}, upper={hi}")
            if lo > hi:
                raise ValueError(f"joint {name!r}: lower limit {lo} is above upper limit {hi}")
            if not (math.isfinite(step) and step > 0):
                raise ValueError(f"joint {name!r}: max_step must be a positive finite angle, got {step}")

    def _note_nonfinite(self, goal: np.ndarray, finite: np.ndarray) -> None:
        self.nonfinite += 1
        for i in np.flatnonzero(~finite):
            if int(i) not in self._warned:  # once per joint: a broken policy would otherwise flood the log
                self._warned.add(int(i))
                log.warning("goal of joint %r is %s: holding its last command (logged once)", self.names[i], goal[i])


# --------------------------------------------------------------------------- watchdog


class Watchdog:
    """Fires `on_fire()` from its own thread when `feed()` has not been called for `timeout_s`.

    `start()` counts as a feed. After firing it stays quiet until the next `feed()` (at most one fire
    per stall). Checks run every timeout/5, so it fires between timeout_s and 1.2 * timeout_s late.
    """

    def __init__(self, timeout_s: float, on_fire: Callable[[], None], name: str = "watchdog") -> None:
        try:
            self.timeout_s = float(timeout_s)
        except (TypeError, ValueError):
            self.timeout_s = math.nan
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"watchdog {name!r}: timeout_s must be a positive number of seconds, got {timeout_s!r}")
        self.name = name
        self._on_fire = on_fire
        self._lock = threading.Lock()
        self._last_feed = time.monotonic()
        self._armed = True
        self._pauses = 0
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self.fired = 0

    def start(self) -> None:
        """Begin watching in a daemon thread; the start counts as a feed."""
        if self._thread is not None:
            raise RuntimeError(f"watchdog {self.name!r} is already running")
        self.feed()
        self._stop_event = threading.Event()  # a fresh one: an old thread stopped from on_fire keeps its own
        self._thread = threading.Thread(target=self._run, args=(self._stop_event,), name=self.name, daemon=True)
        self._thread.start()

    def feed(self) -> None:
        """A fresh command went out: restart the countdown and re-arm after a fire."""
        with self._lock:
            self._last_feed = time.monotonic()
            self._armed = True

    def stop(self) -> None:
        """Stop watching (safe to call from on_fire, and more than once)."""
        self._stop_event.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Suspend checking during a long deliberate action (a slow move home); the countdown restarts after."""
        with self._lock:
            self._pauses += 1
        try:
            yield
        finally:
            with self._lock:
                self._pauses -= 1
                self._last_feed = time.monotonic()

    def __enter__(self) -> Watchdog:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _run(self, stop: threading.Event) -> None:
        interval = self.timeout_s / 5
        while not stop.wait(interval):
            if self._expired():
                self._fire()

    def _expired(self) -> bool:
        """True once per stall: disarms and counts the fire under the lock."""
        with self._lock:
            if self._pauses or not self._armed or time.monotonic() - self._last_feed < self.timeout_s:
                return False
            self._armed = False
            self.fired += 1
            return True

    def _fire(self) -> None:
        try:
            self._on_fire()
        except Exception:  # the watchdog must outlive a failing handler
            log.exception("watchdog %r: on_fire raised; still watching", self.name)


# --------------------------------------------------------------------------- e-stop


def _tty_fileno(stream: IO | None) -> int | None:
    """The stream's file descriptor if it is a terminal, else None (pytest and pipes replace stdin)."""
    if stream is None:
        return None
    try:
        fd = stream.fileno()
    except (AttributeError, ValueError, OSError):
        return None
    return fd if os.isatty(fd) else None


class EStop:
    """A software e-stop that works at any time: a signal (SIGUSR1 by default), a file appearing, or a key press.

    With `keys`, each character typed is first offered to `keys(ch)` (an operator prompt's few
    commands); a character it does not take (returns False, or raises) stops the robot, so a
    stray key errs on the side of stopping. Without `keys` any key stops. Once stopped, keys are
    no longer offered: a late "continue" must not look as if it undid the stop.

    One daemon thread watches all sources. The signal handler only writes a byte to a pipe that the
    thread selects on: running `on_trigger` (which cuts torque over the bus) inside a handler on the
    main thread could deadlock on a lock the main thread already holds mid-transaction.
    `on_trigger` runs on the thread that noticed: the watch thread, or the caller of `trigger`.
    """

    POLL_S = 0.05  # file polling period, and the longest close() waits for the thread to notice

    def __init__(
        self,
        file: str | Path | None = None,
        key: bool = False,
        signum: int | None = signal.SIGUSR1,
        on_trigger: Callable[[str], None] | None = None,
        stdin: IO | None = None,
        keys: Callable[[str], bool] | None = None,
    ) -> None:
        self.file = Path(file) if file is not None else None
        self.key = key
        self.signum = signum
        self._on_trigger = on_trigger
        self._stdin = stdin
        self._keys = keys
        self.triggered = threading.Event()
        self.reason = ""
        self._once = threading.Lock()  # acquired by the first trigger and never released
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake_r: int | None = None
        self._wake_w: int | None = None
        self._old_handler: Any = None
        self._handler_installed = False
        self._tty_fd: int | None = None
        self._tty_saved: list[Any] | None = None
        self._started = False
        self._closed = False

    def start(self) -> None:
        """Install the sources and start the watch thread."""
        if self._started:
            raise RuntimeError("e-stop already started")
        self._started = True
        try:
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_r, False)
            os.set_blocking(self._wake_w, False)
            if self.signum is not None:
                self._install_signal()
            if self.key:
                self._open_key()
            self._thread = threading.Thread(target=self._watch, name="estop", daemon=True)
            self._thread.start()
        except BaseException:
            self.close()
            raise

    def trigger(self, reason: str) -> None:
        """Stop: the first reason wins and `on_trigger` runs once; later calls do nothing."""
        if not self._once.acquire(blocking=False):
            return
        self.reason = reason
        self.triggered.set()
        log.warning("E-STOP: %s", reason)
        if self._on_trigger is not None:
            try:
                self._on_trigger(reason)
            except Exception:
                log.exception("e-stop: on_trigger raised while handling %r", reason)

    def close(self) -> None:
        """Stop watching; restore the signal handler and the terminal settings. Idempotent."""
        if not self._started or self._closed:
            return
        self._closed = True
        restored = self._restore_signal()
        self._closing.set()
        self._wake(b"c")
        thread, self._thread = self._thread, None
        stopped = True
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
            stopped = not thread.is_alive()
            if not stopped:
                log.error("e-stop: the watch thread did not stop within 5 s (on_trigger still running?)")
        self._restore_tty()
        atexit.unregister(self._restore_tty)
        if restored and stopped:  # else a late handler or the thread may still use the pipe: leave it open
            self._close_pipe()

    def __enter__(self) -> EStop:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # signal source

    def _install_signal(self) -> None:
        name = signal.Signals(self.signum).name
        if threading.current_thread() is not threading.main_thread():
            log.warning("e-stop: started off the main thread, so the signal source (%s) is off", name)
            return
        self._old_handler = signal.signal(self.signum, self._on_signal)
        self._handler_installed = True
        log.info("e-stop: `kill -%s %d` stops the robot", name.removeprefix("SIG"), os.getpid())

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._wake(b"s")  # only an os.write: safe whatever the interrupted code holds

    def _restore_signal(self) -> bool:
        """Put the old handler back; False when it cannot be (not the main thread)."""
        if not self._handler_installed:
            return True
        if threading.current_thread() is not threading.main_thread():
            log.warning("e-stop: closed off the main thread; the %s handler stays installed",
                        signal.Signals(self.signum).name)
            return False
        signal.signal(self.signum, self._old_handler if self._old_handler is not None else signal.SIG_DFL)
        self._handler_installed = False
        return True

    # key source

    def _open_key(self) -> None:
        fd = _tty_fileno(self._stdin if self._stdin is not None else sys.stdin)
        if fd is None:
            log.warning("e-stop: stdin is not a terminal, so the key source is off")
            return
        self._tty_saved = termios.tcgetattr(fd)
        self._tty_fd = fd
        atexit.register(self._restore_tty)  # a crash that skips close() must not leave the terminal raw
        tty.setcbreak(fd)  # keys arrive one by one without Enter; Ctrl-C still sends SIGINT
        if self._keys is None:
            log.info("e-stop: press any key to stop the robot")
        else:
            log.info("e-stop: press p/c/r for the prompt (h: help); any other key stops the robot")

    def _restore_tty(self) -> None:
        saved, self._tty_saved = self._tty_saved, None
        if saved is None or self._tty_fd is None:
            return
        try:
            termios.tcsetattr(self._tty_fd, termios.TCSADRAIN, saved)
        except termios.error as e:
            log.warning("e-stop: could not restore the terminal settings of fd %d: %s", self._tty_fd, e)

    def _read_key(self) -> bool:
        """Offer each key to `keys`, trigger on the first it does not take; False when the terminal is gone."""
        assert self._tty_fd is not None
        try:
            data = os.read(self._tty_fd, 64)
        except OSError:
            data = b""
        if not data:
            log.warning("e-stop: the terminal closed, so the key source is off")
            return False
        for ch in data.decode("utf-8", errors="replace"):  # an arrow key's escape sequence starts with ESC: stops
            if self.triggered.is_set():
                break  # stopped: later keys are not commands any more
            if not self._offer_key(ch):
                self.trigger(f"e-stop key pressed: {ch!r}")
        return True

    def _offer_key(self, ch: str) -> bool:
        """True when `keys` took the character as an operator command."""
        if self._keys is None:
            return False
        try:
            return bool(self._keys(ch))
        except Exception:  # a broken prompt must not swallow a key meant to stop the robot
            log.exception("e-stop: the key handler raised on %r; treating the key as an e-stop", ch)
            return False

    # watch thread

    def _watch(self) -> None:
        assert self._wake_r is not None
        fds = [self._wake_r] + ([self._tty_fd] if self._tty_fd is not None else [])
        while not self._closing.is_set():
            self._check_file()
            ready, _, _ = select.select(fds, [], [], self.POLL_S)
            if self._wake_r in ready:
                self._drain_wake()
            if self._tty_fd is not None and self._tty_fd in ready and not self._read_key():
                fds.remove(self._tty_fd)

    def _check_file(self) -> None:
        if self.file is not None and self.file.exists():
            self.trigger(f"e-stop file {self.file} appeared")

    def _drain_wake(self) -> None:
        assert self._wake_r is not None
        try:
            data = os.read(self._wake_r, 512)
        except BlockingIOError:
            return
        if b"s" in data and self.signum is not None:
            self.trigger(f"e-stop signal {signal.Signals(self.signum).name} received")

    def _wake(self, byte: bytes) -> None:
        fd = self._wake_w
        if fd is None:
            return
        with contextlib.suppress(OSError):  # a full pipe already holds a wake-up
            os.write(fd, byte)

    def _close_pipe(self) -> None:
        fds = (self._wake_r, self._wake_w)
        self._wake_r = self._wake_w = None
        for fd in fds:
            if fd is not None:
                os.close(fd)


# --------------------------------------------------------------------------- event log


@dataclass(frozen=True)
class SafetyEvent:
    """One safety event. `kind`: "watchdog", "estop", "bus_fault", "servo_fault", "limit", ..."""

    time: float  # wall clock (time.time()), so events line up with logs and episode files
    kind: str
    detail: str


class SafetyLog:
    """Every safety event is logged (WARNING, once per event) and kept until the control loop takes it.

    At most `max_pending` events wait to be taken (the oldest go first); `counts` never forgets.
    """

    def __init__(self, max_pending: int = 1000) -> None:
        if max_pending < 1:
            raise ValueError(f"SafetyLog: max_pending must be at least 1, got {max_pending}")
        self._lock = threading.Lock()
        self._pending: deque[SafetyEvent] = deque(maxlen=max_pending)
        self._counts: Counter[str] = Counter()

    def record(self, kind: str, detail: str) -> SafetyEvent:
        """Log the event and keep it for `take`."""
        if not kind:
            raise ValueError(f"SafetyLog.record: an event needs a kind (detail was {detail!r})")
        event = SafetyEvent(time.time(), kind, detail)
        with self._lock:
            self._pending.append(event)
            self._counts[kind] += 1
        log.warning("safety %s: %s", kind, detail)
        return event

    def take(self) -> list[SafetyEvent]:
        """Every event recorded since the last take, oldest first (thread-safe drain)."""
        with self._lock:
            events = list(self._pending)
            self._pending.clear()
        return events

    @property
    def counts(self) -> dict[str, int]:
        """Events recorded so far per kind (a copy)."""
        with self._lock:
            return dict(self._counts)
