"""`reverie-learner train --offline REPLAY_DIR`: world model and behaviour trained on fixed, recorded data, with
no environment and no robot (to pre-train on yesterday's robot data before today's run, or to study a
model on a dataset). The run directory is the usual one: resolved config, metrics (JSONL + TensorBoard),
learning curves of the losses, checkpoints, the exported policy (which a robot or `serve` can start
from), open-loop videos where there is a camera, and summary.json. Running the same command again
resumes from the newest checkpoint.

The recorded chunks are copied into LOGDIR/replay first (`prefill.copy_into_run`: the source is only
read); batches are sampled from it as online training samples them. The run's step is the update count:
`train.log_every` and `train.checkpoint_every` count updates here, and the run stops after `--updates N`
(default: as many as online training would have made on this much data, `train.train_ratio` replayed
steps per recorded step). What it shares with `train` and `serve` is learner/run.py."""

from __future__ import annotations

import dataclasses
import signal
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from core.agents.spaces import ActSpace
from core.config import Config, ConfigError
from learner.agents import make_agent
from learner.metrics import MetricsLogger
from learner.offline.prefill import STORE, action_layout, copy_into_run
from learner.openloop import write_openloop
from learner.plots import plot_losses
from learner.replay import Replay
from learner.run import Run, RunCounters, updates_earned

LOSSES = ("wm/dec", "wm/reward", "wm/cont", "wm/kl", "ac/critic_loss")


@dataclasses.dataclass
class OfflineCounters(RunCounters):
    updates: int = 0


class OfflineTrainer(Run):
    """Updates the agent on a fixed replay until `updates` updates (or a stop signal)."""

    STEP_KEY, STEP_UNIT = "updates", "updates"
    counters: OfflineCounters

    def __init__(self, cfg: Config, logdir: str | Path, source: str | Path, updates: int | None = None,
                 progress: bool = True) -> None:
        if updates is not None and updates < 1:
            raise ConfigError([f"--updates {updates}: expected a number of updates >= 1"], "arguments")
        super().__init__(cfg, logdir, progress)
        self.source = Path(source)
        copied = copy_into_run(self.source, self.logdir)
        self.replay = Replay.from_config(self.logdir / STORE, cfg.replay, seed=cfg.seed)
        first = next((p for p in sorted((self.logdir / STORE).glob("*.npz"))), None)
        if first is None:
            raise ConfigError([f"{source}: no readable steps to train on"], "arguments")
        from learner.offline.reader import ReplayDir  # the copy, read like any replay

        space, width = action_layout(ReplayDir(self.logdir / STORE, verify=False).layout)
        self.agent = make_agent(cfg, space, ActSpace(width, bool(copied.get("discrete", False))))
        self.logger = MetricsLogger(self.logdir)
        self.counters = OfflineCounters()
        batch_steps = cfg.train.batch_size * cfg.train.batch_length
        self.total = updates or max(1, int(updates_earned(copied["steps"], cfg.train.train_ratio, batch_steps)))
        self.stopped = ""
        self._resume()

    @property
    def step(self) -> int:
        return self.counters.updates

    def _restore(self, parts: dict[str, Any], meta: dict[str, Any]) -> None:
        self.replay.load(meta["replay"])
        torch.set_rng_state(parts["rng"]["torch"])

    def _checkpoint_parts(self) -> dict[str, Any]:
        return {"rng": {"torch": torch.get_rng_state()}}

    def _checkpoint_meta(self) -> dict[str, Any]:
        return {"replay": self.replay.save(), "offline_source": str(self.source)}

    def run(self) -> dict[str, Any]:
        start = time.time()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        bar = tqdm(total=self.total, initial=self.step, disable=not self.progress, unit="update", dynamic_ncols=True,
                   desc="offline")
        try:
            if len(self.replay) < self.cfg.train.batch_length:
                raise ConfigError([f"{self.source}: {len(self.replay)} steps in RAM, fewer than one sequence of "
                                   f"train.batch_length={self.cfg.train.batch_length}"], "arguments")
            while self.step < self.total and not self.stopped:
                self._update()
                self.counters.updates = self.agent.updates
                bar.update(1)
                self._maybe_log()
                self._maybe_checkpoint()
        finally:
            bar.close()
            for sig, old in previous.items():
                signal.signal(sig, old)
        self._log()
        self.save()
        plot_losses(self.logger.path, self.logdir / "losses.png", keys=LOSSES, title="World-model losses (offline)")
        if self.agent.image_keys and len(self.replay) >= self.cfg.train.batch_length:
            write_openloop(self.agent, self.replay, self.logdir / "videos" / f"openloop_{self.step:09d}.mp4",
                           fps=self.cfg.control.hz)
        summary = self._summary(self.stopped or f"{self.total} updates reached", time.time() - start, self.checkpoint,
                                {"offline_source": str(self.source), "replay_steps": len(self.replay)})
        self.replay.close()
        self.logger.close()
        return summary

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stopped = signal.Signals(signum).name
        tqdm.write(f"{self.stopped}: stopping after this update; a checkpoint is written")
