"""Link throughput: robot -> learner experience rates and learner -> robot weight latency on loopback.
Prints one JSON document on stdout (progress lines on stderr; a short table on stderr unless --json).

Steps are 64x64x3 uint8 image + 24-D float32 proprio + 6-D float32 action + reward/flags + the
bookkeeping time/policy_version arrays (12,431 bytes), sent in chunks of 20 steps. Robots are
separate processes ('spawn'); the learner side runs in this process.

Figures and targets:
  raw_push_pull     pyzmq PUSH -> PULL of the same frames (copy=False), no decoding: the ceiling
  transport         DEALER -> ROUTER, decode + check_steps + queue.Queue, no replay: >= 0.7x raw
  durable_ingest    RobotLink + Spool -> LinkServer + Replay, first send to last ack: >= 5000 steps/s
  weights_push      size12m policy blob, LinkServer.publish -> every RobotLink verified: < 1 s for 8
  control_loop      |period - nominal| / nominal at 20 and 50 Hz beside 8 flooding robots: p99 < 10 %
                    By default the control robot has CPU 0 to itself (as on its own computer; the learner
                    and the flooding robots share the rest) and runs as `reverie-robot run` does by
                    default: link in a child process, control.spin_ms = 2. --no-pin shares every CPU.

    python bench/link_throughput.py [--robots 1 8] [--steps 5000] [--transport-steps 20000] [--seconds 10]
                                    [--parts raw transport ingest weights control] [--quick] [--json]
                                    [--realtime PRIO] [--link-thread] [--no-pin] [--spin-ms MS]
                                    [--flood-nice N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing as mp
import os
import platform
import queue
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zmq

# Heavy imports (torch, the learner and robot packages) happen inside the functions that need them, so
# 'spawn' children that only move bytes start quickly.

CTX = mp.get_context("spawn")
CHUNK = 20  # steps per message
IMAGE = (64, 64, 3)
PROPRIO = 24
ACT_DIM = 6
SPEC = {
    "image": ["uint8", list(IMAGE)],
    "proprio": ["float32", [PROPRIO]],
    "action": ["float32", [ACT_DIM]],
    "reward": ["float32", []],
    "is_first": ["bool", []],
    "is_last": ["bool", []],
    "is_terminal": ["bool", []],
}
HELLO = {"spec": SPEC, "task": "link-bench", "hz": 20.0, "discrete": False}
TARGETS = {
    "transport_ratio_to_raw": 0.7,
    "durable_ingest_steps_per_s": 5000.0,
    "weights_push_8_robots_s": 1.0,
    "control_loop_period_error_p99": 0.10,
}
START_TIMEOUT = 120.0  # s for a robot process to start and connect (torch import on a busy machine)
# Chunks a robot keeps submitted but unacknowledged (spooled or waiting to be). Bounded by `acked`, which only
# lags behind (never runs ahead), unlike status().queued: a producer that outruns spool.put (an fsync per chunk)
# keeps RobotLink's thread spooling instead of serving its socket, so the bound must not trust a stale `queued`.
IN_FLIGHT = 128


def say(msg: str) -> None:
    print(f"[link-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_chunk(rng: np.random.Generator, first: bool = False) -> dict[str, np.ndarray]:
    return {
        "image": rng.integers(0, 256, (CHUNK, *IMAGE), dtype=np.uint8),
        "proprio": rng.standard_normal((CHUNK, PROPRIO)).astype(np.float32),
        "action": rng.uniform(-1, 1, (CHUNK, ACT_DIM)).astype(np.float32),
        "reward": rng.standard_normal(CHUNK).astype(np.float32),
        "is_first": (np.arange(CHUNK) == 0) & first,
        "is_last": np.zeros(CHUNK, bool),
        "is_terminal": np.zeros(CHUNK, bool),
        "policy_version": np.zeros(CHUNK, np.int64),
        "time": time.time() + np.arange(CHUNK) * 0.05,
    }


def step_bytes() -> int:
    arrays = make_chunk(np.random.default_rng(0))
    return sum(a.nbytes for a in arrays.values()) // CHUNK


def _quiet_logs() -> None:
    logging.basicConfig(level=logging.ERROR, format="%(name)s %(levelname)s %(message)s")
    for name in ("reverie", "robot", "learner"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _exit_with_parent() -> None:
    """A watchdog thread: if the benchmark process dies (even by SIGKILL), this child exits too."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _child(body: Callable[..., None]) -> Callable[..., None]:
    """Run a child body; report an exception through the results queue (last positional argument)."""

    def run(*args: Any) -> None:
        _quiet_logs()
        _exit_with_parent()
        results = args[-1]
        try:
            body(*args)
        except BaseException:  # noqa: BLE001  (the parent reports it)
            results.put(("error", f"{body.__name__}{args[1:2]}", traceback.format_exc()))
            raise

    run.__name__ = body.__name__
    return run


# --- children (module level: 'spawn' imports this file by path and finds them by name) --------------------------


def raw_sender(address: str, idx: int, n_chunks: int, ready: Any, go: Any, done: Any, results: Any) -> None:
    _child(_raw_sender)(address, idx, n_chunks, ready, go, done, results)


def _raw_sender(address: str, idx: int, n_chunks: int, ready: Any, go: Any, done: Any, results: Any) -> None:
    from core.link.protocol import Message, encode

    frames = encode(Message("steps", f"bench-{idx}", "raw", 0, arrays=make_chunk(np.random.default_rng(idx))))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        ready.set()
        go.wait()
        for _ in range(n_chunks):
            sock.send_multipart(frames, copy=False)
        done.wait(600)  # keep the socket until the receiver has everything (LINGER 0 would drop the rest)
    finally:
        sock.close(0)
        ctx.term()


def transport_sender(address: str, idx: int, n_chunks: int, ready: Any, go: Any, done: Any, results: Any) -> None:
    _child(_transport_sender)(address, idx, n_chunks, ready, go, done, results)


def _transport_sender(address: str, idx: int, n_chunks: int, ready: Any, go: Any, done: Any, results: Any) -> None:
    from core.link.protocol import Message, encode

    arrays = make_chunk(np.random.default_rng(idx))
    run = f"run{idx}"
    messages = [encode(Message("steps", f"bench-{idx}", run, seq, arrays=arrays)) for seq in range(n_chunks)]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        ready.set()
        go.wait()
        for frames in messages:
            sock.send_multipart(frames, copy=False)
        done.wait(600)
    finally:
        sock.close(0)
        ctx.term()


def _robot_link(address: str, robot: str, spool_dir: str, hello: dict | None = None) -> Any:
    import torch

    from core.config.link import LinkConfig
    from robot.link.spool import Spool
    from robot.link.thread import RobotLink

    torch.set_num_threads(1)
    cfg = LinkConfig()  # the product's defaults for heartbeats, loss detection and resends
    link = RobotLink(address, robot, Spool(Path(spool_dir), 8 << 30), hello or HELLO, heartbeat_s=cfg.heartbeat_s,
                     lost_after_s=cfg.lost_after_s, resend_after_s=cfg.resend_after_s)
    link.start()
    return _connected(link, address, robot)


def _link_process(address: str, robot: str, spool_dir: str, hello: dict) -> Any:
    """The product default (link.process): the link in a child process of the robot (robot.link.process)."""
    from core.config.link import LinkConfig
    from robot.link.process import LinkProcess

    cfg = LinkConfig()
    link = LinkProcess(address, robot, (spool_dir, 8 << 30), hello, heartbeat_s=cfg.heartbeat_s,
                       lost_after_s=cfg.lost_after_s, resend_after_s=cfg.resend_after_s, start_timeout=START_TIMEOUT)
    link.start()
    return _connected(link, address, robot)


def _connected(link: Any, address: str, robot: str) -> Any:
    """The started link once it is connected (closed and TimeoutError after START_TIMEOUT)."""
    end = time.monotonic() + START_TIMEOUT
    while not link.status().connected:
        if time.monotonic() > end:
            link.close()
            raise TimeoutError(f"{robot}: not connected to {address} within {START_TIMEOUT} s")
        time.sleep(0.01)
    return link


def ingest_robot(address: str, idx: int, n_chunks: int, spool_dir: str, ready: Any, go: Any, results: Any) -> None:
    _child(_ingest_robot)(address, idx, n_chunks, spool_dir, ready, go, results)


def _ingest_robot(address: str, idx: int, n_chunks: int, spool_dir: str, ready: Any, go: Any, results: Any) -> None:
    link = _robot_link(address, f"bench-{idx}", spool_dir)
    try:
        rng = np.random.default_rng(idx)
        chunks = [make_chunk(rng, first=(i == 0)) for i in range(min(n_chunks, 8))]
        ready.set()
        go.wait()
        first = time.time()
        for i in range(n_chunks):
            while i - (link.status().acked + 1) >= IN_FLIGHT:
                time.sleep(0.0005)
            link.submit(chunks[i % len(chunks)] | {"time": time.time() + np.arange(CHUNK) * 0.05})
        while link.status().acked < n_chunks - 1:
            time.sleep(0.001)
        last = time.time()
        status = link.status()
        results.put(("ingest", idx, first, last, status.spool_count, status.malformed))
    finally:
        link.close(10.0)


def weights_robot(address: str, idx: int, spool_dir: str, ready: Any, stop: Any, results: Any) -> None:
    _child(_weights_robot)(address, idx, spool_dir, ready, stop, results)


def _weights_robot(address: str, idx: int, spool_dir: str, ready: Any, stop: Any, results: Any) -> None:
    link = _robot_link(address, f"bench-{idx}", spool_dir)
    try:
        ready.set()
        while not stop.is_set():
            weights = link.take_weights()
            if weights is None:
                time.sleep(0.002)
                continue
            # `received` is when the link thread had checked sha256, parsed the blob and found it finite.
            results.put(("weights", idx, weights.version, weights.received, len(weights.blob)))
        status = link.status()
        results.put(("weights_done", idx, status.weights_rejected, status.last_rejection))
    finally:
        link.close(10.0)


PIN_ENV = "REVERIE_BENCH_PIN"  # set by --pin to the CPUs the benchmark started with; inherited by the children
RT_ENV = "REVERIE_BENCH_RT"  # set by --realtime: control.realtime_priority of the control robot
SPIN_ENV = "REVERIE_BENCH_SPIN_MS"  # set by --spin-ms: control.spin_ms of the control robot
LP_ENV = "REVERIE_BENCH_LINK_PROCESS"  # "1" unless --link-thread: the control robot's link runs in a child process


def _pin(role: str) -> None:
    """--pin: the control robot gets CPU 0 to itself, the learner and flooding robots share the rest,
    as when the robot has its own computer (only where the OS supports CPU affinity)."""
    # The CPUs come from the environment, not from this process's affinity: a child inherits the
    # parent's pinning (the parent hosts the learner on the "other" CPUs) and would see only those.
    cpus = sorted(int(c) for c in os.environ.get(PIN_ENV, "").split(",") if c)
    if len(cpus) < 2 or not hasattr(os, "sched_setaffinity"):
        return
    os.sched_setaffinity(0, {cpus[0]} if role == "control" else set(cpus[1:]))


def flood_robot(address: str, idx: int, spool_dir: str, nice: int, ready: Any, go: Any, stop: Any,
                results: Any) -> None:
    _child(_flood_robot)(address, idx, spool_dir, nice, ready, go, stop, results)


def _flood_robot(address: str, idx: int, spool_dir: str, nice: int, ready: Any, go: Any, stop: Any,
                 results: Any) -> None:
    _pin("other")
    if nice:
        os.nice(nice)  # stand-ins for robots on other machines: let them yield this machine's cores
    link = _robot_link(address, f"flood-{idx}", spool_dir)
    try:
        rng = np.random.default_rng(100 + idx)
        chunks = [make_chunk(rng, first=(i == 0)) for i in range(8)]
        ready.set()
        go.wait()
        i = 0
        while not stop.is_set():
            if i - (link.status().acked + 1) >= IN_FLIGHT:  # as fast as the learner takes it
                time.sleep(0.001)
                continue
            link.submit(chunks[i % len(chunks)] | {"time": time.time() + np.arange(CHUNK) * 0.05})
            i += 1
        results.put(("flood", idx, i))
    finally:
        link.close(10.0)


def control_robot(address: str, hz: float, seconds: float, spool_dir: str, ready: Any, go: Any, results: Any) -> None:
    _child(_control_robot)(address, hz, seconds, spool_dir, ready, go, results)


def _control_robot(address: str, hz: float, seconds: float, spool_dir: str, ready: Any, go: Any,
                   results: Any) -> None:
    _pin("control")
    from core.config import Config
    from core.interface import ArraySpec, Robot, flag_specs
    from robot.runner import ControlLoop, step_spec

    class BenchRobot(Robot):
        """A trivial backend: a fresh 64x64 image and 24-D vector each step, no hardware, no physics."""

        def __init__(self) -> None:
            self.observation_spec = {"image": ArraySpec(IMAGE, np.uint8, 0, 255),
                                     "proprio": ArraySpec((PROPRIO,), np.float32), **flag_specs()}
            self.action_spec = ArraySpec((ACT_DIM,), np.float32, -1.0, 1.0)
            self.rng = np.random.default_rng(7)
            self.t = 0

        def _obs(self, first: bool) -> dict[str, np.ndarray]:
            self.t += 1
            return {"image": self.rng.integers(0, 256, IMAGE, dtype=np.uint8),
                    "proprio": self.rng.standard_normal(PROPRIO).astype(np.float32),
                    "reward": np.float32(0.0), "is_first": np.bool_(first),
                    "is_last": np.bool_(self.t % 500 == 0), "is_terminal": np.bool_(False)}

        def reset(self, seed: int | None = None) -> dict[str, np.ndarray]:
            return self._obs(True)

        def send(self, action: np.ndarray | int) -> None:
            pass

        def observe(self) -> dict[str, np.ndarray]:
            return self._obs(False)

        def stop(self) -> None:
            pass

        def close(self) -> None:
            pass

    rt = int(os.environ.get(RT_ENV, "0")) or None
    cfg = Config.model_validate({"name": "link-bench", "task": "arm_reach",
                                 "control": {"hz": hz, "realtime_priority": rt,
                                             "spin_ms": float(os.environ.get(SPIN_ENV, "2.0"))},
                                 "sim": {"physics_hz": 1000.0}, "link": {"chunk_seconds": 1.0}})
    robot = BenchRobot()
    spec, act = step_spec(robot)
    hello = {"spec": spec.to_wire(), "task": "link-bench", "hz": float(hz), "discrete": act.discrete}
    make_link = _link_process if os.environ.get(LP_ENV) == "1" else _robot_link
    link = make_link(address, f"control-{int(hz)}", spool_dir, hello)
    try:
        loop = ControlLoop(cfg, robot, link)
        ready.set()
        go.wait()
        stats = loop.run(duration=seconds)
        errors = stats.period_errors[1:]  # the first period includes reset
        results.put(("control", hz, errors, stats.steps, link.status().malformed))
    finally:
        link.close(10.0)


# --- the parent ---------------------------------------------------------------------------------------------------


class Children:
    """The robot processes of one part: started with 'spawn', always stopped (terminate, then kill) on the way out."""

    def __init__(self) -> None:
        self.procs: list[Any] = []
        self.results = CTX.Queue()

    def spawn(self, target: Callable[..., None], *args: Any, daemon: bool = True) -> Any:
        """daemon=False for a child that starts processes of its own (a daemonic process may not have children)."""
        proc = CTX.Process(target=target, args=(*args, self.results), daemon=daemon, name=f"{target.__name__}")
        proc.start()
        self.procs.append(proc)
        return proc

    def check(self) -> None:
        for proc in self.procs:
            if proc.exitcode not in (None, 0):
                raise RuntimeError(f"child {proc.name} (pid {proc.pid}) exited with code {proc.exitcode}")

    def wait_events(self, events: list[Any], what: str, timeout: float = START_TIMEOUT) -> None:
        end = time.monotonic() + timeout
        while not all(e.is_set() for e in events):
            self._check_errors()
            if time.monotonic() > end:
                raise TimeoutError(f"not within {timeout} s: {what}")
            time.sleep(0.05)

    def collect(self, n: int, what: str, timeout: float, kind: str | None = None) -> list[tuple]:
        """The next n result tuples of `kind` (any kind when None; other kinds are dropped) from the children."""
        got: list[tuple] = []
        end = time.monotonic() + timeout
        while len(got) < n:
            if time.monotonic() > end:
                raise TimeoutError(f"not within {timeout} s: {what} ({len(got)} of {n} results)")
            try:
                item = self.results.get(timeout=0.2)
            except queue.Empty:
                self.check()
                continue
            if item[0] == "error":
                raise RuntimeError(f"child {item[1]} failed:\n{item[2]}")
            if kind is None or item[0] == kind:
                got.append(item)
        return got

    def _check_errors(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                item = self.results.get_nowait()
                if item[0] == "error":
                    raise RuntimeError(f"child {item[1]} failed:\n{item[2]}")
        self.check()

    def close(self, timeout: float = 15.0) -> None:
        end = time.monotonic() + timeout
        for proc in self.procs:
            proc.join(max(0.1, end - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(2.0)
        self.results.close()
        self.results.join_thread()


@contextlib.contextmanager
def children() -> Iterator[Children]:
    kids = Children()
    ok = False
    try:
        yield kids
        ok = True
    finally:
        kids.close(15.0 if ok else 0.0)  # after an error, children may wait on events forever: stop them now


@contextlib.contextmanager
def learner(base: Path, name: str, ram_steps: int = 50_000) -> Iterator[Any]:
    """A LinkServer on a free loopback port over a fresh Replay (default chunk length) in base/name."""
    from core.config.link import LinkConfig
    from learner.link.server import LinkServer
    from learner.replay import Replay

    replay = Replay(base / name / "replay", ram_steps=ram_steps)
    server = LinkServer(LinkConfig(bind="tcp://127.0.0.1:*"), replay, base / name / "run")
    try:
        server.start()
        yield server
        server.check()
    finally:
        server.close()
        replay.close()


def _written() -> int | None:
    """Bytes this process (all its threads) has passed to write() so far (Linux /proc/self/io wchar)."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _rate(steps: int, seconds: float) -> float:
    return round(steps / seconds, 1) if seconds > 0 else float("nan")


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def bench_raw(robots: int, steps: int) -> dict[str, Any]:
    n_chunks = max(1, steps // CHUNK)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    go, done = CTX.Event(), CTX.Event()
    try:
        sock.bind("tcp://127.0.0.1:*")
        address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        with children() as kids:
            ready = [CTX.Event() for _ in range(robots)]
            for i in range(robots):
                kids.spawn(raw_sender, address, i, n_chunks, ready[i], go, done)
            kids.wait_events(ready, f"{robots} raw senders started")
            total = n_chunks * robots
            received = nbytes = 0
            go.set()
            start = time.perf_counter()
            while received < total:
                if not sock.poll(1000):
                    kids.check()
                    continue
                frames = sock.recv_multipart(copy=False)
                nbytes += sum(f.buffer.nbytes for f in frames)
                received += 1
            seconds = time.perf_counter() - start
            done.set()
    finally:
        sock.close(0)
        ctx.term()
    return {"steps": total * CHUNK, "seconds": round(seconds, 3), "steps_per_s": _rate(total * CHUNK, seconds),
            "MB_per_s": round(nbytes / seconds / 1e6, 1)}


def bench_transport(robots: int, steps: int, handoff: bool = True) -> dict[str, Any]:
    """Receive, decode and check every message; with `handoff`, put each into a queue.Queue another thread drains."""
    from core.link.protocol import check_steps, decode, spec_of

    spec = spec_of(SPEC)
    n_chunks = max(1, steps // CHUNK)
    total = n_chunks * robots
    handed: queue.Queue = queue.Queue(maxsize=256)
    consumed = [0]

    def consume() -> None:
        while handed.get() is not None:
            consumed[0] += 1

    consumer = threading.Thread(target=consume, name="consumer", daemon=True)
    consumer.start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    go, done = CTX.Event(), CTX.Event()
    rejected = 0
    try:
        sock.bind("tcp://127.0.0.1:*")
        address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        with children() as kids:
            ready = [CTX.Event() for _ in range(robots)]
            for i in range(robots):
                kids.spawn(transport_sender, address, i, n_chunks, ready[i], go, done)
            kids.wait_events(ready, f"{robots} transport senders started")
            received = 0
            go.set()
            start = time.perf_counter()
            while received < total:
                if not sock.poll(1000):
                    kids.check()
                    continue
                frames = sock.recv_multipart(copy=False)
                received += 1
                try:
                    msg = decode(frames[1:])
                    check_steps(msg, spec)
                except ValueError:
                    rejected += 1
                    continue
                if handoff:
                    handed.put(msg)
            handed.put(None)
            consumer.join()
            seconds = time.perf_counter() - start
            done.set()
    finally:
        handed.put(None)
        sock.close(0)
        ctx.term()
    if rejected:
        raise RuntimeError(f"transport: {rejected} of {total} messages failed decode/check_steps")
    return {"steps": total * CHUNK, "seconds": round(seconds, 3), "steps_per_s": _rate(total * CHUNK, seconds)}


def bench_ingest(base: Path, robots: int, steps: int) -> dict[str, Any]:
    n_chunks = max(1, steps // CHUNK)
    with learner(base, f"ingest-{robots}") as server, children() as kids:
        go = CTX.Event()
        ready = [CTX.Event() for _ in range(robots)]
        for i in range(robots):
            kids.spawn(ingest_robot, server.endpoint, i, n_chunks, str(base / f"ingest-{robots}" / f"spool-{i}"),
                       ready[i], go)
        kids.wait_events(ready, f"{robots} ingest robots connected")
        written = _written()
        go.set()
        results = kids.collect(robots, "every robot's last chunk acknowledged", timeout=600.0, kind="ingest")
        after = _written()
        first, last = min(r[2] for r in results), max(r[3] for r in results)
        stats = server.replay.stats()["totals"]
        table = server.robot_table()
    total = n_chunks * robots * CHUNK
    seconds = last - first
    if stats["steps"] != total:
        raise RuntimeError(f"durable ingest: the replay holds {stats['steps']} steps, the robots sent {total}")
    out = {"steps": total, "seconds": round(seconds, 3), "steps_per_s": _rate(total, seconds),
           "duplicates": sum(r["duplicates"] for r in table), "spool_left": sum(r[4] for r in results),
           "replay_disk_chunks": stats["disk_chunks"]}
    if written is not None and after is not None:
        # Replay files written by the learner per byte of experience received (flush rewrites open chunks whole).
        out["learner_MB_written"] = round((after - written) / 1e6, 1)
        out["write_amplification"] = round((after - written) / (total * step_bytes()), 2)
    return out


def policy_blobs() -> dict[str, bytes]:
    import torch

    from core.agents.dreamer.policy import export_policy, policy_weights
    from core.agents.spaces import ActSpace
    from core.config.agent import DreamerConfig
    from core.weights import weights_to_bytes
    from learner.agents.dreamer.agent import DreamerModel

    torch.manual_seed(0)
    space = {"image": (IMAGE, "uint8"), "reward": ((), "float32"), "is_first": ((), "bool"),
             "is_last": ((), "bool"), "is_terminal": ((), "bool")}
    model = DreamerModel(DreamerConfig(size="size12m", device="cpu"), space, ActSpace(ACT_DIM, False))
    tensors, meta = policy_weights(model, 1)
    return {"float32": export_policy(model, 1),
            "float16": weights_to_bytes({k: v.half() for k, v in tensors.items()}, meta)}


def bench_weights(base: Path, robots: int, blobs: dict[str, bytes], reps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with learner(base, f"weights-{robots}") as server, children() as kids:
        stop = CTX.Event()
        ready = [CTX.Event() for _ in range(robots)]
        for i in range(robots):
            kids.spawn(weights_robot, server.endpoint, i, str(base / f"weights-{robots}" / f"spool-{i}"), ready[i],
                       stop)
        kids.wait_events(ready, f"{robots} robots connected for weights")
        version = 0
        try:
            for dtype, blob in blobs.items():
                latencies = []
                for _ in range(reps):
                    version += 1
                    time.sleep(0.5)  # let the previous push settle
                    start = time.time()
                    server.publish(blob, version, version, dtype)
                    got = []
                    while len(got) < robots:
                        item = kids.collect(1, f"weights v{version} verified by {robots} robots", 120.0,
                                            kind="weights")[0]
                        if item[2] == version:
                            got.append(item)
                    latencies.append(max(item[3] for item in got) - start)
                    say(f"  weights {dtype} v{version} -> {robots} robot(s): {latencies[-1]:.3f} s")
                out[dtype] = {"blob_MB": round(len(blob) / 1e6, 2), "latency_s_median": round(statistics.median(
                    latencies), 3), "latency_s_max": round(max(latencies), 3), "reps": reps}
        finally:
            stop.set()
        done = kids.collect(robots, "robots report their rejections", 60.0, kind="weights_done")
        if any(d[2] for d in done):
            raise RuntimeError(f"weights refused by a robot: {[d[3] for d in done if d[2]]}")
    return out


def _control_once(kids: Children, server: Any, base: Path, hz: float, seconds: float, tag: str) -> dict[str, Any]:
    ready, go = CTX.Event(), CTX.Event()
    kids.spawn(control_robot, server.endpoint, hz, seconds, str(base / "control" / f"spool-{tag}-{hz:g}"), ready, go,
               daemon=os.environ.get(LP_ENV) != "1")
    kids.wait_events([ready], f"the {hz:g} Hz control robot connected")
    before, start = server.received, time.monotonic()
    go.set()
    _, _, errors, steps, _ = kids.collect(1, f"the {hz:g} Hz control loop", seconds + 120.0, kind="control")[0]
    rate = (server.received - before) / (time.monotonic() - start)
    err = np.asarray(errors)
    out = {"steps": steps, "period_error_p50": round(float(np.quantile(err, 0.5)), 4),
           "period_error_p99": round(float(np.quantile(err, 0.99)), 4),
           "period_error_max": round(float(err.max()), 4), "learner_steps_per_s_meanwhile": round(rate, 1)}
    say(f"  {hz:g} Hz, {tag}: period error p50 {out['period_error_p50']:.2%}, p99 {out['period_error_p99']:.2%}, "
        f"max {out['period_error_max']:.2%}; learner taking {rate:,.0f} steps/s")
    return out


def bench_control(base: Path, flood: int, rates: list[float], seconds: float, nice: int = 0) -> dict[str, Any]:
    """Each rate twice: beside an idle link (the baseline), then while `flood` robots flood the same learner."""
    out: dict[str, Any] = {f"{hz:g}": {"hz": hz, "seconds": seconds} for hz in rates}
    _pin("other")  # this process hosts the learner's link server
    with learner(base, "control") as server, children() as kids:
        for hz in rates:
            out[f"{hz:g}"]["idle"] = _control_once(kids, server, base, hz, seconds, "idle")
        go, stop = CTX.Event(), CTX.Event()
        ready = [CTX.Event() for _ in range(flood)]
        for i in range(flood):
            kids.spawn(flood_robot, server.endpoint, i, str(base / "control" / f"flood-spool-{i}"), nice, ready[i], go,
                       stop)
        kids.wait_events(ready, f"{flood} flooding robots connected")
        go.set()
        say(f"  {flood} robots flooding the learner")
        try:
            for hz in rates:
                out[f"{hz:g}"]["busy"] = _control_once(kids, server, base, hz, seconds, "busy")
        finally:
            stop.set()
        kids.collect(flood, "flooding robots stopped", 60.0, kind="flood")
    return out


def table(results: dict[str, Any]) -> str:
    lines = [f"{'figure':48} {'value':>14}  target"]
    for n, r in results.get("raw_push_pull", {}).items():
        lines.append(f"{f'raw PUSH/PULL, {n} sender(s), steps/s':48} {r['steps_per_s']:>14,.0f}  (ceiling)")
    for n, r in results.get("transport", {}).items():
        lines.append(f"{f'transport, {n} robot(s), steps/s':48} {r['steps_per_s']:>14,.0f}")
        lines.append(f"{'  ratio to raw':48} {r['ratio_to_raw']:>14.2f}  >= {TARGETS['transport_ratio_to_raw']}")
        lines.append(f"{'  without the queue hand-off, steps/s':48} {r['no_queue_steps_per_s']:>14,.0f}")
    for n, r in results.get("durable_ingest", {}).items():
        lines.append(f"{f'durable ingest, {n} robot(s), steps/s':48} {r['steps_per_s']:>14,.0f}  "
                     f">= {TARGETS['durable_ingest_steps_per_s']:.0f}")
    for n, by_dtype in results.get("weights_push", {}).items():
        for dtype, r in by_dtype.items():
            label = f"weights {dtype} ({r['blob_MB']} MB) -> {n} robot(s), max s"
            lines.append(f"{label:48} {r['latency_s_max']:>14.3f}  < {TARGETS['weights_push_8_robots_s']} (8 robots)")
    cpus = "own CPU" if results["settings"].get("pinned") else "shared CPUs"
    for hz, by_load in results.get("control_loop", {}).items():
        for load in ("idle", "busy"):
            if load in by_load:
                r = by_load[load]
                lines.append(f"{f'control {hz} Hz ({cpus}), link {load}: p50 / p99':48} "
                             f"{r['period_error_p50']:>6.1%} /{r['period_error_p99']:>6.1%}"
                             f"{'  p99 < 10%' if load == 'busy' else ''}")
    return "\n".join(lines)


def verdicts(results: dict[str, Any]) -> dict[str, Any]:
    met: dict[str, Any] = {}
    for n, r in results.get("transport", {}).items():
        met[f"transport_{n}_ratio_ge_0.7"] = r["ratio_to_raw"] >= TARGETS["transport_ratio_to_raw"]
    for n, r in results.get("durable_ingest", {}).items():
        met[f"durable_ingest_{n}_ge_5000"] = r["steps_per_s"] >= TARGETS["durable_ingest_steps_per_s"]
    eight = results.get("weights_push", {}).get("8", {})
    for dtype, r in eight.items():
        met[f"weights_{dtype}_8_robots_lt_1s"] = r["latency_s_max"] < TARGETS["weights_push_8_robots_s"]
    for hz, r in results.get("control_loop", {}).items():
        if "busy" in r:
            met[f"control_{hz}hz_busy_p99_lt_10pct"] = (r["busy"]["period_error_p99"]
                                                        < TARGETS["control_loop_period_error_p99"])
    return met


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--robots", type=int, nargs="+", default=[1, 8], help="robot process counts to measure")
    parser.add_argument("--steps", type=int, default=5000, help="steps each robot sends in the durable ingest")
    parser.add_argument("--transport-steps", type=int, default=20000,
                        help="steps each robot sends in the raw and transport parts (fast: more for a stable figure)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each control-loop measurement, s")
    parser.add_argument("--reps", type=int, default=3, help="weight pushes per dtype and robot count")
    parser.add_argument("--parts", nargs="+", default=["raw", "transport", "ingest", "weights", "control"],
                        choices=["raw", "transport", "ingest", "weights", "control"])
    parser.add_argument("--flood", type=int, default=8, help="robots flooding the learner during the control loop")
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                        help="control-loop part: give the control robot its own CPU (as on its own computer); "
                             "the learner and the flooding robots share the other CPU(s); --no-pin: all share all")
    parser.add_argument("--realtime", type=int, default=0, metavar="PRIO",
                        help="control-loop part: run the control robot's loop SCHED_FIFO at this priority "
                             "(control.realtime_priority; needs CAP_SYS_NICE)")
    parser.add_argument("--spin-ms", type=float, default=2.0,
                        help="control-loop part: control.spin_ms of the control robot (0: sleep to each tick)")
    parser.add_argument("--link-thread", action="store_true",
                        help="control-loop part: the control robot runs its link in a thread (RobotLink, "
                             "link.process=false) instead of a child process (the default)")
    parser.add_argument("--flood-nice", type=int, default=0,
                        help="nice increment of the flooding robots (e.g. 10: they stand in for other machines)")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a new temp dir, removed at exit)")
    parser.add_argument("--quick", action="store_true", help="small numbers for a smoke run")
    parser.add_argument("--json", action="store_true", help="print only the JSON document (no table)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.seconds, args.reps = min(args.steps, 400), min(args.seconds, 2.0), 1
        args.transport_steps = min(args.transport_steps, 2000)
    _quiet_logs()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: children get stopped
    import torch

    torch.set_num_threads(1)
    if args.dir is not None:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="reverie_link_bench_", dir=args.dir))
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(), "loadavg_start": _load()},
        "settings": {"robots": args.robots, "steps_per_robot": args.steps,
                     "transport_steps_per_robot": args.transport_steps, "chunk_steps": CHUNK,
                     "step_bytes": step_bytes(), "control_seconds": args.seconds, "flood_robots": args.flood,
                     "flood_nice": args.flood_nice, "quick": args.quick, "realtime_priority": args.realtime,
                     "link_process": not args.link_thread, "pinned": args.pin, "spin_ms": args.spin_ms},
        "targets": TARGETS,
    }
    try:
        if "raw" in args.parts or "transport" in args.parts:
            results["raw_push_pull"] = {}
            for n in args.robots:
                say(f"raw PUSH/PULL: {n} sender(s) x {args.transport_steps} steps")
                results["raw_push_pull"][str(n)] = bench_raw(n, args.transport_steps)
                say(f"  {results['raw_push_pull'][str(n)]['steps_per_s']:,.0f} steps/s")
        if "transport" in args.parts:
            results["transport"] = {}
            for n in args.robots:
                say(f"transport (DEALER -> ROUTER, decode, check_steps, queue): {n} robot(s) x "
                    f"{args.transport_steps} steps")
                r = bench_transport(n, args.transport_steps)
                r["ratio_to_raw"] = round(r["steps_per_s"] / results["raw_push_pull"][str(n)]["steps_per_s"], 3)
                say(f"  {r['steps_per_s']:,.0f} steps/s ({r['ratio_to_raw']:.2f}x raw); again without the queue:")
                r["no_queue_steps_per_s"] = bench_transport(n, args.transport_steps, handoff=False)["steps_per_s"]
                results["transport"][str(n)] = r
                say(f"  {r['no_queue_steps_per_s']:,.0f} steps/s decoded and checked, not handed to another thread")
        if "ingest" in args.parts:
            results["durable_ingest"] = {}
            for n in args.robots:
                say(f"durable ingest (RobotLink + Spool -> LinkServer + Replay): {n} robot(s) x {args.steps} steps")
                results["durable_ingest"][str(n)] = bench_ingest(base, n, args.steps)
                say(f"  {results['durable_ingest'][str(n)]['steps_per_s']:,.0f} steps/s")
        if "weights" in args.parts:
            say("weights: building the size12m policy blobs")
            blobs = policy_blobs()
            results["weights_push"] = {}
            for n in args.robots:
                say(f"weights push to {n} robot(s)")
                results["weights_push"][str(n)] = bench_weights(base, n, blobs, args.reps)
        if "control" in args.parts:
            say(f"control loop at 20 and 50 Hz for {args.seconds:g} s each, {args.flood} robots flooding")
            if args.pin:
                os.environ[PIN_ENV] = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))) if hasattr(
                    os, "sched_getaffinity") else ""
            if args.realtime:
                os.environ[RT_ENV] = str(args.realtime)
            os.environ[LP_ENV] = "0" if args.link_thread else "1"
            os.environ[SPIN_ENV] = str(args.spin_ms)
            results["control_loop"] = bench_control(base, args.flood, [20.0, 50.0], args.seconds, args.flood_nice)
    finally:
        results["machine"]["loadavg_end"] = _load()
        shutil.rmtree(base, ignore_errors=True)
        for proc in mp.active_children():  # anything a failed part left behind
            proc.kill()
    results["met"] = verdicts(results)
    if not args.json:
        print(table(results), file=sys.stderr)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
