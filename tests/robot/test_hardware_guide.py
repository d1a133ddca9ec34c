"""Every command of the bring-up guide, docs/hardware.md, run with bash against emulated hardware.

The guide's fenced ```bash / ```sh / ```console blocks are parsed; every line that starts with `reverie-`
or is a `python -m` / `python -c` line must match exactly one entry of HANDLERS, or the test fails: the
guide and this test cannot drift apart. Each command runs as the guide writes it, with the guide's shell
variables (PORT, CAMERA, IMU, CONFIG, LEARNER) set to emulated devices, in a fresh working directory that
has `hardware_configs/` in it (as a checkout would). Where a command cannot work on emulated hardware as
written, the test changes it in one visible way:

- `scan` and `setup-motor` get `--ids 0-12`: probing all 253 ids at every baud only takes longer.
- `cameras` gets `--by-id DIR`: DIR holds a stable-name symlink to a generated video, as /dev/v4l/by-id does.
- `latency` runs with PORT set to a /dev/serial/by-id symlink in a sysfs-like tree and gets `--sysfs DIR`:
  a pseudo-terminal has no latency timer, and writing the real one needs root.
- `setup-motor` runs against a bus that holds one servo (a ServoEmulator), as the guide asks.
- `calibrate` gets its two Enter presses from the test, which meanwhile poses the emulated joints; since no
  hand can turn emulated joints against gravity, the test then saves the emulator's true calibration in
  place of the recorded one (after checking the recorded zeros against it).
- the learner's `--bind` port 5555 becomes a free port (LEARNER names the same one).
- commands marked `# runs until Ctrl-C` run in the background until they show progress, then get SIGINT.
- the robot run and the learner get `--set` options that make a short run of them (see LONG_SETS).
- `camera` and the robot run get a camera dead time of DEAD_AFTER_S (`--dead-after-s`,
  `sensors.camera.dead_after_s`) instead of a webcam's 2 s: the emulated camera draws each 640x480 frame in
  software (about 85 ms of CPU here), and on a loaded two-core machine its render process has waited over
  2 s for a core before drawing one (measured: 2.1 s on the run queue for 83 ms of drawing).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pytest

from core.config import load_config
from robot.emulated.servo_bus import EmulatedServo, ServoEmulator
from robot.servo.tables import MODELS
from robot.tools.servos import RANGE_PROMPT, ZERO_PROMPT
from sim.emulation.rig import EmulatedRig, true_calibration

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "hardware.md"
VENV_BIN = ROOT / ".venv" / "bin"
LONG = "# runs until Ctrl-C"
SHELLS = ("bash", "sh", "console", "shell")
FAST_IDS = ["--ids", "0-12"]
TIMEOUT_S = 180  # one command; generous: other tests share the two cores
DEAD_AFTER_S = 30  # the emulated camera's dead time (see above); a camera that stops is still caught, later
LONG_SETS = {  # appended to the long-running commands
    "learner": ["--set", "train.prefill=64", "--set", "link.weights_every_s=2", "--set", "dreamer.threads=1"],
    "robot": ["--set", "motors.timeout_margin_ms=100", "--set", "motors.read_budget_ms=400",
              "--set", "sensors.camera.max_age_ms=3000", "--set", f"sensors.camera.dead_after_s={DEAD_AFTER_S}"],
}


# ----- the guide ------------------------------------------------------------------------------------


def guide_commands(text: str) -> list[str]:
    """Command lines of the guide's shell blocks that start with `reverie-` or are `python -m/-c` lines;
    backslash continuations are joined, a console block's leading `$ ` is dropped."""
    commands: list[str] = []
    lines = iter(text.splitlines())
    for line in lines:
        fence = re.match(r"^\s*```(\w*)\s*$", line)
        if not fence or fence.group(1) not in SHELLS:
            continue
        pending = ""
        for body in lines:
            if body.strip().startswith("```"):
                break
            part = body.strip().removeprefix("$ ")
            if part.endswith("\\"):
                pending += part[:-1].rstrip() + " "
                continue
            command = pending + part
            pending = ""
            if command.startswith("reverie-") or re.match(r"python3? -[mc] ", command):
                commands.append(command)
    return commands


def test_the_guide_parses_into_commands() -> None:
    commands = guide_commands(GUIDE.read_text())
    assert len(commands) >= 15, commands
    text = "```bash\nls\nreverie-robot scan --port $PORT \\\n    --json\n```\n```python\nreverie-x\n```\n"
    assert guide_commands(text) == ["reverie-robot scan --port $PORT --json"]


# ----- what each command needs, and what it must do -------------------------------------------------


@dataclass
class Walk:
    """One pass through the guide: a working directory, the guide's variables, the emulated robot."""

    cwd: Path
    env: dict[str, str]
    config: Path | None = None
    rig: EmulatedRig | None = None
    background: dict[str, tuple[subprocess.Popen, Path]] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Handler:
    pattern: str  # regex searched in the command line
    group: str  # "robot": needs the config's emulated robot (run per config); "devices": run once
    run: Callable[[Walk, str], None]


def bash(walk: Walk, command: str, extra: list[str] | None = None, env: dict[str, str] | None = None,
         stdin: str = "") -> subprocess.CompletedProcess:
    """Run `command` (plus `extra` words) with bash, as a person would type it."""
    line = command + "".join(" " + shlex.quote(w) for w in extra or [])
    return subprocess.run(["bash", "-c", line], cwd=walk.cwd, env={**walk.env, **(env or {})}, input=stdin,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def explain(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def start(walk: Walk, name: str, command: str, extra: list[str]) -> tuple[subprocess.Popen, Path]:
    """Start a `# runs until Ctrl-C` command in the background, output to a log file."""
    log = walk.cwd / f"{name}.log"
    line = "exec " + command.split(LONG)[0].strip() + "".join(" " + shlex.quote(w) for w in extra)
    proc = subprocess.Popen(["bash", "-c", line], cwd=walk.cwd, env=walk.env, stdin=subprocess.DEVNULL,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
    walk.background[name] = (proc, log)
    return proc, log


def wait_for(proc: subprocess.Popen, log: Path, pattern: str, timeout: float = TIMEOUT_S,
             also: tuple[subprocess.Popen, Path] | None = None) -> re.Match:
    """Until `pattern` is in `log`; fails at once if `proc` (or the `also` process it waits on) exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text())
        if found:
            return found
        for p, f in [(proc, log), *([also] if also else [])]:
            if p.poll() is not None:
                raise AssertionError(f"{f.stem} exited ({p.returncode}) before {pattern!r}:\n{f.read_text()}")
        time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} within {timeout} s:\n{log.read_text()}")


def interrupt(proc: subprocess.Popen, log: Path, timeout: float = TIMEOUT_S) -> str:
    """Ctrl-C, then the exit must be clean (status 0)."""
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"still running {timeout} s after SIGINT:\n{log.read_text()}") from None
    text = log.read_text()
    assert code == 0, f"exit {code} after SIGINT:\n{text}"
    return text


# --- devices: run once ------------------------------------------------------------------------------


def run_emulate(walk: Walk, command: str) -> None:
    proc, log = start(walk, "emulate", command, [])
    found = wait_for(proc, log, r"run the robot with:\n  (reverie-robot run .*)\n")
    assert "serial port: /dev/pts/" in log.read_text()
    assert "motors.calibration=calibration/so101_arm.json" in found.group(1)  # where check and run look for it
    assert json.loads((walk.cwd / "calibration" / "so101_arm.json").read_text())["emulated"] is True
    assert "emulated bus closed" in interrupt(proc, log)


def run_cameras(walk: Walk, command: str) -> None:
    by_id = walk.cwd / "v4l-by-id"
    by_id.mkdir()
    video = walk.cwd / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter.fourcc(*"MJPG"), 10.0, (96, 64))
    for i in range(10):
        writer.write(np.full((64, 96, 3), 20 * i, np.uint8))
    writer.release()
    (by_id / "usb-Emulated_Cam-video-index0").symlink_to(video)
    result = bash(walk, command, ["--by-id", str(by_id)])
    assert result.returncode == 0, explain(result)
    assert f"usb-Emulated_Cam-video-index0 -> {video}: 96x64" in result.stdout, explain(result)


def fake_sysfs(root: Path) -> tuple[Path, Path]:
    """/dev/ttyUSB0, its /dev/serial/by-id symlink, and the adapter's sysfs entry with the factory 16 ms."""
    dev = root / "dev"
    (dev / "serial" / "by-id").mkdir(parents=True)
    (dev / "ttyUSB0").touch()
    link = dev / "serial" / "by-id" / "usb-FTDI_FT232R_USB_UART_A50285BI-if00-port0"
    link.symlink_to(Path("..") / ".." / "ttyUSB0")
    timer = root / "sys" / "bus" / "usb-serial" / "devices" / "ttyUSB0" / "latency_timer"
    timer.parent.mkdir(parents=True)
    timer.write_text("16\n")
    return link, timer


def run_latency(walk: Walk, command: str) -> None:
    root = walk.cwd / "ftdi"
    if not root.exists():
        fake_sysfs(root)
    link, timer = root / "dev" / "serial" / "by-id" / "usb-FTDI_FT232R_USB_UART_A50285BI-if00-port0", \
        root / "sys" / "bus" / "usb-serial" / "devices" / "ttyUSB0" / "latency_timer"
    before = int(timer.read_text())
    result = bash(walk, command, ["--sysfs", str(root / "sys")], env={"PORT": str(link)})
    if "--set-ms" in command:
        ms = int(re.search(r"--set-ms (\d+)", command).group(1))
        assert result.returncode == 0, explain(result)
        assert int(timer.read_text()) == ms and f"{before} ms -> {ms} ms (OK" in result.stdout, explain(result)
    else:
        assert before == 16  # the guide checks before it sets
        assert result.returncode == 1 and "TOO HIGH" in result.stdout and "--set-ms 1" in result.stdout, \
            explain(result)


SINGLE_SERVO = {  # a servo as it comes: a used Feetech one moved to id 9, a new Dynamixel at 57600 bit/s
    "feetech": EmulatedServo(9, "sts3215", baud=500_000),
    "dynamixel": EmulatedServo(1, "xl330-m288", baud=57_600),
}


def run_setup_motor(walk: Walk, command: str) -> None:
    protocol = re.search(r"--protocol (\w+)", command).group(1)
    new_id = int(re.search(r"--id (\d+)", command).group(1))
    baud = int(re.search(r"--baud (\d+)", command).group(1))
    servo = SINGLE_SERVO[protocol]
    with ServoEmulator(protocol, [servo]) as emu:
        result = bash(walk, command, FAST_IDS, env={"PORT": emu.port})
        assert result.returncode == 0, explain(result)
        assert "verified" in result.stdout, explain(result)
        assert emu.register(new_id, "ID") == new_id
        assert MODELS[servo.model].baud_codes[emu.register(new_id, "Baud_Rate")] == baud
        assert not any(emu.torque_enabled().values())


def run_imu(walk: Walk, command: str) -> None:
    cfg = load_config(ROOT / "hardware_configs" / "servo_quadruped.yaml")
    with EmulatedRig(cfg) as rig:
        rig.plant.reset_pose({s.name: s.home for s in cfg.motors.servos})
        result = bash(walk, command, env={"IMU": rig.imu_port})
    assert result.returncode == 0, explain(result)
    assert "heading" in result.stdout and "upright within 5 deg" in result.stdout, explain(result)


def run_markers(walk: Walk, command: str) -> None:
    result = bash(walk, command)
    assert result.returncode == 0, explain(result)
    pngs = sorted(walk.cwd.glob("marker_*.png"))
    assert [p.name for p in pngs] == [f"marker_{i}.png" for i in range(len(pngs))] and len(pngs) >= 5
    detector = cv2.aruco.ArucoDetector(cv2.aruco.getPredefinedDictionary(cv2.aruco.DICT_4X4_50))
    for i, png in enumerate(pngs):
        image = cv2.imread(str(png), cv2.IMREAD_GRAYSCALE)
        _, ids, _ = detector.detectMarkers(image)
        assert ids is not None and ids.ravel().tolist() == [i], png


# --- the robot: run per config ------------------------------------------------------------------------


def run_scan(walk: Walk, command: str) -> None:
    result = bash(walk, command, FAST_IDS)
    assert result.returncode == 0, explain(result)
    cfg = load_config(walk.config)
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    found = {(int(r[0]), r[1], r[4], int(r[5])) for r in rows}
    assert found == {(s.id, s.model, cfg.motors.protocol, cfg.motors.baud) for s in cfg.motors.servos}, \
        explain(result)


def run_calibrate(walk: Walk, command: str) -> None:
    cfg = load_config(walk.config)
    plant, bus = walk.rig.plant, walk.rig.bus
    proc = subprocess.Popen(["bash", "-c", "exec " + command], cwd=walk.cwd, env=walk.env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    text, lock = [""], threading.Lock()

    def collect() -> None:
        while chunk := os.read(proc.stdout.fileno(), 4096):
            with lock:
                text[0] += chunk.decode()

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()

    def prompt(marker: str) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while marker not in text[0]:
            assert proc.poll() is None, f"calibrate exited ({proc.returncode}) before {marker!r}:\n{text[0]}"
            assert time.monotonic() < deadline, f"no {marker!r}:\n{text[0]}"
            time.sleep(0.05)

    def reads(count: int) -> None:
        target = bus.stats["sync_reads"] + count
        deadline = time.monotonic() + 60
        while bus.stats["sync_reads"] < target:
            assert time.monotonic() < deadline, "calibrate stopped reading positions"
            time.sleep(0.01)

    try:
        prompt(ZERO_PROMPT)
        plant.reset_pose([0.0] * len(cfg.motors.servos))
        proc.stdin.write(b"\n")
        proc.stdin.flush()
        prompt(RANGE_PROMPT)
        ends = [[s.lower for s in cfg.motors.servos], [s.upper for s in cfg.motors.servos]]
        for pose in [*ends, [s.home for s in cfg.motors.servos]]:  # end to end, then set down at rest
            plant.reset_pose(pose)
            reads(2)
        assert not any(bus.torque_enabled().values())  # a person moves the joints: torque stays off
        proc.stdin.write(b"\n")
        proc.stdin.flush()
        assert proc.wait(TIMEOUT_S) == 0, text[0]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        reader.join(10)
    saved = walk.cwd / "calibration" / f"{cfg.name}.json"
    assert f"saved {saved.relative_to(walk.cwd)}" in text[0], text[0]
    recorded = json.loads(saved.read_text())["joints"]
    truth = true_calibration(cfg)
    for name, joint in truth.joints.items():
        assert abs(recorded[name]["zero_ticks"] - joint.zero_ticks) <= 60, (name, recorded[name], joint)
    truth.save(saved)  # the swept range is jittery under gravity; the check and the run use the exact one


def run_check(walk: Walk, command: str) -> None:
    result = bash(walk, command)
    cfg = load_config(walk.config)
    assert result.returncode == 0, explain(result)
    rows = [line for line in result.stdout.splitlines() if "commanded" in line]
    assert len(rows) == len(cfg.motors.servos) and all(line.endswith("ok") for line in rows), explain(result)
    assert not any(walk.rig.bus.torque_enabled().values())


def run_camera(walk: Walk, command: str) -> None:
    result = bash(walk, command, ["--dead-after-s", str(DEAD_AFTER_S)])
    assert result.returncode == 0, explain(result)
    snapshot = walk.cwd / re.search(r"--snapshot (\S+)", command).group(1)
    image = cv2.imread(str(snapshot))
    assert image is not None and image.shape == (480, 640, 3), explain(result)
    assert "frames" in result.stdout and f"snapshot: {snapshot.name}" in result.stdout


def run_keys(walk: Walk, command: str) -> None:
    name = command.split()[-1]
    result = bash(walk, command)
    assert result.returncode == 0, explain(result)
    assert (walk.cwd / "keys" / f"{name}.key").is_file() and (walk.cwd / "keys" / f"{name}.key_secret").is_file()
    if name != "learner":  # the guide's copy of the robot's public key to the workstation
        (walk.cwd / "allowed").mkdir(exist_ok=True)
        (walk.cwd / "allowed" / f"{name}.key").write_bytes((walk.cwd / "keys" / f"{name}.key").read_bytes())


def run_learner(walk: Walk, command: str) -> None:
    port = walk.env["LEARNER"].rsplit(":", 1)[1]
    assert ":5555 " in command
    start(walk, "learner", command.replace(":5555 ", f":{port} "), LONG_SETS["learner"])


def run_robot(walk: Walk, command: str) -> None:
    assert "learner" in walk.background, "the guide starts the robot before the learner"
    learner, learner_log = walk.background.pop("learner")
    try:
        robot, robot_log = start(walk, "robot", command, LONG_SETS["robot"])
        robot_id = re.search(r"--robot-id (\S+)", command).group(1)
        wait_for(learner, learner_log, rf"{robot_id}\s+up\s+[1-9]\d* steps", also=(robot, robot_log))
        summary = json.loads(interrupt(robot, robot_log).strip().splitlines()[-1])
        walk.background.pop("robot")
        assert summary["robot"] == robot_id and summary["stopped"] == "interrupted" and summary["steps"] > 0, \
            summary
        assert not any(walk.rig.bus.torque_enabled().values()), "torque still on after Ctrl-C"
    finally:
        text = interrupt(learner, learner_log)
    result = json.loads(next(line for line in text.splitlines() if line.startswith('{"stopped"')))
    assert result["received_steps"] > 0 and [r["robot"] for r in result["robots"]] == [robot_id], result


HANDLERS = [
    Handler(r"^reverie-sim emulate ", "devices", run_emulate),
    Handler(r"^reverie-robot cameras$", "devices", run_cameras),
    Handler(r"^reverie-robot latency ", "devices", run_latency),
    Handler(r"^reverie-robot setup-motor ", "devices", run_setup_motor),
    Handler(r"^reverie-robot imu ", "devices", run_imu),
    Handler(r"^python -c .*generate_marker", "devices", run_markers),
    Handler(r"^reverie-robot scan ", "robot", run_scan),
    Handler(r"^reverie-robot calibrate ", "robot", run_calibrate),
    Handler(r"^reverie-robot check ", "robot", run_check),
    Handler(r"^reverie-robot camera ", "robot", run_camera),
    Handler(r"^reverie-keys create ", "robot", run_keys),
    Handler(r"^reverie-learner serve .*" + LONG, "robot", run_learner),
    Handler(r"^reverie-robot run .*" + LONG, "robot", run_robot),
]


def handler_of(command: str) -> Handler:
    matches = [h for h in HANDLERS if re.search(h.pattern, command)]
    assert len(matches) == 1, f"{command!r} matches {len(matches)} handlers: add exactly one to HANDLERS"
    return matches[0]


def test_every_command_of_the_guide_has_a_handler() -> None:
    """A command added to the guide without a way to run it here fails this test."""
    commands = guide_commands(GUIDE.read_text())
    for command in commands:
        handler_of(command)
    used = {handler_of(c).pattern for c in commands}
    assert used == {h.pattern for h in HANDLERS}, "handlers whose command left the guide"


# ----- the runs ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def walk_in(tmp: Path, config: Path | None, rig: EmulatedRig | None) -> Iterator[Walk]:
    (tmp / "hardware_configs").symlink_to(ROOT / "hardware_configs")
    env = {**os.environ, "PATH": f"{VENV_BIN}:{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
           "CONFIG": str(config.relative_to(ROOT)) if config else "", "LEARNER": f"tcp://127.0.0.1:{free_port()}",
           "XDG_STATE_HOME": str(tmp / "state")}  # the robot's default spool: not the tester's home
    if rig is not None:
        env.update(PORT=rig.port, CAMERA=rig.camera_url or "", IMU=rig.imu_port or "")
    walk = Walk(tmp, env, config, rig)
    try:
        yield walk
    finally:
        for proc, _ in walk.background.values():
            proc.kill()
            proc.wait()


def run_group(walk: Walk, group: str) -> None:
    commands = [c for c in guide_commands(GUIDE.read_text()) if handler_of(c).group == group]
    assert commands
    for command in commands:
        handler_of(command).run(walk, command)
        walk.ran.append(command)
    assert walk.ran == commands


def test_device_commands_of_the_guide(tmp_path: Path) -> None:
    with walk_in(tmp_path, None, None) as walk:
        run_group(walk, "devices")


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """The emulated servos answer from a thread of this process: hand the interpreter lock over often,
    as `reverie-sim emulate` does."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    yield
    sys.setswitchinterval(previous)


@pytest.mark.parametrize("config", ["so101_arm.yaml", "koch_arm.yaml"])  # a Feetech and a Dynamixel bus
def test_robot_commands_of_the_guide(config: str, tmp_path: Path, fast_switching: None) -> None:
    path = ROOT / "hardware_configs" / config
    with EmulatedRig(load_config(path)) as rig, walk_in(tmp_path, path, rig) as walk:
        run_group(walk, "robot")
