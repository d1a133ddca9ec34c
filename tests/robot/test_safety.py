"""The safety layer: the command filter's guarantees hold for any policy output, the watchdog fires once per
stall from its own thread, the e-stop answers a file, a signal and a key on a real pseudo-terminal."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import termios
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from robot.safety import CommandFilter, EStop, SafetyEvent, SafetyLog, Watchdog

REPO = Path(__file__).resolve().parents[2]
TOL = 1e-9  # float rounding of last +- max_step; angles here are at most tens of radians


def _wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll with a generous deadline: these tests wait for threads, they never time them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


# --------------------------------------------------------------------------- command filter: properties


def _vec(n: int, elements: st.SearchStrategy[float]) -> st.SearchStrategy[np.ndarray]:
    return st.lists(elements, min_size=n, max_size=n).map(lambda v: np.array(v, dtype=np.float64))


@st.composite
def _filter_case(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    n = draw(st.integers(1, 12))
    lower = draw(_vec(n, st.floats(-10, 10)))
    upper = lower + draw(_vec(n, st.floats(0, 10)))
    step = st.floats(1e-3, 3.2)
    max_step = np.full(n, draw(step)) if draw(st.booleans()) else draw(_vec(n, step))  # scalar or per joint
    present = draw(_vec(n, st.floats(-30, 30)))  # may start outside the limits
    # Any float (huge, NaN, inf) or a plausible angle, so that in-range small steps happen too.
    element = st.floats() | st.floats(-15, 15) | st.sampled_from([np.nan, np.inf, -np.inf, 1e308, -1e308])
    goals = draw(st.lists(_vec(n, element), min_size=1, max_size=25))
    return lower, upper, max_step, present, goals


def _distance(x: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    return np.maximum(lower - x, 0.0) + np.maximum(x - upper, 0.0)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(_filter_case())
def test_every_command_is_safe_for_any_policy_output(case) -> None:
    lower, upper, max_step, present, goals = case
    names = [f"j{i}" for i in range(len(lower))]
    filt = CommandFilter(lower, upper, max_step if np.ptp(max_step) else float(max_step[0]), names)
    filt.reset(present)
    prev = present.copy()
    for goal in goals:
        out = filt(goal)
        assert out.dtype == np.float64 and out.shape == prev.shape
        assert np.all(np.isfinite(out))
        assert np.all(np.abs(out - prev) <= max_step + TOL), "moved more than max_step in one step"
        d_prev, d_out = _distance(prev, lower, upper), _distance(out, lower, upper)
        inside = d_prev == 0
        assert np.all(d_out[inside] == 0), "left the limits after being inside them"
        outside = ~inside
        assert np.all(d_out[outside] < d_prev[outside]), "did not move toward the range"
        assert np.all(d_out[outside] <= np.maximum(d_prev[outside] - max_step[outside], 0) + TOL)
        ok = np.isfinite(goal) & (goal >= lower) & (goal <= upper) & (np.abs(goal - prev) <= max_step)
        assert np.array_equal(out[ok], goal[ok]), "a safe goal was changed"
        held = ~np.isfinite(goal) & inside
        assert np.array_equal(out[held], prev[held]), "a NaN/inf joint did not hold its last command"
        assert np.array_equal(filt.last, out)
        prev = out


@settings(max_examples=200, deadline=None, database=None)
@given(st.data())
def test_a_safe_goal_passes_unchanged(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 12))
    lower = data.draw(_vec(n, st.floats(-10, 10)))
    upper = lower + data.draw(_vec(n, st.floats(0, 10)))
    max_step = data.draw(st.floats(1e-3, 3.2))
    present = lower + (upper - lower) * data.draw(_vec(n, st.floats(0, 1)))
    present = np.clip(present, lower, upper)
    goal = np.clip(present + max_step * data.draw(_vec(n, st.floats(-1, 1))), lower, upper)
    goal = np.where(np.abs(goal - present) <= max_step, goal, present)  # rounding may push one just past
    filt = CommandFilter(lower, upper, max_step, [f"j{i}" for i in range(n)])
    filt.reset(present)
    out = filt(goal)
    assert np.array_equal(out, goal)
    assert (filt.clamped, filt.rate_limited, filt.nonfinite) == (0, 0, 0)


# --------------------------------------------------------------------------- command filter: examples and errors


def _arm() -> CommandFilter:
    return CommandFilter(np.array([-1.0, -2.0, 0.0]), np.array([1.0, 2.0, 1.5]), 0.1, ["pan", "lift", "gripper"])


def test_clamps_then_rate_limits_and_counts() -> None:
    filt = _arm()
    filt.reset(np.array([0.95, 0.0, 0.0]))
    out = filt(np.array([5.0, 0.05, -3.0]))  # pan clamped to 1.0 (within a step), gripper clamped to 0.0
    np.testing.assert_array_equal(out, [1.0, 0.05, 0.0])
    assert (filt.clamped, filt.rate_limited) == (1, 0)
    out = filt(np.array([1.0, 1.0, 1.0]))  # lift and gripper rate-limited
    np.testing.assert_allclose(out, [1.0, 0.15, 0.1])
    assert (filt.clamped, filt.rate_limited) == (1, 1)


def test_powered_up_outside_the_limits_walks_back_without_jumping() -> None:
    filt = _arm()
    filt.reset(np.array([1.35, 0.0, 0.0]))  # pan 0.35 rad past its upper limit
    seen = [filt(np.array([0.0, 0.0, 0.0]))[0] for _ in range(5)]
    np.testing.assert_allclose(seen, [1.25, 1.15, 1.05, 0.95, 0.85])


def test_nonfinite_goal_holds_counts_and_logs_once_per_joint(caplog: pytest.LogCaptureFixture) -> None:
    filt = _arm()
    filt.reset(np.array([0.2, 0.3, 0.4]))
    with caplog.at_level(logging.WARNING, logger="robot.safety"):
        for _ in range(3):
            out = filt(np.array([np.nan, 0.3, np.inf]))
            np.testing.assert_array_equal(out, [0.2, 0.3, 0.4])
    assert filt.nonfinite == 3
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "'pan'" in messages[0] and "nan" in messages[0]
    assert "'gripper'" in messages[1] and "inf" in messages[1]


def test_float32_goal_is_accepted_and_result_is_float64() -> None:
    filt = _arm()
    filt.reset(np.zeros(3))
    out = filt(np.array([0.05, -0.05, 0.05], dtype=np.float32))
    assert out.dtype == np.float64


def test_shape_errors_name_the_expected_size() -> None:
    filt = _arm()
    with pytest.raises(ValueError, match=r"present position: expected shape \(3,\).*got shape \(2,\)"):
        filt.reset(np.zeros(2))
    filt.reset(np.zeros(3))
    with pytest.raises(ValueError, match=r"goal: expected shape \(3,\).*'pan', 'lift', 'gripper'.*got shape \(4,\)"):
        filt(np.zeros(4))
    with pytest.raises(ValueError, match=r"upper: expected shape \(2,\)"):
        CommandFilter(np.zeros(2), np.ones(3), 0.1, ["a", "b"])
    with pytest.raises(ValueError, match=r"max_step: expected shape \(2,\)"):
        CommandFilter(np.zeros(2), np.ones(2), np.array([0.1, 0.1, 0.1]), ["a", "b"])


def test_limit_errors_name_the_joint() -> None:
    with pytest.raises(ValueError, match=r"joint 'lift': lower limit 3.0 is above upper limit 2.0"):
        CommandFilter(np.array([-1.0, 3.0]), np.array([1.0, 2.0]), 0.1, ["pan", "lift"])
    with pytest.raises(ValueError, match=r"joint 'pan': limits must be finite"):
        CommandFilter(np.array([-np.inf, 0.0]), np.array([1.0, 2.0]), 0.1, ["pan", "lift"])
    with pytest.raises(ValueError, match=r"joint 'lift': max_step must be a positive"):
        CommandFilter(np.zeros(2), np.ones(2), np.array([0.1, 0.0]), ["pan", "lift"])
    with pytest.raises(ValueError, match=r"present position of joint 'pan' is nan"):
        _arm().reset(np.array([np.nan, 0.0, 0.0]))


def test_command_before_reset_is_an_error() -> None:
    with pytest.raises(RuntimeError, match=r"reset\(present\)"):
        _arm()(np.zeros(3))


# --------------------------------------------------------------------------- watchdog

WD_TIMEOUT = 0.5  # generous: a feeding thread starved on a busy 2-core machine must not look like a stall


class _Fires:
    """An on_fire that records when and on which thread it ran."""

    def __init__(self, raise_error: bool = False) -> None:
        self.times: list[float] = []
        self.threads: list[str] = []
        self.raise_error = raise_error

    def __call__(self) -> None:
        self.times.append(time.monotonic())
        self.threads.append(threading.current_thread().name)
        if self.raise_error:
            raise RuntimeError("on_fire failed on purpose")


def _policy(wd: Watchdog, feed_for: float) -> float:
    """A policy thread that feeds every 10 ms for `feed_for` seconds, then stalls; returns when it stalled."""
    stalled: list[float] = []

    def loop() -> None:
        end = time.monotonic() + feed_for
        while time.monotonic() < end:
            wd.feed()
            time.sleep(0.01)
        stalled.append(time.monotonic())

    thread = threading.Thread(target=loop, name="policy")
    thread.start()
    thread.join()
    return stalled[0]


def test_watchdog_fires_once_per_stall_from_its_own_thread_and_rearms() -> None:
    fires = _Fires()
    with Watchdog(WD_TIMEOUT, fires, name="policy-watchdog") as wd:
        stalled_at = _policy(wd, feed_for=4 * WD_TIMEOUT)
        assert wd.fired == 0, "fired while fed regularly"
        assert _wait_until(lambda: wd.fired == 1)
        assert fires.times[0] >= stalled_at
        assert fires.threads == ["policy-watchdog"]
        time.sleep(3 * WD_TIMEOUT)
        assert wd.fired == 1 and len(fires.times) == 1, "fired more than once for one stall"
        wd.feed()  # re-arms
        assert _wait_until(lambda: wd.fired == 2)
        assert len(fires.times) == 2


def test_watchdog_does_not_fire_while_paused() -> None:
    fires = _Fires()
    with Watchdog(WD_TIMEOUT, fires) as wd:
        with wd.paused():
            time.sleep(4 * WD_TIMEOUT)  # a slow move home: no feeds
            assert wd.fired == 0
        resumed = time.monotonic()
        assert _wait_until(lambda: wd.fired == 1), "did not watch again after the pause"
        assert fires.times[0] >= resumed


def test_watchdog_survives_an_exception_in_on_fire(caplog: pytest.LogCaptureFixture) -> None:
    fires = _Fires(raise_error=True)
    with caplog.at_level(logging.ERROR, logger="robot.safety"), Watchdog(WD_TIMEOUT, fires, name="wd-x") as wd:
        assert _wait_until(lambda: wd.fired == 1 and len(fires.times) == 1)
        wd.feed()
        assert _wait_until(lambda: len(fires.times) == 2), "the watchdog thread died with on_fire"
    assert any("wd-x" in r.getMessage() and "on_fire raised" in r.getMessage() for r in caplog.records)


def test_watchdog_can_be_stopped_from_on_fire_and_twice() -> None:
    done = threading.Event()
    wd: Watchdog

    def on_fire() -> None:
        wd.stop()
        done.set()

    wd = Watchdog(0.1, on_fire, name="self-stop")
    wd.start()
    assert done.wait(5)
    assert _wait_until(lambda: not any(t.name == "self-stop" for t in threading.enumerate()))
    wd.stop()
    with pytest.raises(ValueError, match="'bad'.*positive"):
        Watchdog(0.0, on_fire, name="bad")


def test_watchdog_start_twice_is_an_error() -> None:
    with Watchdog(1.0, lambda: None, name="twice") as wd, pytest.raises(RuntimeError, match="'twice'"):
        wd.start()


# --------------------------------------------------------------------------- e-stop


class _Triggers:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def __call__(self, reason: str) -> None:
        self.calls.append((reason, threading.current_thread().name))


def _close_within(estop: EStop, timeout: float = 5.0) -> None:
    closer = threading.Thread(target=estop.close)  # the watch thread is blocked in select: close must not hang
    closer.start()
    closer.join(timeout)
    assert not closer.is_alive(), "EStop.close() hung"


def test_estop_file_appearing_triggers(tmp_path: Path) -> None:
    path = tmp_path / "stop-now"
    calls = _Triggers()
    with EStop(file=path, signum=None, on_trigger=calls) as estop:
        assert not estop.triggered.wait(0.3)
        path.touch()
        assert estop.triggered.wait(5)
        assert estop.reason == f"e-stop file {path} appeared"
        assert _wait_until(lambda: len(calls.calls) == 1)
    assert calls.calls == [(estop.reason, "estop")]


def test_estop_file_present_at_start_triggers_at_once(tmp_path: Path) -> None:
    path = tmp_path / "left-over"
    path.touch()
    with EStop(file=str(path), signum=None) as estop:
        assert estop.triggered.wait(5)
        assert str(path) in estop.reason


def test_estop_signal_triggers_and_old_handler_is_restored() -> None:
    assert threading.current_thread() is threading.main_thread()
    original = signal.getsignal(signal.SIGUSR1)

    def previous(signum: int, frame: object) -> None:
        pass

    signal.signal(signal.SIGUSR1, previous)
    try:
        calls = _Triggers()
        with EStop(on_trigger=calls) as estop:
            assert signal.getsignal(signal.SIGUSR1) is not previous
            os.kill(os.getpid(), signal.SIGUSR1)
            assert estop.triggered.wait(5)
            assert estop.reason == "e-stop signal SIGUSR1 received"
            assert _wait_until(lambda: len(calls.calls) == 1)
            assert calls.calls[0][1] == "estop"  # cut torque off the main thread, which may hold the bus lock
        assert signal.getsignal(signal.SIGUSR1) is previous
    finally:
        signal.signal(signal.SIGUSR1, original)


def test_estop_signal_source_is_off_outside_the_main_thread(caplog: pytest.LogCaptureFixture) -> None:
    before = signal.getsignal(signal.SIGUSR2)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with EStop(signum=signal.SIGUSR2) as estop:
                assert signal.getsignal(signal.SIGUSR2) is before
                assert not estop.triggered.is_set()
        except BaseException as e:  # surfaced in the main thread below
            errors.append(e)

    with caplog.at_level(logging.WARNING, logger="robot.safety"):
        thread = threading.Thread(target=run)
        thread.start()
        thread.join(10)
    assert not errors
    assert any("signal source (SIGUSR2) is off" in r.getMessage() for r in caplog.records)


@pytest.fixture
def pty_stdin():
    """The slave side of a real pseudo-terminal as a stdin stream, and the master fd to type into."""
    master, slave = os.openpty()
    stream = open(slave, "rb", buffering=0, closefd=False)  # noqa: SIM115 - closed below
    try:
        yield master, slave, stream
    finally:
        stream.close()
        os.close(slave)
        os.close(master)


def test_estop_key_press_on_a_pty_triggers_and_close_restores_the_terminal(pty_stdin) -> None:
    master, slave, stream = pty_stdin
    before = termios.tcgetattr(slave)
    assert before[3] & termios.ICANON  # a fresh pty is in canonical mode
    calls = _Triggers()
    estop = EStop(key=True, signum=None, stdin=stream, on_trigger=calls)
    estop.start()
    during = termios.tcgetattr(slave)
    assert not during[3] & termios.ICANON and not during[3] & termios.ECHO, "not in cbreak mode"
    assert not estop.triggered.wait(0.3)
    os.write(master, b"q")  # one key, no Enter
    assert estop.triggered.wait(5)
    assert estop.reason == "e-stop key pressed: 'q'"  # names the key
    assert _wait_until(lambda: calls.calls == [("e-stop key pressed: 'q'", "estop")])
    _close_within(estop)
    assert termios.tcgetattr(slave) == before


def test_estop_offers_keys_to_the_handler_first_and_stops_on_the_rest(pty_stdin) -> None:
    master, _, stream = pty_stdin
    offered: list[tuple[str, str]] = []

    def keys(ch: str) -> bool:
        offered.append((ch, threading.current_thread().name))
        return ch in "ab"

    with EStop(key=True, signum=None, stdin=stream, keys=keys) as estop:
        os.write(master, b"ab")
        assert _wait_until(lambda: [c for c, _ in offered] == ["a", "b"])
        assert not estop.triggered.wait(0.3), "a key the handler took stopped the robot"
        os.write(master, b"z")
        assert estop.triggered.wait(5)
        assert estop.reason == "e-stop key pressed: 'z'"
        os.write(master, b"a")  # after the stop keys are no longer commands
        time.sleep(0.3)
    assert offered == [("a", "estop"), ("b", "estop"), ("z", "estop")]


def test_estop_stops_when_the_key_handler_raises(pty_stdin, caplog: pytest.LogCaptureFixture) -> None:
    master, _, stream = pty_stdin

    def keys(ch: str) -> bool:
        raise RuntimeError("prompt bug")

    with caplog.at_level(logging.ERROR, logger="robot.safety"), \
            EStop(key=True, signum=None, stdin=stream, keys=keys) as estop:
        os.write(master, b"p")
        assert estop.triggered.wait(5)
        assert estop.reason == "e-stop key pressed: 'p'"
    assert any("key handler raised on 'p'" in r.getMessage() for r in caplog.records)


def test_estop_close_restores_the_terminal_without_a_key(pty_stdin) -> None:
    _, slave, stream = pty_stdin
    before = termios.tcgetattr(slave)
    estop = EStop(key=True, signum=None, stdin=stream)
    estop.start()
    assert termios.tcgetattr(slave) != before
    _close_within(estop)
    assert termios.tcgetattr(slave) == before
    assert not estop.triggered.is_set()
    estop.close()  # idempotent


def test_estop_restores_the_terminal_at_exit_after_a_crash(pty_stdin) -> None:
    _, slave, _ = pty_stdin
    before = termios.tcgetattr(slave)
    script = textwrap.dedent(
        f"""
        import os, termios
        from robot.safety import EStop
        stream = os.fdopen({slave}, "rb", buffering=0)
        EStop(key=True, signum=None, stdin=stream).start()
        assert not termios.tcgetattr({slave})[3] & termios.ICANON
        print("cbreak on", flush=True)
        raise RuntimeError("crash without close")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", script], pass_fds=(slave,), capture_output=True, text=True, timeout=60, env=env
    )
    assert "cbreak on" in proc.stdout, proc.stderr
    assert proc.returncode != 0 and "crash without close" in proc.stderr
    assert termios.tcgetattr(slave) == before, "the terminal was left in cbreak mode"


def test_estop_key_source_off_when_stdin_is_not_a_tty(caplog: pytest.LogCaptureFixture) -> None:
    read_fd, write_fd = os.pipe()
    with open(read_fd, "rb", buffering=0) as pipe, caplog.at_level(logging.WARNING, logger="robot.safety"):
        with EStop(key=True, signum=None, stdin=pipe) as estop:
            os.write(write_fd, b"x")
            assert not estop.triggered.wait(0.3)
        os.close(write_fd)
    off = [r for r in caplog.records if "not a terminal" in r.getMessage()]
    assert len(off) == 1


def test_estop_trigger_is_idempotent_first_reason_wins() -> None:
    calls = _Triggers()
    estop = EStop(signum=None, on_trigger=calls)
    estop.trigger("first")
    estop.trigger("second")
    assert estop.reason == "first" and estop.triggered.is_set()
    assert [reason for reason, _ in calls.calls] == ["first"]


def test_estop_concurrent_triggers_call_back_once() -> None:
    calls = _Triggers()
    estop = EStop(signum=None, on_trigger=calls)
    barrier = threading.Barrier(8)

    def hit(i: int) -> None:
        barrier.wait()
        estop.trigger(f"thread {i}")

    threads = [threading.Thread(target=hit, args=(i,), name=f"hitter-{i}") for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls.calls) == 1
    reason, thread_name = calls.calls[0]
    assert estop.reason == reason and thread_name == f"hitter-{reason.split()[-1]}"


def test_estop_on_trigger_exception_is_logged_and_still_stops(caplog: pytest.LogCaptureFixture) -> None:
    def broken(reason: str) -> None:
        raise OSError("bus gone")

    estop = EStop(signum=None, on_trigger=broken)
    with caplog.at_level(logging.ERROR, logger="robot.safety"):
        estop.trigger("test")
    assert estop.triggered.is_set()
    assert any("on_trigger raised" in r.getMessage() for r in caplog.records)


def test_estop_start_twice_is_an_error() -> None:
    with EStop(signum=None) as estop, pytest.raises(RuntimeError, match="already started"):
        estop.start()


# --------------------------------------------------------------------------- safety log


def test_safety_log_record_and_take_from_two_threads(caplog: pytest.LogCaptureFixture) -> None:
    log = SafetyLog(max_pending=10_000)
    per_thread = 500
    taken: list[SafetyEvent] = []

    def produce(kind: str) -> None:
        for i in range(per_thread):
            log.record(kind, str(i))

    with caplog.at_level(logging.WARNING, logger="robot.safety"):
        producers = [threading.Thread(target=produce, args=(k,)) for k in ("watchdog", "bus_fault")]
        for t in producers:
            t.start()
        while any(t.is_alive() for t in producers):
            taken.extend(log.take())
        for t in producers:
            t.join()
        taken.extend(log.take())
    assert log.take() == []
    for kind in ("watchdog", "bus_fault"):
        assert [e.detail for e in taken if e.kind == kind] == [str(i) for i in range(per_thread)]
    assert log.counts == {"watchdog": per_thread, "bus_fault": per_thread}
    assert sum(r.levelno == logging.WARNING for r in caplog.records) == 2 * per_thread


def test_safety_log_event_fields_and_bounded_pending() -> None:
    log = SafetyLog(max_pending=3)
    before = time.time()
    event = log.record("estop", "e-stop key pressed")
    assert event == SafetyEvent(event.time, "estop", "e-stop key pressed") and event.time >= before
    for i in range(4):
        log.record("limit", f"joint {i}")
    assert [e.detail for e in log.take()] == ["joint 1", "joint 2", "joint 3"]  # the oldest went first
    assert log.counts == {"estop": 1, "limit": 4}
    with pytest.raises(ValueError, match="needs a kind"):
        log.record("", "no kind")
