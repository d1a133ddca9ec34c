"""Training in one process: step an environment, fill replay, update the agent at the train ratio.

The train ratio counts replayed steps per *policy* step (batch x length per update), so one
update happens every batch*length/train_ratio environment steps. A run directory holds the
resolved config, metrics (JSONL + TensorBoard), videos, a learning curve, the replay store and
checkpoints; running the same command again resumes from the newest complete checkpoint.
Checkpoints are taken at episode boundaries, so a resumed run continues exactly as an
uninterrupted one would; a run that ends mid-episode (Ctrl-C, SIGTERM) stores that episode as
cut first, so its checkpoint falls at a boundary too. What it shares with `reverie-learner serve`
(checkpoints, the update, metrics rows, curves, the summary) is learner/run.py; here are the
environment loop and evaluation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from core.agents import Agent, Policy
from core.config import Config, ConfigError
from core.video import side_by_side, write_video
from learner.agents import make_agent
from learner.envs import Env
from learner.metrics import MetricsLogger
from learner.replay import Replay
from learner.replay.validation import nonfinite_keys
from learner.run import Run, RunCounters, mean_or_none, updates_earned

STREAM = "0"
EVAL_SEED_OFFSET = 1_000_000
# Ctrl-C, and what docker stop, systemd, Slurm and kill send: both end the run with a checkpoint.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class EvaluationStopped(Exception):
    """A stop signal arrived during an evaluation, which is then dropped (no row, no videos)."""


class Rate:
    """Updates per second for the progress bar, timed from this process's first update (the prefill and
    the agent's construction before it do not count); None until there is a rate to show."""

    def __init__(self, updates: int) -> None:
        self.initial, self.start = updates, None

    def per_second(self, updates: int) -> float | None:
        now = time.monotonic()
        if self.start is None:
            if updates > self.initial:
                self.start = (updates, now)
            return None
        done, seconds = updates - self.start[0], now - self.start[1]
        return done / seconds if done and seconds > 0 else None


def _say(text: str) -> None:
    """A line on stderr from a signal handler. os.write, because the interrupted code may be inside a
    buffered write to the same stream (re-entering it raises, and would print a traceback)."""
    os.write(2, f"\n{text}\n".encode())


@dataclasses.dataclass
class Counters(RunCounters):
    """Where a single-process run stands; checkpointed, so a resumed run counts on exactly."""

    env_steps: int = 0
    episodes: int = 0
    train_credit: float = 0.0  # updates earned and not yet done (the train-ratio clock)
    eval_rounds: int = 0
    last_eval: int = 0


class Trainer(Run):
    """`reverie-learner train`: steps an environment, updates at the train ratio, evaluates."""

    STEP_KEY, STEP_UNIT = "env_steps", "env steps"
    agent: Agent
    counters: Counters
    stopped = ""  # the signal that ended the run early, if one did

    def __init__(self, cfg: Config, logdir: str | Path, env: str | None = None, progress: bool = True) -> None:
        if cfg.train.train_ratio < 0:
            raise ConfigError(["train.train_ratio: unthrottled (< 0) only applies to reverie-learner serve; "
                               "single-process training needs a positive ratio"], "train")
        super().__init__(cfg, logdir, progress)
        self.env_override = env
        self.rng = np.random.default_rng(cfg.seed)
        self.env = Env(cfg, env, seed=cfg.seed)
        self.agent = make_agent(cfg, self.env.obs_space, self.env.act_space)
        self.policy = self.agent.policy()
        self.replay = Replay.from_config(self.logdir / "replay", cfg.replay, seed=cfg.seed)
        self.replay.describe(STREAM, self.env.describe(cfg))  # streams.json: names, units, bounds, rate
        self.logger = MetricsLogger(self.logdir)
        self.counters = Counters()
        self.episode_returns: list[float] = []
        self.random_returns: list[float] = []
        self._resume()

    @property
    def step(self) -> int:
        return self.counters.env_steps

    # --- checkpoints: the environment's episode count, the replay's positions, both generators and the
    # returns so far, so that a resumed run continues exactly as an uninterrupted one would
    def _restore(self, parts: dict[str, Any], meta: dict[str, Any]) -> None:
        self.env.episodes = self.counters.episodes
        self.replay.load(meta["replay"])
        self.rng.bit_generator.state = meta["numpy_rng"]
        torch.set_rng_state(parts["rng"]["torch"])
        self.random_returns = list(meta.get("random_returns", []))
        self.episode_returns = list(meta.get("episode_returns", []))  # the progress bar and summary go on

    def _checkpoint_parts(self) -> dict[str, Any]:
        return {"rng": {"torch": torch.get_rng_state()}}

    def _checkpoint_meta(self) -> dict[str, Any]:
        return {"replay": self.replay.save(), "numpy_rng": self.rng.bit_generator.state,
                "random_returns": self.random_returns, "episode_returns": self.episode_returns}

    # --- the loop
    def run(self) -> dict[str, Any]:
        """Train until `train.steps` env steps or a stop signal; store a running episode as cut,
        checkpoint, evaluate (not after a stop signal) and return the summary."""
        start = time.time()
        with self._stop_on_signals():
            bar = tqdm(total=self.cfg.train.steps, initial=self.counters.env_steps, disable=not self.progress,
                       unit="step", dynamic_ncols=True, desc=self._bar_desc())
            try:
                self._loop(bar)
            finally:
                bar.close()
                self.replay.close_episode(STREAM)  # ended mid-episode: stored as cut (no-op at a boundary)
                self.save()
            return self.finish(time.time() - start)

    def _loop(self, bar: tqdm) -> None:
        cfg, c = self.cfg.train, self.counters
        batch_steps = cfg.batch_size * cfg.batch_length
        obs = self.env.reset()
        episode_return, episode_length = 0.0, 0
        rate = Rate(self.agent.updates)
        while c.env_steps < cfg.steps and not self.stopped:
            if obs["is_first"] and c.env_steps:
                self._periodic(at_boundary=True)  # evaluate and checkpoint between episodes
                if self.stopped:
                    break  # during the evaluation: stop at this boundary
            prefill = c.env_steps < cfg.prefill
            context = None
            if prefill:
                action = self.env.random_action(self.rng)
            elif nonfinite_keys({k: np.asarray(v) for k, v in obs.items()}):
                # A glitching sensor: the replay refuses this step and starts a new episode after it, so
                # the policy starts afresh too, rather than carry NaN in its state from now on.
                self.policy.reset()
                action = self.env.random_action(self.rng)
            else:
                self.policy.act(obs, mode="sample")
                action = self.policy.last_action[0]
                context = self._acting_context()
            self.replay.add({**obs, "action": action}, STREAM, task=self.env.id,
                            policy_version=self.agent.updates, context=context)
            episode_return += float(obs["reward"])
            episode_length += 1
            c.env_steps += 1
            bar.update(1)
            if obs["is_last"]:
                self._episode_done(episode_return, episode_length, prefill)
                episode_return, episode_length = 0.0, 0
                obs = self.env.reset()
            else:
                obs = self.env.step(action)
            if not prefill or c.env_steps == cfg.prefill:
                self._train(batch_steps)
            self._periodic(at_boundary=False)
            if self.progress:
                bar.set_description(self._bar_desc(), refresh=False)
                bar.set_postfix_str(self._bar_postfix(rate.per_second(self.agent.updates)), refresh=False)

    def _bar_desc(self) -> str:
        """What the bar is waiting for: the random-action prefill, then training."""
        prefill, steps = self.cfg.train.prefill, self.counters.env_steps
        return f"prefill {steps}/{prefill}" if steps < prefill else "train"

    def _bar_postfix(self, updates_per_s: float | None) -> str:
        """The numbers that exist so far: the prefill's random returns, then updates, their rate and
        the latest policy episode's return (none is shown before there is one)."""
        if self.counters.env_steps < self.cfg.train.prefill:
            return f"random return={self.random_returns[-1]:.2f}" if self.random_returns else ""
        parts = [f"updates={self.agent.updates}"]
        if updates_per_s is not None:
            parts.append(f"upd/s={updates_per_s:.2f}")
        if self.episode_returns:
            parts.append(f"return={self.episode_returns[-1]:.2f}")
        return " ".join(parts)

    def _acting_context(self) -> dict[str, np.ndarray] | None:
        """The posterior latents acting just computed (deter, stoch, the action taken): stored with
        the step as its replay context, so a sequence starting after it has a start state before
        any update has touched it (the official agent does the same)."""
        if not self.agent.replay_context:
            return None
        return {key: value[0] for key, value in self.policy.context().items()}

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGINT and SIGTERM stop the run promptly: after the current step (an evaluation under way is
        dropped), the running episode is stored as cut, a checkpoint is written, and there is no final
        evaluation. A second one exits at once (status 128 + signal number, one line, no traceback),
        even mid-checkpoint: checkpoints, the policy file and replay chunks are written atomically, so
        the newest complete checkpoint stays whole and resumes. Held until the summary is written. Only
        the main thread can own signals; elsewhere (a caller's worker thread) they keep their handlers."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, _frame: object) -> None:
            name = signal.Signals(signum).name
            if self.stopped:
                _say(f"reverie-learner: {name} again: exiting now, without a new checkpoint; the same command "
                     "resumes from the newest complete one")
                os._exit(128 + signum)
            self.stopped = name
            _say(f"{name}: stopping (an evaluation under way is dropped): an episode under way is stored as cut, "
                 "then a checkpoint is written; no final evaluation. A second signal exits at once, without it")

        previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _episode_done(self, episode_return: float, length: int, prefill: bool) -> None:
        c = self.counters
        c.episodes += 1
        (self.random_returns if prefill else self.episode_returns).append(episode_return)
        self.train_stats.add({"train/return": episode_return, "train/reward_per_step": episode_return / max(1, length)})

    def _train(self, batch_steps: int) -> None:
        """Earn one policy step's worth of updates and do the whole ones."""
        c = self.counters
        if not self._replay_ready():
            return
        c.train_credit += updates_earned(1, self.cfg.train.train_ratio, batch_steps)
        while c.train_credit >= 1.0 and not self.stopped:  # what is left is checkpointed for the resume
            c.train_credit -= 1.0
            self._update()

    def _periodic(self, at_boundary: bool) -> None:
        """Metrics rows between episode boundaries; evaluation and checkpoints at them."""
        cfg, c = self.cfg.train, self.counters
        if not at_boundary:
            self._maybe_log()
        due = at_boundary and cfg.eval_every and c.env_steps - c.last_eval >= cfg.eval_every
        if due and self.evaluate() is not None:  # a dropped one is due again when the run resumes
            c.last_eval = c.env_steps
        if at_boundary and not self.stopped:  # stopping: the final checkpoint follows
            self._maybe_checkpoint()

    def _row(self) -> dict[str, float]:
        return {"episodes": self.counters.episodes}

    # --- evaluation
    def evaluate(self) -> float | None:
        """An evaluation round (`_evaluate`); None when a stop signal dropped it."""
        with torch.random.fork_rng(devices=[]):  # evaluation must not shift the training run's randomness
            try:
                return self._evaluate()
            except EvaluationStopped:
                tqdm.write(f"evaluation at {self.counters.env_steps} env steps dropped")
                return None

    def _evaluate(self) -> float:
        """`eval_episodes` episodes acting with sampled actions (as the official agent acts, and as
        training does) and as many with the mode action, from the same start states; returns the
        sampled-action mean (`eval/return`). Tasks that report success get its rate too. A stop signal
        raises EvaluationStopped before the round counts; one after its episodes skips the videos."""
        c, episodes = self.counters, self.cfg.train.eval_episodes
        round_ = c.eval_rounds + 1
        video = self.cfg.train.video_every and round_ % self.cfg.train.video_every == 0
        tqdm.write(f"evaluating at {c.env_steps} env steps: {episodes} episodes with sampled actions and "
                   f"{episodes} with the mode{' (videos)' if video else ''}")
        env = Env(self.cfg, self.env_override, seed=self.cfg.seed + EVAL_SEED_OFFSET + round_ * 100,
                  render=bool(video))
        policy = self.agent.policy()
        frames: list[np.ndarray] = []
        results = {}
        try:
            for mode in ("sample", "mode"):
                env.episodes = 0  # both modes start from the same states
                results[mode] = [self._eval_episode(env, policy, mode, frames if video and mode == "sample" and i == 0
                                                    else None) for i in range(episodes)]
        finally:
            env.close()
        c.eval_rounds = round_
        videos = self.logdir / "videos"
        video = video and not self.stopped
        if frames and video:
            write_video(videos / f"eval_{c.env_steps:09d}.mp4", np.stack(frames), fps=self.cfg.control.hz)
        if video:
            self._openloop_video()
        row = {**self._eval_row(results), "updates": self.agent.updates}
        self.logger.log(c.env_steps, row)
        random = mean_or_none(self.random_returns)
        self._plot(("train/return", "eval/return", "eval/return_mode"),
                   baseline=None if random is None else {"random policy": random})
        text = f"return {row['eval/return']:.3f} sampled, {row['eval/return_mode']:.3f} mode"
        if "eval/success" in row:
            text += f"; success {row['eval/success']:.0%} sampled, {row['eval/success_mode']:.0%} mode"
        tqdm.write(f"eval at {c.env_steps} steps: {text} ({episodes} episodes each)")
        return row["eval/return"]

    def _eval_episode(self, env: Env, policy: Policy, mode: str, frames: list | None) -> tuple[float, bool | None]:
        """One evaluation episode: its return and whether the task reported success at its end."""
        obs, total = env.reset(), 0.0
        policy.reset()
        while True:
            if self.stopped:
                raise EvaluationStopped
            policy.act(obs, mode=mode)
            if frames is not None and (frame := env.render()) is not None:
                image = next((obs[k] for k in self.agent.image_keys), None)
                frames.append(side_by_side(frame, image))
            total += float(obs["reward"])
            if obs["is_last"]:
                success = env.info.get("success")
                return total, None if success is None else bool(success)
            obs = env.step(policy.last_action[0])

    def _eval_row(self, results: dict[str, list[tuple[float, bool | None]]]) -> dict[str, float]:
        sampled = [r for r, _ in results["sample"]]
        row = {"eval/return": float(np.mean(sampled)), "eval/return_min": float(np.min(sampled)),
               "eval/return_max": float(np.max(sampled)),
               "eval/return_mode": float(np.mean([r for r, _ in results["mode"]]))}
        for mode, suffix in (("sample", ""), ("mode", "_mode")):
            flags = [s for _, s in results[mode] if s is not None]
            if flags:
                row[f"eval/success{suffix}"] = float(np.mean(flags))
        if self.random_returns:
            row["random/return"] = float(np.mean(self.random_returns))
        return row

    def finish(self, seconds: float) -> dict[str, Any]:
        self._log()
        # Stopped by a signal: be quick (docker and systemd send SIGKILL after a grace period).
        final_eval = self.evaluate() if self.cfg.train.eval_every and not self.stopped else None
        summary = self._summary(self.stopped or f"train.steps ({self.cfg.train.steps}) reached", seconds,
                                self.checkpoint, {"episodes": self.counters.episodes, "final_eval_return": final_eval,
                                                  "random_return": mean_or_none(self.random_returns),
                                                  "train_return_last10": mean_or_none(self.episode_returns[-10:])})
        self.close()
        return summary

    def close(self) -> None:
        self.replay.close()
        self.logger.close()
        self.env.close()
