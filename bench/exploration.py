"""Reward-free exploration evidence (issue 26, sections 2 and 3), on MountainCarContinuous-v0.

    python bench/exploration.py mountaincar           # Plan2Explore vs random vs plain DreamerV3, 3 seeds
    python bench/exploration.py cascade               # coverage: CASCADE vs population Plan2Explore vs random
    python bench/exploration.py both --quick          # a smoke run of the same code: tiny model, short budgets
    python bench/exploration.py cost                  # seconds per update of each stage, CPU-hours of each case

`--preset cpu` (default) fits 2 CPU cores (hours); `--preset full` is the larger budget, for a GPU.

mountaincar, per seed: (1) a random policy for the budget: the share of its episodes reaching the flag
(x >= 0.45); (2) `reverie-learner train --set dreamer.explore=plan2explore` (reward-free) for the same
budget: the share of the explorer's episodes (after the random prefill) that reach the flag; (3) `reverie-learner
adapt` on that run: the zero-shot task policy's evaluation return (target >= 90, Gymnasium's threshold) with no
further collection; (4) plain DreamerV3 (`dreamer.explore: none`) with the same budget: its final evaluation
return (expected < 90). cascade, per seed: B deployments of N explorers (learner/deployments.py) with alpha 0.1
(CASCADE), alpha 0 (a population of Plan2Explore explorers) and random actions: the coverage of the collected
data after each deployment (the share of a 20 x 20 grid over position x velocity visited), then zero-shot
returns on goals chosen after collection (the flag; the far left x <= -1.1) with `adapt --reward`. `--task
fourrooms` runs the cascade case on MiniGrid's FourRooms (learner/fourrooms.py): coverage of the rooms' cells, goals
the far corner and the top-right corner.

Resumable: each stage writes runs/exploration-<preset>/<case>/seed<N>/<stage>.json when done and is skipped when
that file exists; a train run interrupted mid-way resumes from its checkpoint. Prints one JSON object with the
per-seed figures, the checks and `others_cpu_share`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.learner_throughput import _cpu_ticks, _others_busy  # noqa: E402
from learner import fourrooms  # noqa: E402
from learner.compute import prepare_openmp  # noqa: E402

ENV = "gymnasium:MountainCarContinuous-v0"
FLAG = 0.45  # the goal position of MountainCarContinuous-v0
LEFT = -1.1  # a goal chosen after collection: the far left
GRID = 20
BOUNDS = ((-1.2, 0.6), (-0.07, 0.07))  # position, velocity
THRESHOLD = 90.0

# Presets. `cpu` (the default) is what 2 shared CPU cores finish in hours (bench/README.md has the measured cost;
# `cost` re-measures it): size1m, batch 16 x 64, train ratio 128 (an update every 8 env steps), 20k env steps (~18
# explorer episodes of MountainCar's 999 steps after a 2-episode random prefill). `full` is the original budget
# (50k steps, train ratio 256: ~5x the updates), sized for a GPU. `quick` is a smoke run of the same code.
_CPU_SETS = ["dreamer.size=size1m", "train.batch_size=16", "train.batch_length=64", "dreamer.budget=small",
             "train.log_every=1000"]
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"steps": 20_000, "prefill": 2000, "adapt_updates": 2000, "eval_episodes": 10,
            "sets": [*_CPU_SETS, "train.train_ratio=128", "train.checkpoint_every=2000"],
            "deployments": 5, "population": 4, "deployment_steps": 4000, "deployment_updates": 400},
    "full": {"steps": 50_000, "prefill": 5000, "adapt_updates": 5000, "eval_episodes": 10,
             "sets": [*_CPU_SETS, "train.train_ratio=256", "train.checkpoint_every=5000"],
             "deployments": 5, "population": 4, "deployment_steps": 10_000, "deployment_updates": 2000},
    "quick": {"steps": 1100, "prefill": 1000, "adapt_updates": 5, "eval_episodes": 1,
              "sets": ["dreamer.size=tiny", "train.batch_size=2", "train.batch_length=16", "train.train_ratio=16",
                       "explore.ensemble=3", "train.log_every=500", "train.checkpoint_every=100000"],
              "deployments": 2, "population": 2, "deployment_steps": 1000, "deployment_updates": 3},
}


# --- what the collected data shows
def coverage_cells(obs: np.ndarray) -> set[tuple[int, int]]:
    """The grid cells (position x velocity) that observations (N, 2) fall in."""
    idx = [np.clip(((obs[:, dim] - lo) / (hi - lo) * GRID).astype(int), 0, GRID - 1)
           for dim, (lo, hi) in enumerate(BOUNDS)]
    return set(zip(idx[0].tolist(), idx[1].tolist()))


def replay_steps(replay: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vector obs (N, 2), policy versions (N,), is_first (N,)) of a run's replay, in order."""
    from learner.offline.reader import ReplayDir

    rd = ReplayDir(replay, verify=False)
    obs, versions, firsts = [], [], []
    for path, _ in rd.chunks:
        _, steps, _, ver = rd.read(path, ["vector", "is_first"])
        obs.append(steps["vector"])
        firsts.append(steps["is_first"])
        versions.append(ver)
    return np.concatenate(obs), np.concatenate(versions), np.concatenate(firsts)


def episodes_reaching(obs: np.ndarray, firsts: np.ndarray) -> list[bool]:
    """Per episode (split at is_first): whether it reached the flag."""
    starts = list(np.flatnonzero(firsts)) + [len(obs)]
    return [bool((obs[a:b, 0] >= FLAG).any()) for a, b in zip(starts[:-1], starts[1:]) if b > a]


def goal_left(batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """A goal chosen after collection (`adapt --reward bench.exploration:goal_left`): 1 per step at x <= -1.1."""
    return (np.asarray(batch["vector"])[..., 0] <= LEFT).astype(np.float32)


def goal_flag(batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """The flag as a goal: 1 per step at x >= 0.45."""
    return (np.asarray(batch["vector"])[..., 0] >= FLAG).astype(np.float32)


def mc_coverage(obs: np.ndarray) -> float:
    """MountainCar: the share of the position x velocity grid's cells that observations (N, 2) visited."""
    return len(coverage_cells(obs)) / GRID**2


# The cascade case's tasks: env, coverage of the collected observations, goals chosen after collection (reward
# functions for `adapt --reward`). MountainCar is section 2's task; FourRooms (minigrid) is the issue's sparse
# navigation task for section 3.
TASKS: dict[str, tuple[str, Any, tuple[str, ...]]] = {
    "mountaincar": (ENV, mc_coverage, ("bench.exploration:goal_flag", "bench.exploration:goal_left")),
    "fourrooms": ("gymnasium:" + fourrooms.GYM_ID, fourrooms.room_coverage,
                  ("learner.fourrooms:goal_far", "learner.fourrooms:goal_top_right")),
}


# --- stages
def stage(path: Path, fn: Any) -> dict[str, Any]:
    """Run `fn` once: its result is kept in `path` and read back on later runs."""
    if path.is_file():
        return json.loads(path.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    result = {**fn(), "seconds": round(time.time() - start, 1)}
    path.write_text(json.dumps(result, indent=1))
    return result


def _sets(p: dict[str, Any], seed: int, *extra: str) -> list[str]:
    return [x for s in [*p["sets"], f"seed={seed}", "dreamer.threads=1", *extra] for x in ("--set", s)]


def random_policy(p: dict[str, Any], seed: int) -> dict[str, Any]:
    from core.config import config_from_dict
    from learner.envs import Env

    cfg = config_from_dict({"name": "mc", "backend": "gym", "gym_id": ENV.split(":")[1], "seed": seed}, "bench")
    env, rng = Env(cfg, seed=seed), np.random.default_rng(seed)
    obs_all, firsts, done = [], [], 0
    while done < p["steps"]:
        obs = env.reset()
        while True:
            obs_all.append(obs["vector"])
            firsts.append(obs["is_first"])
            done += 1
            if obs["is_last"]:
                break
            obs = env.step(env.random_action(rng))
    env.close()
    obs_arr = np.stack(obs_all)
    reached = episodes_reaching(obs_arr, np.asarray(firsts))
    return {"episodes": len(reached), "flag_share": float(np.mean(reached)),
            "coverage": len(coverage_cells(obs_arr)) / GRID**2}


def explore_run(p: dict[str, Any], seed: int, logdir: Path) -> dict[str, Any]:
    from learner.cli import main as learner_main

    with contextlib.redirect_stdout(sys.stderr):
        code = learner_main(["train", "--env", ENV, "--logdir", str(logdir), "--quiet",
                             *_sets(p, seed, "dreamer.explore=plan2explore", f"train.steps={p['steps']}",
                                    f"train.prefill={p['prefill']}", "train.eval_every=0")])
    if code:
        raise RuntimeError(f"explore run failed ({code})")
    obs, versions, firsts = replay_steps(logdir / "replay")
    explorer = versions > 0  # the prefill acted as version 0 (random)
    reached = episodes_reaching(obs[explorer], firsts[explorer]) if explorer.any() else []
    summary = json.loads((logdir / "summary.json").read_text())
    return {"episodes": len(reached), "flag_share": float(np.mean(reached)) if reached else 0.0,
            "coverage": len(coverage_cells(obs)) / GRID**2, "updates": summary["updates"],
            "train_seconds": summary["seconds"]}


def adapt(p: dict[str, Any], source: Path, logdir: Path, reward: str | None = None) -> dict[str, Any]:
    from learner.agents.dreamer.adapt import adapt_run

    summary = adapt_run(source, logdir, p["adapt_updates"], [], reward, p["eval_episodes"], progress=False)
    keys = ("eval/return", "eval/return_mode", "eval/goal_return", "eval/goal_return_mode", "adapt_updates")
    return {k: summary[k] for k in keys if k in summary}


def plain_run(p: dict[str, Any], seed: int, logdir: Path) -> dict[str, Any]:
    from learner.cli import main as learner_main

    with contextlib.redirect_stdout(sys.stderr):
        code = learner_main(["train", "--env", ENV, "--logdir", str(logdir), "--quiet",
                             *_sets(p, seed, f"train.steps={p['steps']}", f"train.prefill={p['prefill']}",
                                    f"train.eval_every={p['steps']}", f"train.eval_episodes={p['eval_episodes']}")])
    if code:
        raise RuntimeError(f"plain run failed ({code})")
    summary = json.loads((logdir / "summary.json").read_text())
    return {"eval/return": summary["final_eval_return"], "updates": summary["updates"]}


def mountaincar(p: dict[str, Any], seed: int, out: Path) -> dict[str, Any]:
    d = out / "mountaincar" / f"seed{seed}"
    rnd = stage(d / "random.json", lambda: random_policy(p, seed))
    expl = stage(d / "explore.json", lambda: explore_run(p, seed, d / "explore"))
    zero = stage(d / "zero_shot.json", lambda: adapt(p, d / "explore", d / "zero_shot"))
    plain = stage(d / "plain.json", lambda: plain_run(p, seed, d / "plain"))
    return {"random": rnd, "plan2explore": expl, "zero_shot": zero, "plain_dreamerv3": plain}


def deployments(p: dict[str, Any], seed: int, logdir: Path, alpha: float | None,
                task: str = "mountaincar") -> dict[str, Any]:
    """B deployments with CASCADE (alpha), or random actions (None); coverage after each deployment."""
    from core.config import apply_overrides, config_from_dict, parse_overrides
    from learner.deployments import run_deployments, version_member

    env, coverage, _ = TASKS[task]
    raw: dict[str, Any] = {"name": task, "backend": "gym", "gym_id": env.split(":", 1)[1], "seed": seed}
    apply_overrides(raw, parse_overrides([*p["sets"], "dreamer.threads=1", "dreamer.explore=cascade",
                                          f"explore.alpha={alpha or 0.0}", f"explore.population={p['population']}",
                                          f"explore.deployments={p['deployments']}",
                                          f"explore.deployment_steps={p['deployment_steps']}",
                                          f"explore.deployment_updates={p['deployment_updates']}"]))
    cfg = config_from_dict(raw, "bench")
    if not (logdir / "deployments.jsonl").is_file():
        run_deployments(cfg, logdir, random=alpha is None, progress=False)
    obs, versions, _ = replay_steps(logdir / "replay")
    deployment = np.array([version_member(int(v), p["population"])[0] for v in versions])
    return {"coverage": [coverage(obs[(deployment >= 0) & (deployment <= b)]) for b in range(p["deployments"])]}


def cascade(p: dict[str, Any], seed: int, out: Path, task: str = "mountaincar") -> dict[str, Any]:
    d = out / ("cascade" if task == "mountaincar" else f"cascade-{task}") / f"seed{seed}"
    res: dict[str, Any] = {}
    for name, alpha in (("cascade", 0.1), ("population_p2e", 0.0), ("random", None)):
        res[name] = stage(d / f"{name}.json", lambda a=alpha, n=name: deployments(p, seed, d / n, a, task))
    for name in ("cascade", "population_p2e"):
        for reward in TASKS[task][2]:
            goal = reward.split(":")[1]
            res[name][goal] = stage(d / f"{name}_{goal}.json", lambda n=name, g=goal, r=reward: adapt(
                p, d / n, d / f"{n}_{g}", r))["eval/goal_return"]
    return res


# --- what a preset costs
def _synthetic_batch(space: Mapping[str, tuple[tuple[int, ...], str]], act: Any, b: int, t: int) -> dict[str, Any]:
    """A replay-shaped batch (B, T, ...) of random values: an update's cost does not depend on them."""
    rng = np.random.default_rng(0)
    flags = ("reward", "is_first", "is_last", "is_terminal")
    batch: dict[str, Any] = {k: rng.normal(size=(b, t, *shape)).astype(np.float32)
                             for k, (shape, _) in space.items() if k not in flags}
    batch["reward"] = np.zeros((b, t), np.float32)
    batch["is_first"] = np.zeros((b, t), bool)
    batch["is_first"][:, 0] = True
    batch["is_last"] = np.zeros((b, t), bool)
    batch["is_terminal"] = np.zeros((b, t), bool)
    batch["action"] = np.stack([act.random(rng) for _ in range(b * t)]).reshape(b, t, -1).astype(np.float32)
    return batch


def _timed(step: Any, updates: int) -> dict[str, float]:
    """CPU and wall seconds per call of `step` after one untimed call (cell compilation, allocator warm-up)."""
    step()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(updates):
        step()
    return {"cpu_s": round((time.process_time() - cpu) / updates, 3),
            "wall_s": round((time.perf_counter() - wall) / updates, 3)}


def update_cost(p: dict[str, Any], updates: int, task: str = "mountaincar") -> dict[str, Any]:
    """Seconds per update of each learner the preset's stages run (one thread, as the runs use), measured on
    replay-shaped batches, and the CPU-hours of each case for 3 seeds at those figures (acting not counted)."""
    import torch

    from core.config import apply_overrides, config_from_dict, parse_overrides
    from learner.agents.dreamer.adapt import Adapter
    from learner.agents.dreamer.agent import Dreamer
    from learner.compute import configure_compute
    from learner.envs import Env

    def agent(*extra: str) -> tuple[Any, Any, dict[str, Any]]:
        raw: dict[str, Any] = {"name": task, "backend": "gym", "gym_id": TASKS[task][0].split(":", 1)[1], "seed": 0}
        apply_overrides(raw, parse_overrides([*p["sets"], "dreamer.threads=1", *extra]))
        cfg = config_from_dict(raw, "bench")
        configure_compute(cfg.dreamer)
        env = Env(cfg, seed=0)
        space, act = env.obs_space, env.act_space
        env.close()
        torch.manual_seed(0)
        dreamer = Dreamer.from_config(cfg, space, act)
        return cfg, dreamer, _synthetic_batch(space, act, cfg.train.batch_size, cfg.train.batch_length)

    per: dict[str, dict[str, float]] = {}
    cfg, explorer, batch = agent("dreamer.explore=plan2explore")
    per["plan2explore"] = _timed(lambda: explorer.train(batch), updates)
    adapter = Adapter(explorer)
    per["adapt"] = _timed(lambda: adapter.step(batch), updates)
    _, plain, batch = agent("dreamer.explore=none")
    per["plain"] = _timed(lambda: plain.train(batch), updates)
    _, population, batch = agent("dreamer.explore=cascade", f"explore.population={p['population']}")
    per["cascade"] = _timed(lambda: population.train(batch), updates)
    rows = cfg.train.batch_size * cfg.train.batch_length
    run_updates = (p["steps"] - p["prefill"]) * cfg.train.train_ratio / rows
    counts = {"mountaincar": {"plan2explore": run_updates, "plain": run_updates, "adapt": p["adapt_updates"]},
              "cascade": {"cascade": 2 * p["deployments"] * p["deployment_updates"], "adapt": 4 * p["adapt_updates"]}}
    hours = {case: round(3 * sum(n * per[k]["cpu_s"] for k, n in c.items()) / 3600, 1) for case, c in counts.items()}
    return {"per_update": per, "updates_per_seed": counts, "cpu_hours_3_seeds": hours}


def checks(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    mc = results.get("mountaincar")
    if mc:
        out["explorer_reaches_flag"] = all(s["plan2explore"]["flag_share"] > 0 for s in mc.values())
        out["random_never_reaches_flag"] = all(s["random"]["flag_share"] == 0 for s in mc.values())
        out["zero_shot_at_least_90"] = all(s["zero_shot"]["eval/return"] >= THRESHOLD for s in mc.values())
        out["plain_dreamerv3_below_90"] = all((s["plain_dreamerv3"]["eval/return"] or 0) < THRESHOLD
                                              for s in mc.values())
    cs = results.get("cascade")
    if cs:
        final = {k: np.mean([s[k]["coverage"][-1] for s in cs.values()]) for k in ("cascade", "population_p2e",
                                                                                    "random")}
        out["coverage_final_mean"] = {k: float(v) for k, v in final.items()}
        out["coverage_cascade_ge_p2e_ge_random"] = bool(final["cascade"] >= final["population_p2e"] >= final["random"])
    return out


def main(argv: list[str] | None = None) -> int:
    prepare_openmp()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("case", choices=("mountaincar", "cascade", "both", "cost"),
                        help="cost: seconds per update of each stage's learner at the preset, and the cases' CPU-hours")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="budgets and model (default: cpu)")
    parser.add_argument("--quick", action="store_true", help="the quick preset: a smoke run, tiny model, one seed")
    parser.add_argument("--task", choices=sorted(TASKS), default="mountaincar",
                        help="the cascade case's (and cost's) task: MountainCar, or MiniGrid FourRooms")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2; quick: 0)")
    parser.add_argument("--updates", type=int, default=3, help="cost: updates timed per learner (after one untimed)")
    parser.add_argument("--runs", default=str(ROOT / "runs"), help="where runs/exploration-<preset>/ lives")
    args = parser.parse_args(argv)
    preset = "quick" if args.quick else args.preset
    p = PRESETS[preset]
    before, start = _cpu_ticks(), time.time()
    if args.case == "cost":
        print(json.dumps({"preset": preset, "task": args.task, "settings": p, **update_cost(p, args.updates, args.task),
                          "others_cpu_share": _others_busy(before, _cpu_ticks())}, indent=1))
        return 0
    seeds = args.seeds or ([0] if preset == "quick" else [0, 1, 2])
    out = Path(args.runs) / f"exploration-{preset}"
    results: dict[str, Any] = {}
    if args.case in ("mountaincar", "both"):
        results["mountaincar"] = {f"seed{s}": mountaincar(p, s, out) for s in seeds}
    if args.case in ("cascade", "both"):
        results["cascade"] = {f"seed{s}": cascade(p, s, out, args.task) for s in seeds}
    print(json.dumps({"preset": preset, "task": args.task, "settings": p, "results": results, "checks": checks(results),
                      "seconds": round(time.time() - start, 1), "others_cpu_share": _others_busy(before, _cpu_ticks())},
                     indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
