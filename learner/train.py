"""Training in one process: step an environment, fill replay, update Dreamer at the train ratio.

The train ratio counts replayed steps per *policy* step (batch x length per update), so one
update happens every batch*length/train_ratio environment steps. A run directory holds the
resolved config, metrics (JSONL + TensorBoard), videos, a learning curve, the replay store and
checkpoints; running the same command again resumes from the newest complete checkpoint.
Checkpoints are taken at episode boundaries, so a resumed run continues exactly as an
uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from learner.checkpoint import load_latest_checkpoint, save_checkpoint, save_weights
from learner.compute import configure_compute
from learner.config import Config, ConfigError, write_resolved
from learner.dreamer.agent import CONTEXT_KEYS, Dreamer
from learner.dreamer.policy import Policy, policy_weights
from learner.envs import Env
from learner.metrics import Mean, MetricsLogger
from learner.openloop import write_openloop
from learner.plots import plot_learning_curve
from learner.replay import Replay
from learner.replay.chunk import nonfinite_keys
from learner.replay.context import CONTEXT_PART, restore_context
from learner.video import side_by_side, write_video

STREAM = "0"
EVAL_SEED_OFFSET = 1_000_000
# Ctrl-C, and what docker stop, systemd, Slurm and kill send: both end the run with a checkpoint.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclasses.dataclass
class Counters:
    env_steps: int = 0
    episodes: int = 0
    train_credit: float = 0.0
    eval_rounds: int = 0
    last_log: int = 0
    last_eval: int = 0
    last_checkpoint: int = 0


class Trainer:
    def __init__(self, cfg: Config, logdir: str | Path, env: str | None = None, progress: bool = True) -> None:
        self.cfg, self.logdir, self.env_override, self.progress = cfg, Path(logdir), env, progress
        if cfg.train.train_ratio < 0:
            raise ConfigError(["train.train_ratio: unthrottled (< 0) only applies to reverie-learner serve; "
                               "single-process training needs a positive ratio"], "train")
        self.logdir.mkdir(parents=True, exist_ok=True)
        write_resolved(cfg, self.logdir)
        dcfg = cfg.dreamer
        configure_compute(dcfg)
        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.env = Env(cfg, env, seed=cfg.seed)
        self.agent = Dreamer(dcfg, self.env.obs_space, self.env.act_space)
        self.policy = Policy.from_model(self.agent.model)
        self.replay = Replay.from_config(self.logdir / "replay", cfg.replay, seed=cfg.seed)
        self.logger = MetricsLogger(self.logdir)
        self.counters = Counters()
        self.train_stats = Mean()
        self.episode_returns: list[float] = []
        self.random_returns: list[float] = []
        self.stopped = ""  # the signal that ended the run early, if one did
        self.checkpoint: Path | None = None  # the newest checkpoint this process wrote
        self._resume()

    # --- checkpoints
    def _resume(self) -> None:
        found = load_latest_checkpoint(self.logdir / "checkpoints")  # skips (and names) corrupt ones
        if found is None:
            return
        path, parts, meta = found
        self.agent.load_state_dict({"model": parts["model"], "optimizer": parts["optimizer"],
                                    "updates": meta["updates"]})
        self.counters = Counters(**meta["counters"])
        self.env.episodes = self.counters.episodes
        self.replay.load(meta["replay"])
        self.rng.bit_generator.state = meta["numpy_rng"]
        torch.set_rng_state(parts["rng"]["torch"])
        restored = restore_context(self.replay, parts, path)
        self.random_returns = list(meta.get("random_returns", []))
        self.episode_returns = list(meta.get("episode_returns", []))  # the progress bar and summary go on
        tqdm.write(f"resumed from {path} at {self.counters.env_steps} env steps, {self.agent.updates} updates, "
                   f"replay context for {restored} steps")

    def save(self) -> Path | None:
        """Flush the replay, then checkpoint and export the policy, unless the model went non-finite
        (then the previous checkpoints and policy stay, and it says so): None when nothing was written."""
        self.replay.flush()
        if self.agent.refuse_nonfinite(f"checkpoint at {self.counters.env_steps} env steps not written"):
            return None
        parts = {"model": self.agent.model.state_dict(), "optimizer": self.agent.optimizer.state_dict(),
                 "rng": {"torch": torch.get_rng_state()}, CONTEXT_PART: self.replay.context_state()}
        meta = {"counters": dataclasses.asdict(self.counters), "updates": self.agent.updates,
                "replay": self.replay.save(), "numpy_rng": self.rng.bit_generator.state,
                "random_returns": self.random_returns, "episode_returns": self.episode_returns,
                "config": self.cfg.to_dict()}
        path = save_checkpoint(self.logdir / "checkpoints", self.counters.env_steps, parts, meta)
        self.export_policy()
        self.checkpoint = path
        return path

    def export_policy(self) -> Path:
        return save_weights(self.logdir / "policy.safetensors", *policy_weights(self.agent.model, self.agent.updates))

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
        if not self.cfg.dreamer.replay_context:
            return None
        return {key: self.policy.state[key][0].detach().float().cpu().numpy() for key in CONTEXT_KEYS}

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
        cfg, c = self.cfg.train, self.counters
        if len(self.replay) < cfg.batch_length:
            return
        c.train_credit += cfg.train_ratio / batch_steps
        while c.train_credit >= 1.0:
            c.train_credit -= 1.0
            batch = self.replay.sample(cfg.batch_size, cfg.batch_length)
            metrics, context = self.agent.train(batch)
            if self.cfg.dreamer.replay_context and context:  # none from a skipped (non-finite) update
                self.replay.write_context(batch["ids"], {k: v.cpu().numpy() for k, v in context.items()})
            self.train_stats.add(metrics)

    def _periodic(self, at_boundary: bool) -> None:
        cfg, c = self.cfg.train, self.counters
        if not at_boundary and c.env_steps - c.last_log >= cfg.log_every:
            c.last_log = c.env_steps
            self._log()
        if at_boundary and cfg.eval_every and c.env_steps - c.last_eval >= cfg.eval_every:
            c.last_eval = c.env_steps
            self.evaluate()
        if at_boundary and c.env_steps - c.last_checkpoint >= cfg.checkpoint_every:
            c.last_checkpoint = c.env_steps
            self.save()

    def _log(self) -> None:
        row = self.train_stats.result()
        row.update({"env_steps": self.counters.env_steps, "updates": self.agent.updates,
                    "episodes": self.counters.episodes, "replay_steps": len(self.replay),
                    "skipped_updates": self.agent.skipped,
                    "replay/refused_steps": self.replay.stats()["totals"]["refused_steps"]})
        self.logger.log(self.counters.env_steps, row)

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
        policy = Policy.from_model(self.agent.model)
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
        if video and self.agent.model.keys.images and len(self.replay) >= self.cfg.train.batch_length:
            write_openloop(self.agent, self.replay, videos / f"openloop_{c.env_steps:09d}.mp4",
                           fps=self.cfg.control.hz)
        row = {**self._eval_row(results), "updates": self.agent.updates}
        self.logger.log(c.env_steps, row)
        self._plot()
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
                image = next((obs[k] for k in self.agent.model.keys.images), None)
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

    def _plot(self) -> None:
        baseline = {"random policy": float(np.mean(self.random_returns))} if self.random_returns else None
        keys = ("train/return", "eval/return", "eval/return_mode")
        plot_learning_curve(self.logdir / "metrics.jsonl", self.logdir / "learning_curve.png", keys=keys,
                            baseline=baseline)
        plot_learning_curve(self.logdir / "metrics.jsonl", self.logdir / "learning_curve_updates.png", keys=keys,
                            x="updates", baseline=baseline, title="Learning curve against updates")

    def finish(self, seconds: float) -> dict[str, Any]:
        self._log()
        # Stopped by a signal: be quick (docker and systemd send SIGKILL after a grace period).
        final_eval = self.evaluate() if self.cfg.train.eval_every and not self.stopped else None
        summary = {"stopped": self.stopped or f"train.steps ({self.cfg.train.steps}) reached",
                   "env_steps": self.counters.env_steps, "updates": self.agent.updates,
                   "episodes": self.counters.episodes, "seconds": round(seconds, 1),
                   "checkpoint": str(self.checkpoint) if self.checkpoint else None,
                   "final_eval_return": final_eval,
                   "random_return": float(np.mean(self.random_returns)) if self.random_returns else None,
                   "train_return_last10": float(np.mean(self.episode_returns[-10:])) if self.episode_returns else None}
        (self.logdir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.close()
        return summary

    def close(self) -> None:
        self.replay.close()
        self.logger.close()
        self.env.close()
