"""`reverie-learner serve --deployments`: CASCADE's deployments over the link (issue 26 s3).

The in-process protocol (learner/deployments.py) with robots: deployment d sends each robot a frozen explorer
of the population, as a policy blob of version `member_version(d, k, N)`, and nothing trains while the robots
collect `explore.deployment_steps` steps acted by those versions (over all robots). Then the learner trains
offline for `explore.deployment_updates` updates (world model, ensemble, explorers) and starts deployment d+1
with the population's new weights, until `explore.deployments` are done.

Who acts what: the robots connected when a deployment starts, in the order they first said hello; with at
least N robots, robot i acts member i mod N throughout; with R < N robots, robot i acts members i, i+R, ...
one after another, each for whole episodes until it has acted a share of ceil(deployment_steps / N) steps
(one robot: round-robin over the population, each member once, in order, so versions only increase, as a
robot requires). A robot that joins mid-deployment acts member i mod N. A switch takes effect when the robot
has loaded the new blob, so the first steps of an episode may still be the previous member's: each step
records the version that acted, and only steps of a version sent in this deployment count towards its budget.

Robots are never held: while the learner trains between deployments they go on acting with their frozen
explorer; those steps are stored (nothing a robot records is dropped) and reported as `between_steps`.
Each deployment appends one row to LOGDIR/deployments.jsonl: per robot the versions sent and the steps stored
per version, each member's blob sha256, the updates before, during (0) and after. Checkpoints hold where the
deployments stand, so a restarted serve goes on with the same deployment.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from core.config import Config, ConfigError
from core.link.protocol import weights_checksum
from core.weights import weights_to_bytes
from learner.deployments import RESULTS, member_version
from learner.serve import RETURNS_EVERY_S, STATUS_EVERY_S, Server

COLLECT, TRAIN = "collect", "train"
POLL_S = 0.02


def members_of(position: int, robots: int, population: int) -> list[int]:
    """The explorers the robot at `position` (0-based, in the order the deployment's `robots` robots joined)
    acts, one after another: its own when there are enough robots, else every robots-th member from its own."""
    if position < robots < population:
        return list(range(position, population, robots))
    return [position % population]


def deployment_problem(cfg: Config) -> str | None:
    """Why `serve --deployments` cannot run with this config, else None."""
    if cfg.agent != "dreamer" or cfg.dreamer.explore == "none":
        return (f"serve --deployments needs agent: dreamer with dreamer.explore plan2explore or cascade (got agent "
                f"{cfg.agent!r}, dreamer.explore {cfg.dreamer.explore!r})")
    return None


@dataclasses.dataclass
class Robot:
    """One robot's part in the current deployment."""

    members: list[int]
    index: int = 0  # which of `members` it acts now
    sent: list[int] = dataclasses.field(default_factory=list)  # versions sent to it, in order
    acted: Counter = dataclasses.field(default_factory=Counter)  # steps stored per version (any phase)
    current: int = 0  # steps stored of the version acting now
    switch: bool = False  # its share is done and an episode ended: send the next member

    def row(self) -> dict[str, Any]:
        return {"members": self.members, "versions": self.sent,
                "acted": {str(v): int(n) for v, n in sorted(self.acted.items())}}


@dataclasses.dataclass
class Standing:
    """Where the deployments stand (checkpointed): deployment index (= deployments done when it is collecting),
    phase, steps counted, updates done. A run resumed with more `explore.deployments` goes on from here."""

    deployment: int = 0
    phase: str = COLLECT
    collected: int = 0  # steps acted by this deployment's versions
    trained: int = 0  # offline updates done after this deployment
    updates_before: int = 0  # the agent's updates when this deployment's blobs were made
    updates_collecting: int = 0  # updates while it collected (none)


class DeploymentServer(Server):
    """`Server` in deployment mode: per-robot frozen explorers while collecting, offline training between."""

    def __init__(self, cfg: Config, logdir: str | Path, bind: str | None = None, progress: bool = True,
                 robots: int = 1) -> None:
        if problem := deployment_problem(cfg):
            raise ConfigError([problem], "dreamer.explore")
        if robots < 1:
            raise ConfigError([f"--robots {robots}: must be >= 1"], "arguments")
        super().__init__(cfg, logdir, bind=bind, progress=progress)
        self.min_robots = robots
        self.standing = Standing()
        self.robots: dict[str, Robot] = {}
        self.blobs: list[bytes] = []  # this deployment's member blobs
        self.stale = 0  # steps stored while collecting, acted by a version not sent in this deployment
        self.between = 0  # steps stored while training
        self._started = time.time()  # this deployment's start (or this process's, when it resumed training)
        self._base = 0  # steps stored before this process's link received any
        self._next_status = self._next_returns = 0.0
        self._lock = threading.Lock()
        self.link.on_steps = self._on_steps

    # --- the link thread
    def _on_steps(self, robot: str, versions: np.ndarray, is_last: np.ndarray) -> None:
        """Count what a robot stored: per version, towards the budget, and its member's share (rotation)."""
        with self._lock:
            state = self.robots.get(robot)
            if state is not None:
                state.acted.update(int(v) for v in versions)
            if self.standing.phase != COLLECT:
                self.between += len(versions)
                return
            if state is None:  # not assigned yet (it said hello a moment ago)
                self.stale += len(versions)
                return
            counted = int(np.isin(versions, state.sent).sum())
            self.standing.collected += counted
            self.stale += len(versions) - counted
            if state.index + 1 >= len(state.members) or not state.sent:
                return
            share = math.ceil(self.cfg.explore.deployment_steps / self._population)
            for version, last in zip(versions.tolist(), is_last.tolist(), strict=True):
                if version == state.sent[-1]:
                    state.current += 1
                    if last and state.current >= share:
                        state.switch = True

    # --- checkpoints
    def _checkpoint_meta(self) -> dict[str, Any]:
        return {**super()._checkpoint_meta(), "deployments": dataclasses.asdict(self.standing)}

    def _restore(self, parts: dict[str, Any], meta: dict[str, Any]) -> None:
        super()._restore(parts, meta)
        if isinstance(saved := meta.get("deployments"), dict):
            self.standing = Standing(**saved)

    def _maybe_publish(self, force: bool = False) -> None:
        """Nothing: deployments send their own weights, per robot."""

    @property
    def _population(self) -> int:
        assert self.agent is not None
        return self.agent.exploration.population

    # --- the loop
    def _loop(self, deadline: float | None) -> None:
        xcfg = self.cfg.explore
        self._base = self.stored_at_open
        self._next_status = time.monotonic() + STATUS_EVERY_S
        while not self._stop and self.standing.deployment < xcfg.deployments:
            if self.standing.phase == TRAIN:
                self._train(deadline)
            else:
                self._collect(deadline)
        if self.standing.deployment >= xcfg.deployments:
            self.stop(f"explore.deployments ({xcfg.deployments}) done")
        self._tick(deadline)

    def _tick(self, deadline: float | None) -> None:
        """What every pass does: the link's health, the step count, returns, metrics, checkpoints, status."""
        self.link.check()
        self.counters.received = self._base + self.link.received
        if time.monotonic() >= self._next_returns:
            self._next_returns = time.monotonic() + RETURNS_EVERY_S
            self._collect_returns()
        self._maybe_log()
        self._maybe_checkpoint()
        now = time.monotonic()
        if now >= self._next_status:
            self._next_status = now + STATUS_EVERY_S
            tqdm.write(self.status_line())
        if deadline is not None and now >= deadline:
            self.stop("time limit reached")

    def _say(self, text: str) -> None:
        if self.progress:
            tqdm.write(text)

    def _collect(self, deadline: float | None) -> None:
        """One deployment's collection: wait for the robots, send each its explorer, count until the budget."""
        xcfg, agent, d = self.cfg.explore, self.agent, self.standing.deployment
        assert agent is not None
        if (connected := self._connected()) < self.min_robots:
            self._say(f"deployment {d + 1}: waiting for {self.min_robots} robots ({connected} connected)")
        while not self._stop and self._connected() < self.min_robots:
            self._tick(deadline)
            time.sleep(POLL_S)
        if self._stop:
            return
        self._start(d)
        self._say(f"deployment {d + 1}/{xcfg.deployments}: robots {', '.join(self.robots)} act versions "
                  f"{[member_version(d, k, self._population) for k in range(self._population)]}; nothing trains")
        self.standing.updates_before = agent.updates
        while not self._stop:
            self._assign_late()
            self._switch()
            with self._lock:
                done = self.standing.collected >= xcfg.deployment_steps
                if done:
                    self.standing.phase, self.standing.trained = TRAIN, 0
                    self.standing.updates_collecting = agent.updates - self.standing.updates_before
            self._tick(deadline)
            if done:
                break
            time.sleep(POLL_S)

    def _connected(self) -> int:
        return sum(r.connected for r in list(self.link.robots.values()))

    def _start(self, d: int) -> None:
        """The deployment's blobs, and a member for every robot connected now (in the order they joined)."""
        assert self.agent is not None
        x, n = self.agent.exploration, self._population
        self.blobs = []
        for k in range(n):
            tensors, meta = x.member_weights(k, member_version(d, k, n))
            if self.cfg.link.weights_dtype == "float16":
                tensors = {key: value.half() for key, value in tensors.items()}
            self.blobs.append(weights_to_bytes(tensors, meta))
        connected = [robot for robot, state in list(self.link.robots.items()) if state.connected]
        with self._lock:
            self.robots, self.stale, self.between = {}, 0, 0
            for i, robot in enumerate(connected):
                self.robots[robot] = Robot(members_of(i, len(connected), n))
        self._started = time.time()
        for robot in connected:
            self._send(robot)

    def _assign_late(self) -> None:
        """A robot that said hello during the deployment acts member (its position) mod N."""
        late = [robot for robot, state in list(self.link.robots.items())
                if state.connected and robot not in self.robots]
        for robot in late:
            with self._lock:
                self.robots[robot] = Robot([len(self.robots) % self._population])
            self._send(robot)

    def _switch(self) -> None:
        with self._lock:
            due = [robot for robot, state in self.robots.items() if state.switch]
            for robot in due:
                state = self.robots[robot]
                state.index, state.current, state.switch = state.index + 1, 0, False
        for robot in due:
            self._send(robot)

    def _send(self, robot: str) -> None:
        """The robot's current member, as this deployment's frozen blob of it."""
        assert self.agent is not None
        n, d = self._population, self.standing.deployment
        with self._lock:
            state = self.robots[robot]
            member = state.members[state.index]
            version = member_version(d, member, n)
            state.sent.append(version)
        self.link.publish_to(robot, self.blobs[member], version, self.agent.updates, self.cfg.link.weights_dtype)
        self.published = (max(self.published[0], version), time.monotonic())
        self._say(f"  {robot}: explorer {member} as version {version}")

    def _train(self, deadline: float | None) -> None:
        """Offline updates between deployments; then the deployment's row, and the next deployment."""
        xcfg, agent = self.cfg.explore, self.agent
        assert agent is not None
        self._say(f"deployment {self.standing.deployment + 1}: {self.standing.collected} steps collected; "
                  f"training offline for {xcfg.deployment_updates - self.standing.trained} updates")
        while not self._stop and self.standing.trained < xcfg.deployment_updates:
            if not self._replay_ready():
                self._say(f"  the replay holds fewer steps than train.batch_length ({self.cfg.train.batch_length}):"
                          " no update")
                break
            self._update()
            self.standing.trained += 1
            self._tick(deadline)
        if self._stop:
            return
        self._write_row()
        with self._lock:
            self.standing = Standing(self.standing.deployment + 1, COLLECT)
        self.save()  # the deployment boundary: a restart starts the next deployment from here

    def _write_row(self) -> None:
        assert self.agent is not None
        n, d = self._population, self.standing.deployment
        with self._lock:
            row = {"deployment": d, "versions": [member_version(d, k, n) for k in range(n)],
                   "sha256": [weights_checksum(blob) for blob in self.blobs],
                   "robots": {robot: state.row() for robot, state in self.robots.items()},
                   "collected": self.standing.collected, "stale_steps": self.stale, "between_steps": self.between,
                   "updates_before": self.standing.updates_before,
                   "updates_collecting": self.standing.updates_collecting, "updates_after": self.agent.updates,
                   "seconds": round(time.time() - self._started, 1)}
        with (self.logdir / RESULTS).open("a") as f:
            f.write(json.dumps(row) + "\n")

    def _summary(self, stopped: str, seconds: float, checkpoint: Path | None,
                 fields: dict[str, Any]) -> dict[str, Any]:
        return super()._summary(stopped, seconds, checkpoint, {**fields, "deployment": self.standing.deployment,
                                                               "deployment_phase": self.standing.phase})
