"""CASCADE's protocol, in one process: B deployments of N frozen explorers, offline training between them.

A deployment acts with frozen copies of the population's explorers (policy blobs, as a robot would get
them), one member per episode in turn, until `explore.deployment_steps` steps are stored; nothing trains
during it. Between deployments the world model, the ensemble and the explorers train offline for
`explore.deployment_updates` updates on everything collected so far. Each step's replay record names the
policy version that acted: deployment d's member k acts as version d * N + k + 1 (`member_version`), so
the data of every explorer can be told apart afterwards (bench/exploration.py measures coverage per
deployment). The same numbering is meant for the link (one frozen explorer per robot).

Runs with any `dreamer.explore` (plan2explore: a population of one) and with a random population
(`random=True`: the baseline, no learning at all).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.agents import load_policy
from core.config import Config, ConfigError, write_resolved
from core.weights import weights_to_bytes
from learner.agents import make_agent
from learner.checkpoint import save_checkpoint
from learner.envs import Env
from learner.replay import Replay

STREAM = "0"
RESULTS = "deployments.jsonl"


def member_version(deployment: int, member: int, population: int) -> int:
    """The policy version deployment `deployment`'s explorer `member` acts as (> 0, increasing)."""
    return deployment * population + member + 1


def version_member(version: int, population: int) -> tuple[int, int]:
    """(deployment, member) of a version `member_version` gave."""
    return (version - 1) // population, (version - 1) % population


def frozen_members(agent: Any, deployment: int) -> list[Any]:
    """Independent copies of the explorers as a robot builds them from their blobs: later updates leave them be."""
    x = agent.exploration
    policies = []
    for k in range(x.population):
        version = member_version(deployment, k, x.population)
        tensors, meta = x.member_weights(k, version)
        policies.append(load_policy(weights_to_bytes(tensors, meta), agent.device))
    return policies


def collect(env: Env, replay: Replay, policies: list[Any] | None, steps: int, versions: list[int],
            rng: np.random.Generator, on_step: Callable[[dict[str, Any], int], None] | None = None) -> list[dict]:
    """`steps` steps into `replay`, member k (or a random policy when `policies` is None) acting whole episodes
    in turn; an episode under way when the count is reached is finished (a deployment ends between episodes).
    Returns one row per episode: member, version, return, length, terminal."""
    episodes: list[dict] = []
    n, done, k = len(versions), 0, -1
    while done < steps:
        k = (k + 1) % n
        policy = None if policies is None else policies[k]
        if policy is not None:
            policy.reset()
        obs, ret, length = env.reset(), 0.0, 0
        while True:
            if policy is None:
                action = env.random_action(rng)
            else:
                policy.act(obs, mode="sample")
                action = policy.last_action[0]
            replay.add({**obs, "action": action}, STREAM, task=env.id, policy_version=versions[k])
            if on_step is not None:
                on_step(obs, k)
            ret += float(obs["reward"])
            length += 1
            done += 1
            if obs["is_last"]:
                episodes.append({"member": k, "version": versions[k], "return": ret, "length": length,
                                 "terminal": bool(obs["is_terminal"])})
                break
            obs = env.step(action)
    return episodes


def run_deployments(cfg: Config, logdir: Path, env_id: str | None = None, random: bool = False,
                    on_step: Callable[[dict[str, Any], int], None] | None = None,
                    progress: bool = True) -> list[dict[str, Any]]:
    """B deployments (`explore.deployments`) on the run's env; one JSON row per deployment in
    LOGDIR/deployments.jsonl. `random`: every member acts randomly and nothing trains (the baseline)."""
    xcfg = cfg.explore
    if not random and cfg.dreamer.explore == "none":
        raise ConfigError(["dreamer.explore: none; deployments need plan2explore or cascade (or the random "
                           "baseline)"], "dreamer.explore")
    logdir.mkdir(parents=True, exist_ok=True)
    write_resolved(cfg, logdir)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    env = Env(cfg, env_id, seed=cfg.seed)
    replay = Replay.from_config(logdir / "replay", cfg.replay, seed=cfg.seed)
    agent = None if random else make_agent(cfg, env.obs_space, env.act_space)
    population = xcfg.population if cfg.dreamer.explore == "cascade" or random else 1
    rows: list[dict[str, Any]] = []
    try:
        for d in range(xcfg.deployments):
            start = time.time()
            versions = [member_version(d, k, population) for k in range(population)]
            policies = None if agent is None else frozen_members(agent, d)
            episodes = collect(env, replay, policies, xcfg.deployment_steps, versions, rng, on_step)
            metrics: dict[str, float] = {}
            if agent is not None and len(replay) >= cfg.train.batch_length:
                for _ in range(xcfg.deployment_updates):
                    batch = replay.sample(cfg.train.batch_size, cfg.train.batch_length)
                    m, context = agent.train(batch)
                    if agent.replay_context and context:
                        replay.write_context(batch["ids"], {k: v.cpu().numpy() for k, v in context.items()})
                    for key in ("explore/disagreement", "explore/diversity", "explore/ensemble_loss", "wm/dec"):
                        if key in m:
                            metrics[key] = float(m[key])
            row = {"deployment": d, "versions": versions, "episodes": episodes, "replay_steps": len(replay),
                   "updates": agent.updates if agent else 0, **metrics, "seconds": round(time.time() - start, 1)}
            rows.append(row)
            with (logdir / RESULTS).open("a") as f:
                f.write(json.dumps(row) + "\n")
            if progress:
                print(f"deployment {d + 1}/{xcfg.deployments}: {len(episodes)} episodes, {len(replay)} steps, "
                      f"{row['updates']} updates", flush=True)
        if agent is not None:  # what `reverie-learner adapt --from LOGDIR` starts from
            replay.flush()
            state = agent.state_dict()
            updates = state.pop("updates")
            save_checkpoint(logdir / "checkpoints", len(replay), state,
                            {"updates": updates, "counters": {}, "config": cfg.to_dict()})
    finally:
        replay.close()
        env.close()
    return rows
