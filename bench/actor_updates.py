"""How far, and how consistently, each update moves the actor: the measurement behind "the actor
does not move" (issue: Dreamer that learns what DreamerV3 learns).

Trains on a Gymnasium env (or a task config) exactly as `reverie-learner train` does and, per
window of updates, reports for the actor's tensors (and, for comparison, the world model's):

- `rel_step`: |delta theta| / |theta| of one update, over the group's tensors together;
- `consistency`: |p_end - p_start| / sum |delta p| over the window: 1 when every update points the
  same way, ~1/sqrt(n) for a random walk of n updates;
- `agc_factor` / `agc_clipped`: LaProp's adaptive-clipping factor min(1, agc max(pmin, |p|) / |g|)
  (mean, and the share of tensors it shrinks), computed from the same gradient the optimiser used;
- the behaviour metrics: advantage mean / std / magnitude, return scale, entropy, value and return;
- `out_rms`: the rms of the actor's output layer.

    python bench/actor_updates.py --env gymnasium:Pendulum-v1 --set dreamer.size=size1m \
        --set train.steps=4000 --every 250 --logdir runs/actor_updates

Prints one JSON object per window and a final summary; writes actor_updates.png in the logdir.
`--quick` is a smoke run of a minute or two (`make bench`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from core.config import apply_overrides, config_from_dict, load_config, parse_overrides  # noqa: E402
from learner.train import Trainer  # noqa: E402

# --quick: Pendulum, size1m, 200 random steps, then 100 steps at 16 replayed steps each in 4x16 batches
# (25 updates, five windows of 5), no evaluation: a smoke run of the measurement, not a measurement.
QUICK_ENV = "gymnasium:Pendulum-v1"
QUICK_SET = ["dreamer.size=size1m", "train.steps=300", "train.prefill=200", "train.train_ratio=16",
             "train.batch_size=4", "train.batch_length=16", "train.eval_every=0", "train.log_every=100"]
QUICK_EVERY = 5
QUICK_NOTE = "Pendulum, size1m, 25 small updates in windows of 5, in a scratch logdir"
METRICS = ("ac/adv", "ac/adv_std", "ac/adv_mag", "ac/return_scale", "ac/entropy", "ac/value", "ac/return")


class Recorder:
    """Wraps `Dreamer.train` to measure every update's parameter changes and clipping."""

    def __init__(self, trainer: Trainer, every: int) -> None:
        self.agent, self.every = trainer.agent, every
        model = self.agent.model
        out = model.behavior.actor.out
        self.groups = {"actor": list(model.behavior.actor.parameters()), "actor_out": [out.weight, out.bias],
                       "critic": list(model.behavior.critic.parameters()), "world_model": list(model.wm.parameters())}
        self.out = model.behavior.actor.out.weight
        self.cfg = self.agent.cfg
        self.rows: list[dict] = []
        self._reset_window()
        self._train = self.agent.train
        self.agent.train = self.train  # type: ignore[method-assign]

    def _reset_window(self) -> None:
        self.start = {g: [p.detach().clone() for p in ps] for g, ps in self.groups.items()}
        self.path = {g: [torch.zeros(()) for _ in ps] for g, ps in self.groups.items()}
        self.sums: dict[str, float] = {}
        self.n = 0

    def _add(self, key: str, value: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value

    def train(self, batch: dict):  # noqa: ANN201
        before = {g: [p.detach().clone() for p in ps] for g, ps in self.groups.items()}
        metrics, context = self._train(batch)
        for group, params in self.groups.items():
            steps, norms, factors = [], [], []
            for i, (p, old) in enumerate(zip(params, before[group])):
                step = (p.detach() - old).norm()
                self.path[group][i] += step
                steps.append(step.item() ** 2)
                norms.append(old.norm().item() ** 2)
                if p.grad is not None and self.cfg.optimizer == "laprop":
                    limit = self.cfg.agc * max(self.cfg.agc_pmin, old.norm().item())
                    factors.append(min(1.0, limit / (p.grad.norm().item() + 1e-12)))
            self._add(f"{group}/rel_step", (sum(steps) / max(sum(norms), 1e-24)) ** 0.5)
            if factors:
                self._add(f"{group}/agc_factor", sum(factors) / len(factors))
                self._add(f"{group}/agc_clipped", sum(f < 1.0 for f in factors) / len(factors))
        for key in METRICS:
            if key in metrics:
                self._add(key, float(metrics[key]))
        self.n += 1
        if self.n == self.every:
            self._flush()
        return metrics, context

    def _flush(self) -> None:
        row = {"updates": self.agent.updates, **{k: v / self.n for k, v in self.sums.items()}}
        for group, params in self.groups.items():
            moved = sum((p.detach() - s).norm().item() for p, s in zip(params, self.start[group]))
            path = sum(v.item() for v in self.path[group])
            row[f"{group}/consistency"] = moved / max(path, 1e-12)
        row["out_rms"] = self.out.detach().square().mean().sqrt().item()
        self.rows.append(row)
        print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        self._reset_window()


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["actor/rel_step", "actor/consistency", "actor/agc_clipped", "ac/adv_mag", "ac/entropy", "out_rms"]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    x = [r["updates"] for r in rows]
    for ax, key in zip(axes.flat, keys):
        ax.plot(x, [r.get(key, float("nan")) for r in rows], label="actor" if key.startswith("actor") else key)
        wm = key.replace("actor/", "world_model/")
        if wm != key:
            ax.plot(x, [r.get(wm, float("nan")) for r in rows], label="world model")
            ax.legend()
        ax.set_title(key)
        ax.set_xlabel("updates")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--env", help="gymnasium:ID (or give --config)")
    ap.add_argument("--config", help="a task config YAML")
    ap.add_argument("--set", action="append", default=[], help="key=value overrides, as reverie-learner train")
    ap.add_argument("--every", type=int, default=250, help="updates per reported window")
    ap.add_argument("--logdir", default="runs/actor_updates")
    ap.add_argument("--quick", action="store_true", help="smoke run (`make bench`): " + QUICK_NOTE)
    args = ap.parse_args(argv)
    if args.quick:
        return quick(args)
    if not (args.env or args.config):
        ap.error("give --env or --config (or --quick)")
    return measure(args)


def quick(args: argparse.Namespace) -> int:
    """A few windows of a tiny run in a scratch logdir: a fresh run each time (a kept logdir would resume)."""
    if not (args.env or args.config):
        args.env = QUICK_ENV
    args.set = QUICK_SET + args.set  # later overrides win
    args.every = min(args.every, QUICK_EVERY)
    with tempfile.TemporaryDirectory(prefix="reverie-actor-updates-") as scratch:
        args.logdir = scratch
        return measure(args)


def measure(args: argparse.Namespace) -> int:
    """Train as `reverie-learner train` does, reporting each window of updates as it closes."""
    if args.config:
        cfg = load_config(args.config, args.set)
    else:
        gym_id = args.env.removeprefix("gymnasium:")
        raw = {"name": gym_id, "backend": "gym", "gym_id": gym_id}
        overrides = parse_overrides(args.set)
        apply_overrides(raw, overrides)
        cfg = config_from_dict(raw, f"--env {args.env}", overrides)
    trainer = Trainer(cfg, args.logdir, env=args.env, progress=False)
    recorder = Recorder(trainer, args.every)
    summary = trainer.run()
    plot(recorder.rows, Path(args.logdir) / "actor_updates.png")
    print(json.dumps({"summary": summary, "windows": len(recorder.rows)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
