"""A learner update on a shared CPU: seconds per Dreamer update with the machine to itself and beside
a CPU-bound competitor, for the learner's default thread policy and the candidates it was chosen from.

    python bench/shared_cpu.py                  # every policy, 3 idle + 3 busy updates each
    python bench/shared_cpu.py --quick          # smoke run (`make bench`): default and torch, 1 + 1 updates
    python bench/shared_cpu.py --policy default one --updates 5 --competitors 2

The update is the learner benchmark's (bench/learner_throughput.py's batch and spaces): size1m, 2024
recipe, 24-D vector observations, 16x64 batches, 6-D continuous action. Each policy runs in a fresh
interpreter (OpenMP reads its environment once, when torch loads). The competitor is one process per
`--competitors` (default 1: the issue's "one other CPU-bound process"), each a single-threaded Python
busy loop, started once and paused (SIGSTOP) between busy updates: idle and busy updates alternate,
so a drift in the host's load hits both alike. Target: busy/idle <= 2.5 with the default settings.

Prints one JSON document. `others_cpu_share` is, as in the other benchmarks, the share of the whole
machine's CPU that other processes used during the timed updates (the competitor included in busy
updates); `background_cpu_share` is that less the competitor's own share.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "bench"):  # runnable as `python bench/shared_cpu.py`; the helpers live beside it
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import learner_throughput as lt  # noqa: E402  (after the path set-up above)

from learner.compute import USER_WAIT_VARS  # noqa: E402

TARGET_RATIO = 2.5
# name -> (what it is, environment added before torch loads, torch threads: None = leave torch's choice,
# 0 = the learner's own choice through learner.compute, as `reverie-learner` with dreamer.threads: 0)
POLICIES: dict[str, tuple[str, dict[str, str], int | None]] = {
    "default": ("the learner's default (dreamer.threads: 0): prepare_openmp + configure_compute", {}, 0),
    "torch": ("before: no OpenMP settings, torch's own thread count (spinning waits)", {}, None),
    "spin_short": ("a short spin (GOMP_SPINCOUNT=10000) before sleeping, threads = usable CPUs",
                   {"GOMP_SPINCOUNT": "10000"}, 0),
    "one": ("one torch thread, no OpenMP settings", {}, 1),
}
QUICK = {"updates": 1, "warmup": 1, "policy": ["default", "torch"]}
COMPETITOR = "while True: pass"


# --------------------------------------------------------------------------- worker side
def _proc_ticks(pid: int) -> int | None:
    """utime + stime of a process, in clock ticks (the unit of /proc/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return None


def _machine_ticks() -> int | None:
    try:
        with open("/proc/stat") as f:
            return sum(int(v) for v in f.readline().split()[1:9])
    except (OSError, ValueError):
        return None


def _signal(procs: list[subprocess.Popen], sig: int) -> None:
    for proc in procs:
        os.kill(proc.pid, sig)


def _timed_update(agent: Any, batch: dict, competitors: list[subprocess.Popen]) -> dict[str, float]:
    """One update: wall and CPU seconds, threads, and the CPU share of other processes and of the competitors."""
    import torch

    comp_before = [_proc_ticks(p.pid) for p in competitors]
    ticks, total, cpu = lt._cpu_ticks(), _machine_ticks(), time.process_time()  # noqa: SLF001
    start = time.perf_counter()
    agent.train(batch)
    row = {"s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu, "threads": torch.get_num_threads(),
           "others_cpu_share": lt._others_busy(ticks, lt._cpu_ticks())}  # noqa: SLF001
    total_after, comp_after = _machine_ticks(), [_proc_ticks(p.pid) for p in competitors]
    if competitors and total and total_after and total_after > total and None not in comp_before + comp_after:
        row["competitor_cpu_share"] = sum(a - b for a, b in zip(comp_after, comp_before, strict=True)) / (
            total_after - total)
    return row


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Time alternating idle and busy updates under one policy; the environment is already set."""
    _, _, threads = POLICIES[spec["policy"]]
    if spec["policy"] == "default":
        from learner.compute import prepare_openmp

        prepare_openmp()  # as reverie-learner's main() does, before torch loads
    import numpy as np
    import torch

    from core.agents.spaces import ActSpace
    from core.config.agent import DreamerConfig
    from learner.agents.dreamer.agent import Dreamer
    from learner.compute import configure_compute

    torch.manual_seed(0)
    cfg = DreamerConfig(recipe="2024", size=spec.get("preset", "size1m"), device="cpu", threads=threads or 0)
    if threads is None:
        from learner.compute import keep_freed_memory

        keep_freed_memory()  # the old default kept the heap too: only the threads differ
    else:
        configure_compute(cfg)
    agent = Dreamer(cfg, lt._spaces("vector", 64), ActSpace(lt.ACT_DIM, False), torch.device("cpu"))  # noqa: SLF001
    batch = lt._batch(np.random.default_rng(0), "vector", spec["batch"], spec["length"], 64)  # noqa: SLF001
    for _ in range(spec["warmup"]):
        agent.train(batch)

    competitors = [subprocess.Popen([sys.executable, "-c", COMPETITOR]) for _ in range(spec["competitors"])]
    _signal(competitors, signal.SIGSTOP)
    rows: dict[str, list[dict[str, float]]] = {"idle": [], "busy": []}
    try:
        for _ in range(spec["updates"]):
            rows["idle"].append(_timed_update(agent, batch, []))
            _signal(competitors, signal.SIGCONT)
            time.sleep(0.2)  # the competitor is running before the update starts
            rows["busy"].append(_timed_update(agent, batch, competitors))
            _signal(competitors, signal.SIGSTOP)
    finally:
        for proc in competitors:
            proc.kill()
            proc.wait()
    return {"rows": rows, "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "gomp_spincount": os.environ.get("GOMP_SPINCOUNT")}


# --------------------------------------------------------------------------- driver side
def run_policy(name: str, spec: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """One policy in a fresh interpreter whose environment holds only that policy's OpenMP settings."""
    env = {k: v for k, v in os.environ.items() if k not in USER_WAIT_VARS}
    env.update(POLICIES[name][1])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps({**spec, "policy": name})]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker and its competitors
        proc.communicate()
        return {"error": f"policy exceeded --timeout {timeout} s"}
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(stderr.strip().splitlines()[-5:])
        return {"error": f"worker exited with {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def _max(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(max(present), 3) if present else None


def summarise(name: str, result: dict[str, Any]) -> dict[str, Any]:
    """Medians of the idle and busy updates, their ratio, and how busy the rest of the machine was."""
    out: dict[str, Any] = {"policy": name, "what": POLICIES[name][0]}
    if "error" in result:
        return {**out, "error": result["error"]}
    out.update({k: result[k] for k in ("threads", "omp_wait_policy", "gomp_spincount")})
    for phase, rows in result["rows"].items():
        out[f"{phase}_s"] = round(statistics.median(r["s"] for r in rows), 3)
        out[f"{phase}_s_all"] = [round(r["s"], 3) for r in rows]
        out[f"{phase}_cpu_s"] = round(statistics.median(r["cpu_s"] for r in rows), 3)
        out[f"{phase}_others_cpu_share"] = _max([r["others_cpu_share"] for r in rows])
        out[f"{phase}_threads"] = sorted({r["threads"] for r in rows})
    busy = result["rows"]["busy"]
    out["competitor_cpu_share"] = _max([r.get("competitor_cpu_share") for r in busy])
    background = [r["others_cpu_share"] - r["competitor_cpu_share"] for r in busy
                  if r["others_cpu_share"] is not None and r.get("competitor_cpu_share") is not None]
    out["busy_background_cpu_share"] = _max(background)
    out["ratio_busy_idle"] = round(out["busy_s"] / out["idle_s"], 2)
    out["others_cpu_share"] = out["idle_others_cpu_share"]  # the other benchmarks' figure: the idle updates'
    return out


def openmp_runtime() -> str:
    """The parallel backend torch reports (`torch.__config__.parallel_info()`), e.g. 'OpenMP'."""
    import torch

    for line in torch.__config__.parallel_info().splitlines():
        if line.startswith("ATen parallel backend"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A size1m Dreamer update idle and beside a CPU-bound competitor.",
                                     epilog="Prints one JSON document; progress goes to stderr.")
    parser.add_argument("--policy", nargs="+", choices=list(POLICIES), default=list(POLICIES),
                        help="thread policies to run (default: all)")
    parser.add_argument("--updates", type=int, default=3, help="timed updates per phase (idle, busy) per policy")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--competitors", type=int, default=1, help="busy-loop processes running in busy updates")
    parser.add_argument("--preset", default="size1m", help="dreamer.size (the figures: size1m; tiny for a smoke test)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=1800.0, help="wall-clock limit per policy, seconds")
    parser.add_argument("--quick", action="store_true", help="smoke run: default and torch, one update per phase")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:  # its figures are defaults, so flags given beside --quick still win
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args._worker:  # noqa: SLF001
        print(json.dumps(worker(json.loads(args._worker))), flush=True)  # noqa: SLF001
        return
    from learner.compute import usable_cpus

    spec = {k: getattr(args, k) for k in ("updates", "warmup", "competitors", "batch", "length", "preset")}
    rows = []
    for name in args.policy:
        print(f"[shared_cpu] policy {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        rows.append(summarise(name, run_policy(name, spec, args.timeout)))
        row = rows[-1]
        print(f"[shared_cpu]   {time.perf_counter() - start:.0f} s: "
              + (row["error"] if "error" in row else
                 f"idle {row['idle_s']} s, busy {row['busy_s']} s, ratio {row['ratio_busy_idle']}, "
                 f"others {row['others_cpu_share']}"), file=sys.stderr, flush=True)
    default = next((r for r in rows if r["policy"] == "default" and "ratio_busy_idle" in r), None)
    for row in rows:  # on a loaded host every policy's "idle" is slowed too: set each against the default's idle
        if default and "idle_s" in row:
            row["idle_over_default_idle"] = round(row["idle_s"] / default["idle_s"], 2)
            row["busy_over_default_idle"] = round(row["busy_s"] / default["idle_s"], 2)
    notes = []
    background = _max([r.get("others_cpu_share") for r in rows])
    if background is not None and background > 0.1:
        notes.append(f"the machine was not idle: other processes used up to {background:.0%} of its CPU during "
                     f"'idle' updates; compare the policies with each other, not with an idle machine's figures")
    import torch

    doc = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "usable_cpus": usable_cpus(), "torch": torch.__version__, "python": platform.python_version(),
                    "parallel_backend": openmp_runtime()},
        "settings": {"preset": args.preset, "recipe": "2024", "obs": "vector", "batch": args.batch,
                     "length": args.length, "updates_per_phase": args.updates, "warmup": args.warmup,
                     "competitors": args.competitors,
                     "competitor": f"{args.competitors} single-threaded Python busy loop(s), nice 0, paused "
                                   "between busy updates"},
        "policies": rows,
        "target": {"ratio_busy_idle_max": TARGET_RATIO,
                   "default_ratio": default["ratio_busy_idle"] if default else None,
                   "reached": default["ratio_busy_idle"] <= TARGET_RATIO if default else None},
        "notes": notes,
    }
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
