"""Zero-shot adaptation after reward-free exploration (Plan2Explore): `reverie-learner adapt`.

    reverie-learner adapt --from runs/explore --logdir runs/explore-task --updates 2000
    reverie-learner adapt --from runs/explore --logdir runs/goal2 --reward mypkg.rewards:reach_goal_2

An exploring run's world model learned without rewards (`explore.reward_free`). Here, with no further
collection, the reward head learns the task's reward from the recorded data, on the world model's
posterior states as constants (the representation stays the explorer's), and the task actor-critic learns
in imagination on it; the world model itself does not change. The reward is the one recorded with each
step (known afterwards), or what `--reward module:function` computes from the recorded observations: the
function takes a replay batch (numpy arrays (B, T, ...): observation keys, `action`, the flags) and returns
the reward (B, T) received on arriving at each step. The task policy is then evaluated on the run's
environment and exported as the run's policy file.

The output directory holds the resolved config, metrics.jsonl, policy.safetensors (the task policy) and
summary.json; it starts afresh each time (nothing is collected, so a rerun costs only the updates).
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from core.agents.dreamer.policy import Policy, policy_weights
from core.config import Config, ConfigError, apply_overrides, config_from_dict, parse_overrides, write_resolved
from core.weights import save_weights
from learner.agents.dreamer.agent import Dreamer, autocast, frozen
from learner.agents.dreamer.optim import make_optimizer

RewardFn = Callable[[Mapping[str, np.ndarray]], np.ndarray]


class Adapter:
    """Trains a Dreamer agent's reward head and task actor-critic from replayed data, the world model fixed."""

    def __init__(self, agent: Dreamer, reward_fn: RewardFn | None = None) -> None:
        self.agent, self.reward_fn = agent, reward_fn
        wm, beh = agent.wm, agent.behavior
        self.reward_head = nn.ModuleList([wm.reward_net, wm.reward_out])
        self.optimizer = make_optimizer(agent.cfg, self.reward_head, beh.actor, beh.critic)
        self.updates = 0

    def relabel(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The batch with the task's reward: recorded, or computed from the recorded observations."""
        if self.reward_fn is None:
            return dict(batch)
        reward = np.asarray(self.reward_fn(batch), dtype=np.float32)
        if reward.shape != np.shape(batch["reward"]):
            raise ValueError(f"the reward function returned shape {list(reward.shape)}, expected "
                             f"{list(np.shape(batch['reward']))} (one reward per replayed step)")
        return {**batch, "reward": reward}

    def loss(self, batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """Reward-head loss on the posterior states (constants) plus the task actor-critic's loss in imagination."""
        agent = self.agent
        cfg, wm, beh = agent.cfg, agent.wm, agent.behavior
        data, start = agent.to_inputs(batch), agent.context_from_batch(batch)
        with torch.no_grad():
            embed = wm.encoder(data)
            prev_action = torch.cat([start["action"][:, None], data["action"][:, :-1]], 1)
            post, _ = wm.rssm.observe(embed, prev_action, data["is_first"], start, agent.cells.post)
            feat = wm.rssm.feat(post)
        reward_loss = -wm.reward(feat).log_prob(data["reward"]).mean()
        b, t = data["action"].shape[:2]
        flat = {k: post[k].reshape(b * t, *post[k].shape[2:]) for k in ("deter", "stoch")}
        with frozen(wm):
            states, actions, outs = agent.cells.imagine(flat, cfg.imag_horizon)
            imag = wm.rssm.feat(states)
            reward, cont_logit = wm.heads(imag)
        reward = reward.mean()
        reward = torch.cat([torch.zeros_like(reward[:1]), reward[1:]], 0)
        imag_cont = torch.sigmoid(cont_logit[1:]) if cfg.imag_cont == "prob" else (cont_logit[1:] > 0).float()
        cont = torch.cat([(1.0 - data["is_terminal"]).reshape(1, -1), imag_cont], 0)
        ac_loss, _, metrics = beh.loss(imag.float(), actions, reward, cont, policy=beh.actor.dist(outs.float()))
        metrics["adapt/reward_loss"] = reward_loss.detach()
        return reward_loss + ac_loss, metrics

    def step(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        agent = self.agent
        agent.model.train()
        with autocast(agent.cfg.precision, agent.device):
            loss, metrics = self.loss(self.relabel(batch))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        # The slow critic's schedule (`slow_critic_every`; v2: a copy every 100) goes on from the
        # agent's count, as the exported policy's version does.
        agent.behavior.update_slow(agent.updates + self.updates)
        self.updates += 1
        return metrics


def load_reward_fn(path: str) -> RewardFn:
    """`module:function` as a reward function (ConfigError naming what is wrong)."""
    module, sep, name = path.partition(":")
    if not sep or not module or not name:
        raise ConfigError([f"--reward {path!r}: expected module:function, e.g. mypkg.rewards:reach"], "arguments")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError([f"--reward {path!r}: cannot load it ({exc})"], "arguments") from None
    if not callable(fn):
        raise ConfigError([f"--reward {path!r}: not a function"], "arguments")
    return fn


def evaluate(cfg: Config, policy: Policy, episodes: int, seed: int,
             reward_fn: RewardFn | None = None) -> dict[str, float]:
    """The task policy on the run's environment: `episodes` with sampled actions and as many with the mode. With
    a reward function, each episode is also scored by it (`eval/goal_return`: the task it was adapted to)."""
    from learner.envs import Env

    env = Env(cfg, seed=seed)
    out: dict[str, float] = {}
    try:
        for mode, key in (("sample", "eval/return"), ("mode", "eval/return_mode")):
            env.episodes = 0
            returns, goal_returns = [], []
            for _ in range(episodes):
                obs, total, goal = env.reset(), 0.0, 0.0
                policy.reset()
                while True:
                    policy.act(obs, mode=mode)
                    total += float(obs["reward"])
                    if reward_fn is not None and not obs["is_first"]:  # a step's reward is for arriving there
                        step = {k: np.asarray(v)[None, None] for k, v in obs.items()}
                        step["action"] = policy.last_action[None]
                        goal += float(np.asarray(reward_fn(step)).reshape(-1)[0])
                    if obs["is_last"]:
                        break
                    obs = env.step(policy.last_action[0])
                returns.append(total)
                goal_returns.append(goal)
            out[key] = float(np.mean(returns))
            out[key + "_min"] = float(np.min(returns))
            if reward_fn is not None:
                out[key.replace("return", "goal_return")] = float(np.mean(goal_returns))
    finally:
        env.close()
    return out


def adapt_run(source: Path, logdir: Path, updates: int, overrides: list[str], reward: str | None = None,
              episodes: int = 10, progress: bool = True) -> dict[str, Any]:
    """Load an exploring run's newest checkpoint and replay, adapt for `updates` updates, evaluate, export."""
    import yaml

    from learner.checkpoint import load_latest_checkpoint
    from learner.envs import Env
    from learner.metrics import MetricsLogger
    from learner.offline.prefill import MARKER, STORE, copy_into_run
    from learner.replay import Replay

    if updates < 1:
        raise ConfigError([f"--updates {updates}: expected a number of updates >= 1"], "arguments")
    config_file = source / "config.yaml"
    if not config_file.is_file():
        raise ConfigError([f"--from {source}: no config.yaml; is it a run directory of reverie-learner train?"],
                          "arguments")
    raw = yaml.safe_load(config_file.read_text())
    parsed = parse_overrides(overrides)
    apply_overrides(raw, parsed)
    cfg = config_from_dict(raw, str(config_file), parsed)
    if cfg.agent != "dreamer":
        raise ConfigError([f"agent: {cfg.agent!r}; adapt trains a Dreamer agent's reward head and task policy"],
                          str(config_file))
    found = load_latest_checkpoint(source / "checkpoints")
    if found is None:
        raise ConfigError([f"--from {source}: no complete checkpoint in {source / 'checkpoints'}"], "arguments")
    reward_fn = load_reward_fn(reward) if reward else None
    if (logdir / STORE).exists():  # a fresh start: the copy of the replay is redone from the source
        shutil.rmtree(logdir / STORE)
        (logdir / MARKER).unlink(missing_ok=True)
    logdir.mkdir(parents=True, exist_ok=True)
    write_resolved(cfg, logdir)
    torch.manual_seed(cfg.seed)
    copy_into_run(source / "replay", logdir)
    replay = Replay.from_config(logdir / STORE, cfg.replay, seed=cfg.seed)
    env = Env(cfg, seed=cfg.seed)
    agent = Dreamer.from_config(cfg, env.obs_space, env.act_space)
    env.close()
    path, parts, meta = found
    agent.load_state_dict({**parts, "updates": meta["updates"]})
    adapter = Adapter(agent, reward_fn)
    logger = MetricsLogger(logdir)
    start = time.time()
    try:
        every = max(1, updates // 20)
        for i in range(updates):
            batch = replay.sample(cfg.train.batch_size, cfg.train.batch_length)
            metrics = adapter.step(batch)
            if (i + 1) % every == 0 or i + 1 == updates:
                row = {k: float(v) for k, v in metrics.items()}
                logger.log(i + 1, {"updates": i + 1, **row})
                if progress:
                    print(f"adapt {i + 1}/{updates}: reward loss {row['adapt/reward_loss']:.3f}, imagined return "
                          f"{row['ac/return']:.3f}", file=sys.stderr)
        policy = Policy.from_model(agent.model)  # the task policy, not the explorer
        result = evaluate(cfg, policy, episodes, cfg.seed + 1_000_000, reward_fn)
        logger.log(updates, {"updates": updates, **result})
        save_weights(logdir / "policy.safetensors", *policy_weights(agent.model, agent.updates + updates))
    finally:
        logger.close()
        replay.close()
    summary = {"source": str(source), "checkpoint": str(path), "exploration_updates": int(meta["updates"]),
               "adapt_updates": updates, "reward": reward or "recorded", "episodes": episodes, **result,
               "seconds": round(time.time() - start, 1)}
    (logdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
