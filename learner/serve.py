"""`reverie-learner serve`: train the agent continuously on experience streamed by robot processes.

The link server thread (learner/link/server.py) stores what robots send; this loop trains at the
configured ratio of replayed steps per received step (`train.train_ratio`; negative = as fast as
it can), publishes policy weights every `link.weights_every_updates` updates or
`link.weights_every_s` seconds, logs metrics and a learning curve from the robots' episodes,
prints a per-robot status table and checkpoints, each with a video of the world model's open-loop
prediction. Robots are never waited on: when training is ahead of the data it sleeps, and when it
is behind the robots simply keep going. What it shares with `reverie-learner train` (checkpoints,
the update, metrics rows, curves, the summary) is learner/run.py; here are the link server,
weights publishing and the robots' status.
"""

from __future__ import annotations

import dataclasses
import functools
import signal
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from core.agents.spaces import ActSpace, ObsSpace
from core.config import Config
from core.layout import ACTION_KEY
from core.weights import weights_to_bytes
from learner.agents import agent_class, make_agent
from learner.link.server import LinkServer, RunSpec
from learner.metrics import MetricsLogger
from learner.replay import Replay
from learner.run import Run, RunCounters, mean_or_none, updates_allowed
from learner.viewers.rerun_live import RobotCameras

STATUS_EVERY_S = 10.0
RETURNS_EVERY_S = 1.0  # how often the loop takes the robots' finished episodes from the replay
STATUS_ROBOTS = 20  # robots the status table lists (the most recently heard); the others are only counted
MAX_MODEL_PARAMS = 2**31  # a layout needing a bigger agent is refused: almost surely a wrong dimension
INTERRUPTED = "interrupted"  # the stop reason of SIGINT and SIGTERM


@dataclasses.dataclass
class ServeCounters(RunCounters):
    received: int = 0  # steps stored over the whole run (all restarts)


def spaces_of(spec: RunSpec) -> tuple[ObsSpace, ActSpace]:
    """The model's observation and action spaces from the robots' step layout."""
    space = spec.layout.without(ACTION_KEY)
    shape = spec.layout[ACTION_KEY].shape
    if len(shape) != 1:
        raise ValueError(f"action must be a vector (one dimension), got shape {list(shape)}")
    return space, ActSpace(int(shape[0]), spec.discrete)


def layout_problem(cfg: Config, spec: RunSpec) -> str | None:
    """Why the agent cannot be built for this step layout (None if it can). The link server asks before a
    robot's layout becomes the run's (a saved one it could not train would stop every start), so the agent
    counts its parameters without allocating them."""
    try:
        space, act = spaces_of(spec)
        params = agent_class(cfg.agent).parameter_count(cfg, space, act)
    except Exception as exc:  # noqa: BLE001  (whatever the model code raises, this layout cannot be trained)
        return f"the agent cannot be built for this layout: {exc}"
    if params > MAX_MODEL_PARAMS:
        return (f"the agent for this layout would have {params} parameters (limit {MAX_MODEL_PARAMS}); "
                "is a dimension wrong?")
    return None


class Server(Run):
    """`reverie-learner serve`: trains on what robots stream, publishes weights, shows the robots."""

    STEP_KEY, STEP_UNIT = "received_steps", "received steps"
    counters: ServeCounters

    def __init__(self, cfg: Config, logdir: str | Path, bind: str | None = None, progress: bool = True) -> None:
        super().__init__(cfg, logdir, progress)
        self.replay = Replay.from_config(self.logdir / "replay", cfg.replay, seed=cfg.seed)
        try:
            self.link = LinkServer(cfg.link, self.replay, self.logdir, address=bind,
                                   layout_check=functools.partial(layout_problem, cfg))
        except BaseException:
            self.replay.close()
            raise
        # The steps of earlier runs, counted before the link thread stores any: the received total is this plus
        # `link.received` (taken later, a chunk stored but not yet counted by the link was counted twice).
        self.stored_at_open = self.replay.stats()["totals"]["steps"]
        self.logger = MetricsLogger(self.logdir)
        if self.logger.rerun is not None:  # --rerun: the robots' camera images too, as their chunks arrive
            self.replay.on_steps_added = RobotCameras(self.logger.rerun)
        self.counters = ServeCounters()
        self.agent = None  # built for the robots' step layout once the first one says it
        # Episodes the replay holds at start were reported by the run that stored them: only those that
        # finish from now on are this run's to report (averaging the old ones into the first row after a
        # restart dragged the curve back to the early returns).
        self.returns_seen = {stream: info["episodes"] for stream, info in self.replay.stats()["streams"].items()}
        self.all_returns: list[float] = []  # every reported episode's return, over restarts (checkpointed)
        self.published = (0, time.monotonic())  # (version, when)
        self._refused_version = -1  # weights of this many updates were non-finite: not sent
        self._predicted_at = -1  # the step of the last open-loop prediction video
        self._stop = False
        self._stop_reason = ""

    @property
    def step(self) -> int:
        return self.counters.received

    def stop(self, reason: str) -> None:
        self._stop, self._stop_reason = True, self._stop_reason or reason

    # --- setup
    def _restore(self, parts: dict[str, Any], meta: dict[str, Any]) -> None:
        self.all_returns = [*meta.get("returns", []), *self.all_returns]  # the summary spans restarts

    def _checkpoint_meta(self) -> dict[str, Any]:
        return {"returns": self.all_returns}

    def save(self) -> Path | None:
        """A checkpoint and, with it, the world model's open-loop prediction handed to TensorBoard and rerun
        (serve has no evaluation rounds to make one): once per step, after the first update, and not while a
        signal is stopping the run (be quick)."""
        path = super().save()
        if (path is not None and self.agent is not None and self.agent.updates and self.step != self._predicted_at
                and self._stop_reason != INTERRUPTED):
            self._predicted_at = self.step
            if self._openloop_video() is not None:
                self.logger.media(self.step)
        return path

    def _build(self, spec: RunSpec) -> None:
        space, act = spaces_of(spec)
        self.agent = make_agent(self.cfg, space, act)
        self._resume()

    def _idle(self) -> None:
        """A pass of waiting with nothing to train: rank 0 of several tells the others it lives (serve_ranks)."""

    def _wait_for_spec(self, deadline: float | None) -> RunSpec | None:
        if self.link.spec is None:
            tqdm.write(f"waiting for the first robot on {self.link.endpoint} ...")
        while self.link.spec is None and not self._stop:
            self.link.check()
            self._idle()
            if deadline is not None and time.monotonic() >= deadline:
                self.stop("time limit reached before any robot connected")
            time.sleep(0.05)
        return self.link.spec

    # --- the loop
    def run(self, duration: float | None = None) -> dict[str, Any]:
        start = time.monotonic()
        deadline = None if duration is None else start + duration
        self.link.start()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stop(INTERRUPTED))
        spec = self._wait_for_spec(deadline)
        if spec is not None:
            self._build(spec)
            self._loop(deadline)
        return self.finish(time.monotonic() - start)

    def _loop(self, deadline: float | None) -> None:
        cfg = self.cfg.train
        batch_steps = cfg.batch_size * cfg.batch_length
        # What the replay holds is the truth (a checkpoint may be older than the last stored chunk).
        base = self.stored_at_open
        bar = tqdm(unit="step", disable=not self.progress, dynamic_ncols=True, desc=self._bar_text(base),
                   mininterval=1.0)
        next_status = time.monotonic() + STATUS_EVERY_S
        next_returns = time.monotonic() + RETURNS_EVERY_S
        while not self._stop:
            self.link.check()
            received = base + self.link.received
            self.counters.received = received
            bar.set_description(self._bar_text(received), refresh=False)
            bar.update(received - bar.n)
            if time.monotonic() >= next_returns:
                next_returns = time.monotonic() + RETURNS_EVERY_S
                self._collect_returns()
            trained = self._maybe_train(received, batch_steps)
            self._maybe_publish()
            self._maybe_log()
            self._maybe_checkpoint()
            now = time.monotonic()
            if now >= next_status:
                next_status = now + STATUS_EVERY_S
                tqdm.write(self.status_line())
            if deadline is not None and now >= deadline:
                self.stop("time limit reached")
            if cfg.steps and received >= cfg.steps:
                self.stop(f"train.steps ({cfg.steps}) received")
            if not trained:
                time.sleep(0.02)
            # refresh=False: the bar redraws at most every mininterval (a redraw per 20 ms pass flooded logs)
            bar.set_postfix(updates=self.agent.updates if self.agent else 0, robots=len(self.link.robots),
                            refresh=False)
        self.counters.received = base + self.link.received  # steps stored during the last pass count too
        bar.close()

    def _bar_text(self, received: int) -> str:
        """What the progress bar counts: the prefill the first update waits for, then received steps."""
        prefill = self.cfg.train.prefill
        return f"prefill {received}/{prefill}" if received < prefill else "received"

    def _maybe_train(self, received: int, batch_steps: int) -> bool:
        """One update if the robots' steps allow another; whether it did one."""
        cfg, agent = self.cfg.train, self.agent
        assert agent is not None
        if not self._replay_ready():
            return False
        if agent.updates >= updates_allowed(received, cfg.prefill, cfg.train_ratio, batch_steps):
            return False
        self._update()
        return True

    def _maybe_publish(self, force: bool = False) -> None:
        agent, link = self.agent, self.cfg.link
        assert agent is not None
        version, when = self.published
        if agent.updates == 0 or agent.updates == version:
            return
        due = agent.updates - version >= link.weights_every_updates or time.monotonic() - when >= link.weights_every_s
        if not (due or force) or agent.updates == self._refused_version:
            return
        if agent.refuse_nonfinite(f"weights version {agent.updates} not sent to the robots"):
            self._refused_version = agent.updates  # checked once per version
            return
        tensors, meta = agent.policy_weights()
        if link.weights_dtype == "float16":
            tensors = {k: v.half() for k, v in tensors.items()}
        self.link.publish(weights_to_bytes(tensors, meta), agent.updates, agent.updates, link.weights_dtype)
        self.published = (agent.updates, time.monotonic())

    def _collect_returns(self) -> None:
        """The robots' episodes finished since the last look, into the next row's `train/return` mean."""
        for stream, info in self.replay.stats()["streams"].items():
            seen = self.returns_seen.get(stream, 0)
            for value in info["returns"][seen:]:
                self.train_stats.add({"train/return": value})
                self.all_returns.append(value)
            self.returns_seen[stream] = len(info["returns"])

    def _row(self) -> dict[str, float]:
        """The link: robots connected, rejects, and each robot's rate and lag."""
        table = self.link.robot_table()
        row: dict[str, float] = {"robots": sum(r["connected"] for r in table), "link/rejected": self.link.rejects.total}
        for r in table:
            row[f"robot/{r['robot']}/steps_s"] = r["steps_s"]
            row[f"robot/{r['robot']}/lag_s"] = r["lag_s"]
        return row

    def _log(self) -> None:
        self._collect_returns()
        super()._log()
        self._plot(("train/return",), against_updates=False)

    def status_line(self) -> str:
        """The status table: the STATUS_ROBOTS most recently heard robots, the others counted (any peer can
        make up robot ids; heartbeat values arrive short and escaped, see link.server.plain_stats)."""
        rows = self.link.robot_table(limit=STATUS_ROBOTS)
        seen, connected = self.link.robot_counts()
        head = (f"updates {self.agent.updates if self.agent else 0}  received {self.counters.received}  "
                f"weights v{self.published[0]}  rejected {self.link.rejects.total}")
        lines = [head] + [f"  {r['robot']:<16} {'up' if r['connected'] else 'DOWN':<5} {r['steps']:>8} steps "
                          f"{r['steps_s']:>6.1f}/s  lag {r['lag_s']:>6.3f}s  spool {r['spool']}  "
                          f"acting v{r['version']}" for r in rows]
        if seen > len(rows):
            lines.append(f"  ... and {seen - len(rows)} more robots ({connected} of all {seen} connected)")
        return "\n".join(lines)

    def finish(self, seconds: float) -> dict[str, Any]:
        if self.agent is not None:
            self._log()
        checkpoint = self.save()
        self.link.close()
        self.replay.close()
        self.logger.close()
        return self._summary(self._stop_reason, seconds, checkpoint, {
            "weights_version": self.published[0], "robots": self.link.robot_table(),
            "rejected": dict(self.link.rejects.counts), "episodes": len(self.all_returns),
            "return_first10": mean_or_none(self.all_returns[:10]),
            "return_last10": mean_or_none(self.all_returns[-10:])})
