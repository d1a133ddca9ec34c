"""`reverie-learner serve`: train Dreamer continuously on experience streamed by robot processes.

The link server thread (learner/link/server.py) stores what robots send; this loop trains at the
configured ratio of replayed steps per received step (`train.train_ratio`; negative = as fast as
it can), publishes policy weights every `link.weights_every_updates` updates or
`link.weights_every_s` seconds, logs metrics and a learning curve from the robots' episodes,
prints a per-robot status table and checkpoints. Robots are never waited on: when training is
ahead of the data it sleeps, and when it is behind the robots simply keep going.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from learner.checkpoint import load_latest_checkpoint, save_checkpoint, save_weights, weights_to_bytes
from learner.compute import configure_compute
from learner.config import Config, write_resolved
from learner.config_agent import DreamerConfig
from learner.dreamer.agent import Dreamer, DreamerModel
from learner.dreamer.policy import policy_weights
from learner.dreamer.preprocess import ActSpace
from learner.link.server import LinkServer, RunSpec
from learner.metrics import Mean, MetricsLogger
from learner.plots import plot_learning_curve
from learner.replay import Replay
from learner.replay.context import CONTEXT_PART, restore_context

STATUS_EVERY_S = 10.0
STATUS_ROBOTS = 20  # robots the status table lists (the most recently heard); the others are only counted
MAX_MODEL_PARAMS = 2**31  # a layout needing a bigger agent is refused: almost surely a wrong dimension


@dataclasses.dataclass
class ServeCounters:
    received: int = 0  # steps stored over the whole run (all restarts)
    last_log: int = 0
    last_checkpoint: int = 0


def spaces_of(spec: RunSpec) -> tuple[dict[str, tuple[tuple[int, ...], str]], ActSpace]:
    """The model's observation and action spaces from the robots' step layout."""
    space = {k: (shape, dtype) for k, (dtype, shape) in spec.spec.items() if k != "action"}
    shape = spec.spec["action"][1]
    if len(shape) != 1:
        raise ValueError(f"action must be a vector (one dimension), got shape {list(shape)}")
    return space, ActSpace(int(shape[0]), spec.discrete)


def layout_problem(cfg: DreamerConfig, spec: RunSpec) -> str | None:
    """Why the agent cannot be built for this step layout (None if it can). The link server asks before a
    robot's layout becomes the run's (a saved one it could not train would stop every start), so it builds
    the model on the meta device: shapes only, no memory, no weights."""
    try:
        space, act = spaces_of(spec)
        with torch.device("meta"):
            model = DreamerModel(cfg, space, act)
    except Exception as exc:  # noqa: BLE001  (whatever the model code raises, this layout cannot be trained)
        return f"the agent cannot be built for this layout: {exc}"
    params = sum(p.numel() for p in model.parameters())
    if params > MAX_MODEL_PARAMS:
        return (f"the agent for this layout would have {params} parameters (limit {MAX_MODEL_PARAMS}); "
                "is a dimension wrong?")
    return None


def updates_allowed(received: int, prefill: int, ratio: float, batch_steps: int) -> float:
    """Updates the learner may have done after `received` steps: `ratio` replayed steps (batch x
    length per update) per received step once the prefill is in; a negative ratio means no limit."""
    if received < max(prefill, 1):
        return 0.0
    if ratio < 0:
        return float("inf")
    return 1.0 + ratio * (received - prefill) / batch_steps


class Server:
    def __init__(self, cfg: Config, logdir: str | Path, bind: str | None = None, progress: bool = True) -> None:
        self.cfg, self.logdir, self.progress = cfg, Path(logdir), progress
        self.logdir.mkdir(parents=True, exist_ok=True)
        write_resolved(cfg, self.logdir)
        configure_compute(cfg.dreamer)
        torch.manual_seed(cfg.seed)
        self.replay = Replay.from_config(self.logdir / "replay", cfg.replay, seed=cfg.seed)
        try:
            self.link = LinkServer(cfg.link, self.replay, self.logdir, address=bind,
                                   layout_check=functools.partial(layout_problem, cfg.dreamer))
        except BaseException:
            self.replay.close()
            raise
        self.logger = MetricsLogger(self.logdir)
        self.counters = ServeCounters()
        self.stats = Mean()
        self.agent: Dreamer | None = None
        self.returns_seen: dict[str, int] = {}
        self.all_returns: list[float] = []
        self.published = (0, time.monotonic())  # (version, when)
        self._refused_version = -1  # weights of this many updates were non-finite: not sent
        self._stop = False
        self._stop_reason = ""

    def stop(self, reason: str) -> None:
        self._stop, self._stop_reason = True, self._stop_reason or reason

    # --- setup
    def _build(self, spec: RunSpec) -> Dreamer:
        space, act = spaces_of(spec)
        agent = Dreamer(self.cfg.dreamer, space, act)
        found = load_latest_checkpoint(self.logdir / "checkpoints")  # skips (and names) corrupt ones
        if found is not None:
            path, parts, meta = found
            agent.load_state_dict({"model": parts["model"], "optimizer": parts["optimizer"],
                                   "updates": meta["updates"]})
            self.counters = ServeCounters(**meta["counters"])
            restored = restore_context(self.replay, parts, path)
            tqdm.write(f"resumed from {path}: {agent.updates} updates, {self.counters.received} steps received, "
                       f"replay context for {restored} steps")
        return agent

    def _wait_for_spec(self, deadline: float | None) -> RunSpec | None:
        if self.link.spec is None:
            tqdm.write(f"waiting for the first robot on {self.link.endpoint} ...")
        while self.link.spec is None and not self._stop:
            self.link.check()
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
            signal.signal(sig, lambda *_: self.stop("interrupted"))
        spec = self._wait_for_spec(deadline)
        if spec is not None:
            self.agent = self._build(spec)
            self._loop(deadline)
        return self.finish(time.monotonic() - start)

    def _loop(self, deadline: float | None) -> None:
        cfg = self.cfg.train
        batch_steps = cfg.batch_size * cfg.batch_length
        # What the replay holds is the truth (a checkpoint may be older than the last stored chunk).
        base = self.replay.stats()["totals"]["steps"] - self.link.received
        bar = tqdm(unit="step", disable=not self.progress, dynamic_ncols=True, desc="received", mininterval=1.0)
        next_status = time.monotonic() + STATUS_EVERY_S
        while not self._stop:
            self.link.check()
            received = base + self.link.received
            self.counters.received = received
            bar.update(received - bar.n)
            trained = self._maybe_train(received, batch_steps)
            self._maybe_publish()
            self._periodic(received)
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
            bar.set_postfix(updates=self.agent.updates if self.agent else 0, robots=len(self.link.robots))
        bar.close()

    def _maybe_train(self, received: int, batch_steps: int) -> bool:
        cfg, agent = self.cfg.train, self.agent
        assert agent is not None
        if len(self.replay) < cfg.batch_length:
            return False
        if agent.updates >= updates_allowed(received, cfg.prefill, cfg.train_ratio, batch_steps):
            return False
        batch = self.replay.sample(cfg.batch_size, cfg.batch_length)
        metrics, context = agent.train(batch)
        if self.cfg.dreamer.replay_context and context:  # none from a skipped (non-finite) update
            self.replay.write_context(batch["ids"], {k: v.cpu().numpy() for k, v in context.items()})
        self.stats.add(metrics)
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
        tensors, meta = policy_weights(agent.model, agent.updates)
        if link.weights_dtype == "float16":
            tensors = {k: v.half() for k, v in tensors.items()}
        self.link.publish(weights_to_bytes(tensors, meta), agent.updates, agent.updates, link.weights_dtype)
        self.published = (agent.updates, time.monotonic())

    def _periodic(self, received: int) -> None:
        cfg, c = self.cfg.train, self.counters
        if received - c.last_log >= cfg.log_every:
            c.last_log = received
            self._log(received)
        if received - c.last_checkpoint >= cfg.checkpoint_every:
            c.last_checkpoint = received
            self.save()

    def _new_returns(self) -> list[float]:
        new: list[float] = []
        for stream, info in self.replay.stats()["streams"].items():
            seen = self.returns_seen.get(stream, 0)
            new.extend(info["returns"][seen:])
            self.returns_seen[stream] = len(info["returns"])
        self.all_returns.extend(new)
        return new

    def _log(self, received: int) -> None:
        assert self.agent is not None
        row = self.stats.result()
        new = self._new_returns()
        if new:
            row["train/return"] = float(np.mean(new))
        table = self.link.robot_table()
        row.update({"received_steps": received, "updates": self.agent.updates, "replay_steps": len(self.replay),
                    "robots": sum(r["connected"] for r in table), "link/rejected": self.link.rejects.total,
                    "skipped_updates": self.agent.skipped,
                    "replay/refused_steps": self.replay.stats()["totals"]["refused_steps"]})
        for r in table:
            row[f"robot/{r['robot']}/steps_s"] = r["steps_s"]
            row[f"robot/{r['robot']}/lag_s"] = r["lag_s"]
        self.logger.log(received, row)
        plot_learning_curve(self.logdir / "metrics.jsonl", self.logdir / "learning_curve.png", keys=("train/return",))

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

    # --- state
    def save(self) -> Path | None:
        if self.agent is None:
            return None
        self.replay.flush()
        if self.agent.refuse_nonfinite(f"checkpoint at {self.counters.received} received steps not written"):
            return None
        parts = {"model": self.agent.model.state_dict(), "optimizer": self.agent.optimizer.state_dict(),
                 CONTEXT_PART: self.replay.context_state()}
        meta = {"counters": dataclasses.asdict(self.counters), "updates": self.agent.updates,
                "config": self.cfg.to_dict()}
        path = save_checkpoint(self.logdir / "checkpoints", self.counters.received, parts, meta)
        save_weights(self.logdir / "policy.safetensors", *policy_weights(self.agent.model, self.agent.updates))
        return path

    def finish(self, seconds: float) -> dict[str, Any]:
        if self.agent is not None:
            self._log(self.counters.received)
        checkpoint = self.save()
        self.link.close()
        self.replay.close()
        self.logger.close()
        summary = {"stopped": self._stop_reason, "seconds": round(seconds, 1),
                   "received_steps": self.counters.received, "updates": self.agent.updates if self.agent else 0,
                   "weights_version": self.published[0], "robots": self.link.robot_table(),
                   "rejected": dict(self.link.rejects.counts), "episodes": len(self.all_returns),
                   "return_first10": float(np.mean(self.all_returns[:10])) if self.all_returns else None,
                   "return_last10": float(np.mean(self.all_returns[-10:])) if self.all_returns else None,
                   "checkpoint": str(checkpoint) if checkpoint else None}
        (self.logdir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
