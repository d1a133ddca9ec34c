"""The operator's prompt on the robot's terminal: pause, continue and mark scene resets by key press.

Like DayDreamer's, it needs no display: a person at the robot's terminal presses `p` to pause (the
episode ends at the next step and the robot holds still), `c` to continue (a new episode starts),
`r` to mark a scene reset, `h` for help. Keys arrive from the e-stop's watch thread
(`EStop(key=True, keys=prompt.handle_key)`), so any key the prompt does not know stops the robot.
The robot or its task calls `request(reason)` when it needs a person (a cube out of reach, a
quadruped on its back) and `wait(hold, period_s)` between episodes, holding its pose while paused.

With no terminal (a service, a pipe) nobody can answer: the prompt never pauses, `request` only
logs a warning and `wait` returns at once, so an unattended robot keeps running instead of hanging.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import IO

log = logging.getLogger(__name__)

PAUSED = "paused by operator"
RESET = "reset marked by operator"
HELP = (
    "operator keys: p: pause (the episode ends, the robot holds still), c: continue, "
    "r: scene reset (mid-episode: end it now and reset the scene; paused: the scene was reset, continue), "
    "h or ?: this help; any other key: E-STOP"
)


def _is_terminal(stream: IO | None) -> bool:
    try:
        return stream is not None and os.isatty(stream.fileno())
    except (AttributeError, ValueError, OSError):  # no fileno (a StringIO), or a closed stream
        return False


class OperatorPrompt:
    """Pause/continue/reset by key press, thread-safe: keys come from the e-stop thread, `wait` runs on the robot's.

    State: running, or paused with a reason. A pause (by `p`, `r` mid-episode, or `request`) leaves one
    episode end for `take_episode_end`; `c` or `r` while paused ends the pause and wakes `wait`.
    """

    def __init__(self, interactive: bool = True, out: IO[str] | None = None) -> None:
        self.interactive = interactive
        self._out = out
        self._cond = threading.Condition()
        self._print_lock = threading.Lock()
        self._paused = False
        self._reason = ""
        self._reset_marked = False  # a reset was marked in this pause: `wait` answers "reset" even after `c`
        self._prompted = False  # the prompt line for this pause is on the screen
        self._outcome: str | None = None  # "continue" or "reset" once the person ended the pause
        self._episode_end: str | None = None
        self.counts = {"pauses": 0, "resets": 0, "requests": 0}

    @classmethod
    def for_stdin(cls, stdin: IO | None = None, out: IO[str] | None = None) -> OperatorPrompt:
        """Interactive only when stdin (default sys.stdin) is a terminal that a person can type into."""
        return cls(interactive=_is_terminal(stdin if stdin is not None else sys.stdin), out=out)

    @property
    def paused(self) -> bool:
        with self._cond:
            return self._paused

    # --- keys (the e-stop thread) ---------------------------------------------------------------------

    def handle_key(self, ch: str) -> bool:
        """Act on one typed character; False for a key that is not a command (the e-stop then fires)."""
        key = ch.lower()
        if key in ("h", "?"):
            self._say(HELP)
        elif key == "p":
            self._key_pause()
        elif key == "c":
            self._key_continue()
        elif key == "r":
            self._key_reset()
        else:
            return False
        return True

    def _key_pause(self) -> None:
        with self._cond:
            if self._paused:
                message = "[paused] already paused. c: continue, r: scene reset"
            else:
                self._pause(PAUSED, PAUSED)
                self.counts["pauses"] += 1
                message = "[pause] the episode ends at the next step; the robot holds still"
        log.info("operator: %s", message)
        self._say(message)

    def _key_continue(self) -> None:
        with self._cond:
            if not self._paused:
                message = "[running] not paused (p: pause, h: help)"
            else:
                self._resume("reset" if self._reset_marked else "continue")
                message = "[continue] a new episode starts"
        self._say(message)

    def _key_reset(self) -> None:
        with self._cond:
            if not self._reset_marked:  # one reset per pause, however often r is pressed
                self.counts["resets"] += 1
            if self._paused:
                self._reset_marked = True
                self._resume("reset")
                message = "[reset] scene reset marked; a new episode starts"
            else:
                self._pause(RESET, f"{RESET}: reset the scene, then press c")
                self._reset_marked = True
                message = "[reset] the episode ends now; reset the scene, then press c"
        log.info("operator: %s", message)
        self._say(message)

    # --- the robot's side -----------------------------------------------------------------------------

    def take_episode_end(self) -> str | None:
        """Why the running episode must end now ("paused by operator", ...), or None; each reason once."""
        with self._cond:
            reason, self._episode_end = self._episode_end, None
            return reason

    def request(self, reason: str) -> None:
        """Ask a person for help: pause (ending the episode) and say what to do; only a warning without a terminal."""
        with self._cond:
            self.counts["requests"] += 1
            if self.interactive and self._paused:  # already paused: this is what the person must do now
                self._reason = reason
                self._outcome = None  # a `c` pressed before the request does not answer it
            elif self.interactive:
                self._pause(f"operator help requested: {reason}", reason)
            self._prompted = True
        if not self.interactive:
            log.warning("operator help needed but no terminal to ask on (stdin is not a TTY); going on: %s", reason)
            return
        log.info("operator help needed: %s", reason)
        self._say(self._prompt_line(reason))

    def wait(self, hold: Callable[[], None], period_s: float, stopped: Callable[[], bool] | None = None) -> str:
        """Block while paused, calling `hold()` every `period_s`: "running", "continue", "reset" or "stopped".

        "running": not paused (or no terminal), returns at once. "continue"/"reset": the person pressed
        c/r ("reset" also after `c` when a reset was marked in this pause). "stopped": `stopped()`
        turned true (the e-stop fired); the prompt stays paused.
        """
        if not period_s > 0:
            raise ValueError(f"OperatorPrompt.wait: period_s must be a positive number of seconds, got {period_s!r}")
        with self._cond:
            if not self._paused:
                return "running"
            reason, prompted, self._prompted = self._reason, self._prompted, True
            answered = self._outcome  # c/r pressed before the episode had even ended
        if not self.interactive:  # only a direct handle_key call can pause without a terminal: nobody can resume
            log.warning("operator: paused (%s) but there is no terminal to continue from; going on", reason)
            self._end_pause()
            return "running"
        if answered is not None:
            self._end_pause()
            return answered
        if not prompted:
            self._say(self._prompt_line(reason))
        deadline = time.monotonic()
        while True:
            if stopped is not None and stopped():
                return "stopped"
            with self._cond:
                if self._outcome is not None:
                    outcome = self._outcome
                    self._end_pause()
                    return outcome
            hold()
            deadline += period_s
            with self._cond:
                self._cond.wait_for(lambda: self._outcome is not None, timeout=max(0.0, deadline - time.monotonic()))

    # --- internals ------------------------------------------------------------------------------------

    def _pause(self, episode_end: str, reason: str) -> None:
        """Enter the paused state (caller holds the lock); a pause already under way keeps its reason."""
        if self._paused:
            return
        self._paused = True
        self._reason = reason
        self._reset_marked = False
        self._prompted = False
        self._outcome = None
        self._episode_end = episode_end

    def _resume(self, outcome: str) -> None:
        """The person ended the pause (caller holds the lock): wake `wait`."""
        self._outcome = outcome
        self._cond.notify_all()

    def _end_pause(self) -> None:
        """Back to running; an episode end not yet taken belonged to the episode the pause ended."""
        with self._cond:
            self._paused = False
            self._outcome = None
            self._reset_marked = False
            self._episode_end = None

    @staticmethod
    def _prompt_line(reason: str) -> str:
        return f"[paused] {reason}. c: continue, r: scene reset, any other key: E-STOP"

    def _say(self, text: str) -> None:
        """One line to the operator, flushed; a broken stream is logged, never raised into the key thread."""
        out = self._out if self._out is not None else sys.stderr
        with self._print_lock:
            try:
                out.write(text + "\n")
                out.flush()
            except (OSError, ValueError) as e:
                log.warning("operator prompt: could not write to %r: %s (message: %s)", out, e, text)
