"""What rank 0's replay costs a data-parallel update (issue 24, section 4; docs/scaling.md).

In `serve` on N ranks the replay lives on rank 0, which samples the global batch and scatters each rank
its share, then gathers the posterior latents back. This starts N ranks as torchrun would (gloo on the CPU,
NCCL with a GPU per rank), times on rank 0 per update: sampling the global batch from a real `Replay`,
scattering it, the update itself (forward, gradient all-reduce, optimiser) and gathering the latents, and
prints one JSON object (with `others_cpu_share`: timings taken while other processes used the CPU are
inflated).

    python bench/data_parallel.py --ranks 2 --device cpu --preset tiny --iters 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.learner_throughput import _cpu_ticks, _others_busy  # noqa: E402


def _fill(replay, steps: int, image: int, act: int) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    chunk = 64
    for _ in range(0, steps, chunk):
        rows = {"image": rng.integers(0, 256, (chunk, image, image, 3), dtype=np.uint8),
                "vector": rng.normal(size=(chunk, 8)).astype(np.float32),
                "action": rng.uniform(-1, 1, (chunk, act)).astype(np.float32),
                "reward": rng.normal(size=chunk).astype(np.float32),
                "is_first": np.arange(chunk) == 0, "is_last": np.zeros(chunk, bool),
                "is_terminal": np.zeros(chunk, bool)}
        replay.add_steps(rows, "bench")


def rank_main(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from core.agents.spaces import ActSpace
    from core.config.agent import DreamerConfig
    from learner.agents.dreamer.agent import Dreamer
    from learner.distributed import close_world, distribute, gather_context, init_world, scatter_batch

    world = init_world(args.device)
    torch.manual_seed(0)
    space = {"image": ((args.image, args.image, 3), "uint8"), "vector": ((8,), "float32"),
             "reward": ((), "float32"), "is_first": ((), "bool"), "is_last": ((), "bool"),
             "is_terminal": ((), "bool")}
    act = ActSpace(4, False)
    cfg = DreamerConfig.model_validate({"size": args.preset, "device": args.device})
    agent = Dreamer(cfg, space, act)
    distribute(agent, world, seed=0)
    times: dict[str, list[float]] = {"sample": [], "scatter": [], "update": [], "gather": []}
    sample = _sampler(args, world)
    for i in range(args.warmup + args.iters):
        t0 = time.perf_counter()
        batch = sample() if world.is_main else None
        t1 = time.perf_counter()
        local = scatter_batch(world, batch)
        t2 = time.perf_counter()
        _, context = agent.train(local)
        if world.device.type == "cuda":
            torch.cuda.synchronize()
        t3 = time.perf_counter()
        gather_context(world, context)
        t4 = time.perf_counter()
        if i >= args.warmup:
            for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[key].append(value)
    if world.is_main:
        print(json.dumps({k: round(float(np.median(v)), 4) for k, v in times.items()}), flush=True)
    close_world()


def _sampler(args, world):
    """Rank 0's global batch, sampled from a real Replay holding random steps (as serve's rank 0 does)."""
    from learner.replay import Replay

    if not world.is_main:
        return lambda: None
    replay = Replay(Path(tempfile.mkdtemp(prefix="dp-bench-")) / "replay", chunk_length=64)
    _fill(replay, args.batch * args.length * 4, args.image, 4)
    return lambda: replay.sample(args.batch, args.length)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    parser.add_argument("--preset", default="size1m")
    parser.add_argument("--batch", type=int, default=16, help="global batch (split over the ranks)")
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--image", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank:
        rank_main(args)
        return 0
    from learner.launch import free_port

    port = free_port()
    before, start = _cpu_ticks(), time.time()
    procs = [subprocess.Popen([sys.executable, __file__, "--rank", *(argv or sys.argv[1:])], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r),
                                              "WORLD_SIZE": str(args.ranks), "MASTER_ADDR": "127.0.0.1",
                                              "MASTER_PORT": str(port), "PYTHONPATH": str(ROOT)})
             for r in range(args.ranks)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        print(json.dumps({"error": [p.returncode for p in procs]}))
        return 1
    timing = json.loads(outs[0].strip().splitlines()[-1])
    print(json.dumps({"ranks": args.ranks, "device": args.device, "preset": args.preset, "batch": args.batch,
                      "length": args.length, "image": args.image, "per_rank_batch": args.batch // args.ranks,
                      "seconds_per_update_rank0": timing, "wall_s": round(time.time() - start, 1),
                      "others_cpu_share": _others_busy(before, _cpu_ticks())}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
