"""The robot process's control loop: observe -> act with the local policy -> command, at a fixed rate.

Nothing here waits on the network or the learner: experience goes to the link's queue (which
spools it to disk and sends it from its own thread), and new weights are turned into a policy by a
background loader and swapped in between two control steps. Until the first weights arrive the
robot acts randomly (or with `link.initial_weights`). If the spool fills up (the learner has
been unreachable too long) the robot stops safely and says why: experience is never dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.agents import Policy, PolicyBlob, build_policy, policy_from_file, read_policy
from core.agents.spaces import ActSpace
from core.config import Config
from core.config.link import chunk_steps
from core.interface import ArraySpec, Robot, RobotError
from core.layout import ACTION_KEY, BOOL_FLAGS, StepLayout
from robot.backends import action_dim
from robot.link.contract import Link, LinkError, LinkRefused, Weights
from robot.link.spool import SpoolFull

log = logging.getLogger("reverie.robot")
status_log = logging.getLogger("reverie.robot.status")  # the periodic status line (shown by default)
RECENT_STEPS = 3000  # one minute at 50 Hz


def step_spec(robot: Robot) -> tuple[StepLayout, ActSpace]:
    """The per-step layout announced to the learner (observation entries + model-form action)."""
    dim, discrete = action_dim(robot.action_spec)
    fields = {k: (s.shape, s.dtype) for k, s in robot.observation_spec.items()}
    return StepLayout({**fields, ACTION_KEY: ((dim,), np.float32)}), ActSpace(dim, discrete)


def _act_kind(act: ActSpace) -> str:
    return f"{act.dim} {'discrete choices' if act.discrete else 'continuous dimensions'}"


def policy_misfit(policy: Policy, spec: StepLayout, act: ActSpace) -> str | None:
    """Why `policy` cannot drive a robot with this step layout (another task's weights), else None."""
    if (policy.act_space.dim, policy.act_space.discrete) != (act.dim, act.discrete):
        return f"the policy acts in {_act_kind(policy.act_space)}, the robot in {_act_kind(act)}"
    for key in policy.inputs:
        shape = tuple(policy.space[key][0])
        if key not in spec:
            return f"the policy reads observation {key!r}, which the robot does not have"
        if spec[key].shape != shape:
            return f"observation {key!r}: the policy expects shape {shape}, the robot gives {spec[key].shape}"
    return None


def blob_misfit(blob: PolicyBlob, spec: StepLayout, act: ActSpace) -> str | None:
    """Why a received blob cannot be this robot's, from what it declares, before anything is built. Every
    observation key it declares must be the robot's, with the robot's shape: the keys its patterns are then
    matched against while building are the robot's own."""
    if (blob.act_space.dim, blob.act_space.discrete) != (act.dim, act.discrete):
        return f"the policy acts in {_act_kind(blob.act_space)}, the robot in {_act_kind(act)}"
    for key, (shape, _) in blob.space.items():
        if key not in spec or key == ACTION_KEY:
            return f"the policy's observation space has {key[:64]!r}, which the robot does not have"
        if spec[key].shape != tuple(shape):
            return f"observation {key!r}: the policy expects shape {tuple(shape)}, the robot gives {spec[key].shape}"
    return None


def warm_up(policy: Policy, spec: StepLayout, rounds: int = 3) -> None:
    """Act a few times on a blank observation, then forget it. A fresh policy's first calls are slow
    (torch allocates and picks kernels: seconds, once); paying that here keeps it out of a control period,
    where it would trip the motors' watchdog."""
    obs = {k: np.zeros(shape, dtype) for k, (shape, dtype) in spec.without(ACTION_KEY).items()}
    for i in range(rounds):
        obs["is_first"] = np.bool_(i == 0)
        policy.act(obs, mode="sample")
        policy.prepare()
    policy.reset()


ACT_TIMINGS = 20  # act() calls timed before a policy is used: its p99 must fit the control period


def act_time_problem(policy: Policy, spec: StepLayout, period: float, calls: int = ACT_TIMINGS) -> str | None:
    """Why `policy` cannot act at this control rate, measured after a warm-up, else None: the p99 of `calls`
    control steps' act() and prepare() (what a tick spends on the policy) must fit in `period`. A planner
    (PlaNet) can take far longer than a period; acting with it would miss every deadline. The timing stops
    once two calls overran: the p99 of up to 101 calls is then over the period whatever the rest take.
    The time is the calling thread's CPU time: what the policy costs, not what other processes took from it
    while it ran (a busy machine must not refuse a policy that fits; the status line shows period errors);
    the robot runs torch on this one thread (robot.cli), so nothing of the policy's work is missed.
    A policy may name what shrinks its cost (`cost_settings`, e.g. a planner's candidates, iterations and
    horizon); the message passes that on."""
    warm_up(policy, spec)
    obs = {k: np.zeros(shape, dtype) for k, (shape, dtype) in spec.without(ACTION_KEY).items()}
    times: list[float] = []
    for i in range(calls):
        obs["is_first"] = np.bool_(i == 0)
        start = time.thread_time()
        policy.act(obs, mode="sample")
        policy.prepare()
        times.append(time.thread_time() - start)
        if sum(t > period for t in times) >= 2:
            break
    policy.reset()
    p99 = float(np.quantile(times, 0.99))
    if p99 <= period:
        return None
    shrink = getattr(policy, "cost_settings", None) or "the policy's size"
    return (f"act() takes {1e3 * p99:.1f} ms (p99 of {len(times)} calls, CPU time), more than the control "
            f"period of {1e3 * period:.1f} ms (control.hz {1 / period:g}); lower {shrink}, or control.hz")


class PolicyLoader:
    """Builds a Policy from received weights in a background thread (it takes milliseconds to tens of
    milliseconds, more than a control period can spare); the loop picks up the newest one ready. What a blob
    declares is bounded and checked against this robot before anything is built (`read_policy`, `blob_misfit`,
    `build_policy`), so a blob describing a huge network costs milliseconds, not seconds and gigabytes."""

    def __init__(self, link: Link, spec: StepLayout, act: ActSpace, period: float) -> None:
        self.link = link
        self.spec, self.act, self.period = spec, act, period
        self.ready: Policy | None = None
        self.failures = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="policy-loader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)

    def take(self) -> Policy | None:
        with self._lock:
            policy, self.ready = self.ready, None
        return policy

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            weights: Weights | None = self.link.take_weights()
            if weights is None:
                continue
            try:
                blob = read_policy(weights.blob)
                if why := blob_misfit(blob, self.spec, self.act):
                    raise ValueError(why)
                policy = build_policy(blob)  # of whatever algorithm the blob names
                policy.version = weights.version
                if why := policy_misfit(policy, self.spec, self.act):
                    raise ValueError(why)
                if why := act_time_problem(policy, self.spec, self.period):  # warms it up first
                    raise ValueError(why)
            except Exception as exc:  # noqa: BLE001  (bad weights must never stop the robot)
                self.failures += 1
                log.warning("weights v%d could not be turned into a policy (%s); keeping the old one",
                            weights.version, exc)
                continue
            with self._lock:
                self.ready = policy


@dataclass
class LoopStats:
    steps: int = 0
    episodes: int = 0
    chunks: int = 0
    swaps: int = 0
    # |actual - nominal| / nominal per step: 8 bytes each (35 MB a day at 50 Hz), for the run's summary
    period_errors: array = field(default_factory=lambda: array("d"))
    # the last RECENT_STEPS of them: what the live status and the heartbeat report, at a cost that
    # does not grow with the run (a quantile over a whole day would stall the loop)
    recent_errors: deque = field(default_factory=lambda: deque(maxlen=RECENT_STEPS))
    returns: list[float] = field(default_factory=list)

    def add_period_error(self, error: float) -> None:
        self.period_errors.append(error)
        self.recent_errors.append(error)

    def period_error(self, q: float) -> float:
        """Quantile q over the whole run."""
        return float(np.quantile(np.frombuffer(self.period_errors), q)) if self.period_errors else 0.0

    def recent_period_error(self, q: float) -> float:
        """Quantile q over the last RECENT_STEPS steps."""
        return float(np.quantile(self.recent_errors, q)) if self.recent_errors else 0.0


def step_digests(arrays: dict[str, np.ndarray], keys: list[str]) -> list[str]:
    """One short content hash per step over `keys` (observations, action, reward): lets a ledger
    of what a robot produced be checked against what the learner stored."""
    n = len(next(iter(arrays.values())))
    out = []
    for i in range(n):
        h = hashlib.blake2b(digest_size=12)
        for key in keys:
            h.update(np.ascontiguousarray(arrays[key][i]).tobytes())
        out.append(h.hexdigest())
    return out


def ledger_keys(spec: StepLayout) -> list[str]:
    """What a ledger digest covers: everything but the episode flags (the learner may cut an episode)."""
    return sorted(k for k in spec if k not in BOOL_FLAGS)


def realtime(priority: int | None) -> bool:
    """Put the calling thread (the control loop) under SCHED_FIFO so other processes cannot delay
    its wake-ups; the link and loader threads keep normal scheduling."""
    if priority is None:
        return False
    if not hasattr(os, "sched_setscheduler"):
        log.warning("control.realtime_priority: this OS has no SCHED_FIFO; running with normal scheduling")
        return False
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except (PermissionError, OSError) as exc:
        log.warning("control.realtime_priority %d refused (%s): needs CAP_SYS_NICE or root "
                    "(setcap cap_sys_nice+ep on the python binary); running with normal scheduling", priority, exc)
        return False
    return True


def wait_until(deadline: float, spin: float) -> None:
    """Sleep until `spin` seconds before `deadline`, then spin to it: waking from sleep can be late by
    milliseconds on a loaded machine (or a virtual CPU that the host parked), a spinning thread is not."""
    now = time.monotonic()
    if deadline - now > spin:
        time.sleep(deadline - now - spin)
    while time.monotonic() < deadline:
        time.sleep(0)  # releases the GIL, so the link thread still runs while we spin


def pin_cpus(cpus: list[int] | None) -> bool:
    """Pin the calling thread (the control loop) to `cpus`, so the work of other processes runs elsewhere;
    threads it starts later inherit the set, processes started before keep theirs."""
    if cpus is None:
        return False
    if not hasattr(os, "sched_setaffinity"):
        log.warning("control.cpus: this OS has no CPU affinity; running unpinned")
        return False
    try:
        os.sched_setaffinity(0, set(cpus))
    except OSError as exc:
        allowed = sorted(os.sched_getaffinity(0))
        log.warning("control.cpus %s refused (%s); this process may use CPUs %s; running unpinned", cpus, exc, allowed)
        return False
    return True


class ControlLoop:
    def __init__(self, cfg: Config, robot: Robot, link: Link, seed: int = 0,
                 initial: Policy | None = None, ledger: Path | None = None,
                 controller: Callable[[dict[str, np.ndarray]], np.ndarray] | None = None) -> None:
        """`controller`: acts in place of any policy (model-form actions; a leader arm, robot/teleop.py): the
        steps record its actions as policy version 0, and weights the learner sends are not used."""
        self.cfg, self.robot, self.link = cfg, robot, link
        self.controller = controller
        self.spec, self.act_space = step_spec(robot)
        action = robot.action_spec
        self.low = np.asarray(action.low, np.float32) if isinstance(action, ArraySpec) else None
        self.high = np.asarray(action.high, np.float32) if isinstance(action, ArraySpec) else None
        if initial is not None and (why := policy_misfit(initial, self.spec, self.act_space)
                                    or act_time_problem(initial, self.spec, 1.0 / cfg.control.hz)):
            raise ValueError(f"initial policy v{initial.version}: {why}")
        self.policy = initial
        self.rng = np.random.default_rng(seed)
        self.loader = PolicyLoader(link, self.spec, self.act_space, 1.0 / cfg.control.hz)
        self.chunk_steps = chunk_steps(cfg.link.chunk_seconds, cfg.control.hz)
        self.buffer: list[dict[str, np.ndarray]] = []
        self.stats = LoopStats()
        self.stop_reason = ""
        self._stop = threading.Event()
        self.ledger = open(ledger, "a") if ledger is not None else None  # noqa: SIM115  (closed in run)

    @property
    def version(self) -> int:
        return self.policy.version if self.policy is not None else 0

    def stop(self, reason: str = "stopped") -> None:
        self.stop_reason = self.stop_reason or reason
        self._stop.set()

    def run(self, duration: float | None = None, max_steps: int | None = None) -> LoopStats:
        """Run until `stop()`, `duration` seconds, `max_steps` steps, or a full spool."""
        period = 1.0 / self.cfg.control.hz
        spin = min(self.cfg.control.spin_ms / 1000.0, period / 2)
        # The link and loader threads share the GIL with this loop; by default a thread waiting for
        # it can wait 5 ms (a quarter of a 50 Hz period). Hand it over more often while we run.
        switch = sys.getswitchinterval()
        sys.setswitchinterval(min(switch, period / 100))
        pin_cpus(self.cfg.control.cpus)
        realtime(self.cfg.control.realtime_priority)
        if self.policy is not None:
            warm_up(self.policy, self.spec)
        self.loader.start()
        episode_return = 0.0
        try:
            obs = self.robot.reset()  # inside the try: an e-stop or fault here is a safety stop too
            start = last = time.monotonic()
            deadline = start + period
            status_every = self.cfg.control.status_every_s
            next_status = start + status_every
            while not self._stop.is_set():
                self._swap_policy()
                action = self._act(obs)
                if not obs["is_last"]:  # the last observation of an episode takes no command
                    try:
                        self.robot.send(self.act_space.to_env(action, self.low, self.high))
                    except RobotError:
                        self._record(obs | {"is_last": np.bool_(True)}, action)  # the learner sees the boundary
                        raise
                self._record(obs, action)
                episode_return += float(obs["reward"])
                reset = bool(obs["is_last"])  # a reset moves the robot home over many periods: no control period
                if reset:
                    self.stats.episodes += 1
                    self.stats.returns.append(episode_return)
                    episode_return = 0.0
                    obs = self.robot.reset()
                else:
                    obs = self.robot.observe()
                if self.policy is not None:
                    self.policy.prepare()  # the recurrent update, off the next act()'s path
                self.stats.steps += 1
                if max_steps is not None and self.stats.steps >= max_steps:
                    self.stop("step limit reached")
                if duration is not None and time.monotonic() - start >= duration:
                    self.stop("time limit reached")
                # Hold the rate: sleep to the next tick; when late, start the next period now rather
                # than bursting to catch up (a burst of commands is worse than a late one).
                wait_until(deadline, spin)
                now = time.monotonic()
                if not reset:
                    self.stats.add_period_error(abs((now - last) - period) / period)
                last = now
                deadline = max(deadline + period, now)
                if self.stats.steps % self.chunk_steps == 0:
                    self.link.set_stats(version=self.version, steps=self.stats.steps,
                                        period_err_p99=round(self.stats.recent_period_error(0.99), 4))
                if status_every and now >= next_status:
                    self._status(now - start)
                    next_status = now + status_every
        except SpoolFull as exc:
            self.stop(f"spool full, stopping safely: {exc}")
        except LinkRefused as exc:
            self.stop(f"refused by the learner: {exc}")
        except LinkError as exc:  # recorded steps stay queued in the link; close() spools them
            self.stop(f"link failed, stopping safely: {exc}")
        except RobotError as exc:
            # A safety stop (e-stop, servo fault, dead bus): the robot's own safe state is already set.
            log.error("robot stopped: %s", exc)
            self.stop(f"robot stopped: {exc}")
            if self.buffer and not self.buffer[-1]["is_last"]:
                self.buffer[-1]["is_last"] = np.bool_(True)  # end the episode where the data ends
        finally:
            sys.setswitchinterval(switch)
            self.robot.stop()
            self.loader.close()
            self._flush_chunk(final=True)
            if self.ledger is not None:
                self.ledger.close()
        return self.stats

    def _status(self, elapsed: float) -> None:
        """One line of progress: what a person watching the robot wants to see every few seconds."""
        s, link = self.stats, self.link.status()
        ret = f"{s.returns[-1]:.2f}" if s.returns else "-"
        state = ("connected" if link.connected else f"refused by the learner: {link.refused}" if link.refused
                 else "learner not reachable (acting on, spooling)")
        robot = getattr(self.link, "robot_id", "robot")
        status_log.info("%s: %d steps (%.1f/s), %d episodes, last return %s, weights v%d, period error p99 %.1f %% "
                        "(last %d steps), link %s, %d chunks spooled", robot, s.steps, s.steps / max(elapsed, 1e-9),
                        s.episodes, ret, self.version, 100 * s.recent_period_error(0.99), len(s.recent_errors),
                        state, link.spool_count)

    def _swap_policy(self) -> None:
        if self.controller is not None:
            return
        new = self.loader.take()
        if new is None:
            return
        if self.policy is not None:
            new.take_state(self.policy)  # newer weights of the same run: the recurrent state carries over
        self.policy = new
        self.stats.swaps += 1
        log.info("acting with weights v%d", new.version)

    def _act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        if self.controller is not None:
            return np.asarray(self.controller(obs), np.float32)
        if self.policy is None:
            return self.act_space.random(self.rng)
        self.policy.act(obs, mode="sample")
        return np.asarray(self.policy.last_action[0], np.float32)

    def _record(self, obs: dict[str, np.ndarray], action: np.ndarray) -> None:
        step = {k: np.asarray(obs[k]) for k in self.spec if k != ACTION_KEY}
        step["action"] = action
        step["policy_version"] = np.int64(self.version)
        step["time"] = np.float64(time.time())
        self.buffer.append(step)
        if len(self.buffer) >= self.chunk_steps:
            self._flush_chunk()

    def _flush_chunk(self, final: bool = False) -> None:
        if not self.buffer:
            return
        arrays = {k: np.stack([s[k] for s in self.buffer]) for k in self.buffer[0]}
        for key, (_, dtype) in self.spec.items():
            arrays[key] = arrays[key].astype(dtype, copy=False)
        self.buffer = []
        self.stats.chunks += 1
        if self.ledger is not None:
            digests = step_digests(arrays, ledger_keys(self.spec))
            self.ledger.write(json.dumps({"time": arrays["time"].tolist(), "digest": digests}) + "\n")
            self.ledger.flush()
        try:
            self.link.submit(arrays)
        except (SpoolFull, LinkError) as exc:
            if not final:
                raise
            log.warning("the last %d steps are queued in the link, which spools them as it closes (%s)",
                        len(arrays["time"]), exc)


def load_initial(path: str | None) -> Policy | None:
    if path is None:
        return None
    policy = policy_from_file(path)
    log.info("acting with initial weights %s (v%d) until the learner's arrive", path, policy.version)
    return policy

