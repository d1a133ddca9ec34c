"""Reward-free exploration evidence (issue 26, sections 2 and 3), on MountainCarContinuous-v0.

    python bench/exploration.py mountaincar           # Plan2Explore vs random vs plain DreamerV3, 3 seeds
    python bench/exploration.py cascade               # coverage: CASCADE vs population Plan2Explore vs random
    python bench/exploration.py both --quick          # a smoke run of the same code: tiny model, short budgets

mountaincar, per seed: (1) a random policy for the budget: the share of its episodes reaching the flag
(x >= 0.45); (2) `reverie-learner train --set dreamer.explore=plan2explore` (reward-free) for the same
budget: the share of the explorer's episodes (after the random prefill) that reach the flag; (3) `reverie-learner
adapt` on that run: the zero-shot task policy's evaluation return (target >= 90, Gymnasium's threshold) with no
further collection; (4) plain DreamerV3 (`dreamer.explore: none`) with the same budget: its final evaluation
return (expected < 90). cascade, per seed: B deployments of N explorers (learner/deployments.py) with alpha 0.1
(CASCADE), alpha 0 (a population of Plan2Explore explorers) and random actions: the coverage of the collected
data after each deployment (the share of a 20 x 20 grid over position x velocity visited), then zero-shot
returns on goals chosen after collection (the flag; the far left x <= -1.1) with `adapt --reward`.

Resumable: each stage writes runs/exploration[-quick]/<case>/seed<N>/<stage>.json when done and is skipped when
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
from learner.compute import prepare_openmp  # noqa: E402

ENV = "gymnasium:MountainCarContinuous-v0"
FLAG = 0.45  # the goal position of MountainCarContinuous-v0
LEFT = -1.1  # a goal chosen after collection: the far left
GRID = 20
BOUNDS = ((-1.2, 0.6), (-0.07, 0.07))  # position, velocity
THRESHOLD = 90.0

FULL = {"steps": 50_000, "prefill": 5000, "adapt_updates": 5000, "eval_episodes": 10,
        "sets": ["dreamer.size=size1m", "train.batch_size=16", "train.batch_length=64", "train.train_ratio=256",
                 "dreamer.budget=small", "train.log_every=2000", "train.checkpoint_every=5000"],
        "deployments": 5, "population": 4, "deployment_steps": 10_000, "deployment_updates": 2000}
QUICK = {"steps": 1100, "prefill": 1000, "adapt_updates": 5, "eval_episodes": 1,
         "sets": ["dreamer.size=tiny", "train.batch_size=2", "train.batch_length=16", "train.train_ratio=16",
                  "explore.ensemble=3", "train.log_every=500", "train.checkpoint_every=100000"],
         "deployments": 2, "population": 2, "deployment_steps": 1000, "deployment_updates": 3}


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


def deployments(p: dict[str, Any], seed: int, logdir: Path, alpha: float | None) -> dict[str, Any]:
    """B deployments with CASCADE (alpha), or random actions (None); coverage after each deployment."""
    from core.config import apply_overrides, config_from_dict, parse_overrides
    from learner.deployments import run_deployments, version_member

    raw: dict[str, Any] = {"name": "mc", "backend": "gym", "gym_id": ENV.split(":")[1], "seed": seed}
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
    curve, cells = [], set()
    for b in range(p["deployments"]):
        cells |= coverage_cells(obs[deployment == b])
        curve.append(len(cells) / GRID**2)
    return {"coverage": curve}


def cascade(p: dict[str, Any], seed: int, out: Path) -> dict[str, Any]:
    d = out / "cascade" / f"seed{seed}"
    res: dict[str, Any] = {}
    for name, alpha in (("cascade", 0.1), ("population_p2e", 0.0), ("random", None)):
        res[name] = stage(d / f"{name}.json", lambda a=alpha, n=name: deployments(p, seed, d / n, a))
    for name in ("cascade", "population_p2e"):
        for goal in ("goal_flag", "goal_left"):
            res[name][goal] = stage(d / f"{name}_{goal}.json", lambda n=name, g=goal: adapt(
                p, d / n, d / f"{n}_{g}", f"bench.exploration:{g}"))["eval/goal_return"]
    return res


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
    parser.add_argument("case", choices=("mountaincar", "cascade", "both"))
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, short budgets, one seed")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2; quick: 0)")
    parser.add_argument("--runs", default=str(ROOT / "runs"), help="where runs/exploration[-quick]/ lives")
    args = parser.parse_args(argv)
    p = QUICK if args.quick else FULL
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    out = Path(args.runs) / ("exploration-quick" if args.quick else "exploration")
    before, start = _cpu_ticks(), time.time()
    results: dict[str, Any] = {}
    for case, fn in (("mountaincar", mountaincar), ("cascade", cascade)):
        if args.case in (case, "both"):
            results[case] = {f"seed{s}": fn(p, s, out) for s in seeds}
    print(json.dumps({"quick": args.quick, "settings": p, "results": results, "checks": checks(results),
                      "seconds": round(time.time() - start, 1), "others_cpu_share": _others_busy(before, _cpu_ticks())},
                     indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
