"""World Models evidence (issue 25): does C evolved inside M act well in reality, and how far apart are the two?

    python bench/world_models.py arm_reach_dream          # train (or resume) V, M, C; then the tau table
    python bench/world_models.py car_racing               # CarRacing-v3, C evolved in the real env
    python bench/world_models.py arm_reach_dream --quick  # a few-minute smoke run of the same code
    python bench/world_models.py --list

Each case is one `reverie-learner train` run in runs/world_models/<case>/ (resumed from its newest checkpoint
when run again). For a dream case the paper's table follows: for each temperature tau a fresh C is evolved
in M from the trained V and M (its CMA-ES state checkpointed in tau_<tau>/, so this part resumes too), then
scored in the dream (M's predicted return from real episode starts, one episode long) and in reality
(episodes of the task with the mode action). Prints one JSON object: per tau the virtual and actual return,
their gap and the success rate, and `others_cpu_share` (the share of the CPU other processes used).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from learner.checkpoint import load_latest_checkpoint, save_checkpoint  # noqa: E402

RUNS = ROOT / "runs" / "world_models"
# A smoke run: tiny V, M and C, a few hundred steps; it checks that the whole path runs, not what it reaches.
QUICK = ["world_models.z=8", "world_models.lstm=32", "world_models.vae_depth=4", "world_models.mixtures=2",
         "world_models.vae_updates=20", "world_models.mdn_updates=20", "world_models.generations=5",
         "world_models.population=8", "world_models.rollouts=4", "train.steps=600", "train.prefill=100",
         "train.batch_size=4", "train.batch_length=16", "train.train_ratio=64", "train.eval_every=0",
         "train.checkpoint_every=300", "dreamer.threads=1"]


@dataclass(frozen=True)
class Case:
    config: str  # a hardware config, or gymnasium:ID
    target: str
    overrides: tuple[str, ...] = ()
    taus: tuple[float, ...] = ()  # the tau table (dream cases)
    generations: int = 150  # CMA-ES generations per tau
    episodes: int = 100  # real episodes per evaluation


CASES = {
    "arm_reach_dream": Case("hardware_configs/sim_arm_reach_world_models.yaml",
                            "actual success rate >= 60 % (C evolved only in the dream), dream-reality gap reported",
                            taus=(0.5, 1.0, 1.15, 1.3)),
    "car_racing": Case("gymnasium:CarRacing-v3", "mean over 100 tracks >= 800 (paper 906 +- 21; V alone 632)",
                       overrides=("world_models.image_key=vector", "world_models.evolve_in=real",
                                  "world_models.dream_horizon=1000", "control.hz=50", "train.prefill=10000",
                                  "train.steps=1000000", "train.batch_length=64", "train.train_ratio=64",
                                  "world_models.generations=200")),
}


def _cpu() -> tuple[int, int, int] | None:
    """(busy ticks of the machine, all ticks, this process's ticks incl. children) from /proc."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        total = sum(fields)
        return total - fields[3] - fields[4], total, sum(int(v) for v in own[11:15])
    except (OSError, ValueError, IndexError):
        return None


def _config(case: Case, quick: bool) -> Any:
    from learner.cli import _config as cli_config  # the same config `reverie-learner train` builds

    extra = [*case.overrides, *(QUICK if quick else [])]
    env = case.config if case.config.startswith("gymnasium:") else None
    args = argparse.Namespace(config=None if env else str(ROOT / case.config), env=env, set=extra)
    return cli_config(args), env


def train(case: Case, logdir: Path, quick: bool) -> dict[str, Any]:
    from learner.train import Trainer

    cfg, env = _config(case, quick)
    return Trainer(cfg, logdir, env=env, progress=sys.stderr.isatty()).run()


def tau_row(case: Case, logdir: Path, tau: float, quick: bool) -> dict[str, Any]:
    """Evolve a fresh C in M at temperature `tau` (resumable), then score it in the dream and in reality."""
    from learner.agents.world_models.dream import dream
    from learner.agents.world_models.evolution import Evolution
    from learner.envs import Env
    from learner.train import Trainer

    cfg, env_id = _config(case, quick)
    trainer = Trainer(cfg, logdir, env=env_id, progress=False)  # resumes V, M and the replay
    agent, replay, wm = trainer.agent, trainer.replay, cfg.world_models
    generations = 3 if quick else case.generations
    out = logdir / f"tau_{tau}"
    found = load_latest_checkpoint(out)
    evo = (Evolution.from_state(found[1]["evolution"]) if found else
           Evolution(agent.controller.params.numel(), wm.sigma0, wm.population, seed=cfg.seed + 100))
    batch_args = (cfg.train.batch_size, cfg.train.batch_length)
    while evo.generation < generations:
        z0, state0 = agent.dream_starts(replay.sample(*batch_args), wm.rollouts, first=True)
        params = torch.as_tensor(evo.ask(), dtype=torch.float32)
        evo.tell(dream(agent.mdn, params, z0, state0, wm.dream_horizon, tau, agent.act_space.discrete,
                       agent.generator).returns.mean(1).double().numpy())
        if evo.generation % 10 == 0 or evo.generation == generations:
            save_checkpoint(out, evo.generation, {"evolution": evo.state()}, {"tau": tau})
    with torch.no_grad():
        agent.controller.params.copy_(torch.as_tensor(evo.mean, dtype=torch.float32))
        agent.controller.evolved.fill_(1)
    # Virtual: M's return of C from real episode starts, one episode long, at this tau.
    z0, state0 = agent.dream_starts(replay.sample(*batch_args), 64, first=True)
    virtual = dream(agent.mdn, agent.controller.params[None], z0, state0, cfg.control.episode_steps, tau,
                    agent.act_space.discrete, torch.Generator().manual_seed(0)).returns[0]
    # Actual: episodes of the task, mode action.
    env, policy = Env(cfg, env_id, seed=cfg.seed + 3_000_000), agent.policy()
    returns, successes = [], []
    for _ in range(5 if quick else case.episodes):
        obs, total = env.reset(), 0.0
        policy.reset()
        while True:
            policy.act(obs, mode="mode")
            total += float(obs["reward"])
            if obs["is_last"]:
                break
            obs = env.step(policy.last_action[0])
        returns.append(total)
        if "success" in env.info:
            successes.append(bool(env.info["success"]))
    env.close()
    trainer.close()
    actual = float(np.mean(returns))
    return {"tau": tau, "generations": evo.generation, "virtual_return": round(float(virtual.mean()), 3),
            "actual_return": round(actual, 3), "actual_return_std": round(float(np.std(returns)), 3),
            "gap": round(float(virtual.mean()) - actual, 3), "episodes": len(returns),
            "actual_success": None if not successes else round(float(np.mean(successes)), 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("case", nargs="?", choices=sorted(CASES))
    parser.add_argument("--quick", action="store_true", help="a few-minute smoke run (its own run directory)")
    parser.add_argument("--list", action="store_true", help="the cases and their targets")
    parser.add_argument("--root", type=Path, default=RUNS, help="where the runs live")
    args = parser.parse_args(argv)
    if args.list or not args.case:
        print(json.dumps({name: {"config": c.config, "target": c.target, "taus": c.taus} for name, c in CASES.items()},
                         indent=2))
        return 0
    case = CASES[args.case]
    logdir = args.root / (args.case + ("_quick" if args.quick else ""))
    start, before = time.time(), _cpu()
    summary = train(case, logdir, args.quick)
    rows = [tau_row(case, logdir, tau, args.quick) for tau in (case.taus[2:3] if args.quick else case.taus)]
    after = _cpu()
    others = None
    if before and after and after[1] > before[1]:
        others = round(max(0.0, ((after[0] - before[0]) - (after[2] - before[2])) / (after[1] - before[1])), 3)
    print(json.dumps({"case": args.case, "target": case.target, "quick": args.quick, "train": summary,
                      "taus": rows, "seconds": round(time.time() - start, 1), "others_cpu_share": others}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
