"""Bring-up commands of `reverie-robot`: the USB latency timer, the cameras, the IMU.

    reverie-robot latency --port /dev/serial/by-id/usb-FTDI_...-if00-port0 --set-ms 1
    reverie-robot cameras
    reverie-robot camera --device /dev/v4l/by-id/usb-...-video-index0 --width 640 --height 480 --fps 30 \\
        --pixel-format MJPG --frames 60 --snapshot camera.png [--dead-after-s 2]
    reverie-robot imu --port /dev/serial/by-id/usb-...

Each checks one device a new robot needs and says what to do when it is wrong. Exit status: 0 fine,
1 a check failed (timer too high, no camera found), 2 the device could not be used (the message names
it), 3 the latency timer needs root.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from core.config import flags
from core.config.sensors import DEAD_AFTER_S
from core.interface import RobotError
from robot.cli_errors import run_guarded
from robot.servo import usb_latency

V4L_BY_ID = "/dev/v4l/by-id"
UPRIGHT_DEG = 5.0
NO_CAMERA_HINT = ("is it plugged in (ls /dev/video*)? A camera on a CSI ribbon has no by-id name: pass its "
                  "/dev/videoN to reverie-robot camera")
IMU_HINT = ("Check the BNO055's power, that it is strapped for UART (PS1 high, PS0 low), that its TX goes to "
            "the adapter's RX and back, and the port (ls /dev/serial/by-id/)")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register latency, cameras, camera and imu on `reverie-robot`'s subparsers."""
    latency = sub.add_parser("latency", help="show (and set) the USB serial adapter's latency timer")
    latency.add_argument("--port", required=True, help="serial port, e.g. /dev/serial/by-id/usb-FTDI_...")
    latency.add_argument("--set-ms", type=int, metavar="N", help=f"write N ms (recommended: "
                         f"{usb_latency.RECOMMENDED_MS}; needs root or a udev rule)")
    latency.add_argument("--sysfs", default="/sys", help="root of the sysfs tree (default /sys)")
    latency.add_argument("--json", action="store_true", help="print one JSON object")
    latency.set_defaults(device_command=latency_command)

    cameras = sub.add_parser("cameras", help=f"list the cameras under {V4L_BY_ID} and the mode each is in")
    cameras.add_argument("--by-id", default=V4L_BY_ID, help=f"directory of stable camera names (default {V4L_BY_ID})")
    cameras.add_argument("--json", action="store_true", help="print a JSON list")
    cameras.set_defaults(device_command=cameras_command)

    camera = sub.add_parser("camera", help="open one camera with given settings, read frames, save a snapshot")
    camera.add_argument("--device", required=True, help="device path, video file or http:// MJPEG URL")
    camera.add_argument("--width", type=int, required=True)
    camera.add_argument("--height", type=int, required=True)
    camera.add_argument("--fps", type=float, help="frame rate to ask for (devices; checked for files)")
    camera.add_argument("--pixel-format", help="fourcc to ask for, e.g. MJPG or YUYV")
    camera.add_argument("--frames", type=positive, default=30, help="frames to read (default 30)")
    camera.add_argument("--snapshot", type=Path, help="write the last frame, full resolution, to this PNG")
    camera.add_argument("--dead-after-s", type=flags.camera_dead_after, default=DEAD_AFTER_S, metavar="S",
                        help=f"no frame for S seconds: the camera is dead, exit 2 (default {DEAD_AFTER_S:g}, as "
                        "sensors.camera.dead_after_s); a camera drawn in software on a busy machine can need more")
    camera.add_argument("--json", action="store_true", help="print one JSON object")
    camera.set_defaults(device_command=camera_command)

    imu = sub.add_parser("imu", help="read the BNO055 IMU: orientation, rate, calibration, a verdict")
    imu.add_argument("--port", required=True, help="serial port of the BNO055 (UART mode)")
    imu.add_argument("--samples", type=positive, default=10, help="readings to take (default 10)")
    imu.add_argument("--interval", type=float, default=0.1, help="seconds between readings (default 0.1)")
    imu.add_argument("--json", action="store_true", help="print one JSON object")
    imu.set_defaults(device_command=imu_command)


def run_command(args: argparse.Namespace) -> int:
    """Run the device command `args` names; errors become one readable line and exit status 2."""
    return run_guarded(args.device_command, args, (RobotError, OSError, ValueError))


def positive(text: str) -> int:
    """A count of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 1")
    return value


# ----- latency ------------------------------------------------------------------------------------


def latency_command(args: argparse.Namespace) -> int:
    port = args.port
    if "://" not in port and not os.path.exists(port):
        raise FileNotFoundError(f"port {port} does not exist: is the adapter plugged in? (ls /dev/serial/by-id/)")
    tty = usb_latency.tty_name(port)
    path = usb_latency.latency_path(port, args.sysfs)
    before = usb_latency.latency_timer(port, args.sysfs)
    result: dict[str, Any] = {"port": port, "tty": tty, "path": str(path), "ftdi": before is not None,
                              "latency_ms": before, "recommended_ms": usb_latency.RECOMMENDED_MS}
    if before is None:
        result.update(ok=True, set=False)
        _say(args.json, result, f"{port} ({tty}): no latency timer for this adapter (not FTDI): nothing to do")
        return 0
    if args.set_ms is not None:
        try:
            usb_latency.set_latency_timer(port, args.set_ms, args.sysfs)
        except PermissionError:
            fix = usb_latency.fix_commands(port, args.set_ms, args.sysfs)
            print(f"reverie-robot latency: no permission to write {path} (latency timer of {port}, now {before} ms). "
                  f"Set it as root now:\n  {fix[0]}\nand for every future plug-in, add a udev rule:\n  {fix[1]}\n"
                  f"  {fix[2]}", file=sys.stderr)
            return 3
        after = usb_latency.latency_timer(port, args.sysfs)
        result.update(latency_ms=after, ok=after <= usb_latency.RECOMMENDED_MS, set=True, before_ms=before)
        _say(args.json, result, f"{port} ({tty}): latency timer {before} ms -> {after} ms "
             f"({'OK' if result['ok'] else f'still above the recommended {usb_latency.RECOMMENDED_MS} ms'})")
        return 0
    ok = before <= usb_latency.RECOMMENDED_MS
    result.update(ok=ok, set=False)
    verdict = "OK" if ok else (f"TOO HIGH: every servo round trip waits up to {before} ms; run reverie-robot latency "
                               f"--port {port} --set-ms {usb_latency.RECOMMENDED_MS}")
    _say(args.json, result, f"{port} ({tty}): latency timer {before} ms  {verdict}")
    return 0 if ok else 1


def _say(as_json: bool, result: Any, text: str) -> None:
    print(json.dumps(result) if as_json else text)


# ----- cameras ------------------------------------------------------------------------------------


def probe(path: str) -> dict[str, Any]:
    """The mode `path` is in (width, height, fps, fourcc) and whether it gives a frame; never raises.
    A device is opened through V4L2 as robot.sensors.camera.Camera opens it; anything else (a file) through OpenCV's
    default backend."""
    import cv2

    from robot.sensors.camera import fourcc_text

    real = os.path.realpath(path)
    info: dict[str, Any] = {"name": os.path.basename(path), "path": path, "target": real}
    capture = cv2.VideoCapture(real, cv2.CAP_V4L2) if real.startswith("/dev/") else cv2.VideoCapture(real)
    try:
        if not capture.isOpened():
            info["error"] = ("cannot open: busy, no permission (video group?) or not a capture node "
                             "(a camera's -index1 name is its metadata node)")
            return info
        info.update(width=int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
                    height=int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                    fps=round(float(capture.get(cv2.CAP_PROP_FPS)), 3),
                    fourcc=fourcc_text(capture.get(cv2.CAP_PROP_FOURCC)))
        ok, image = capture.read()
        info["frame"] = ok and image is not None
        if not info["frame"]:
            info["error"] = "opened, but gave no frame"
        return info
    except cv2.error as exc:
        info["error"] = f"OpenCV: {exc}"
        return info
    finally:
        capture.release()


def cameras_command(args: argparse.Namespace) -> int:
    by_id = Path(args.by_id)
    names = sorted(by_id.iterdir()) if by_id.is_dir() else []
    if not names:
        if args.json:
            print("[]")
        print(f"no cameras found under {by_id}: {NO_CAMERA_HINT}", file=sys.stderr)
        return 1
    found = [probe(str(p)) for p in names]
    if args.json:
        print(json.dumps(found))
        return 0
    for cam in found:
        if "error" in cam and "width" not in cam:
            mode = cam["error"]
        else:
            mode = f"{cam['width']}x{cam['height']} @ {cam['fps']:g} fps {cam['fourcc'] or '?'}"
            mode += f"  ({cam['error']})" if "error" in cam else ""
        print(f"{cam['name']} -> {cam['target']}: {mode}")
    return 0


# ----- camera -------------------------------------------------------------------------------------


def camera_command(args: argparse.Namespace) -> int:
    import cv2

    from robot.sensors.camera import Camera

    camera = Camera(args.device, args.width, args.height, fps=args.fps, pixel_format=args.pixel_format,
                    out_size=(args.width, args.height), dead_after_s=args.dead_after_s, keep_full=True, loop=True)
    frames, ages = [], []
    with camera:
        last = -1
        while len(frames) < args.frames:
            frame = camera.latest(max_age_s=camera.dead_after_s)  # only a dead camera raises
            if frame.index != last:
                ages.append(time.monotonic() - frame.time)
                frames.append(frame)
                last = frame.index
            else:
                time.sleep(0.001)
    first, final = frames[0], frames[-1]
    span = final.time - first.time
    fps = (final.index - first.index) / span if span > 0 else None
    result: dict[str, Any] = {
        "device": args.device, "name": camera.name, "settings": camera.settings, "frames": len(frames),
        "skipped": final.index - first.index + 1 - len(frames),
        "measured_fps": round(fps, 2) if fps else None,
        "frame_age_ms": {"mean": round(1000 * sum(ages) / len(ages), 2), "max": round(1000 * max(ages), 2)},
    }
    if args.snapshot:
        path = args.snapshot
        if not cv2.imwrite(str(path), cv2.cvtColor(final.full, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write the snapshot {path}: is the directory there and the name a .png?")
        result["snapshot"] = str(path)
    if args.json:
        print(json.dumps(result))
        return 0
    s = camera.settings
    print(f"{camera.name}: {s.get('width')}x{s.get('height')} @ {s.get('fps', 0):g} fps {s.get('fourcc') or '?'} "
          "(read back)")
    rate = f"{result['measured_fps']:g} fps measured" if fps else "too few frames to measure fps"
    print(f"{len(frames)} frames, {rate}, frame age mean {result['frame_age_ms']['mean']:g} ms, "
          f"max {result['frame_age_ms']['max']:g} ms")
    if args.snapshot:
        print(f"snapshot: {args.snapshot}")
    return 0


# ----- imu ----------------------------------------------------------------------------------------


def tilt_deg(quaternion: Any) -> float:
    """Angle between the chip's z axis and world up, in degrees (0: lying level, face up)."""
    from robot.sensors.imu import world_up_in_body

    return math.degrees(math.acos(max(-1.0, min(1.0, float(world_up_in_body(quaternion)[2])))))


def imu_command(args: argparse.Namespace) -> int:
    from robot.sensors.imu import BNO055, ImuError

    readings = []
    try:
        with BNO055(args.port) as imu:
            for i in range(args.samples):
                if i:
                    time.sleep(args.interval)
                readings.append(imu.read())
    except ImuError as exc:
        raise ImuError(f"{exc}. {IMU_HINT}") from None
    rows = [{"heading_deg": math.degrees(r.euler[0]), "roll_deg": math.degrees(r.euler[1]),
             "pitch_deg": math.degrees(r.euler[2]), "gyro_dps": [math.degrees(g) for g in r.gyro],
             "calibration": r.calibration} for r in readings]
    last = readings[-1]
    tilt = tilt_deg(last.quaternion)
    upright = tilt <= UPRIGHT_DEG
    verdict = (f"upright within {UPRIGHT_DEG:g} deg (tilt {tilt:.1f} deg)" if upright else
               f"tilted {tilt:.1f} deg from upright (roll {rows[-1]['roll_deg']:+.1f}, pitch "
               f"{rows[-1]['pitch_deg']:+.1f} deg): level the robot, or check how the chip is mounted")
    cal = last.calibration
    if min(cal.values()) < 3:
        verdict += ("; not fully calibrated: hold it still (gyro), set it in a few poses (accel), move it in a "
                    "figure 8 (mag)")
    if args.json:
        print(json.dumps({"port": args.port, "readings": [_rounded(r) for r in rows], "tilt_deg": round(tilt, 2),
                          "upright": upright, "verdict": verdict}))
        return 0
    for row in rows:
        gx, gy, gz = row["gyro_dps"]
        c = row["calibration"]
        print(f"heading {row['heading_deg']:7.2f}  roll {row['roll_deg']:+7.2f}  pitch {row['pitch_deg']:+7.2f} deg"
              f"  rate {gx:+7.2f} {gy:+7.2f} {gz:+7.2f} deg/s  calib sys {c['sys']} gyro {c['gyr']} "
              f"accel {c['acc']} mag {c['mag']}")
    print(verdict)
    return 0


def _rounded(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: round(v, 3) for k, v in row.items() if k.endswith("_deg")}
    out["gyro_dps"] = [round(g, 3) for g in row["gyro_dps"]]
    out["calibration"] = row["calibration"]
    return out
