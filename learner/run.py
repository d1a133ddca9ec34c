"""What `reverie-learner train` and `reverie-learner serve` share, written once: a run directory's
checkpoints and resume, the train-ratio clock, one update with its replay-context write-back, the
metrics row, the learning curves and the summary.

`Trainer` (train.py) steps an environment and evaluates; `Server` (serve.py) stores what robots
stream and publishes weights. Each names its step (env steps taken, steps received) and says what
it adds to a checkpoint and to a metrics row; everything else is here.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm import tqdm

from core.agents import Agent
from core.config import Config, ConfigError, write_resolved
from core.weights import save_weights
from learner.checkpoint import load_latest_checkpoint, save_checkpoint
from learner.compute import configure_compute
from learner.metrics import Mean, MetricsLogger
from learner.openloop import write_openloop
from learner.plots import plot_learning_curve
from learner.replay import Replay
from learner.replay.context import CONTEXT_PART, restore_context

CHECKPOINTS = "checkpoints"  # the run directory's checkpoint folder
POLICY_FILE = "policy.safetensors"  # the newest checkpoint's policy, as a robot loads it
SUMMARY_FILE = "summary.json"


# --- the train-ratio clock: `train.train_ratio` replayed steps (batch x length per update) per step


def updates_earned(steps: float, ratio: float, batch_steps: int) -> float:
    """Updates that `steps` steps pay for. `train` adds one step's worth to its credit per policy step
    and spends whole updates from it (the credit is checkpointed, so a resumed run updates exactly
    where an uninterrupted one would); `serve` counts from the received total (`updates_allowed`)."""
    return ratio * steps / batch_steps


def updates_allowed(received: int, prefill: int, ratio: float, batch_steps: int) -> float:
    """Updates the learner may have done after `received` steps: one as soon as the prefill is in, then
    `updates_earned` per received step after it; a negative ratio means no limit. Robots send in bursts
    and training catches up, so the allowance is a function of the total rather than a credit."""
    if received < max(prefill, 1):
        return 0.0
    if ratio < 0:
        return float("inf")
    return 1.0 + updates_earned(received - prefill, ratio, batch_steps)


def mean_or_none(values: Sequence[float]) -> float | None:
    """The mean for a summary field, None (JSON null) before there is anything to average."""
    return float(np.mean(values)) if values else None


@dataclasses.dataclass
class RunCounters:
    """Where a run stands, checkpointed as meta 'counters'; each run adds its own step count."""

    last_log: int = 0  # the step of the last metrics row
    last_checkpoint: int = 0  # the step of the last periodic checkpoint


class Run:
    """A training run in `logdir`: resolved config, metrics (JSONL + TensorBoard), learning curves,
    checkpoints, the exported policy and a summary. A subclass sets `agent` (None until it can be built),
    `replay`, `logger` and `counters`, and names its step with `step`, `STEP_KEY` and `STEP_UNIT`."""

    STEP_KEY: ClassVar[str]  # the step's name in metrics rows and the summary
    STEP_UNIT: ClassVar[str]  # the step's name in messages
    agent: Agent | None
    replay: Replay
    logger: MetricsLogger
    counters: RunCounters

    def __init__(self, cfg: Config, logdir: str | Path, progress: bool) -> None:
        self.cfg, self.logdir, self.progress = cfg, Path(logdir), progress
        self.logdir.mkdir(parents=True, exist_ok=True)
        write_resolved(cfg, self.logdir)
        configure_compute(cfg.dreamer)
        torch.manual_seed(cfg.seed)
        self.train_stats = Mean()  # update metrics and episode returns since the last row
        self.checkpoint: Path | None = None  # the newest checkpoint this process wrote
        self._shown: set[str] = set()  # metric keys a row of this process has held
        self._interval_row = False  # whether this process has written a row at `log_every` yet

    @property
    def step(self) -> int:
        """The run's step count: what checkpoints are named by and metrics rows are logged at."""
        raise NotImplementedError

    # --- checkpoints
    def _resume(self) -> None:
        """Continue from the newest complete checkpoint (a damaged newer one is skipped with a warning
        naming it): the agent, the counters, what the run keeps itself (`_restore`), then the replay
        context latents, which need the replay as it was loaded."""
        found = load_latest_checkpoint(self.logdir / CHECKPOINTS)
        if found is None:
            return
        path, parts, meta = found
        assert self.agent is not None
        trained = meta.get("config", {}).get("agent", "dreamer")  # checkpoints from before `agent`: Dreamer
        if trained != self.cfg.agent:
            raise ConfigError([f"agent: {self.cfg.agent!r}, but {path} holds a {trained!r} agent; resume it "
                               f"with agent: {trained}, or start another run directory"], "checkpoint")
        self.agent.load_state_dict({**parts, "updates": meta["updates"]})  # it takes the parts it saved
        self.counters = type(self.counters)(**meta["counters"])
        self._restore(parts, meta)
        restored = restore_context(self.replay, parts, path)
        tqdm.write(f"resumed from {path} at {self.step} {self.STEP_UNIT}, {self.agent.updates} updates, "
                   f"replay context for {restored} steps")

    def _restore(self, parts: dict[str, Any], meta: dict[str, Any]) -> None:
        """Put back what `_checkpoint_parts` and `_checkpoint_meta` saved."""

    def _checkpoint_parts(self) -> dict[str, Any]:
        """Tensor state this run adds to a checkpoint."""
        return {}

    def _checkpoint_meta(self) -> dict[str, Any]:
        """JSON state this run adds to a checkpoint."""
        return {}

    def save(self) -> Path | None:
        """Flush the replay, then checkpoint and export the policy, unless the model went non-finite
        (then the previous checkpoints and policy stay, and it says so): None when nothing was written."""
        if self.agent is None:  # serve before the first robot: nothing trained yet
            return None
        self.replay.flush()
        if self.agent.refuse_nonfinite(f"checkpoint at {self.step} {self.STEP_UNIT} not written"):
            return None
        agent = self.agent.state_dict()  # 'updates' and its parts
        updates = agent.pop("updates")
        parts = {**agent, **self._checkpoint_parts(), CONTEXT_PART: self.replay.context_state()}
        meta = {"counters": dataclasses.asdict(self.counters), "updates": updates,
                **self._checkpoint_meta(), "config": self.cfg.to_dict()}
        path = save_checkpoint(self.logdir / CHECKPOINTS, self.step, parts, meta)
        self.export_policy()
        self.checkpoint = path
        return path

    def export_policy(self) -> Path:
        """The agent's policy as the weights blob a robot loads, beside the checkpoints."""
        assert self.agent is not None
        return save_weights(self.logdir / POLICY_FILE, *self.agent.policy_weights())

    # --- updates
    def _replay_ready(self) -> bool:
        return len(self.replay) >= self.cfg.train.batch_length

    def _update(self) -> None:
        """One update on a replayed batch. Its posterior latents go back into the replay as context: the
        start state of a later sequence beginning there (a skipped, non-finite update returns none)."""
        assert self.agent is not None
        cfg = self.cfg.train
        batch = self.replay.sample(cfg.batch_size, cfg.batch_length)
        metrics, context = self.agent.train(batch)
        if self.agent.replay_context and context:
            self.replay.write_context(batch["ids"], {k: v.cpu().numpy() for k, v in context.items()})
        self.train_stats.add(metrics)

    # --- periodic outputs
    def _maybe_log(self) -> None:
        """A row every `train.log_every` steps. Before this process's first such row, also a row as soon
        as a metric appears that no row of it has held yet (the first episode's return, the first
        update's losses): a new or resumed run shows its files within a minute, not after `log_every`
        steps (many minutes on a small CPU). These early rows leave the interval's grid as it is."""
        if self.step - self.counters.last_log >= self.cfg.train.log_every:
            self.counters.last_log = self.step
            self._interval_row = True
            self._log()
        elif not self._interval_row and self.agent is not None and self.train_stats.keys() - self._shown:
            self._log()

    def _maybe_checkpoint(self) -> None:
        if self.step - self.counters.last_checkpoint >= self.cfg.train.checkpoint_every:
            self.counters.last_checkpoint = self.step
            self.save()

    def _log(self) -> None:
        """One metrics row: the means since the last row, where the run stands and what `_row` adds."""
        assert self.agent is not None
        row = self.train_stats.result()
        row.update({self.STEP_KEY: self.step, "updates": self.agent.updates, **self._row(),
                    "replay_steps": len(self.replay), "skipped_updates": self.agent.skipped,
                    "replay/refused_steps": self.replay.stats()["totals"]["refused_steps"]})
        self.logger.log(self.step, row)
        self._shown.update(row)

    def _row(self) -> dict[str, float]:
        """What this run adds to a metrics row."""
        return {}

    def _openloop_video(self) -> Path | None:
        """The world model's open-loop prediction on replayed sequences (truth / prediction / error) as
        LOGDIR/videos/openloop_<step>.mp4, for the metrics writer's `media` to hand to TensorBoard and rerun;
        None where the agent predicts no image or replay holds no whole sequence yet. It draws the model's
        noise under a forked torch generator: a video must not shift the run's randomness."""
        assert self.agent is not None
        if not self.agent.image_keys or not self._replay_ready():
            return None
        with torch.random.fork_rng(devices=[]):
            return write_openloop(self.agent, self.replay, self.logdir / "videos" / f"openloop_{self.step:09d}.mp4",
                                  fps=self.cfg.control.hz)

    def _plot(self, keys: Sequence[str], baseline: dict[str, float] | None = None,
              against_updates: bool = True) -> None:
        """The learning curves from the metrics so far: against the run's steps and, if asked, updates."""
        metrics = self.logger.path
        plot_learning_curve(metrics, self.logdir / "learning_curve.png", keys=keys, baseline=baseline)
        if against_updates:
            plot_learning_curve(metrics, self.logdir / "learning_curve_updates.png", keys=keys, x="updates",
                                baseline=baseline, title="Learning curve against updates")
        self.logger.media(self.step)  # these curves and the videos written since: TensorBoard images, rerun

    def _summary(self, stopped: str, seconds: float, checkpoint: Path | None,
                 fields: dict[str, Any]) -> dict[str, Any]:
        """Write and return summary.json: why the run stopped, where it stands, `fields`, its duration and
        the checkpoint to resume from."""
        summary = {"stopped": stopped, self.STEP_KEY: self.step,
                   "updates": self.agent.updates if self.agent else 0, **fields,
                   "seconds": round(seconds, 1), "checkpoint": str(checkpoint) if checkpoint else None}
        (self.logdir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        return summary
