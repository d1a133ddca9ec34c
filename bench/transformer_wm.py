"""Open-loop prediction error of the transformer world model against the RSSM (issue 27 s1).

Both models train on the same random-policy episodes of one of our tasks (the same batches, in the same order)
and are then scored on held-out episodes: the posterior over the first `--context` steps, then the prior
imagined from the recorded actions alone (`Dreamer.openloop` features), decoded; the error is the decoder's
squared error in symlog space of every vector observation, summed over dimensions, averaged over sequences at
horizons 1, 8 and 16 after the context. The RSSM is `--rssm-size`; the transformer's width is chosen (unless
given) so that its world model's parameter count is the nearest to the RSSM's.

    python bench/transformer_wm.py --config sim_arm_reach_state.yaml --updates 2000   # a real comparison
    python bench/transformer_wm.py --quick                                               # smoke (seconds)

Prints progress to stderr and one JSON document (with others_cpu_share) to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HORIZONS = (1, 8, 16)


def _cpu_busy() -> tuple[int, int] | None:
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return None
    return sum(fields) - fields[3] - fields[4], sum(fields)


def collect(cfg: Any, episodes: int, seed: int) -> tuple[list[dict[str, Any]], Any, Any]:
    """`episodes` random-policy episodes of the task, each a dict of (T, ...) arrays with the action taken."""
    import numpy as np

    from learner.envs import Env

    env, rng, out = Env(cfg, seed=seed), np.random.default_rng(seed), []
    try:
        for _ in range(episodes):
            steps, obs = [], env.reset()
            while True:
                action = env.random_action(rng)
                steps.append({**obs, "action": action})
                if obs["is_last"]:
                    break
                obs = env.step(action)
            out.append({k: np.stack([np.asarray(s[k]) for s in steps]) for k in steps[0]})
        return out, env.obs_space, env.act_space
    finally:
        env.close()


def sample(episodes: list[dict], batch: int, length: int, rng: Any) -> dict:
    import numpy as np

    rows = []
    for _ in range(batch):
        ep = episodes[rng.integers(len(episodes))]
        start = rng.integers(0, len(ep["action"]) - length + 1)
        row = {k: v[start:start + length] for k, v in ep.items()}
        row["is_first"] = row["is_first"].copy()
        row["is_first"][0] = True
        rows.append(row)
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def openloop_error(agent: Any, batch: dict, context: int) -> dict[str, float]:
    import torch

    from core.agents.dreamer.dists import symlog
    from learner.agents.dreamer.openloop import openloop_features

    data, feat = openloop_features(agent, batch, context)
    recon = agent.wm.decoder(feat)
    err = 0.0
    for key in agent.model.keys.vectors:
        target = symlog(data[key].reshape(*data[key].shape[:2], -1))
        err = err + (recon[key].float() - target).square().sum(-1)
    with torch.no_grad():
        return {f"h{h}": round(float(err[:, context + h - 1].mean()), 5) for h in HORIZONS}


def build(cfg: Any, dynamics: str, size: str, width: int, space: Any, act: Any) -> Any:
    from core.config.agent import DreamerConfig
    from learner.agents.dreamer.agent import Dreamer

    over: dict[str, Any] = {"size": size, "device": "cpu", "compile": "off", "threads": 1}
    if dynamics == "transformer":
        over |= {"dynamics": "transformer", "transformer": {"width": width, "heads": max(1, min(8, width // 16))}}
    dcfg = DreamerConfig.model_validate({**cfg.dreamer.model_dump(mode="json"), **over})
    return Dreamer(dcfg, space, act)


def wm_params(agent: Any) -> int:
    return sum(p.numel() for p in agent.wm.parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="sim_arm_reach_state.yaml", help="a task config in hardware_configs/")
    parser.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                        help="config overrides (default: control.episode_steps=100, camera.enabled=false)")
    parser.add_argument("--rssm-size", default="size1m")
    parser.add_argument("--width", type=int, default=0, help="transformer width; 0 = matched to the RSSM's params")
    parser.add_argument("--updates", type=int, default=1000)
    parser.add_argument("--episodes", type=int, default=40, help="training episodes (random policy)")
    parser.add_argument("--heldout", type=int, default=10, help="held-out episodes (another seed)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--context", type=int, default=16, help="observed steps before the open loop")
    parser.add_argument("--quick", action="store_true", help="smoke: 3 updates, 4+2 episodes, batch 4")
    args = parser.parse_args(argv)
    if args.quick:
        args.updates, args.episodes, args.heldout, args.batch = 3, 4, 2, 4
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import numpy as np
    import torch

    import sim  # noqa: F401 - registers our tasks with Gymnasium
    from core.config import load_config

    torch.set_num_threads(1)
    sets = args.set if args.set is not None else ["control.episode_steps=100", "camera.enabled=false"]
    cfg = load_config(ROOT / "hardware_configs" / args.config, sets)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    t0, busy0 = time.time(), _cpu_busy()
    train, space, act = collect(cfg, args.episodes, seed=0)
    heldout, _, _ = collect(cfg, args.heldout, seed=1)
    length = min(args.length, min(len(e["action"]) for e in train + heldout))
    if length < args.context + max(HORIZONS):
        raise SystemExit(f"episodes of {length} steps are too short for context {args.context} + horizon 16")
    torch.manual_seed(0)
    rssm = build(cfg, "rssm", args.rssm_size, 0, space, act)
    width = args.width
    if not width:  # the width whose world model is nearest the RSSM's in parameters
        target = wm_params(rssm)
        width = min((16 * k for k in range(1, 33)),
                    key=lambda w: abs(wm_params(build(cfg, "transformer", args.rssm_size, w, space, act)) - target))
    models = {"rssm": rssm, "transformer": build(cfg, "transformer", args.rssm_size, width, space, act)}
    results: dict[str, Any] = {}
    for name, agent in models.items():
        rng, start = np.random.default_rng(0), time.time()
        for i in range(args.updates):
            agent.train(sample(train, args.batch, length, rng))
            if (i + 1) % max(1, args.updates // 10) == 0:
                log(f"{name}: {i + 1}/{args.updates} updates, {time.time() - start:.0f} s")
        eval_rng = np.random.default_rng(1)
        batch = sample(heldout, max(args.batch, 16), length, eval_rng)
        torch.manual_seed(1)
        results[name] = {"wm_params": wm_params(agent), "sec_per_update": round((time.time() - start)
                                                                                 / max(1, args.updates), 3),
                         "openloop_error": openloop_error(agent, batch, args.context)}
    busy1 = _cpu_busy()
    share = None
    if busy0 and busy1 and busy1[1] > busy0[1]:
        share = round((busy1[0] - busy0[0]) / (busy1[1] - busy0[1]) * os.cpu_count() - 1.0, 3)
    print(json.dumps({"config": args.config, "updates": args.updates, "batch": args.batch, "length": length,
                      "context": args.context, "horizons": HORIZONS, "transformer_width": width,
                      "train_episodes": args.episodes, "heldout_episodes": args.heldout, "results": results,
                      "seconds": round(time.time() - t0, 1), "others_cpu_share": share,
                      "note": "others_cpu_share: busy CPUs beyond this process's one thread, machine-wide"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
