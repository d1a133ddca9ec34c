"""End to end over real TCP on loopback: a learner process (`reverie-learner serve`) and simulated
robot processes (`reverie-robot run`, PyBullet ArmReach from proprioception).

The robot writes a ledger of every step it produced (time + content hash); after the run the
learner's replay directory must hold exactly those steps, each once, whatever happened in
between: the learner SIGKILLed and restarted, a robot SIGKILLed, a learner that starts late, a
network cut by a test-owned TCP proxy.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from learner.checkpoint import latest_checkpoint, load_checkpoint
from learner.replay import Replay
from learner.replay.chunk_file import ChunkError, read_chunk
from learner.replay.context import restore_context
from robot.demo import free_port
from robot.runner import ledger_keys, step_digests

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "hardware_configs" / "sim_arm_reach_proprio.yaml"
HZ = 20
COMMON = ["--set", f"control.hz={HZ}", "--set", "sim.physics_hz=240", "--set", "link.robot_lost_s=3"]
LEARNER = ["--set", "train.prefill=40", "--set", "train.train_ratio=16", "--set", "link.weights_every_updates=1",
           "--set", "link.weights_every_s=1", "--set", "train.log_every=100", "--set", "train.checkpoint_every=200",
           "--set", "dreamer.threads=1"]
UP_S, AWAY_S = 4.0, 5.0  # the learner-restart test: the robot's rate is compared over these two phases
PROCS: list[subprocess.Popen] = []


class Learner:
    def __init__(self, logdir: Path, port: int) -> None:
        self.logdir, self.port = logdir, port
        self.proc: subprocess.Popen | None = None

    def start(self) -> Learner:
        cmd = [sys.executable, "-m", "learner.cli", "serve", "--config", str(CONFIG), "--logdir", str(self.logdir),
               "--bind", f"tcp://127.0.0.1:{self.port}", "--quiet", *COMMON, *LEARNER]
        self.log = open(self.logdir.parent / f"learner-{time.monotonic_ns()}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        PROCS.append(self.proc)
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def wait_for_line(self, text: str, limit: float = 60.0) -> None:
        """Until the learner's output holds `text` (warnings are printed; info lines are not)."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if text in (out := Path(self.log.name).read_text()):
                return
            time.sleep(0.1)
        raise AssertionError(f"the learner did not log {text!r} in {limit} s: {out[-3000:]}")

    def stop(self) -> dict:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        assert self.proc.wait(120) == 0, Path(self.log.name).read_text()[-3000:]
        self.log.close()
        lines = [ln for ln in Path(self.log.name).read_text().splitlines() if ln.startswith("{")]
        return json.loads(lines[-1])


def start_robot(tmp: Path, robot_id: str, port: int, seconds: float, *extra: str,
                log: Path | None = None) -> subprocess.Popen:
    """A robot process; its output is piped, or written to `log` (read while it runs)."""
    cmd = [sys.executable, "-m", "robot.cli", "run", "--config", str(CONFIG), "--learner", f"tcp://127.0.0.1:{port}",
           "--robot-id", robot_id, "--spool", str(tmp / f"spool-{robot_id}"), "--duration", str(seconds),
           "--ledger", str(tmp / f"ledger-{robot_id}.jsonl"), *COMMON, *extra]
    with open(log, "w") if log else contextlib.nullcontext(subprocess.PIPE) as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)
    PROCS.append(proc)
    return proc


def robot_summary(proc: subprocess.Popen, log: Path | None = None) -> dict:
    out, _ = proc.communicate(timeout=120)
    out = log.read_text() if log else out
    assert proc.returncode == 0, out[-3000:]
    return json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])


def wait_for_robot(robot: subprocess.Popen, log: Path, what: str, done: Callable[[], bool],
                   limit: float = 180.0) -> None:
    """Until `done()`; fails at once if the robot exits. Generous: a robot beside busy processes has taken 26 s
    from its start to its first step."""
    deadline = time.monotonic() + limit
    while not done():
        assert robot.poll() is None, f"the robot exited ({robot.returncode}) before {what}: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {limit} s: {log.read_text()[-3000:]}"
        time.sleep(0.2)


def ledger(tmp: Path, robot_id: str) -> tuple[list[float], list[str]]:
    times, digests = [], []
    for line in (tmp / f"ledger-{robot_id}.jsonl").read_text().splitlines():
        row = json.loads(line)
        times += row["time"]
        digests += row["digest"]
    return times, digests


def stored(logdir: Path, robot_id: str) -> tuple[list[float], list[str], dict[str, np.ndarray]]:
    """Every step of `robot_id` in the learner's replay directory, in time order."""
    times, digests, parts = [], [], []
    for path in sorted((logdir / "replay").glob("*.npz")):
        try:
            meta, steps, t, _ = read_chunk(path)
        except ChunkError:
            continue
        if meta.stream != robot_id:
            continue
        keys = ledger_keys({**steps, "action": None})
        times += t.tolist()
        digests += step_digests(steps, keys)
        parts.append(steps)
    order = np.argsort(times, kind="stable")
    flags = {k: np.concatenate([p[k] for p in parts])[order] for k in ("is_first", "is_last", "is_terminal")}
    return [times[i] for i in order], [digests[i] for i in order], flags


def assert_exactly_once(tmp: Path, logdir: Path, robot_id: str) -> int:
    produced_t, produced_d = ledger(tmp, robot_id)
    got_t, got_d, _ = stored(logdir, robot_id)
    dupes = [t for t, n in Counter(got_t).items() if n > 1]
    assert not dupes, f"{len(dupes)} steps stored more than once"
    assert len(got_t) == len(produced_t), f"robot produced {len(produced_t)} steps, learner stored {len(got_t)}"
    assert got_t == sorted(produced_t)
    assert sorted(got_d) == sorted(produced_d)  # same content, not just the same count
    return len(got_t)


def step_rate(times: np.ndarray) -> float:
    return (len(times) - 1) / (times[-1] - times[0])


def test_learner_killed_and_restarted_keeps_every_step_once_and_the_robot_keeps_its_rate(tmp_path):
    # Each phase waits for what the robot does (its ledger, its status line), not for a fixed time: on a busy
    # machine its start alone has outlasted a fixed schedule's whole learner-up phase.
    port, log = free_port(), tmp_path / "robot.log"
    logdir = tmp_path / "learner"
    learner = Learner(logdir, port).start()
    robot = start_robot(tmp_path, "arm1", port, 300, "--set", "control.status_every_s=1", log=log)

    def stepped_for(seconds: float) -> bool:
        try:
            times = ledger(tmp_path, "arm1")[0]
        except (FileNotFoundError, ValueError):  # not written yet, or a line being written
            return False
        return bool(times) and times[-1] - times[0] >= seconds

    wait_for_robot(robot, log, f"{UP_S + 1:g} s of steps with the learner connected",
                   lambda: stepped_for(UP_S + 1) and "link connected" in log.read_text())
    learner.kill()
    killed_at, seen = time.time(), len(log.read_text())
    wait_for_robot(robot, log, "a status line with the learner lost",  # within ~2 s
                   lambda: "learner not reachable" in log.read_text()[seen:])
    lost_at = time.time()
    time.sleep(AWAY_S)  # the robot keeps acting and spools
    restarted_at, seen = time.time(), len(log.read_text())
    learner = Learner(logdir, port).start()
    wait_for_robot(robot, log, "a status line with the restarted learner connected and weights",
                   lambda: re.search(r"weights v[1-9]\d*, .*link connected", log.read_text()[seen:]) is not None)
    robot.send_signal(signal.SIGINT)
    summary = robot_summary(robot, log)
    assert summary["stopped"] == "interrupted", summary
    server = learner.stop()
    n = assert_exactly_once(tmp_path, logdir, "arm1")
    assert n == summary["steps"]
    assert server["received_steps"] == n  # counted across the restart, no duplicate counted
    assert summary["acting_version"] > 0 and summary["weights_swaps"] >= 1  # weights came back
    # The stop's checkpoint keeps the replay-context latents training wrote back (2024 recipe), and
    # they fit the replay directory a restarted learner reopens.
    parts, _ = load_checkpoint(latest_checkpoint(logdir / "checkpoints"))
    with Replay(logdir / "replay") as replay:
        assert restore_context(replay, parts, "stop checkpoint") > 0
    # The control rate while the learner was away against the rate just before, from the robot's own step
    # times: a robot that blocks on the missing learner loses ticks; a busy machine slows both alike. Both from
    # the kill and from the robot's noticing it: waiting half a second a chunk once it knows the learner is gone
    # costs a fifth of the whole phase, but a third of the phase after noticing.
    times = np.array(ledger(tmp_path, "arm1")[0])
    up = step_rate(times[(times >= killed_at - UP_S) & (times <= killed_at)])
    for phase, start in (("down", killed_at + 0.5), ("known to be lost", lost_at)):
        away = step_rate(times[(times >= start) & (times <= restarted_at)])
        assert away > 0.8 * up, f"{away:.1f} steps/s while the learner was {phase}, {up:.1f} while it was up"


def test_robot_killed_mid_episode_is_closed_as_abandoned_and_others_continue(tmp_path):
    port = free_port()
    logdir = tmp_path / "learner"
    learner = Learner(logdir, port).start()
    keeper = start_robot(tmp_path, "keeper", port, seconds=16)
    # Episodes far longer than the run, so the kill always lands mid-episode.
    victim = start_robot(tmp_path, "victim", port, 60, "--set", "control.episode_steps=100000")
    # Killed once the learner holds some of its steps (an event, not a time: on a busy machine its first
    # chunks can take seconds to arrive, and a robot the learner holds nothing of has no episode to close).
    wait_for_stored(logdir, "victim")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    learner.wait_for_line("robot victim lost")  # its link process said bye, or it fell silent for robot_lost_s
    summary = robot_summary(keeper)
    time.sleep(1.0)
    server = learner.stop()
    assert_exactly_once(tmp_path, logdir, "keeper")
    rows = {r["robot"]: r for r in server["robots"]}
    assert rows["keeper"]["steps"] == summary["steps"]
    assert not rows["keeper"]["connected"], "the learner stopped before it handled the keeper's bye"
    _, _, flags = stored(logdir, "victim")
    # Its last stored step ends the episode as cut (is_last), not as a task ending (is_terminal).
    assert flags["is_last"][-1] and not flags["is_terminal"][-1]
    info = subprocess.run([sys.executable, "-m", "learner.replay_cli", "info", str(logdir / "replay"), "--json"],
                          cwd=ROOT, capture_output=True, text=True, check=True)
    streams = json.loads(info.stdout)["streams"]
    assert streams["victim"]["abandoned"] == 1, streams["victim"]
    # The keeper stops on its time limit and says bye: an episode it had started and not finished is closed as
    # abandoned (its bye cut it), none else. Which one it is depends on the step it stopped at (an episode is
    # episode_steps + 1 rows, and a busy machine stops the keeper a step earlier or later), so count it: the
    # episodes the keeper started (is_first rows stored) less those it finished (its own summary).
    _, _, keeper_flags = stored(logdir, "keeper")
    unfinished = int(keeper_flags["is_first"].sum()) - summary["episodes"]
    assert unfinished in (0, 1) and streams["keeper"]["episodes"] == summary["episodes"], (streams["keeper"], summary)
    assert streams["keeper"]["abandoned"] == unfinished, (streams["keeper"], summary)


def wait_for_stored(logdir: Path, robot_id: str, limit: float = 60.0) -> None:
    """Until the learner's replay directory holds a chunk of `robot_id` (the learner writes it before it
    acknowledges the chunk)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        for path in (logdir / "replay").glob("*.npz"):
            try:
                if read_chunk(path, ())[0].stream == robot_id:
                    return
            except (ChunkError, OSError):  # being replaced as we read: the next pass sees the new file
                continue
        time.sleep(0.1)
    raise AssertionError(f"the learner stored no chunk of {robot_id} in {limit} s")


def test_learner_that_starts_late_gets_everything(tmp_path):
    port = free_port()
    logdir = tmp_path / "learner"
    robot = start_robot(tmp_path, "early", port, seconds=12)
    time.sleep(5)
    learner = Learner(logdir, port).start()
    summary = robot_summary(robot)
    learner.stop()
    assert assert_exactly_once(tmp_path, logdir, "early") == summary["steps"]


class CuttableProxy:
    """A TCP proxy owned by the test: forwards both ways until `cut()`, which drops every connection
    and refuses new ones until `restore()` (a network outage as the robot sees it)."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open = threading.Event()
        self.open.set()
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.open.is_set():
                client.close()
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while self.open.is_set():
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.close()

    def cut(self) -> None:
        self.open.clear()
        with self.lock:
            for s in self.conns:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            self.conns.clear()

    def restore(self) -> None:
        self.open.set()

    def close(self) -> None:
        self.cut()
        self.listener.close()


def test_network_cut_then_restored_loses_and_duplicates_nothing(tmp_path):
    port = free_port()
    logdir = tmp_path / "learner"
    learner = Learner(logdir, port).start()
    proxy = CuttableProxy(port)
    try:
        robot = start_robot(tmp_path, "remote", proxy.port, seconds=18)
        time.sleep(6)
        proxy.cut()
        time.sleep(5)  # longer than link.robot_lost_s: the learner closes the running episode
        proxy.restore()
        summary = robot_summary(robot)
    finally:
        proxy.close()
    learner.stop()
    assert assert_exactly_once(tmp_path, logdir, "remote") == summary["steps"]



@pytest.fixture(autouse=True)
def _kill_leftovers():
    """A failed assertion must not leave a learner or robot process running (and holding a port)."""
    yield
    for proc in list(PROCS):
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    PROCS.clear()
