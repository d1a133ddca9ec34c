"""Training in one process: step an environment, fill replay, update the agent at the train ratio.

The train ratio counts replayed steps per *policy* step (batch x length per update), so one
update happens every batch*length/train_ratio environment steps. A run directory holds the
resolved config, metrics (JSONL + TensorBoard), videos, a learning curve, the replay store and
checkpoints; running the same command again resumes from the newest complete checkpoint.
Checkpoints are taken at episode boundaries, so a resumed run continues exactly as an
uninterrupted one would. What it shares with `reverie-learner serve` (checkpoints, the update,
metrics rows, curves, the summary) is learner/run.py; here are the environment loop and evaluation.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from learner.openloop import write_openloop
from learner.replay import Replay
from learner.replay.validation import nonfinite_keys
from learner.run import Run, RunCounters, mean_or_none, updates_earned

STREAM = "0"
EVAL_SEED_OFFSET = 1_000_000
# Ctrl-C, and what docker stop, systemd, Slurm and kill send: both end the run with a checkpoint.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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
        self.logger = MetricsLogger(self.logdir)
        self.counters = Counters()
        self.episode_returns: list[float] = []
        self.random_returns: list[float] = []
        self.stopped = ""  # the signal that ended the run early, if one did
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
        """Train until `train.steps` env steps or a stop signal; checkpoint; return the summary."""
        cfg, c = self.cfg.train, self.counters
        start = time.time()
        bar = tqdm(total=cfg.steps, initial=c.env_steps, disable=not self.progress, unit="step", dynamic_ncols=True)
        updates_at_start, t_start = self.agent.updates, time.time()
        try:
            with self._stop_on_signals():
                self._loop(bar, updates_at_start, t_start)
        except KeyboardInterrupt:
            tqdm.write("interrupted: saving a checkpoint and the replay")
        finally:
            bar.close()
            self.save()
        return self.finish(time.time() - start)

    def _loop(self, bar: tqdm, updates_at_start: int, t_start: float) -> None:
        cfg, c = self.cfg.train, self.counters
        batch_steps = cfg.batch_size * cfg.batch_length
        obs = self.env.reset()
        episode_return, episode_length = 0.0, 0
        while c.env_steps < cfg.steps and not self.stopped:
            if obs["is_first"] and c.env_steps:
                self._periodic(at_boundary=True)  # evaluate and checkpoint between episodes
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
            if c.env_steps % 50 == 0:
                rate = (self.agent.updates - updates_at_start) / max(1e-9, time.time() - t_start)
                last = self.episode_returns[-1] if self.episode_returns else float("nan")
                bar.set_postfix(updates=self.agent.updates, upd_s=f"{rate:.2f}", ret=f"{last:.2f}")

    def _acting_context(self) -> dict[str, np.ndarray] | None:
        """The posterior latents acting just computed (deter, stoch, the action taken): stored with
        the step as its replay context, so a sequence starting after it has a start state before
        any update has touched it (the official agent does the same)."""
        if not self.agent.replay_context:
            return None
        return {key: value[0] for key, value in self.policy.context().items()}

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGINT and SIGTERM end the loop after the current step (the caller then checkpoints); a second
        one stops at once (KeyboardInterrupt: the checkpoint is still written). Only the main thread can
        own signals; elsewhere (a caller's worker thread) they keep their handlers."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, _frame: object) -> None:
            if self.stopped:
                raise KeyboardInterrupt
            self.stopped = signal.Signals(signum).name
            tqdm.write(f"{self.stopped}: stopping after this step; saving a checkpoint and the replay first")

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
        while c.train_credit >= 1.0:
            c.train_credit -= 1.0
            self._update()

    def _periodic(self, at_boundary: bool) -> None:
        """Metrics rows between episode boundaries; evaluation and checkpoints at them."""
        cfg, c = self.cfg.train, self.counters
        if not at_boundary:
            self._maybe_log()
        if at_boundary and cfg.eval_every and c.env_steps - c.last_eval >= cfg.eval_every:
            c.last_eval = c.env_steps
            self.evaluate()
        if at_boundary:
            self._maybe_checkpoint()

    def _row(self) -> dict[str, float]:
        return {"episodes": self.counters.episodes}

    # --- evaluation
    def evaluate(self) -> float:
        with torch.random.fork_rng(devices=[]):  # evaluation must not shift the training run's randomness
            return self._evaluate()

    def _evaluate(self) -> float:
        """`eval_episodes` episodes acting with sampled actions (as the official agent acts, and as
        training does) and as many with the mode action, from the same start states; returns the
        sampled-action mean (`eval/return`). Tasks that report success get its rate too."""
        c = self.counters
        c.eval_rounds += 1
        video = self.cfg.train.video_every and c.eval_rounds % self.cfg.train.video_every == 0
        env = Env(self.cfg, self.env_override, seed=self.cfg.seed + EVAL_SEED_OFFSET + c.eval_rounds * 100,
                  render=bool(video))
        policy = self.agent.policy()
        frames: list[np.ndarray] = []
        results = {}
        for mode in ("sample", "mode"):
            env.episodes = 0  # both modes start from the same states
            results[mode] = [self._eval_episode(env, policy, mode, frames if video and mode == "sample" and i == 0
                                                else None) for i in range(self.cfg.train.eval_episodes)]
        env.close()
        videos = self.logdir / "videos"
        if frames:
            write_video(videos / f"eval_{c.env_steps:09d}.mp4", np.stack(frames), fps=self.cfg.control.hz)
        if video and self.agent.image_keys and len(self.replay) >= self.cfg.train.batch_length:
            write_openloop(self.agent, self.replay, videos / f"openloop_{c.env_steps:09d}.mp4",
                           fps=self.cfg.control.hz)
        row = {**self._eval_row(results), "updates": self.agent.updates}
        self.logger.log(c.env_steps, row)
        random = mean_or_none(self.random_returns)
        self._plot(("train/return", "eval/return", "eval/return_mode"),
                   baseline=None if random is None else {"random policy": random})
        text = f"return {row['eval/return']:.3f} sampled, {row['eval/return_mode']:.3f} mode"
        if "eval/success" in row:
            text += f"; success {row['eval/success']:.0%} sampled, {row['eval/success_mode']:.0%} mode"
        tqdm.write(f"eval at {c.env_steps} steps: {text} ({self.cfg.train.eval_episodes} episodes each)")
        return row["eval/return"]

    def _eval_episode(self, env: Env, policy: Policy, mode: str, frames: list | None) -> tuple[float, bool | None]:
        """One evaluation episode: its return and whether the task reported success at its end."""
        obs, total = env.reset(), 0.0
        policy.reset()
        while True:
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
