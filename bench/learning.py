"""The learning benchmark: does Dreamer learn what DreamerV3 learns, on tasks a reader can check?

Each named case is a task config (with the train ratio, prefill and model it learns with, so that
`reverie-learner train --config X` learns with no flags), a step budget, seeds and a target. Every
(case, seed) is one `reverie-learner train` run in its own directory, `ROOT/<case>/seed<k>`; running
the benchmark again resumes each run from its newest checkpoint, so a budget longer than a sitting
is reached over several. The report reads what the runs logged (metrics.jsonl) and writes:

- `ROOT/learning.json`: per case and seed, the evaluation curve (mean return of the sampled and
  the mode action, success rate where the task has one) against env steps and updates, the random
  policy's return, where the target was first met;
- `ROOT/learning.md`: the table (case, target, result, the measured figures);
- `ROOT/learning.png`: every case's curves, mean over seeds with the min-max spread, against env
  steps and against updates, with the random policy and the target as lines.

    python bench/learning.py --list
    python bench/learning.py pendulum_2024 --seeds 0 1 2 --jobs 2     # run (or resume), then report
    python bench/learning.py --report                                 # report only, from what exists

Prints progress lines while it runs and the summary as JSON at the end. Timings depend on the
host: each run's `summary.json` keeps its wall-clock seconds, and the report quotes the machine's
others' CPU share measured while the runs went.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIGS = ROOT / "hardware_configs"


@dataclass(frozen=True)
class Target:
    """`metric` (an evaluation mean over seeds' runs) must reach `threshold` within `within` env steps."""

    metric: str
    threshold: float
    within: int
    text: str
    floor_after: float | None = None  # and no evaluation after the first success below this
    smooth_rows: int = 1  # trailing mean over this many logged rows (train/* rows average a few episodes)

    def met_at(self, curve: list[tuple[int, float]]) -> int | None:
        """The first env step at which a seed's curve reaches the threshold within the budget."""
        for step, value in curve:
            if step <= self.within and value >= self.threshold:
                return step
        return None

    def holds_after(self, curve: list[tuple[int, float]], first: int) -> bool:
        return self.floor_after is None or all(v >= self.floor_after for s, v in curve if s >= first)


@dataclass(frozen=True)
class Case:
    config: str
    steps: int
    target: Target
    sets: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0, 1, 2)
    note: str = ""
    runs_of: str | None = None  # read another case's runs (the same run, another target) instead of running

    def args(self, seed: int) -> list[str]:
        out = ["--config", str(CONFIGS / self.config), "--set", f"seed={seed}", "--set", f"train.steps={self.steps}"]
        for item in self.sets:
            out += ["--set", item]
        return out


PENDULUM_TARGET = Target("eval/return", -200.0, 10_000, ">= -200 within 10k env steps, every seed")
CASES: dict[str, Case] = {
    "pendulum_2024": Case("gym_pendulum.yaml", 10_000, PENDULUM_TARGET,
                          note="2024 recipe (default), size1m, the small-budget preset"),
    "pendulum_2024_faithful": Case("gym_pendulum.yaml", 10_000, PENDULUM_TARGET, sets=("dreamer.budget=faithful",),
                                   note="2024 recipe with the official optimiser settings (lr 4e-5, warm-up 1000)"),
    "pendulum_2023": Case("gym_pendulum.yaml", 10_000,
                          Target("eval/return", -200.0, 10_000,
                                 ">= -200 within 10k, every seed; never below -300 after", floor_after=-300.0),
                          sets=("dreamer.recipe=2023",), note="2023 recipe, size1m"),
    "arm_reach_proprio": Case("sim_arm_reach_state.yaml", 10_000,
                              Target("eval/success", 0.9, 10_000, "success rate >= 90 % within 10k env steps"),
                              note="random targets, proprioception + the target's position"),
    "arm_reach_pixels": Case("sim_arm_reach.yaml", 30_000,
                             Target("eval/success", 0.8, 30_000, "success rate >= 80 % within 30k env steps"),
                             note="random targets, 64x64 pixels + proprioception"),
    # 1000-step log rows hold 4 of the 250-step episodes: 3 rows are the last ~10 episodes.
    "quadruped_walk": Case("sim_quadruped_walk.yaml", 100_000,
                           Target("train/reward_per_step", 4.5, 100_000, "walks: reward/step >= 4.5 (last ~10 "
                                  "episodes) within 100k", smooth_rows=3), sets=("camera.enabled=false",),
                           note="from its back, reset-free, proprioception"),
    "quadruped_stand": Case("sim_quadruped_walk.yaml", 100_000,
                            Target("train/reward_per_step", 3.5, 50_000, "stands: reward/step >= 3.5 (last ~10 "
                                   "episodes) within 50k", smooth_rows=3), sets=("camera.enabled=false",),
                            note="the quadruped_walk runs, first 50k steps", runs_of="quadruped_walk"),
    # Issue 27 s1: the transformer world model (dreamer.dynamics: transformer, 2 x 512 x 8 heads, context 64).
    "pendulum_transformer": Case("gym_pendulum.yaml", 20_000,
                                 Target("eval/return", -200.0, 20_000, ">= -200 within 20k env steps, every seed"),
                                 sets=("dreamer.dynamics=transformer",),
                                 note="2024 recipe, size1m heads and latents, the default transformer in place of "
                                 "the GRU (STORM-like)"),
    # Issue 25: PlaNet plans with CEM in its learned latent space (agent: planet, no actor).
    "planet_pendulum": Case("gym_pendulum_planet.yaml", 30_000,
                            Target("eval/return", -200.0, 30_000, ">= -200 within 30k env steps, every seed"),
                            note="PlaNet, official model and loss, action repeat 2; CEM cut for CPUs: 100 "
                            "candidates, top 10, 5 iterations (official 1000, 100, 10), horizon 12"),
    # Issue 26 s1: Dreamer v1 and DreamerV2 as recipes of the same learner, at their own dimensions (the
    # config file names size1m, so they are set back here), batches and train ratios (v1: 100 updates of
    # 50 x 50 per 1000 steps; v2: one update of 16 x 50 per 5 steps).
    "pendulum_v1": Case("gym_pendulum.yaml", 20_000,
                        Target("eval/return", -200.0, 20_000, ">= -200 within 20k env steps, every seed"),
                        sets=("dreamer.recipe=v1", "dreamer.deter=200", "dreamer.hidden=200", "dreamer.stoch=30",
                              "dreamer.units=400", "train.batch_size=50", "train.batch_length=50",
                              "train.train_ratio=250"),
                        note="Dreamer v1: Gaussian RSSM 30/200, ELU 400, free nats 3 after averaging, Adam 6e-4 / "
                        "8e-5, tanh-normal actor by dynamics backprop, noise 0.3"),
    "pendulum_v2": Case("gym_pendulum.yaml", 20_000,
                        Target("eval/return", -200.0, 20_000, ">= -200 within 20k env steps, every seed"),
                        sets=("dreamer.recipe=v2", "dreamer.deter=200", "dreamer.hidden=200", "dreamer.stoch=32",
                              "dreamer.classes=32", "dreamer.units=400", "train.batch_size=16",
                              "train.batch_length=50", "train.train_ratio=160"),
                        note="DreamerV2 (dmc domain): 32 x 32 categoricals, KL balance 0.8, free nats 1, dynamics "
                        "backprop, entropy 1e-4, slow critic copied every 100 updates"),
}


# --------------------------------------------------------------------------------------------- running
def run_dir(root: Path, case: str, seed: int) -> Path:
    return root / (CASES[case].runs_of or case) / f"seed{seed}"


def _command(case: Case, seed: int, logdir: Path) -> list[str]:
    return [sys.executable, "-m", "learner.cli", "train", "--logdir", str(logdir), "--quiet", *case.args(seed)]


def run_cases(names: Sequence[str], seeds: Sequence[int] | None, root: Path, jobs: int) -> None:
    """Run (or resume) every (case, seed) not finished yet, `jobs` at a time, each in its own process."""
    names = list(dict.fromkeys(CASES[n].runs_of or n for n in names))  # a case reading another's runs runs those
    todo = [(n, s) for n in names for s in (seeds or CASES[n].seeds) if not _finished(CASES[n], run_dir(root, n, s))]
    running: list[tuple[str, int, subprocess.Popen, Any]] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    while todo or running:
        while todo and len(running) < jobs:
            name, seed = todo.pop(0)
            logdir = run_dir(root, name, seed)
            logdir.mkdir(parents=True, exist_ok=True)
            log = open(logdir / "bench.log", "a")  # noqa: SIM115 (closed when the run ends)
            proc = subprocess.Popen(_command(CASES[name], seed, logdir), cwd=ROOT, stdout=log, stderr=log, env=env)
            running.append((name, seed, proc, log))
            print(f"[learning] started {name} seed {seed} -> {logdir}", flush=True)
        time.sleep(5)
        for item in list(running):
            name, seed, proc, log = item
            if proc.poll() is None:
                continue
            log.close()
            running.remove(item)
            progress = _progress(run_dir(root, name, seed))
            print(f"[learning] {name} seed {seed} ended (exit {proc.returncode}); {progress}", flush=True)


def _finished(case: Case, logdir: Path) -> bool:
    summary = logdir / "summary.json"
    if not summary.is_file():
        return False
    try:
        return json.loads(summary.read_text()).get("env_steps", 0) >= case.steps
    except (OSError, ValueError):
        return False


def _progress(logdir: Path) -> str:
    rows = _rows(logdir)
    evals = [r for r in rows if "eval/return" in r]
    if not evals:
        return "no evaluation yet"
    last = evals[-1]
    return f"last evaluation at {int(last['step'])} steps: return {last['eval/return']:.1f}"


# --------------------------------------------------------------------------------------------- report
def _rows(logdir: Path) -> list[dict[str, Any]]:
    path = logdir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a kill
    return rows


def _curve(rows: list[dict], key: str, x: str = "step") -> list[tuple[int, float]]:
    """(x, value) sorted by x, the last value of a repeated x (a resumed run re-logs)."""
    points = {int(r[x]): float(r[key]) for r in rows if key in r and x in r and _finite(r[key])}
    return sorted(points.items())


def _smoothed(curve: list[tuple[int, float]], rows: int) -> list[tuple[int, float]]:
    """Trailing mean over `rows` points (the first points average what exists so far)."""
    if rows <= 1:
        return curve
    return [(s, sum(v for _, v in curve[max(0, i - rows + 1) : i + 1]) / (i + 1 - max(0, i - rows + 1)))
            for i, (s, _) in enumerate(curve)]


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def _updates_at(rows: list[dict]) -> dict[int, int]:
    """env step -> updates done by then (from the periodic log rows)."""
    return {int(r["step"]): int(r["updates"]) for r in rows if "updates" in r and "step" in r}


def _at_updates(curve: list[tuple[int, float]], updates: dict[int, int]) -> list[tuple[int, float]]:
    steps = sorted(updates)
    out = []
    for step, value in curve:
        before = [s for s in steps if s <= step]
        if before:
            out.append((updates[before[-1]], value))
    return out


def seed_report(case: Case, logdir: Path) -> dict[str, Any]:
    rows = _rows(logdir)
    metric = case.target.metric
    curve = _smoothed(_curve(rows, metric), case.target.smooth_rows)
    first = case.target.met_at(curve)
    summary = json.loads((logdir / "summary.json").read_text()) if (logdir / "summary.json").is_file() else {}
    random = [float(r["random/return"]) for r in rows if _finite(r.get("random/return"))]
    return {
        "env_steps": max([s for s, _ in _curve(rows, "updates")] + [0]),
        "updates": max([int(r["updates"]) for r in rows if "updates" in r] + [0]),
        "curves": {**{k: _curve(rows, k) for k in ("eval/return", "eval/return_mode", "eval/success",
                                                    "train/return", "train/reward_per_step") if _curve(rows, k)},
                   metric: curve},
        "curve_updates": _at_updates(curve, _updates_at(rows)),
        "random_return": random[-1] if random else None,
        "target_met_at": first,
        "holds_after": None if first is None else case.target.holds_after(curve, first),
        "seconds": summary.get("seconds"),
        "finished": _finished(case, logdir),
    }


def case_report(name: str, root: Path) -> dict[str, Any]:
    case = CASES[name]
    seeds = {s: seed_report(case, run_dir(root, name, s)) for s in case.seeds if run_dir(root, name, s).is_dir()}
    met = [r["target_met_at"] is not None and r["holds_after"] is not False for r in seeds.values()]
    metric = case.target.metric
    finals = [r["curves"][metric][-1][1] for r in seeds.values() if metric in r["curves"]]
    bests = [max(v for _, v in r["curves"][metric]) for r in seeds.values() if metric in r["curves"]]
    randoms = [r["random_return"] for r in seeds.values() if r["random_return"] is not None]
    return {
        "case": name, "config": case.config, "sets": list(case.sets), "note": case.note, "budget": case.steps,
        "target": case.target.text, "metric": metric, "seeds": seeds,
        "seeds_met": sum(met), "seeds_run": len(seeds),
        "met": len(seeds) == len(case.seeds) and all(met),
        "final_mean": _mean(finals), "final_min": min(finals, default=None), "best_mean": _mean(bests),
        "random_return": _mean(randoms),
    }


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def markdown(reports: list[dict[str, Any]]) -> str:
    lines = ["| case | target | seeds met / run | final (mean, worst seed) | best (mean) | random | env steps "
             "| result |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in reports:
        steps = ", ".join(str(s["env_steps"]) for s in r["seeds"].values()) or "-"
        result = "met" if r["met"] else ("not run" if not r["seeds_run"] else "not met (yet)")
        lines.append(f"| `{r['case']}` ({r['note']}) | {r['target']} | {r['seeds_met']} / {r['seeds_run']} | "
                     f"{_fmt(r['final_mean'])}, {_fmt(r['final_min'])} | {_fmt(r['best_mean'])} | "
                     f"{_fmt(r['random_return'])} | {steps} | {result} |")
    return "\n".join(lines) + "\n"


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}" if abs(v) < 10 else f"{v:.0f}"


def plot(reports: list[dict[str, Any]], path: Path) -> None:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = [r for r in reports if r["seeds_run"]]
    if not shown:
        return
    fig = Figure(figsize=(11, 3.2 * len(shown)))
    FigureCanvasAgg(fig)
    for i, r in enumerate(shown):
        metric = r["metric"]
        for j, (x_key, title) in enumerate((("steps", "env steps"), ("updates", "updates"))):
            ax = fig.add_subplot(len(shown), 2, 2 * i + j + 1)
            curves = [s["curves"].get(metric, []) if x_key == "steps" else s["curve_updates"]
                      for s in r["seeds"].values()]
            curves = [c for c in curves if c]
            for c in curves:
                ax.plot([p[0] for p in c], [p[1] for p in c], color="tab:blue", alpha=0.25, lw=1)
            if curves:
                grid = sorted({p[0] for c in curves for p in c})
                values = np.array([[np.interp(g, [p[0] for p in c], [p[1] for p in c], right=np.nan) for g in grid]
                                   for c in curves])
                mean = np.nanmean(values, 0)
                ax.plot(grid, mean, color="tab:blue", lw=2, label=f"mean of {len(curves)} seeds")
                ax.fill_between(grid, np.nanmin(values, 0), np.nanmax(values, 0), color="tab:blue", alpha=0.15,
                                label="min-max")
            if metric == "eval/return" and r["random_return"] is not None:
                ax.axhline(r["random_return"], color="gray", ls=":", label="random policy")
            threshold = CASES[r["case"]].target.threshold
            ax.axhline(threshold, color="tab:green", ls="--", label="target")
            ax.set_title(f"{r['case']}: {metric}", fontsize=9)
            ax.set_xlabel(title)
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


def report(names: Sequence[str], root: Path) -> dict[str, Any]:
    reports = [case_report(n, root) for n in names]
    root.mkdir(parents=True, exist_ok=True)
    (root / "learning.json").write_text(json.dumps(reports, indent=1))
    (root / "learning.md").write_text(markdown(reports))
    plot(reports, root / "learning.png")
    return {"root": str(root), "cases": {r["case"]: {k: r[k] for k in ("met", "seeds_met", "seeds_run",
                                                                          "final_mean", "best_mean", "random_return")}
                                         for r in reports}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cases", nargs="*", help=f"cases to run (default: all): {', '.join(CASES)}")
    ap.add_argument("--seeds", type=int, nargs="+", help="seeds to run (default: each case's)")
    ap.add_argument("--root", type=Path, default=ROOT / "runs" / "learning")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (each sets its own threads)")
    ap.add_argument("--report", action="store_true", help="only write the report from existing runs")
    ap.add_argument("--list", action="store_true", help="list the cases and their targets")
    args = ap.parse_args(argv)
    unknown = [n for n in args.cases if n not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    names = args.cases or list(CASES)
    if args.list:
        for name in names:
            case = CASES[name]
            print(f"{name}: {case.config} {' '.join(case.sets)} -- {case.steps} steps, seeds {list(case.seeds)}; "
                  f"target {case.target.text}")
        return 0
    if not args.report:
        run_cases(names, args.seeds, args.root, args.jobs)
    print(json.dumps(report(names, args.root)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
