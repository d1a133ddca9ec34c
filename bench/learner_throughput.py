"""Learner throughput: seconds per Dreamer update (world model + behaviour, one `Dreamer.train`
call), peak memory and the exported policy's act() latency on one CPU thread.

Each case runs in its own process (clean peak-RSS, thread settings and compile caches). A case
is a size preset (or explicit dimensions) x recipe x observation kind x compile mode (off; cell: each
recurrent step compiled, dreamer.compile=cell; full: the whole update). Default:
presets size1m and size12m, 2024 recipe, 64x64 pixels, 16x64 batches, a 6-D continuous action.

`--port-defaults` adds the dimensions of the best-known public PyTorch DreamerV3 port (GRU deter
512, hidden 512, 32x32 latents, CNN depth 32, 2-layer 512-unit MLPs and heads), run with the
2023 architecture the port uses (stride-2 CNN, one LayerNorm GRU) and with the 2024 architecture
at the same dimensions. That port measured 10.9 s/update from 64x64 pixels and 8.5 s/update from
a 24-D vector on the 2-core reference machine; the target is at least 2x faster.

    python bench/learner_throughput.py          # size1m + size12m (CPU: eager + cell-compiled; CUDA: eager + compiled)
    python bench/learner_throughput.py --port-defaults --obs pixels vector --no-compile
    python bench/learner_throughput.py --preset size1m --deter 1024 --units 128 --json
    python bench/learner_throughput.py --quick  # smoke run: one size1m case, about a minute
    python bench/learner_throughput.py --preset size12m --act-only --act-path lean plain --act-repeats 3  # act() A/B

Timings are only valid on an otherwise idle machine: see `others_cpu_share` and `--wait-idle`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# Runnable as `python bench/learner_throughput.py` from the repository root.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ACT_DIM = 6
VECTOR_DIM = 24
DIM_FIELDS = ("deter", "hidden", "stoch", "classes", "cnn_depth", "units", "mlp_layers", "head_layers", "ac_layers")
PORT_DIMS = {"deter": 512, "hidden": 512, "stoch": 32, "classes": 32, "cnn_depth": 32, "units": 512,
             "mlp_layers": 2, "head_layers": 2, "ac_layers": 2}
PORT_SECONDS = {"pixels": 10.9, "vector": 8.5}  # the port's s/update on the 2-core reference machine
PORT_SPEEDUP_TARGET = 2.0
PORT_RECIPE = "2023"  # the port's architecture: stride-2 conv encoder, one GRU with LayerNorm
# Measured on the 2-core reference machine (torch 2.13, cold inductor cache): compiling the whole
# update (64 unrolled observe steps, 15 imagination steps and their backward) took 634 s for size1m.
CPU_COMPILE_NOTE = "torch.compile of the whole update takes ~10 min on a 2-core CPU (634 s measured, size1m)"
QUICK = {"iters": 1, "act_calls": 30, "compile": "off"}  # with one size1m case: --quick, a smoke run


# --------------------------------------------------------------------------- one case (worker side)
def _rss_mb() -> float:
    """Current resident set size (Linux /proc; falls back to the peak)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return _peak_rss_mb()


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _cpu_ticks() -> tuple[int, int, int] | None:
    """(busy ticks of the whole machine, all ticks, ticks of this process) from /proc; None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        total = sum(fields)
        return total - fields[3] - fields[4], total, int(own[11]) + int(own[12])  # idle, iowait; utime+stime
    except (OSError, ValueError, IndexError):
        return None


def _others_busy(before, after) -> float | None:
    """Share of the machine's CPU used by other processes between two `_cpu_ticks()` readings."""
    if before is None or after is None or after[1] == before[1]:
        return None
    return max(0.0, ((after[0] - before[0]) - (after[2] - before[2])) / (after[1] - before[1]))


def _wait_idle(limit: float, threshold: float = 0.1) -> float | None:
    """Wait (up to `limit` s) until other processes use < `threshold` of the CPU; returns their share."""
    deadline, share = time.monotonic() + limit, None
    while True:
        before = _cpu_ticks()
        time.sleep(0.5)
        share = _others_busy(before, _cpu_ticks())
        if share is None or share < threshold or time.monotonic() >= deadline:
            return share


def _spaces(obs: str, image: int) -> dict[str, tuple[tuple[int, ...], str]]:
    space = {"image": ((image, image, 3), "uint8")} if obs == "pixels" else {"vector": ((VECTOR_DIM,), "float32")}
    space.update({"reward": ((), "float32"), "is_first": ((), "bool"), "is_last": ((), "bool"),
                  "is_terminal": ((), "bool")})
    return space


def _batch(rng, obs: str, b: int, t: int, image: int) -> dict:
    import numpy as np

    batch: dict[str, Any] = {
        "action": rng.uniform(-1.0, 1.0, (b, t, ACT_DIM)).astype(np.float32),
        "reward": rng.normal(0.0, 1.0, (b, t)).astype(np.float32),
        "is_first": np.zeros((b, t), bool),
        "is_last": np.zeros((b, t), bool),
        "is_terminal": np.zeros((b, t), bool),
    }
    batch["is_first"][:, 0] = True
    if obs == "pixels":
        batch["image"] = rng.integers(0, 256, (b, t, image, image, 3), dtype=np.uint8)
    else:
        batch["vector"] = rng.normal(0.0, 1.0, (b, t, VECTOR_DIM)).astype(np.float32)
    return batch


def _observation(rng, obs: str, image: int, first: bool) -> dict:
    import numpy as np

    out: dict[str, Any] = {"reward": np.float32(0.0), "is_first": first, "is_last": False, "is_terminal": False}
    if obs == "pixels":
        out["image"] = rng.integers(0, 256, (image, image, 3), dtype=np.uint8)
    else:
        out["vector"] = rng.normal(0.0, 1.0, VECTOR_DIM).astype(np.float32)
    return out


class _Timeout(BaseException):  # not an Exception: torch's compile wrappers must not swallow it
    pass


def _on_alarm(signum, frame):  # noqa: ARG001
    raise _Timeout


def _top_ops(prof, n: int) -> list[dict[str, Any]]:
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows) or 1.0
    return [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 1),
             "share": round(e.self_cpu_time_total / total, 3), "calls": e.count} for e in rows[:n]]


def run_case(case: dict[str, Any], opts: dict[str, Any]) -> dict[str, Any]:
    """Build a Dreamer for `case`, time its updates and its exported policy; returns one result row."""
    import numpy as np
    import torch

    from core.agents.dreamer.policy import export_policy
    from core.agents.spaces import ActSpace
    from core.config.agent import DreamerConfig
    from learner.agents.dreamer.agent import Dreamer, autocast_dtype, resolve_device
    from learner.compute import configure_compute

    if case["threads"]:
        torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    device = resolve_device(opts["device"])
    compiled = case["compile"] not in (False, "off")  # "cell" (each recurrent step) or "full" (the whole update)
    cfg = DreamerConfig(recipe=case["recipe"], size=case["preset"], device=device.type, compile=case["compile"],
                        precision=case["precision"], keep_heap=opts["keep_heap"], threads=case["threads"] or 0,
                        **case["overrides"])
    configure_compute(cfg)  # as the learner does: dreamer.keep_heap and dreamer.threads (0: one per usable CPU)
    out: dict[str, Any] = {"dims": {k: getattr(cfg, k) for k in DIM_FIELDS},
                           "arch": {"norm": cfg.norm, "gru_blocks": cfg.gru_blocks, "encoder": cfg.encoder,
                                    "optimizer": cfg.optimizer,
                                    "actor_grad": cfg.actor_grad_continuous, "repval": cfg.repval_scale > 0,
                                    "cnn_channels": [cfg.cnn_depth * m for m in cfg.cnn_mults]},
                           "autocast": str(autocast_dtype(cfg.precision, device) or "off"),
                           "device": str(device), "threads": torch.get_num_threads(), "keep_heap": cfg.keep_heap,
                           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "runtime default")}
    agent = Dreamer(cfg, _spaces(case["obs"], opts["image"]), ActSpace(ACT_DIM, False), device)
    out["params_m"] = {"world_model": round(sum(p.numel() for p in agent.wm.parameters()) / 1e6, 2),
                       "actor": round(sum(p.numel() for p in agent.behavior.actor.parameters()) / 1e6, 2),
                       "critic": round(sum(p.numel() for p in agent.behavior.critic.parameters()) / 1e6, 2)}
    if opts.get("act_only"):  # act() alone: the exported policy of the untrained model, no updates timed
        return {**out, **_act_latency(agent, case["obs"], opts, export_policy)}
    batch = _batch(rng, case["obs"], opts["batch"], opts["length"], opts["image"])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    busy: list[float] = []
    cpu: list[float] = []

    def update(wait: float = 0.0) -> float:
        if wait > 0:
            _wait_idle(wait)
        ticks, cpu_start = _cpu_ticks(), time.process_time()
        start = time.perf_counter()
        agent.train(batch)
        sync()
        elapsed = time.perf_counter() - start
        cpu.append(time.process_time() - cpu_start)
        share = _others_busy(ticks, _cpu_ticks())
        if share is not None:
            busy.append(share)
        return elapsed

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rss_before = _rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # Warm-up; when compiled, the first call compiles. An alarm bounds compile + warm-up.
    warm: list[float] = []
    if compiled and opts["compile_timeout"] > 0:
        signal.signal(signal.SIGALRM, _on_alarm)
        signal.alarm(int(opts["compile_timeout"]))
    try:
        for _ in range(max(1, opts["warmup"]) if compiled else opts["warmup"]):
            warm.append(update())
    except _Timeout:
        signal.alarm(0)
        return {**out, "error": f"torch.compile + warm-up exceeded {opts['compile_timeout']} s "
                                f"(--compile-timeout); no steady-state numbers; raise --compile-timeout"}
    except Exception as exc:  # noqa: BLE001  (a compile failure must not end the benchmark)
        if not compiled:
            raise
        return {**out, "error": f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    finally:
        if compiled:
            signal.alarm(0)
    busy.clear()
    cpu.clear()
    times = [update(opts["wait_idle"]) for _ in range(opts["iters"])]
    mean = statistics.fmean(times)
    out.update({
        "sec_per_update_mean": round(mean, 4),
        "sec_per_update_min": round(min(times), 4),
        "sec_per_update_max": round(max(times), 4),
        "updates_per_s": round(1.0 / mean, 3),
        "warmup_s": [round(w, 3) for w in warm],
        "iters": len(times),
        "cpu_s_per_update": round(statistics.fmean(cpu), 3),  # process CPU time (all threads)
        # Contention: other processes' share of the machine's CPU during the timed updates, and the
        # 1-min load average before/after. Timings taken with others_cpu_share >> 0 are inflated.
        "others_cpu_share": round(max(busy), 3) if busy else None,
        "load_avg_1m": [load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else None],
    })
    if compiled and warm:
        out["first_update_s"] = round(warm[0], 2)
        out["compile_s"] = round(max(0.0, warm[0] - min(times)), 2)  # first call minus a steady call
    if device.type == "cuda":
        out["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["peak_mem_kind"] = "cuda max_memory_allocated"
    else:
        out["peak_mem_mb"] = round(_peak_rss_mb() - rss_before, 1)
        out["peak_mem_kind"] = "cpu peak RSS delta over the updates"
        out["peak_rss_mb"] = round(_peak_rss_mb(), 1)

    if not compiled:
        out.update(_arithmetic(agent, batch, device, autocast_dtype(cfg.precision, device), mean))

    if opts["profile"]:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            agent.train(batch)
            sync()
        out["profile_top_ops"] = _top_ops(prof, opts["profile"])

    if opts["act_calls"] > 0:
        out.update(_act_latency(agent, case["obs"], opts, export_policy))
    return out


def _update_gflop(agent, batch) -> float:
    """GFLOP of one update (forward, backward, optimiser), counted op by op by torch's FlopCounterMode.

    Why: it turns a time into a rate that can be set against the machine's matrix-product peak, so
    a target can be checked for feasibility (time >= FLOP / peak) on whatever machine runs this.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        agent.train(batch)
    return counter.get_total_flops() / 1e9


def _matmul_peak_gflops(device, dtype, n: int = 2048, reps: int = 5) -> float:
    """Best rate of an n x n x n matrix product in `dtype` with the case's threads: the machine's practical peak."""
    import torch

    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = float("inf")
    for _ in range(reps + 1):  # the first is a warm-up
        sync()
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def _arithmetic(agent, batch, device, autocast, sec_per_update: float) -> dict[str, Any]:
    """FLOP per update, the rate reached, and the matrix-product peak of this machine to compare it with."""
    import torch

    gflop = _update_gflop(agent, batch)
    peak = _matmul_peak_gflops(device, autocast or torch.float32)
    return {"gflop_per_update": round(gflop, 1), "gflops_reached": round(gflop / sec_per_update, 1),
            "matmul_peak_gflops": round(peak, 1), "share_of_matmul_peak": round(gflop / sec_per_update / peak, 3)}


def _act_latency(agent, obs: str, opts: dict[str, Any], export) -> dict[str, Any]:
    """act() latency of the exported policy, timed in a fresh process as a robot runs it.

    The weights blob goes through a file to a new interpreter that imports only the policy: a
    robot's process never trains, so timing act() in the worker, whose heap and caches the updates
    just churned through, would measure the benchmark rather than the robot.
    """
    import tempfile

    paths = opts.get("act_paths") or ["lean"]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        blob = Path(tmp) / "policy.safetensors"
        blob.write_bytes(export(agent.model, agent.updates))
        # Several runs alternate the paths (lean, plain, lean, ...) so that an A/B sees the same host load.
        for _ in range(max(1, opts.get("act_repeats", 1))):
            for path in paths:
                spec = {"blob": str(blob), "obs": obs, "image": opts["image"], "calls": opts["act_calls"],
                        "path": path}
                proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_act", json.dumps(spec)],
                                      capture_output=True, text=True, cwd=ROOT, timeout=600)
                lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
                if proc.returncode != 0 or not lines:
                    return {"act_error": f"act worker exited with {proc.returncode}: {proc.stderr.strip()[-300:]}"}
                runs.append(json.loads(lines[-1]))
    return runs[0] if len(runs) == 1 else {**runs[0], "act_runs": runs, "act_summary": _act_summary(runs)}


def _act_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per act path: the median over its runs of each act() figure, and the range of its p99s."""
    out: dict[str, Any] = {}
    for path in dict.fromkeys(r["act_path"] for r in runs):
        mine = [r for r in runs if r["act_path"] == path]
        keys = [k for k in mine[0] if k.endswith(("_p50", "_p99")) or k == "others_cpu_share"]
        out[path] = {k: round(statistics.median(r[k] for r in mine if r.get(k) is not None), 3) for k in keys
                     if any(r.get(k) is not None for r in mine)}
        out[path]["runs"] = len(mine)
        out[path]["act_ms_p99_range"] = [min(r["act_ms_p99"] for r in mine), max(r["act_ms_p99"] for r in mine)]
    return out


def act_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Time act() on one thread, one observation per call, as the robot's control loop runs it.

    prepare() (the recurrent update and the deter halves of the next step's first layers) runs
    between calls, off the observation-to-command path (act_ms); prepare_ms is its cost and
    act_alone_ms an act() with no prepare() before it, doing that work itself. act_cpu_ms is act()'s
    CPU time (the thread's): what act() costs, less sensitive than wall time to other processes
    taking the core (others_cpu_share: their share of the machine meanwhile). spec["path"]: "lean"
    (what a robot runs, `core.agents.dreamer.act_path`) or "plain" (the modules, for an A/B).
    """
    import numpy as np
    import torch

    from core.agents.dreamer.policy import Policy

    torch.set_num_threads(1)
    policy = Policy.from_weights(Path(spec["blob"]).read_bytes(), "cpu")
    path = spec.get("path", "lean")
    policy.lean = policy.lean and path == "lean"
    rng = np.random.default_rng(0)
    pool = [_observation(rng, spec["obs"], spec["image"], first=False) for _ in range(16)]
    policy.act(_observation(rng, spec["obs"], spec["image"], first=True))
    for i in range(10):
        policy.act(pool[i % len(pool)])
        policy.prepare()
    act, cpu, prep, alone = [], [], [], []
    ticks, load = _cpu_ticks(), os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for i in range(spec["calls"]):
        start, cpu_start = time.perf_counter(), time.thread_time()
        policy.act(pool[i % len(pool)])
        mid, cpu_mid = time.perf_counter(), time.thread_time()
        policy.prepare()
        act.append(mid - start)
        cpu.append(cpu_mid - cpu_start)
        prep.append(time.perf_counter() - mid)
    share = _others_busy(ticks, _cpu_ticks())
    for i in range(spec["calls"]):
        start = time.perf_counter()
        policy.act(pool[i % len(pool)])
        alone.append(time.perf_counter() - start)
    out: dict[str, Any] = {"act_calls": len(act), "act_threads": 1, "act_process": "fresh, policy blob only",
                           "act_path": "lean" if policy.lean else "plain",
                           "others_cpu_share": None if share is None else round(share, 3), "load_avg_1m": load}
    if hasattr(policy, "cache_bytes"):  # a transformer world model: the KV cache it keeps (context - 1 steps)
        out |= {"dynamics": policy.cfg.dynamics, "transformer": policy.cfg.transformer.model_dump(),
                "kv_cache_kb": round(policy.cache_bytes() / 1024, 1)}
    for name, lat in (("act", act), ("act_cpu", cpu), ("prepare", prep), ("act_alone", alone)):
        ms = np.asarray(lat) * 1e3
        out |= {f"{name}_ms_p50": round(float(np.percentile(ms, 50)), 3),
                f"{name}_ms_p99": round(float(np.percentile(ms, 99)), 3)}
    return out


# --------------------------------------------------------------------------- driver (parent side)
def compile_feasible(device: str) -> tuple[bool, str]:
    """Whether torch.compile can run here (inductor on CPU needs a C++ compiler)."""
    import torch

    if sys.platform == "win32":
        return False, "torch.compile is not supported on Windows here"
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        cxx = os.environ.get("CXX") or next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
        if not cxx:
            return False, "torch.compile on CPU needs a C++ compiler (g++/clang++) and none was found"
    return True, ""


def build_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    overrides = {k: getattr(args, k) for k in DIM_FIELDS if getattr(args, k) is not None}
    if args.dynamics != "rssm":
        overrides["dynamics"] = args.dynamics
        overrides["transformer"] = {k: int(v) for k, v in (item.split("=", 1) for item in args.tf)}
    if args.layers is not None:
        overrides.setdefault("mlp_layers", args.layers)
        overrides.setdefault("ac_layers", args.layers)
    presets = list(args.preset or [])
    if not presets and (overrides or not args.port_defaults):
        presets = ["size1m"] if overrides else ["size1m", "size12m"]
    groups: list[tuple[str, str, str, dict[str, int], str | None]] = []  # name, preset, recipe, dims, target
    for preset in presets:
        name = preset + ("+custom" if overrides else "")
        groups.append((name, preset, args.recipe or "2024", overrides, None))
    if args.port_defaults:
        recipes = [args.recipe] if args.recipe else [PORT_RECIPE, "2024" if PORT_RECIPE == "2023" else "2023"]
        for recipe in recipes:
            groups.append((f"port-defaults/{recipe}", "size1m", recipe, {**PORT_DIMS, **overrides},
                           "port" if recipe == PORT_RECIPE else None))
    modes = {"both": ["off", "full"], "on": ["full"], "off": ["off"], "cell": ["cell"], "cells": ["off", "cell"],
             "auto": ["off"]}[args.compile]
    cases = []
    for name, preset, recipe, dims, target in groups:
        for obs in args.obs:
            for compiled in modes:
                for threads in args.threads:
                    for precision in args.precision:
                        cases.append({"name": name, "preset": preset, "recipe": recipe, "obs": obs,
                                      "threads": threads, "compile": compiled, "precision": precision,
                                      "overrides": dims, "target": target})
    return cases


def run_isolated(case: dict[str, Any], opts: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """Run one case in a fresh interpreter; its last stdout line is the result."""
    from learner.compute import openmp_env

    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps({"case": case, "opts": opts})]
    # OpenMP's passive wait policy, as reverie-learner sets it before torch loads (unless the user chose
    # one): with libgomp's default spinning, 2 threads on this loaded 2-core host burnt 9.7 CPU-s per
    # size1m update instead of ~0.8, which measured the spinning, not the update.
    env = {**os.environ, **openmp_env()}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True, env=env)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker and any compile workers it started
        proc.communicate()
        return {"error": f"case exceeded --timeout {timeout} s"}
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(stderr.strip().splitlines()[-5:])
        return {"error": f"worker exited with {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def summarise(case: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    row = {"name": case["name"], "preset": case["preset"], "recipe": case["recipe"], "obs": case["obs"],
           "compile": case["compile"], "precision": case["precision"], "threads": case["threads"] or None,
           **result}
    if case["target"] == "port" and "sec_per_update_mean" in result:
        base = PORT_SECONDS[case["obs"]]
        row["port"] = {"port_sec_per_update": base, "target_sec_per_update": round(base / PORT_SPEEDUP_TARGET, 3),
                       "target_speedup": PORT_SPEEDUP_TARGET,
                       "speedup": round(base / result["sec_per_update_mean"], 2),
                       "reached": result["sec_per_update_mean"] <= base / PORT_SPEEDUP_TARGET}
        if "gflop_per_update" in result:
            # The rate the target asks for, before any time for memory-bound work (norms, activations,
            # optimiser): a share of the matrix-product peak near or above 1 cannot be reached.
            need = result["gflop_per_update"] / (base / PORT_SPEEDUP_TARGET)
            row["port"]["target_needs_gflops"] = round(need, 1)
            row["port"]["target_needs_share_of_matmul_peak"] = round(need / result["matmul_peak_gflops"], 3)
    return row


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'case':<22}{'obs':<8}{'recipe':<7}{'prec':<6}{'comp':<6}{'thr':>4}{'s/upd':>8}{'min':>8}{'upd/s':>8}"
            f"{'compile':>9}"
            f"{'peakMB':>9}{'GF/s':>7}{'%peak':>7}{'act p50':>9}{'act p99':>9}{'vs port':>9}{'others':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['name']:<22}{r['obs']:<8}{r['recipe']:<7}{r['precision'][:5]:<6}{str(r['compile'])[0]:<6}"
                         f"{_fmt(r['threads'], 'd'):>4}  {r['error']}")
            continue
        port = r.get("port")
        ratio = f"{port['speedup']:.2f}x" if port else "-"
        lines.append(
            f"{r['name']:<22}{r['obs']:<8}{r['recipe']:<7}{r['precision'][:5]:<6}{str(r['compile'])[0]:<6}"
            f"{_fmt(r['threads'], 'd'):>4}"
            f"{_fmt(r['sec_per_update_mean']):>8}{_fmt(r['sec_per_update_min']):>8}{_fmt(r['updates_per_s']):>8}"
            f"{_fmt(r.get('compile_s'), '.1f'):>9}{_fmt(r.get('peak_mem_mb'), '.0f'):>9}"
            f"{_fmt(r.get('gflops_reached'), '.0f'):>7}{_fmt(r.get('share_of_matmul_peak'), '.0%'):>7}"
            f"{_fmt(r.get('act_ms_p50'), '.2f'):>9}{_fmt(r.get('act_ms_p99'), '.2f'):>9}"
            f"{ratio:>9}{_fmt(r.get('others_cpu_share'), '.0%'):>8}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Learner throughput: s/update, peak memory and act() latency of Dreamer.",
        epilog="Prints one JSON document (with --json nothing else).")
    parser.add_argument("--preset", action="append", help="size preset (repeatable); default size1m and size12m")
    parser.add_argument("--recipe", choices=("2024", "2023"), default=None,
                        help="architecture recipe (default 2024; --port-defaults: 2023 and 2024)")
    parser.add_argument("--port-defaults", action="store_true",
                        help="the public PyTorch port's dimensions, compared with its 10.9 / 8.5 s/update")
    parser.add_argument("--obs", nargs="+", choices=("pixels", "vector"), default=["pixels"],
                        help="64x64 RGB images, or a 24-D proprioceptive vector")
    for field in ("deter", "hidden", "stoch", "classes", "cnn_depth", "units"):
        parser.add_argument("--" + field.replace("_", "-"), type=int, dest=field)
    parser.add_argument("--layers", type=int, help="MLP layers of the vector encoder/decoder and of actor/critic")
    parser.add_argument("--mlp-layers", type=int, dest="mlp_layers", help=argparse.SUPPRESS)
    parser.add_argument("--ac-layers", type=int, dest="ac_layers", help=argparse.SUPPRESS)
    parser.add_argument("--head-layers", type=int, dest="head_layers", help="hidden layers of reward/cont heads")
    parser.add_argument("--dynamics", choices=("rssm", "transformer"), default="rssm",
                        help="dreamer.dynamics: the world model's sequence model (transformer: act() keeps a KV cache)")
    parser.add_argument("--tf", nargs="+", default=[], metavar="KEY=N",
                        help="dreamer.transformer settings, e.g. width=256 layers=2 heads=8 context=64")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--image", type=int, default=64, help="image height and width")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--compile", dest="compile", action="store_const", const="on",
                       help="only the whole update torch.compile'd (dreamer.compile=full)")
    group.add_argument("--cell", dest="compile", action="store_const", const="cell",
                       help="only the update with its recurrent steps compiled (dreamer.compile=cell)")
    group.add_argument("--no-compile", dest="compile", action="store_const", const="off", help="only eager")
    group.add_argument("--both", dest="compile", action="store_const", const="both",
                       help="eager and whole-update compiled (the default on CUDA; on CPU compiling takes ~10 min)")
    group.add_argument("--cells", dest="compile", action="store_const", const="cells",
                       help="eager and cell-compiled (the default on CPU)")
    parser.add_argument("--compile-timeout", type=float, default=900.0,
                        help="seconds allowed for compile + warm-up before a compiled case is abandoned")
    parser.add_argument("--precision", nargs="+", choices=("auto", "float32", "bfloat16"), default=["auto"],
                        help="dreamer.precision (several: one case each); auto = bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[0],
                        help="torch threads for the update (several: one case each); 0 = torch default")
    parser.add_argument("--act-calls", type=int, default=300, help="act() calls timed per case; 0 = skip")
    parser.add_argument("--act-only", action="store_true",
                        help="time only act() (the untrained model's exported policy): no updates")
    parser.add_argument("--act-path", nargs="+", choices=("lean", "plain"), default=["lean"], dest="act_paths",
                        help="act() path(s) to time: lean (what a robot runs) and/or plain (the modules, an A/B)")
    parser.add_argument("--act-repeats", type=int, default=1,
                        help="fresh act() processes per path, alternating the paths (interleaved A/B)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="torch.profiler one extra update per case and report its top N ops")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                        help="before each timed update wait up to S s for other processes to go idle")
    parser.add_argument("--timeout", type=float, default=None, help="hard wall-clock limit per case, seconds")
    parser.add_argument("--json", action="store_true", help="print only the JSON document")
    parser.add_argument("--system-malloc", dest="keep_heap", action="store_false",
                        help="dreamer.keep_heap off: glibc returns freed memory to the kernel (the old behaviour)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run (`make bench`): size1m only, eager, one timed update, 30 act() calls")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    parser.add_argument("--_act", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:  # its figures are defaults, so flags given beside --quick still win
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
        args.preset = args.preset or ["size1m"]
    if args.compile is None:
        args.compile = "off" if args.act_only else "auto"  # act() alone: one case per preset and observation
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args._worker:  # noqa: SLF001
        spec = json.loads(args._worker)  # noqa: SLF001
        print(json.dumps(run_case(spec["case"], spec["opts"])), flush=True)
        return
    if args._act:  # noqa: SLF001
        print(json.dumps(act_worker(json.loads(args._act))), flush=True)  # noqa: SLF001
        return
    import torch

    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    notes = []
    feasible, why = compile_feasible(args.device)
    on_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.compile == "auto":
        args.compile = ("both" if on_cuda else "cells") if feasible else "off"
        if feasible and not on_cuda:
            notes.append(f"whole-update compiled cases skipped by default on CPU: {CPU_COMPILE_NOTE}; run with "
                         "--compile or --both")
    if not feasible:
        if args.compile == "on":
            notes.append(f"--compile requested but {why}; compiled cases are reported as errors")
        elif args.compile in ("both", "cells"):
            notes.append(f"compiled cases skipped: {why}")
            args.compile = "off"
    opts = {k: getattr(args, k) for k in ("batch", "length", "image", "device", "warmup", "iters",
                                          "act_calls", "profile", "compile_timeout", "wait_idle", "keep_heap",
                                          "act_only", "act_paths", "act_repeats")}
    rows = []
    for case in build_cases(args):
        label = (f"{case['name']} {case['obs']} recipe={case['recipe']} compile={case['compile']} "
                 f"precision={case['precision']} "
                 f"threads={case['threads'] or 'default'}")
        if case["compile"] not in (False, "off") and not feasible:
            result = {"error": f"torch.compile unavailable: {why}"}
        else:
            log(f"running {label} ...")
            start = time.perf_counter()
            result = run_isolated(case, opts, args.timeout)
            log(f"  done in {time.perf_counter() - start:.0f} s"
                + (f": {result['sec_per_update_mean']:.3f} s/update" if "sec_per_update_mean" in result
                   else f": act p50 {result['act_ms_p50']} / p99 {result['act_ms_p99']} ms" if "act_ms_p50" in result
                   else f": {result.get('error') or result.get('act_error')}"))
        rows.append(summarise(case, result))
    device = str(torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                              else ("cpu" if args.device == "auto" else args.device)))
    doc = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "python": platform.python_version(), "device": device,
                    "threads": [t or torch.get_num_threads() for t in args.threads],
                    "cuda": torch.cuda.get_device_name() if device == "cuda" else None},
        "settings": {"batch": args.batch, "length": args.length, "image": args.image, "act_dim": ACT_DIM,
                     "vector_dim": VECTOR_DIM, "keep_heap": args.keep_heap, "warmup": args.warmup, "iters": args.iters,
                     "act_calls": args.act_calls, "act_only": args.act_only, "act_paths": args.act_paths,
                     "act_repeats": args.act_repeats, "compile": args.compile,
                     "compile_timeout_s": args.compile_timeout},
        "cases": rows,
        "targets": [{"case": f"{r['name']} {r['obs']} compile={r['compile']} threads={r['threads']}", **r["port"]}
                    for r in rows if "port" in r],
        "notes": notes,
    }
    if not args.json:
        print(table(rows))
        for note in notes:
            print("note:", note)
        print()
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
