"""The operator's prompt, driven through a real pseudo-terminal: keys typed into the master side reach
the e-stop's watch thread, which offers them to the prompt; the prompt prints back to the same terminal."""

from __future__ import annotations

import io
import logging
import os
import select
import termios
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from link_helpers import wait_for

from robot.operator import OperatorPrompt
from robot.safety import EStop

TIMEOUT = 10.0  # generous: the test machine is small and shared


@dataclass
class Terminal:
    """A prompt wired to an e-stop on a real pty; `type` presses keys, `read_until` reads what the prompt printed."""

    master: int
    slave: int
    prompt: OperatorPrompt
    estop: EStop
    screen: str = ""
    stops: list[str] = field(default_factory=list)

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def read_until(self, text: str, times: int = 1, timeout: float = TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while self.screen.count(text) < times:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.master], [], [], max(0.0, left))
            if not ready:
                raise AssertionError(f"{text!r} never appeared on the terminal; it shows:\n{self.screen}")
            self.screen += os.read(self.master, 4096).decode("utf-8", errors="replace").replace("\r\n", "\n")
        return self.screen


@pytest.fixture
def term() -> Iterator[Terminal]:
    master, slave = os.openpty()
    stdin = open(slave, "rb", buffering=0, closefd=False)  # noqa: SIM115 - closed below
    out = open(slave, "w", encoding="utf-8", closefd=False)  # noqa: SIM115 - closed below
    before = termios.tcgetattr(slave)
    prompt = OperatorPrompt.for_stdin(stdin, out=out)
    stops: list[str] = []
    estop = EStop(key=True, keys=prompt.handle_key, signum=None, stdin=stdin, on_trigger=stops.append)
    estop.start()
    try:
        yield Terminal(master, slave, prompt, estop, stops=stops)
    finally:
        closer = threading.Thread(target=estop.close)
        closer.start()
        closer.join(TIMEOUT)
        assert not closer.is_alive(), "EStop.close() hung"
        assert termios.tcgetattr(slave) == before, "the terminal settings were not restored"
        out.close()
        stdin.close()
        os.close(slave)
        os.close(master)


class Waiter:
    """Runs `prompt.wait` in a thread, as the robot's control loop would, counting the holds."""

    def __init__(self, prompt: OperatorPrompt, stopped: Callable[[], bool] | None = None, period_s: float = 0.01):
        self.holds = 0
        self.result: str | None = None
        self._thread = threading.Thread(target=self._run, args=(prompt, stopped, period_s), daemon=True)
        self._thread.start()

    def _hold(self) -> None:
        self.holds += 1

    def _run(self, prompt: OperatorPrompt, stopped: Callable[[], bool] | None, period_s: float) -> None:
        self.result = prompt.wait(self._hold, period_s, stopped)

    def join(self) -> str | None:
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive(), "wait() did not return"
        return self.result


def test_the_prompt_is_interactive_on_a_terminal(term: Terminal) -> None:
    assert term.prompt.interactive
    assert not term.prompt.paused
    assert term.prompt.take_episode_end() is None


def test_pause_holds_until_continue(term: Terminal) -> None:
    term.type(b"p")
    term.read_until("[pause] the episode ends at the next step")
    assert term.prompt.paused
    assert term.prompt.take_episode_end() == "paused by operator"
    assert term.prompt.take_episode_end() is None  # once

    waiter = Waiter(term.prompt, stopped=term.estop.triggered.is_set)
    term.read_until("[paused] paused by operator. c: continue, r: scene reset, any other key: E-STOP")
    wait_for(lambda: waiter.holds > 3, "wait() did not keep calling hold() while paused")
    assert waiter.result is None  # still waiting
    term.type(b"c")
    assert waiter.join() == "continue"
    term.read_until("[continue]")
    assert not term.prompt.paused
    assert term.prompt.counts == {"pauses": 1, "resets": 0, "requests": 0}
    assert not term.estop.triggered.is_set() and term.stops == []
    assert term.screen.count("[paused]") == 1  # the prompt line is printed once per pause


def test_reset_mid_episode_ends_it_and_marks_a_reset(term: Terminal) -> None:
    term.type(b"r")
    term.read_until("reset the scene, then press c")
    assert term.prompt.take_episode_end() == "reset marked by operator"
    waiter = Waiter(term.prompt)
    wait_for(lambda: waiter.holds > 1, "waiter.holds > 1")
    term.type(b"c")  # the scene is reset: go on
    assert waiter.join() == "reset"  # the next episode starts from a reset scene
    assert term.prompt.counts["resets"] == 1
    assert not term.estop.triggered.is_set()


def test_reset_while_paused_continues_with_a_reset(term: Terminal) -> None:
    term.type(b"P")  # upper case too
    wait_for(lambda: term.prompt.paused, "term.prompt.paused")
    assert term.prompt.take_episode_end() == "paused by operator"
    waiter = Waiter(term.prompt)
    wait_for(lambda: waiter.holds > 1, "waiter.holds > 1")
    term.type(b"R")
    assert waiter.join() == "reset"
    assert term.prompt.counts == {"pauses": 1, "resets": 1, "requests": 0}
    assert not term.estop.triggered.is_set()


def test_help_keys_print_help_and_do_not_stop(term: Terminal) -> None:
    for key in (b"h", b"?", b"H"):
        term.type(key)
    term.read_until("operator keys:", times=3)
    assert "p: pause" in term.screen and "r: scene reset" in term.screen
    term.type(b"c")  # not paused: a note, still no stop
    term.read_until("not paused")
    assert not term.estop.triggered.wait(0.3)
    assert not term.prompt.paused


@pytest.mark.parametrize(("keys", "named"), [(b"x", "'x'"), (b"\r", "'\\n'"), (b"\x1b[A", "'\\x1b'"),
                                             (b"\xc3\xa9", "'é'")])
def test_any_other_key_fires_the_estop_naming_it(term: Terminal, keys: bytes, named: str) -> None:
    term.type(keys)  # x, Enter (the tty turns CR into NL), an arrow key's escape sequence, a non-ASCII key
    assert term.estop.triggered.wait(TIMEOUT)
    assert term.estop.reason == f"e-stop key pressed: {named}"
    wait_for(lambda: term.stops == [term.estop.reason], "term.stops == [term.estop.reason]")


def test_commands_in_one_read_are_handled_until_a_stray_key(term: Terminal) -> None:
    term.type(b"hpxc")  # arrives as one read: help, pause, then a stray key; the `c` after the stop is ignored
    assert term.estop.triggered.wait(TIMEOUT)
    assert term.estop.reason == "e-stop key pressed: 'x'"
    assert term.prompt.paused, "the c typed after the e-stop must not look as if it undid it"
    assert "operator keys:" in term.read_until("[pause]")


def test_keys_after_the_estop_are_not_commands(term: Terminal) -> None:
    term.type(b"x")
    assert term.estop.triggered.wait(TIMEOUT)
    term.type(b"p")
    time.sleep(0.3)
    assert not term.prompt.paused
    assert term.prompt.take_episode_end() is None


def test_wait_returns_stopped_when_the_estop_fires_mid_pause(term: Terminal) -> None:
    term.type(b"p")
    wait_for(lambda: term.prompt.paused, "term.prompt.paused")
    waiter = Waiter(term.prompt, stopped=term.estop.triggered.is_set)
    wait_for(lambda: waiter.holds > 1, "waiter.holds > 1")
    term.type(b"q")
    assert waiter.join() == "stopped"
    assert term.estop.reason == "e-stop key pressed: 'q'"
    assert term.prompt.paused  # nothing continued


def test_request_prints_the_reason_and_waits_for_the_person(term: Terminal) -> None:
    reason = "the cube is outside both regions: put it in region A"
    term.prompt.request(reason)
    term.read_until(f"[paused] {reason}. c: continue")
    assert term.prompt.take_episode_end() == f"operator help requested: {reason}"
    waiter = Waiter(term.prompt)
    wait_for(lambda: waiter.holds > 1, "waiter.holds > 1")
    term.type(b"c")
    assert waiter.join() == "continue"
    assert term.screen.count(reason) == 1  # wait() did not print the prompt a second time
    assert term.prompt.counts == {"pauses": 0, "resets": 0, "requests": 1}


def test_request_while_paused_replaces_the_reason_and_an_early_continue(term: Terminal) -> None:
    term.type(b"p")
    wait_for(lambda: term.prompt.paused, "term.prompt.paused")
    term.type(b"c")  # answered before the robot looked at the scene ...
    term.read_until("[continue]")
    term.prompt.request("robot upside down: set it on its feet")  # ... which needs a person after all
    term.read_until("[paused] robot upside down: set it on its feet.")
    waiter = Waiter(term.prompt)
    wait_for(lambda: waiter.holds > 1, "the continue typed before the request answered it")
    term.type(b"c")
    assert waiter.join() == "continue"


def test_continue_before_the_episode_ended_returns_at_once(term: Terminal) -> None:
    term.type(b"pc")
    term.read_until("[continue]")
    assert term.prompt.take_episode_end() == "paused by operator"  # the pause still ends the episode
    holds: list[None] = []
    assert term.prompt.wait(lambda: holds.append(None), 0.01) == "continue"
    assert holds == []
    assert "[paused]" not in term.screen


def test_an_episode_end_not_taken_does_not_end_the_next_episode(term: Terminal) -> None:
    term.type(b"p")  # pressed between episodes: the robot waits without taking the end
    wait_for(lambda: term.prompt.paused, "term.prompt.paused")
    waiter = Waiter(term.prompt)
    wait_for(lambda: waiter.holds > 1, "waiter.holds > 1")
    term.type(b"c")
    assert waiter.join() == "continue"
    assert term.prompt.take_episode_end() is None


def test_wait_while_running_returns_at_once_without_holding() -> None:
    prompt = OperatorPrompt(out=io.StringIO())
    holds: list[None] = []
    assert prompt.wait(lambda: holds.append(None), 0.05) == "running"
    assert holds == []
    with pytest.raises(ValueError, match="period_s must be a positive"):
        prompt.wait(lambda: None, 0.0)


def test_without_a_terminal_the_prompt_never_blocks(caplog: pytest.LogCaptureFixture) -> None:
    read_fd, write_fd = os.pipe()
    out = io.StringIO()
    with open(read_fd, "rb", buffering=0) as pipe:
        prompt = OperatorPrompt.for_stdin(pipe, out=out)
    os.close(write_fd)
    assert not prompt.interactive
    holds: list[None] = []
    with caplog.at_level(logging.WARNING, logger="robot.operator"):
        prompt.request("robot upside down: set it on its feet")
        assert not prompt.paused
        assert prompt.take_episode_end() is None
        assert prompt.wait(lambda: holds.append(None), 0.01) == "running"
        prompt.handle_key("p")  # cannot arrive from a terminal; a direct call must still not hang wait()
        assert prompt.wait(lambda: holds.append(None), 0.01) == "running"
    assert holds == []
    assert prompt.counts["requests"] == 1
    messages = [r.getMessage() for r in caplog.records]
    assert any("no terminal to ask on" in m and "robot upside down" in m for m in messages), messages


def test_a_broken_output_stream_does_not_break_the_keys(caplog: pytest.LogCaptureFixture) -> None:
    out = io.StringIO()
    out.close()
    prompt = OperatorPrompt(out=out)
    with caplog.at_level(logging.WARNING, logger="robot.operator"):
        assert prompt.handle_key("p")
    assert prompt.paused
    assert any("could not write" in r.getMessage() for r in caplog.records)
