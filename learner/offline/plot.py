"""`reverie-replay plot DIR --out FOLDER`: PNGs of what a replay holds. `returns.png`: the return of each
episode against wall-clock time and against the acting policy version, per stream; `lengths.png`:
episode lengths; `observations.png`: per observation entry, each element's mean, spread and range (named
and in units where the stream is described); `episode_<stream>_<n>.png`: reward and each action
dimension over one episode (the last complete one of each stream, or those selected).

Drawn on matplotlib's Agg canvas (no display, no pyplot) and written atomically."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from core.atomic import atomic_write
from core.layout import ACTION_KEY
from learner.offline.common import add_dir, open_replay, say
from learner.offline.reader import Episode, ReplayDir
from learner.offline.select import add_selection, selection_of

MAX_EPISODE_PLOTS = 8
MAX_DIMS_SHOWN = 64  # elements of one observation entry drawn in observations.png


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="PNGs: returns over time and policy version, lengths, observations, episodes")
    add_dir(p)
    p.add_argument("--out", type=Path, required=True, metavar="FOLDER", help="where the PNGs go (created)")
    add_selection(p)
    p.add_argument("--max-episodes", type=int, default=MAX_EPISODE_PLOTS, metavar="N",
                   help=f"episode plots at most (default {MAX_EPISODE_PLOTS})")
    p.set_defaults(func=run)


def save(fig: Figure, path: Path) -> Path:
    """Render and write a PNG atomically (a watcher never sees half of one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    return path


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:40]


def element_names(replay: ReplayDir, stream: str | None, key: str, count: int) -> list[str]:
    """Names of an entry's elements from the stream's description (`key` or `action`), else key[i]."""
    desc = replay.descriptions.get(stream or "", {}) if stream else next(iter(replay.descriptions.values()), {})
    entry = desc.get("action", {}) if key == ACTION_KEY else desc.get("observations", {}).get(key, {})
    names = entry.get("names") or []
    if len(names) == count and not entry.get("discrete"):
        return [str(n) for n in names]
    if key == ACTION_KEY and entry.get("discrete") and len(names) == count:
        return [str(n) for n in names]
    return [f"{key}[{i}]" for i in range(count)]


def unit_of(replay: ReplayDir, key: str) -> str:
    for desc in replay.descriptions.values():
        entry = desc.get("action", {}) if key == ACTION_KEY else desc.get("observations", {}).get(key, {})
        if entry.get("unit"):
            return str(entry["unit"])
    return ""


def plot_returns(episodes: list[Episode], path: Path) -> Path:
    fig = Figure(figsize=(11, 4.2))
    by_time, by_version = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    streams = list(dict.fromkeys(ep.stream for ep in episodes))
    for stream in streams:
        eps = [ep for ep in episodes if ep.stream == stream and ep.complete]
        if not eps:
            continue
        t0 = min(ep.end_time for ep in episodes if ep.end_time is not None)
        times = np.array([(ep.end_time - t0) / 60.0 for ep in eps])
        returns = np.array([ep.ret for ep in eps])
        by_time.plot(times, returns, marker="o", ms=3, lw=1, label=stream)
        versions = np.array([ep.versions[1] for ep in eps])
        by_version.scatter(versions, returns, s=10, alpha=0.5, label=stream)
        means = {v: float(returns[versions == v].mean()) for v in np.unique(versions)}
        by_version.plot(list(means), list(means.values()), lw=1.5)
    by_time.set(title="Return per episode over time", xlabel="minutes since the first episode ended", ylabel="return")
    by_version.set(title="Return against the acting policy version", xlabel="policy version (updates)",
                   ylabel="return (line: mean per version)")
    for ax in (by_time, by_version):
        ax.grid(alpha=0.3)
        if len(streams) > 1:
            ax.legend(fontsize=7)
    if not any(ep.complete for ep in episodes):
        by_time.text(0.5, 0.5, "no complete episode", ha="center", transform=by_time.transAxes)
    fig.tight_layout()
    return save(fig, path)


def plot_lengths(episodes: list[Episode], path: Path) -> Path:
    fig = Figure(figsize=(8, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    for stream in dict.fromkeys(ep.stream for ep in episodes):
        eps = [ep for ep in episodes if ep.stream == stream]
        ax.plot([ep.index for ep in eps], [ep.length for ep in eps], marker=".", lw=1, label=stream)
        cut = [ep for ep in eps if not ep.complete]
        if cut:
            ax.scatter([ep.index for ep in cut], [ep.length for ep in cut], marker="x", c="red", s=20)
    ax.set(title="Episode lengths (x: not complete)", xlabel="episode", ylabel="steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save(fig, path)


def observation_stats(replay: ReplayDir) -> dict[str, dict[str, np.ndarray]]:
    """Per vector observation key (and action, and reward): per-element mean, std, min, max over every
    readable step; per image key the same per colour channel."""
    sums: dict[str, list[np.ndarray]] = {}
    keys = [*replay.observation_keys(), ACTION_KEY, "reward"]
    images = set(replay.image_keys())
    for path, meta in replay.chunks:
        if not meta.length:
            continue
        _, steps, _, _ = replay.read(path, keys)
        for key, value in steps.items():
            x = value.astype(np.float64)
            x = x.reshape(len(x), -1, x.shape[-1]).reshape(-1, x.shape[-1]) if key in images else x.reshape(len(x), -1)
            s = sums.setdefault(key, [np.zeros(x.shape[1]), np.zeros(x.shape[1]), np.full(x.shape[1], np.inf),
                                      np.full(x.shape[1], -np.inf), np.zeros(1)])
            s[0] += x.sum(0)
            s[1] += np.square(x).sum(0)
            s[2] = np.minimum(s[2], x.min(0))
            s[3] = np.maximum(s[3], x.max(0))
            s[4] += len(x)
    out = {}
    for key, (total, squares, lo, hi, n) in sums.items():
        mean = total / n[0]
        out[key] = {"mean": mean, "std": np.sqrt(np.maximum(squares / n[0] - mean**2, 0.0)), "min": lo, "max": hi}
    return out


def plot_observations(replay: ReplayDir, path: Path) -> Path:
    stats = observation_stats(replay)
    keys = list(stats)
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(5 * cols, 3.2 * rows))
    images = set(replay.image_keys())
    for i, key in enumerate(keys):
        s = {k: v[:MAX_DIMS_SHOWN] for k, v in stats[key].items()}
        ax = fig.add_subplot(rows, cols, i + 1)
        n = len(s["mean"])
        x = np.arange(n)
        ax.errorbar(x, s["mean"], yerr=s["std"], fmt="o", ms=4, capsize=3, label="mean ± std")
        ax.scatter(x, s["min"], marker="_", c="grey", label="min / max")
        ax.scatter(x, s["max"], marker="_", c="grey")
        names = (["R", "G", "B"][:n] if key in images and n <= 3
                 else element_names(replay, None, key, len(stats[key]["mean"]))[:n])
        if n <= 16:
            ax.set_xticks(x, names, rotation=30 if n > 4 else 0, fontsize=7)
        unit = unit_of(replay, key)
        ax.set_title(f"{key}{' (pixels per channel)' if key in images else ''}", fontsize=9)
        if unit:
            ax.set_ylabel(unit, fontsize=8)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    fig.suptitle(f"Observation statistics over every step of {replay.directory.name}", fontsize=10)
    fig.tight_layout()
    return save(fig, path)


def plot_episode(replay: ReplayDir, ep: Episode, path: Path) -> Path:
    steps = replay.steps(ep, ["reward", ACTION_KEY])
    action = steps[ACTION_KEY].reshape(ep.length, -1)
    names = element_names(replay, ep.stream, ACTION_KEY, action.shape[1])
    fig = Figure(figsize=(9, 2.2 + 1.3 * (1 + min(action.shape[1], 12))))
    axes = [fig.add_subplot(1 + min(action.shape[1], 12), 1, i + 1) for i in range(1 + min(action.shape[1], 12))]
    t = np.arange(ep.length)
    axes[0].plot(t, steps["reward"], c="tab:green")
    axes[0].set_ylabel("reward", fontsize=8)
    success = "" if ep.success is None else f", success {'yes' if ep.success else 'no'}"
    axes[0].set_title(f"stream {ep.stream!r} episode {ep.index} ({ep.task}): return {ep.ret:.3f}, {ep.length} steps, "
                      f"ended {ep.end}{success}", fontsize=9)
    for i, ax in enumerate(axes[1:]):
        ax.plot(t, action[:, i], c="tab:blue")
        ax.set_ylabel(names[i], fontsize=8)
        ax.set_ylim(-1.1, 1.1) if action.size and np.abs(action).max() <= 1.0 else None
    axes[-1].set_xlabel("step")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save(fig, path)


def run(args: argparse.Namespace) -> int:
    replay = open_replay(args.directory)
    selection = selection_of(args)
    episodes = selection.apply(replay.episodes())
    out: Path = args.out
    written = [plot_returns(episodes, out / "returns.png"), plot_lengths(episodes, out / "lengths.png"),
               plot_observations(replay, out / "observations.png")]
    chosen = episodes if not selection.empty else _last_complete(episodes)
    if len(chosen) > args.max_episodes:
        say(f"{len(chosen)} episodes selected: plotting the first {args.max_episodes} (--max-episodes)")
    for ep in chosen[: args.max_episodes]:
        written.append(plot_episode(replay, ep, out / f"episode_{slug(ep.stream)}_{ep.index}.png"))
    for path in written:
        print(path)
    return 0


def _last_complete(episodes: list[Episode]) -> list[Episode]:
    """The last complete episode of each stream (the last one of any kind where none is complete)."""
    out: dict[str, Any] = {}
    for ep in episodes:
        if ep.complete or ep.stream not in out or not out[ep.stream].complete:
            out[ep.stream] = ep
    return list(out.values())
