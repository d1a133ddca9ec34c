"""Servo bus commands of `reverie-robot`: find servos, give a new servo its id and baud, calibrate an arm.

    reverie-robot scan --port /dev/serial/by-id/usb-...        # every protocol, every baud
    reverie-robot setup-motor --port PORT --protocol feetech --id 3 --baud 1000000
    reverie-robot calibrate --config hardware_configs/so101_arm.yaml

The bus driver is imported inside each command, so `reverie-robot run` on a simulated robot never
needs pyserial.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from core.config import Config, ConfigError, load_config
from robot.cli_errors import run_guarded

if TYPE_CHECKING:
    from robot.servo.bus import MotorBus

PROTOCOLS = ("dynamixel", "feetech")
SCAN_MARGIN_S = 0.004  # per ping; a reply after its window is still caught by the sweep
SETUP_MARGIN_S = 0.05  # one-off EEPROM writes: patience over speed
CALIBRATE_MARGIN_S = 0.03  # a person moves the arm: no control loop to keep up with
CALIBRATE_RETRIES = 4
SAMPLE_HZ = 50.0
SCAN_COLUMNS = ("id", "model", "model_number", "firmware", "protocol", "baud")
NOTHING_FOUND_HINT = ("check that the servos are powered (a USB cable alone does not power them), the bus wiring and "
                      "the port (ls /dev/serial/by-id/); FTDI adapters need their latency timer at 1 ms")
ZERO_PROMPT = ("Move the robot to its calibration pose (every joint at angle 0 as the config defines it) "
               "and press Enter")
RANGE_PROMPT = "Move every joint slowly through its full range; press Enter when done"
# A joint recorded over less than this (or half its configured range, if that is smaller) did not move: its
# calibration would pin the joint where it stood, so it is refused rather than written.
MIN_SPAN_RAD = 0.1


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register scan, setup-motor and calibrate on `reverie-robot`'s subparsers."""
    scan = sub.add_parser("scan", help="list the servos on a bus (every protocol and baud unless given)")
    scan.add_argument("--port", required=True, help="serial port or pyserial URL")
    scan.add_argument("--protocol", choices=PROTOCOLS, help="only this protocol")
    scan.add_argument("--baud", type=int, help="only this baud rate, bit/s")
    scan.add_argument("--ids", type=id_range, default=range(253), help="ids to probe, e.g. 0-20 (default 0-252)")
    scan.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    scan.set_defaults(motor_command=scan_command)

    setup = sub.add_parser("setup-motor", help="give the only servo on the bus a new id and baud")
    setup.add_argument("--port", required=True, help="serial port or pyserial URL")
    setup.add_argument("--protocol", choices=PROTOCOLS, required=True)
    setup.add_argument("--id", type=servo_id, required=True, metavar="N", help="new id, 0-252")
    setup.add_argument("--baud", type=int, default=1_000_000, help="new baud rate, bit/s (default 1000000)")
    setup.add_argument("--ids", type=id_range, default=range(253), help="ids to search, e.g. 0-20 (default 0-252)")
    setup.set_defaults(motor_command=setup_motor_command)

    calibrate = sub.add_parser("calibrate", help="record each joint's zero and range (torque stays off)")
    calibrate.add_argument("--config", required=True, help="a YAML file from hardware_configs/ with a motors block")
    calibrate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    calibrate.add_argument("--out", help="calibration file (default: motors.calibration, else "
                           "calibration/<config name>.json)")
    calibrate.set_defaults(motor_command=calibrate_command)

    check = sub.add_parser("check", help="first safe motion check: move each joint a little and report")
    check.add_argument("--config", required=True, help="a YAML file from hardware_configs/ with a motors block")
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    check.add_argument("--delta", type=float, default=0.15, help="how far each joint moves, rad (default 0.15)")
    check.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    check.set_defaults(motor_command=check_command)


def run_command(args: argparse.Namespace) -> int:
    """Run the motor command `args` names; errors become one readable line and exit status 2."""
    from robot.servo.errors import MotorError

    return run_guarded(args.motor_command, args, (MotorError, ConfigError, OSError))


def servo_id(text: str) -> int:
    """One servo id, 0-252 (253 and up are broadcast and reserved)."""
    ids = id_range(text)
    if len(ids) != 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected one id from 0 to 252")
    return ids[0]


def id_range(text: str) -> range:
    """'5' -> range(5, 6); '0-20' -> range(0, 21)."""
    lo, _, hi = text.partition("-")
    try:
        first, last = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an id or a range such as 0-20") from None
    if not 0 <= first <= last <= 252:
        raise argparse.ArgumentTypeError(f"{text!r}: ids go from 0 to 252")
    return range(first, last + 1)


# ----- scan ---------------------------------------------------------------------------------------


def protocol_bauds(protocol: str) -> list[int]:
    """Every baud some model of `protocol` supports; the common fast ones first."""
    from robot.servo.tables import MODELS

    bauds = {b for m in MODELS.values() if m.protocol == protocol for b in m.baud_codes.values()}
    return sorted(bauds, key=lambda b: (b != 1_000_000, -b))


def _progress(total: int) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm comes with the learner/sim extras; a bare robot install scans silently
        return _NoBar()
    return tqdm(total=total, file=sys.stderr, unit="id", dynamic_ncols=True, leave=False)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def find_servos(port: str, protocols: list[str], bauds: dict[str, list[int]], ids: range) -> list[dict[str, Any]]:
    """Scan `ids` with each protocol at each of its bauds (progress on stderr)."""
    from robot.servo.bus import MotorBus

    MotorBus(port, protocols[0]).open().close()  # a missing or busy port fails here, before any progress bar
    bar = _progress(sum(len(bauds[p]) for p in protocols) * len(ids))
    found: list[dict[str, Any]] = []
    try:
        for protocol in protocols:
            with MotorBus(port, protocol, bauds[protocol][0], retries=3, timeout_margin_s=SCAN_MARGIN_S) as bus:
                for baud in bauds[protocol]:
                    bar.set_description(f"{protocol} {baud}")
                    bus.set_baud(baud)
                    found += bus.scan(ids, progress=bar.update)
    finally:
        bar.close()
    return found


def scan_command(args: argparse.Namespace) -> int:
    protocols = [args.protocol] if args.protocol else list(PROTOCOLS)
    bauds = {p: [args.baud] if args.baud else protocol_bauds(p) for p in protocols}
    found = find_servos(args.port, protocols, bauds, args.ids)
    if args.json:
        print(json.dumps([{k: s[k] for k in SCAN_COLUMNS} for s in found]))
    elif found:
        print(format_table(found))
    if not found:
        print(f"no servo answered on {args.port} ({', '.join(protocols)}; bauds "
              f"{sorted({b for p in protocols for b in bauds[p]})}): {NOTHING_FOUND_HINT}", file=sys.stderr)
        return 1
    return 0


def format_table(rows: list[dict[str, Any]]) -> str:
    cells = [list(SCAN_COLUMNS)] + [[str(r[k]) for k in SCAN_COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(SCAN_COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


# ----- setup-motor --------------------------------------------------------------------------------


def setup_motor_command(args: argparse.Namespace) -> int:
    from robot.servo.bus import MotorBus
    from robot.servo.errors import MotorError

    found = find_servos(args.port, [args.protocol], {args.protocol: protocol_bauds(args.protocol)}, args.ids)
    if len(found) != 1:
        listed = "; ".join(f"id {s['id']} ({s['model']}) at {s['baud']} bit/s" for s in found)
        what = f"{len(found)} servos answered: {listed}" if found else "no servo answered at any baud"
        raise MotorError(f"setup-motor needs exactly one {args.protocol} servo on {args.port}; {what}. Connect only "
                         "the servo to set up" + ("" if found else f" ({NOTHING_FOUND_HINT})"))
    servo = found[0]
    if servo["model"] == "unknown":
        raise MotorError(f"servo {servo['id']} on {args.port}: unknown {args.protocol} model number "
                         f"{servo['model_number']}; cannot locate its ID and Baud_Rate registers")
    with MotorBus(args.port, args.protocol, servo["baud"], models={servo["id"]: servo["model"]}, retries=3,
                  timeout_margin_s=SETUP_MARGIN_S) as bus:
        for line in configure(bus, servo["id"], args.id, args.baud):
            print(line)
    return 0


def configure(bus: MotorBus, old_id: int, new_id: int, baud: int) -> list[str]:
    """Torque off, then write ID and Baud_Rate (EEPROM), then check the servo answers at both. Returns what
    was done, line by line."""
    from robot.servo.errors import BusCorrupt, BusTimeout, MotorError

    model = bus.model(old_id)
    try:
        code = model.baud_code(baud)
    except ValueError as exc:
        raise MotorError(f"servo {old_id} on {bus.port}: {exc}") from None
    done = [f"found servo {old_id} ({model.name}) at {bus.baud} bit/s on {bus.port}"]
    bus.write("Torque_Enable", old_id, 0)
    feetech = bus.protocol == "feetech"
    if feetech:
        bus.write("Lock", old_id, 0)  # EEPROM writes only stick while unlocked
    if new_id != old_id:
        bus.models[new_id] = model.name
        try:
            bus.write("ID", old_id, new_id)
        except (BusTimeout, BusCorrupt):
            if bus.ping(new_id) is None:  # a lost status after the change took effect is no failure
                raise
        done.append(f"id {old_id} -> {new_id}")
    if baud != bus.baud:
        # Some firmware answers at the new baud already: a lost status is fine, the check below decides.
        with contextlib.suppress(BusTimeout, BusCorrupt):
            bus.write("Baud_Rate", new_id, code)
        done.append(f"baud {bus.baud} -> {baud} (code {code})")
        bus.set_baud(baud)
    if feetech:
        bus.write("Lock", new_id, 1)
    number = bus.ping(new_id)
    if number != model.model_number or bus.read("ID", new_id) != new_id:
        raise MotorError(f"servo {old_id} was reconfigured but does not answer as id {new_id} at {baud} bit/s on "
                         f"{bus.port} (ping -> {number}); run reverie-robot scan to find it")
    done.append(f"verified: servo {new_id} ({model.name}) answers at {baud} bit/s")
    return done


# ----- calibrate ----------------------------------------------------------------------------------


@dataclass
class RangeRecorder:
    """Min/max of each joint's reading, relative to its zero and unwrapped (joints turn < 1 revolution)."""

    zero: dict[int, int]
    ticks_per_rev: dict[int, int]
    low: dict[int, int] = field(default_factory=dict)
    high: dict[int, int] = field(default_factory=dict)
    samples: int = 0
    errors: int = 0
    last_error: str = ""

    def add(self, positions: dict[int, int]) -> None:
        for id, ticks in positions.items():
            n = self.ticks_per_rev[id]
            delta = (ticks - self.zero[id] + n // 2) % n - n // 2
            self.low[id] = min(self.low.get(id, 0), delta)
            self.high[id] = max(self.high.get(id, 0), delta)
        self.samples += 1


class Sampler(threading.Thread):
    """Reads positions at ~SAMPLE_HZ into a RangeRecorder until stopped; read failures are counted and
    retried on the next sample (a person is moving the arm: a cable may wiggle)."""

    def __init__(self, read: Callable[[], dict[int, int]], recorder: RangeRecorder) -> None:
        super().__init__(name="calibrate-sampler", daemon=True)
        self.read = read
        self.recorder = recorder
        self.halt = threading.Event()

    def run(self) -> None:
        from robot.servo.errors import MotorError

        while not self.halt.is_set():
            try:
                self.recorder.add(self.read())
            except MotorError as exc:
                self.recorder.errors += 1
                self.recorder.last_error = str(exc)
            self.halt.wait(1.0 / SAMPLE_HZ)

    def stop(self) -> None:
        self.halt.set()
        self.join()


def _ask(prompt: str) -> None:
    try:
        input(f"{prompt}: ")
    except EOFError:
        raise OSError(f"stdin closed before the answer to: {prompt!r}") from None


def check_servos(bus: MotorBus, cfg: Config) -> None:
    """Every configured servo answers, with the configured model; else one error naming them all."""
    from robot.servo.errors import MotorError
    from robot.servo.tables import MODELS

    missing, wrong = [], []
    for servo in cfg.motors.servos:
        number = next((n for n in (bus.ping(servo.id) for _ in range(3)) if n is not None), None)
        if number is None:
            missing.append(f"servo {servo.id} ({servo.name})")
        elif number != MODELS[servo.model].model_number:
            wrong.append(f"servo {servo.id} ({servo.name}) reports model number {number}, the config says "
                         f"{servo.model} ({MODELS[servo.model].model_number})")
    problems = ([f"{', '.join(missing)} did not answer"] if missing else []) + wrong
    if problems:
        raise MotorError(f"on {bus.port} ({bus.protocol}, {bus.baud} bit/s): {'; '.join(problems)}. "
                         f"Check power, wiring and ids (reverie-robot scan --port {bus.port})")


def calibrate_command(args: argparse.Namespace) -> int:
    from robot.servo.bus import MotorBus
    from robot.servo.calibration import default_path
    from robot.servo.errors import MotorError

    cfg = load_config(args.config, args.set)
    if cfg.motors is None:
        raise ConfigError(["motors: calibrate needs a motors block (a servo robot config)"], args.config)
    m = cfg.motors
    with MotorBus(m.port, m.protocol, m.baud, models={s.id: s.model for s in m.servos},
                  retries=max(m.retries, CALIBRATE_RETRIES), timeout_margin_s=CALIBRATE_MARGIN_S) as bus:
        check_servos(bus, cfg)
        for servo in m.servos:
            bus.write("Torque_Enable", servo.id, 0)
        print(f"torque is off on {len(m.servos)} servos: the arm can be moved by hand", flush=True)
        calibration, recorder = record(bus, cfg)
    path = args.out or default_path(cfg)
    if problem := unusable(calibration, cfg, bus.port):
        raise MotorError(f"calibration refused, {path} not written: {problem}")
    calibration.save(path)
    print(f"saved {path} ({recorder.samples} samples)")
    for line in report(calibration, cfg):
        print(line)
    if recorder.errors:
        print(f"warning: {recorder.errors} of the samples failed to read (last: {recorder.last_error})",
              file=sys.stderr)
    return 0


def record(bus: MotorBus, cfg: Config) -> tuple[Any, RangeRecorder]:
    """The two interactive steps: zero pose, then the range sweep."""
    from robot.servo.calibration import Calibration, JointCalibration

    servos = cfg.motors.servos
    ids = [s.id for s in servos]
    ticks = {s.id: bus.model(s.id).ticks_per_rev for s in servos}

    def read() -> dict[int, int]:
        return bus.sync_read(["Present_Position"], ids)["Present_Position"]

    _ask(ZERO_PROMPT)
    zero = read()
    recorder = RangeRecorder(zero, ticks)
    recorder.add(zero)
    sampler = Sampler(read, recorder)
    sampler.start()
    try:
        _ask(RANGE_PROMPT)
    finally:
        sampler.stop()
    joints = {s.name: JointCalibration(s.id, zero[s.id], 1, zero[s.id] + recorder.low[s.id],
                                       zero[s.id] + recorder.high[s.id]) for s in servos}
    return Calibration(joints, {s.name: ticks[s.id] for s in servos}), recorder


def unusable(calibration: Any, cfg: Config, port: str) -> str | None:
    """Why the recorded calibration must not be saved (joints that did not move, naming their servo ids and
    measured ranges), else None."""
    from robot.servo.bus import is_pseudo_terminal

    still = []
    for servo in cfg.motors.servos:
        low, high = calibration.range_radians(servo.name)
        if high - low < min(MIN_SPAN_RAD, (servo.upper - servo.lower) / 2):
            still.append(f"servo {servo.id} ({servo.name}) [{low:+.3f}, {high:+.3f}] rad")
    if not still:
        return None
    hint = ("this port is a pseudo-terminal, an emulated bus, whose joints no hand can move: use the calibration "
            "`reverie-sim emulate --write-calibration FILE` writes instead" if is_pseudo_terminal(port) else
            "after the second prompt, move every joint slowly from one end of its range to the other")
    return (f"{len(still)} joint{'s' if len(still) > 1 else ''} moved less than {MIN_SPAN_RAD} rad while recording, "
            f"so there is no usable range: {'; '.join(still)}. {hint}")


def report(calibration: Any, cfg: Config) -> list[str]:
    """Per-joint recorded range in radians; a warning where it does not cover [lower, upper]."""
    lines = []
    for servo in cfg.motors.servos:
        low, high = calibration.range_radians(servo.name)
        joint = calibration.joints[servo.name]
        line = (f"{servo.name:>16} (servo {servo.id}): zero {joint.zero_ticks} ticks, range [{low:+.3f}, "
                f"{high:+.3f}] rad")
        if low > servo.lower or high < servo.upper:
            line += (f"  WARNING: does not cover the configured [{servo.lower:+.3f}, {servo.upper:+.3f}]; move it "
                     "further, or narrow lower/upper in the config")
        lines.append(line)
    return lines


def check_command(args: argparse.Namespace) -> int:
    """Power up, walk home, then move each joint by --delta toward the middle of its range and back, through
    the safety layer; report how each followed. Exit 1 if any did not."""
    from robot.servo.robot import ServoRobot

    cfg = load_config(args.config, args.set)
    if cfg.motors is None:
        raise ConfigError([f"no motors block: {args.config} does not describe a servo robot"], args.config)
    if not 0 < args.delta <= 0.5:
        raise ConfigError([f"--delta {args.delta}: expected 0 < delta <= 0.5 rad"], "--delta")
    rows = []
    with ServoRobot(cfg, sensors=False) as robot:  # a motion check needs no camera or IMU
        robot.reset()
        for i, name in enumerate(robot.names):
            print(f"checking {name} (servo {robot.ids[i]}) ...", file=sys.stderr, flush=True)
            rows.append(robot.check_joint(i, args.delta))
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            verdict = "ok" if row["ok"] else f"PROBLEM: {row['problem']}"
            print(f"{row['joint']:>16} (id {row['id']:>3}): commanded {row['commanded']:+.3f} rad, moved "
                  f"{row['moved']:+.3f}, others {row['others_moved']:.3f}  {verdict}")
    return 0 if all(row["ok"] for row in rows) else 1
