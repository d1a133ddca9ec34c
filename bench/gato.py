"""Gato evidence (issue 27, section 2): one model reaches >= 90 % of the scripted expert on each task, and the
prompt selects the task.

    python bench/gato.py            # record the suite, train (or resume) the model, evaluate every task
    python bench/gato.py --quick    # a few-minute smoke run of the same code: tiny model, few episodes
    python bench/gato.py --episodes 200 --set updates=20000 --set layers=4

Resumable: each task directory in runs/gato[-quick]/data/ is recorded once (an existing one is reused), the
run in runs/gato[-quick]/run/ resumes from its newest checkpoint. Evaluation: per task, episodes prompted with
its best recorded episode (the score: (return - random) / (expert - random), Gato's normalisation) and
unprompted; and the prompt check on one body with two tasks (reach_fixed_a, reach_fixed_b: the target is
fixed and unobserved): reach_fixed_b's episodes prompted with b's demonstration, then with a's. Prints one
JSON object with `others_cpu_share` (the share of the CPU other processes used while it ran).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.learner_throughput import _cpu_ticks, _others_busy  # noqa: E402
from learner.compute import prepare_openmp  # noqa: E402

TARGET = 0.9  # the score each task must reach
QUICK = ["layers=1", "width=64", "heads=4", "context=512", "prompt_tokens=192", "patch_channels=8", "batch_size=8",
         "updates=30", "log_every=10", "checkpoint_every=30", "warmup=5", "threads=1", "eval_episodes=1"]
QUICK_EPISODES = 2
PAIR = ("reach_fixed_a", "reach_fixed_b")


def record_suite(data: Path, episodes: int) -> dict[str, float]:
    """Record every suite task that data/ lacks; seconds per task recorded now."""
    from learner.gato.experts import SUITE, TASK_FILE, record

    seconds = {}
    for name, task in SUITE.items():
        if (data / name / TASK_FILE).exists():
            continue
        start = time.time()
        record(task.load(), data / name, episodes, random_episodes=max(2, min(10, episodes)))
        seconds[name] = time.time() - start
    return seconds


def evaluate_all(run: Any, episodes: int) -> dict[str, Any]:
    from learner.gato.evaluate import evaluate

    tasks = {t.name: t for t in run.tasks}
    out: dict[str, Any] = {}
    for name, task in tasks.items():
        prompted = evaluate(run.net, run.cfg, task, episodes)
        unprompted = _unprompted(run, task, episodes)
        out[name] = {k: prompted[k] for k in ("return", "expert_return", "random_return", "score", "success")}
        out[name]["score_unprompted"] = unprompted
    a, b = (tasks[n] for n in PAIR)
    own = evaluate(run.net, run.cfg, b, episodes)
    other = evaluate(run.net, run.cfg, b, episodes, prompt_from=a)
    out["prompt_check"] = {"task": b.name, "score_prompted_with_own": own["score"],
                           "score_prompted_with_" + a.name: other["score"],
                           "success_own": own["success"], "success_other": other["success"]}
    return out


def _unprompted(run: Any, task: Any, episodes: int) -> float | None:
    """The task's score with no prompt at all (what the body and the episode's history alone give)."""
    from learner.gato.evaluate import evaluate

    return evaluate(run.net, run.cfg.model_copy(update={"prompt_tokens": 0}), task, episodes)["score"]


def main(argv: list[str] | None = None) -> int:
    prepare_openmp()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, few episodes and updates")
    parser.add_argument("--episodes", type=int, help="expert episodes per task (default 200, quick 2)")
    parser.add_argument("--eval-episodes", type=int, help="evaluation episodes per task (default gato.eval_episodes)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a gato setting")
    parser.add_argument("--runs", default=str(ROOT / "runs"), help="where runs/gato[-quick]/ lives")
    args = parser.parse_args(argv)
    from learner.gato.cli import gato_config
    from learner.gato.episodes import TaskData
    from learner.gato.train import GatoRun, read_run_config

    base = Path(args.runs) / ("gato-quick" if args.quick else "gato")
    data, logdir = base / "data", base / "run"
    before, start = _cpu_ticks(), time.time()
    recorded = record_suite(data, args.episodes or (QUICK_EPISODES if args.quick else 200))
    t_data = time.time() - start
    cfg = gato_config([*(QUICK if args.quick else []), *args.set], read_run_config(logdir))
    tasks = [TaskData.load(d, cfg) for d in sorted(p.parent for p in data.glob("*/task.json"))]
    run = GatoRun(cfg, tasks, logdir, progress=False)
    t0, u0 = time.time(), run.updates
    summary = run.run()
    t_train = time.time() - t0
    t1 = time.time()
    results = evaluate_all(run, args.eval_episodes or cfg.eval_episodes)
    scores = [r["score"] for k, r in results.items() if k != "prompt_check"]
    check = results["prompt_check"]
    out = {
        "bench": "gato", "quick": args.quick, "updates": run.updates, "parameters": run.parameters,
        "tokens_per_step": {t.name: t.body.step_len for t in tasks},
        "episodes_per_task": {t.name: len(t.episodes) for t in tasks},
        "seconds": {"record": t_data, "recorded_now": recorded, "train": t_train, "evaluate": time.time() - t1},
        "seconds_per_update": t_train / (run.updates - u0) if run.updates > u0 else None,
        "tasks": results,
        "target": f"every task's score >= {TARGET}; {check['task']} prompted with its own demonstration >= {TARGET} "
                  "and with the other task's clearly below",
        "all_tasks_reach_target": all(s is not None and s >= TARGET for s in scores),
        "prompt_selects_task": (check["score_prompted_with_own"] or 0) >= TARGET
        and (check["score_prompted_with_" + PAIR[0]] or 0) < TARGET,
        "stopped": summary["stopped"],
        "others_cpu_share": _others_busy(before, _cpu_ticks()),
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
