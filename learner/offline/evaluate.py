"""`reverie-replay eval CHECKPOINT DIR --out FOLDER`: how well a trained world model predicts recorded data
(data it was trained on, or held out with `split`). For windows of recorded episodes the model sees
`--context` real steps, then imagines `--horizon` more from the recorded actions alone (Dreamer's open
loop, `learner/agents/dreamer/openloop.py`); every prediction is compared with what was recorded:

- each observation entry: images as mean absolute pixel error (0..1), vectors as the RMS error in the
  entry's own units (the decoder's symlog output mapped back);
- reward: the reward head's mean against the recorded reward (absolute error);
- continuation: the head's probability that the episode goes on against the recorded (1 - is_terminal).

Written: `eval.json` (every curve, and a "hold the last seen value" baseline per entry for scale),
`openloop_error.png` (error against horizon, one panel per entry) and, with a camera, `openloop.mp4`
(truth / prediction / error, `core.video.openloop_grid`)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from core.agents.spaces import ActSpace
from core.config import Config, ConfigError, config_from_dict
from core.layout import ACTION_KEY
from core.video import openloop_grid, write_video
from learner.offline.common import add_dir, open_replay, say
from learner.offline.plot import save
from learner.offline.reader import Episode, ReplayDir, ReplayDirError
from learner.offline.select import SelectionError, add_selection, selection_of

CONTEXT, HORIZON, SEQUENCES = 5, 45, 16
VIDEO_SEQUENCES = 4


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="a world model's open-loop prediction error against horizon on recorded data")
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT",
                   help="a checkpoint directory (ckpt-N) or a run directory (its newest checkpoint)")
    add_dir(p)
    p.add_argument("--out", type=Path, required=True, metavar="FOLDER", help="where eval.json, PNG and MP4 go")
    p.add_argument("--context", type=int, default=CONTEXT, help=f"real steps the model sees first (default {CONTEXT})")
    p.add_argument("--horizon", type=int, default=HORIZON, help=f"steps it imagines (default {HORIZON})")
    p.add_argument("--sequences", type=int, default=SEQUENCES, help=f"windows evaluated (default {SEQUENCES})")
    p.add_argument("--seed", type=int, default=0, help="which windows, and the model's samples")
    add_selection(p)
    p.set_defaults(func=run)


# --- the model -----------------------------------------------------------------------------------------------


def load_agent(checkpoint: Path, replay: ReplayDir) -> tuple[Any, Config, Path]:
    """The Dreamer agent of a checkpoint (or a run directory's newest), built for the replay's step layout."""
    from learner.agents import make_agent
    from learner.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint

    path = checkpoint
    if not (path / "meta.json").is_file():
        found = latest_checkpoint(path / "checkpoints") if (path / "checkpoints").is_dir() else None
        if found is None:
            raise ReplayDirError(f"{checkpoint}: neither a checkpoint directory (no meta.json) nor a run directory "
                                 "with a complete checkpoint under checkpoints/")
        path = found
    try:
        parts, meta = load_checkpoint(path)
        cfg = config_from_dict(meta["config"], f"{path}/meta.json")
    except (CheckpointError, ConfigError, KeyError) as exc:
        raise ReplayDirError(f"{path}: cannot load it: {exc}") from None
    if cfg.agent != "dreamer":
        raise ReplayDirError(f"{path}: holds a {cfg.agent!r} agent; eval measures Dreamer's world model")
    if cfg.dreamer.device == "cuda" and not torch.cuda.is_available():
        cfg = config_from_dict({**cfg.to_dict(), "dreamer": {**cfg.to_dict()["dreamer"], "device": "cpu"}}, str(path))
    layout = replay.layout
    act = ActSpace(int(layout[ACTION_KEY].shape[0]), replay.discrete_actions())
    agent = make_agent(cfg, layout.without(ACTION_KEY), act)
    try:
        agent.load_state_dict({**parts, "updates": meta["updates"]})
    except (RuntimeError, KeyError) as exc:
        raise ReplayDirError(f"{path}: its model does not fit the replay's step layout (trained on other "
                             f"observations or actions?): {str(exc)[:400]}") from None
    return agent, cfg, path


# --- the windows -----------------------------------------------------------------------------------------------


def windows(replay: ReplayDir, episodes: list[Episode], length: int, count: int,
            rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A batch (B, length, ...) of windows inside single episodes, spread over the episodes long enough."""
    fit = [ep for ep in episodes if ep.length >= length]
    if not fit:
        longest = max((ep.length for ep in episodes), default=0)
        raise SelectionError(f"no selected episode has {length} steps (context + horizon); the longest has {longest}: "
                             "use a shorter --horizon")
    picks = [fit[i % len(fit)] for i in rng.permutation(max(count, len(fit)))[:count]]
    rows = []
    cache: dict[int, dict[str, np.ndarray]] = {}
    for ep in picks:
        steps = cache.setdefault(id(ep), replay.steps(ep, replay.layout.keys()))
        start = int(rng.integers(0, ep.length - length + 1))
        rows.append({k: v[start:start + length] for k, v in steps.items()})
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0] if not k.startswith("__")}
    batch["is_first"][:, 0] = True  # the model starts each window from its initial state
    return batch


# --- the errors ----------------------------------------------------------------------------------------------


@torch.no_grad()
def prediction_errors(agent: Any, batch: dict[str, np.ndarray], context: int) -> tuple[dict[str, Any], Any]:
    """Per entry: the error at each step of the windows (T,), and the hold-last-value baseline's."""
    from core.agents.dreamer.dists import symexp
    from learner.agents.dreamer.openloop import openloop_features

    data, feat = openloop_features(agent, batch, context)
    recon = agent.wm.decoder(feat)
    reward, cont_logit = agent.wm.heads(feat)
    out: dict[str, Any] = {}
    keys = agent.model.keys
    for key in keys.images:
        truth, pred = (data[key] + 0.5).clamp(0, 1), (recon[key].float() + 0.5).clamp(0, 1)
        hold = truth[:, context - 1: context].expand_as(truth)
        out[key] = {"kind": "image", "unit": "mean absolute pixel error (0..1)",
                    "error": (pred - truth).abs().mean((0, 2, 3, 4)), "hold": (hold - truth).abs().mean((0, 2, 3, 4))}
    for key in keys.vectors:
        truth = data[key].reshape(*data[key].shape[:2], -1)
        pred = symexp(recon[key].float())
        hold = truth[:, context - 1: context].expand_as(truth)
        out[key] = {"kind": "vector", "unit": "RMS error, the entry's units",
                    "error": (pred - truth).square().mean((0, 2)).sqrt(),
                    "hold": (hold - truth).square().mean((0, 2)).sqrt()}
    r = data["reward"].float() if "reward" in data else torch.as_tensor(batch["reward"]).float()
    out["reward"] = {"kind": "reward", "unit": "absolute error", "error": (reward.mean().float() - r).abs().mean(0),
                     "hold": (r[:, context - 1: context] - r).abs().mean(0)}
    alive = 1.0 - torch.as_tensor(batch["is_terminal"]).float()
    out["continuation"] = {"kind": "continuation", "unit": "absolute error of P(episode goes on)",
                           "error": (torch.sigmoid(cont_logit) - alive).abs().mean(0),
                           "hold": (alive[:, context - 1: context] - alive).abs().mean(0)}
    for entry in out.values():
        entry["error"] = entry["error"].cpu().numpy().astype(float)
        entry["hold"] = entry["hold"].cpu().numpy().astype(float)
    return out, (data, recon)


def plot_errors(errors: dict[str, Any], context: int, title: str, path: Path) -> Path:
    keys = list(errors)
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(5 * cols, 3.2 * rows))
    for i, key in enumerate(keys):
        e = errors[key]
        ax = fig.add_subplot(rows, cols, i + 1)
        t = np.arange(len(e["error"])) - context + 1  # 1 = the first imagined step; <= 0: seen steps
        ax.plot(t, e["error"], marker=".", label="world model")
        ax.plot(t, e["hold"], ls="--", c="grey", label="hold the last seen value")
        ax.axvspan(t[0] - 0.5, 0.5, color="green", alpha=0.08)
        ax.set_title(f"{key}", fontsize=9)
        ax.set_xlabel("horizon (steps imagined; shaded: seen)", fontsize=8)
        ax.set_ylabel(e["unit"], fontsize=7)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save(fig, path)


def run(args: argparse.Namespace) -> int:
    if args.context < 1 or args.horizon < 1 or args.sequences < 1:
        raise SelectionError("--context, --horizon and --sequences must be >= 1")
    replay = open_replay(args.directory)
    agent, cfg, path = load_agent(args.checkpoint, replay)
    episodes = selection_of(args).apply(replay.episodes())
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    length = args.context + args.horizon
    batch = windows(replay, episodes, length, args.sequences, rng)
    errors, (data, recon) = prediction_errors(agent, batch, args.context)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    title = f"{path.name} ({agent.updates} updates) on {replay.directory}: {len(batch['reward'])} windows"
    written = [plot_errors(errors, args.context, title, out / "openloop_error.png")]
    images = agent.model.keys.images
    if images:
        key = images[0]
        to_uint8 = lambda x: ((x + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()  # noqa: E731
        n = min(VIDEO_SEQUENCES, len(batch["reward"]))
        grid = openloop_grid(to_uint8(data[key][:n]), to_uint8(recon[key][:n].float()), args.context)
        fps = float((next(iter(replay.descriptions.values()), {}) or {}).get("control_hz") or cfg.control.hz)
        written.append(write_video(out / "openloop.mp4", grid, fps=fps))
    result = {"checkpoint": str(path), "updates": agent.updates, "replay": str(replay.directory),
              "context": args.context, "horizon": args.horizon, "windows": len(batch["reward"]),
              "entries": {k: {"kind": e["kind"], "unit": e["unit"],
                              "seen_mean": float(np.mean(e["error"][: args.context])),
                              "imagined": e["error"][args.context:].tolist(),
                              "seen": e["error"][: args.context].tolist(),
                              "hold_imagined": e["hold"][args.context:].tolist()} for k, e in errors.items()}}
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    written.append(out / "eval.json")
    print(render(result))
    for p in written:
        print(p)
    if not images:
        say("no camera in this replay: no openloop.mp4")
    return 0


def render(result: dict[str, Any]) -> str:
    h = result["horizon"]
    marks = [m for m in (1, 5, 15, h) if m <= h]
    marks = list(dict.fromkeys(marks))
    head = f"{'entry':<16} {'seen':>9} " + " ".join(f"{'h=' + str(m):>9}" for m in marks) + f" {'hold h=' + str(h):>11}"
    lines = [f"open-loop error of {result['checkpoint']} ({result['updates']} updates) on {result['replay']}, "
             f"{result['windows']} windows, {result['context']} seen + {h} imagined steps", head]
    for key, e in result["entries"].items():
        vals = " ".join(f"{e['imagined'][m - 1]:>9.4g}" for m in marks)
        lines.append(f"{key[:16]:<16} {e['seen_mean']:>9.4g} {vals} {e['hold_imagined'][h - 1]:>11.4g}")
    return "\n".join(lines)
