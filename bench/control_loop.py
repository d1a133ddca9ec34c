"""Control loop on the emulated servo bus: bus round trips, then the robot process's rate with a policy.

    python bench/control_loop.py [--seconds 20] [--size size12m] [--parts roundtrip,loop] [--quick]

Part `roundtrip`: one control tick's bus traffic (a sync read of positions + velocities and a sync
write of goals) against the emulated bus at 1 Mbit/s, which delivers every reply no earlier than the
bytes would take on a real wire; 6 and 12 servos, both protocols. The emulator runs in its own process,
as a real bus is another device.

Part `loop`: `reverie-robot run`'s own pieces (ServoRobot with the safety layer, ControlLoop, the
robot link spooling to disk with no learner) on the 12-servo quadruped config at 20 and 50 Hz, with a
`size12m` policy (random weights of the right shape) acting every step; the emulator runs PyBullet
physics in real time in another process. Reports the achieved rate and period error
|period - nominal| / nominal p50/p99. Target: 50 Hz with 12 servos and size12m, p99 < 10 %.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
QUADRUPED = ROOT / "hardware_configs" / "servo_quadruped.yaml"
CASES = [("feetech", "sts3215", 6), ("dynamixel", "xm430-w350", 6), ("feetech", "sts3215", 12),
         ("dynamixel", "xm430-w350", 12)]
BAUD = 1_000_000
QUICK = {"seconds": 3.0, "ticks": 100}  # about half a minute instead of about two
QUICK_NOTE = "3 s per control-loop rate, 100 round trips per bus case"


def say(msg: str) -> None:
    print(f"[control_loop] {msg}", file=sys.stderr, flush=True)


def quantiles(values: list[float], scale: float = 1.0, digits: int = 3) -> dict[str, float]:
    a = np.asarray(values) * scale
    return {"p50": round(float(np.quantile(a, 0.5)), digits), "p99": round(float(np.quantile(a, 0.99)), digits),
            "max": round(float(a.max()), digits)}


# --- part 1: bus round trips ---------------------------------------------------------------------------------------


def _emulator_child(protocol: str, model: str, n: int, conn: Any) -> None:
    from robot.emulated.servo_bus import EmulatedServo, ServoEmulator

    servos = [EmulatedServo(i + 1, model, BAUD) for i in range(n)]
    with ServoEmulator(protocol, servos, timing=True) as emulator:
        conn.send(emulator.port)
        conn.recv()  # until the parent is done


def roundtrip(protocol: str, model: str, n: int, ticks: int) -> dict[str, Any]:
    from robot.servo.bus import MotorBus
    from robot.servo.protocols import codec_for

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_emulator_child, args=(protocol, model, n, child), daemon=True)
    proc.start()
    try:
        port = parent.recv()
        ids = list(range(1, n + 1))
        times = []
        # A generous reply margin: on a loaded machine a late reply should show in the figures, not abort them.
        with MotorBus(port, protocol, BAUD, models={i: model for i in ids}, timeout_margin_s=0.05) as bus:
            for i in ids if protocol == "dynamixel" else ():  # as ServoRobot sets them: no reply delay (500 us default)
                bus.write("Return_Delay_Time", i, 0)
            names = ["Present_Position", "Present_Velocity"]
            for t in range(ticks + 20):
                start = time.perf_counter()
                values = bus.sync_read(names, ids)
                bus.sync_write("Goal_Position", {i: values["Present_Position"][i] for i in ids})
                if t >= 20:  # warm-up
                    times.append(time.perf_counter() - start)
            retries = bus.stats.retries
        codec = codec_for(protocol)
        span = 8 if protocol == "dynamixel" else 4
        wire = (codec.wire_bytes(2 * codec.addr_size + n, False) + n * codec.wire_bytes(span, True)
                + codec.wire_bytes(2 * codec.addr_size + n * (1 + (4 if protocol == "dynamixel" else 2)), False))
        return {"protocol": protocol, "model": model, "servos": n, "ticks": ticks,
                "wire_ms": round(wire * 10 / BAUD * 1e3, 3), "tick_ms": quantiles(times, 1e3), "retries": retries}
    finally:
        parent.send("done")
        proc.join(10)


# --- part 2: the control loop with a policy ------------------------------------------------------------------------


def start_emulator(cfg_path: Path, calibration: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "sim.cli", "emulate", "--config", str(cfg_path), "--write-calibration",
           str(calibration)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        match = re.search(r"(/dev/pts/\d+)", line)
        if match:
            return proc, match.group(1)
        if proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("the emulator did not print its port")


def random_policy(cfg: Any, spec: Any, dim: int) -> Any:
    """A Policy of the configured size with untrained weights: acting costs the same as trained ones."""
    import torch

    from core.agents.dreamer.policy import Policy, policy_weights
    from core.agents.spaces import ActSpace
    from core.weights import weights_to_bytes
    from learner.agents.dreamer.agent import DreamerModel

    space = spec.without("action")
    torch.manual_seed(0)
    model = DreamerModel(cfg.dreamer, space, ActSpace(dim, False))
    tensors, meta = policy_weights(model, 1)
    return Policy.from_weights(weights_to_bytes(tensors, meta))


def control_loop(hz: float, seconds: float, size: str, port: str, calibration: Path, spool: Path) -> dict[str, Any]:
    import torch

    from core.config import load_config
    from core.link.protocol import DEFAULT_MAX_BYTES
    from robot.link.process import LinkProcess
    from robot.runner import ControlLoop, step_spec, warm_up
    from robot.servo.robot import ServoRobot

    torch.set_num_threads(1)  # as reverie-robot run does
    cfg = load_config(QUADRUPED, [f"motors.port={port}", f"motors.calibration={calibration}", f"control.hz={hz}",
                                  f"dreamer.size={size}", "safety.estop_key=false", "control.episode_steps=100000",
                                  # the bus and the policy are measured: proprioception only
                                  "task=joint_reach", "camera.enabled=false", "sensors.camera=null",
                                  "sensors.imu=null"])
    with ServoRobot(cfg) as robot:
        spec, act = step_spec(robot)
        policy = random_policy(cfg, spec, act.dim)
        link = LinkProcess("tcp://127.0.0.1:9", f"bench-{int(hz)}", (spool / f"{hz}", 2**30),  # as link.process
                           {"spec": spec.to_wire(), "task": "bench", "hz": float(hz), "discrete": False},
                           max_bytes=DEFAULT_MAX_BYTES)
        link.start()
        warm_up(policy, spec)  # the loop does this too; here so that the one-off first call is not timed
        act_times: list[float] = []
        original = policy.act

        def timed_act(obs: dict[str, np.ndarray], **kw: Any) -> Any:
            start = time.perf_counter()
            out = original(obs, **kw)
            act_times.append(time.perf_counter() - start)
            return out

        policy.act = timed_act
        try:
            loop = ControlLoop(cfg, robot, link, initial=policy)
            stats = loop.run(duration=seconds)
        finally:
            link.close()
    errors = stats.period_errors[2:]  # the first periods include the move home
    return {"hz": hz, "servos": len(cfg.motors.servos), "policy": size, "steps": stats.steps,
            "achieved_hz": round(stats.steps / seconds, 2), "period_error": quantiles(errors, 100, 2),
            "act_ms": quantiles(act_times, 1e3), "stopped": loop.stop_reason}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per control-loop rate")
    parser.add_argument("--ticks", type=int, default=500, help="round trips per bus case")
    parser.add_argument("--size", default="size12m", help="policy model size")
    parser.add_argument("--parts", default="roundtrip,loop")
    parser.add_argument("--quick", action="store_true", help="smoke run (`make bench`): " + QUICK_NOTE)
    args = parser.parse_args()
    if args.quick:  # its figures are defaults, so flags given beside --quick still win
        parser.set_defaults(**QUICK)
        args = parser.parse_args()
    parts = args.parts.split(",")
    out: dict[str, Any] = {"cpu_count": os.cpu_count(), "baud": BAUD}
    if "roundtrip" in parts:
        out["roundtrip"] = []
        for protocol, model, n in CASES:
            say(f"round trip: {protocol} x{n}")
            out["roundtrip"].append(roundtrip(protocol, model, n, args.ticks))
    if "loop" in parts:
        with tempfile.TemporaryDirectory(prefix="reverie-bench-loop-") as tmp:
            calibration = Path(tmp) / "calibration.json"
            emulator, port = start_emulator(QUADRUPED, calibration)
            try:
                out["loop"] = []
                for hz in (20.0, 50.0):
                    say(f"control loop at {hz:.0f} Hz for {args.seconds:.0f} s")
                    out["loop"].append(control_loop(hz, args.seconds, args.size, port, calibration, Path(tmp)))
            finally:
                emulator.terminate()
                emulator.wait(30)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
