"""`reverie-replay video DIR --out FILE.mp4`: an episode (or a range of them) as a video: the camera images
of each step (every image key side by side, scaled up) above a strip of the reward and every action
dimension over the whole range, with a cursor at the current step and the episode boundaries marked.

The strip is drawn once with matplotlib and the cursor painted per frame, so a long episode costs one
figure, not one per frame; `core/video.py` writes the file (atomically)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from core.layout import ACTION_KEY
from core.video import episode_frames, write_video
from learner.offline.common import add_dir, open_replay, say
from learner.offline.plot import element_names
from learner.offline.reader import Episode, ReplayDir
from learner.offline.select import SelectionError, add_selection, selection_of

FRAME_HEIGHT = 256  # images are scaled up (by whole factors) to about this height
STRIP_HEIGHT = 180
MAX_STEPS = 20_000  # a video of more steps is refused (select fewer episodes)
CURSOR = (230, 30, 30)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("video", help="an episode (or a range) to MP4: camera images and a strip of reward and actions")
    add_dir(p)
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help="the video (.mp4 or .gif)")
    add_selection(p)
    p.add_argument("--fps", type=float, help="frames per second (default: the stream's control rate, else 10)")
    p.set_defaults(func=run)


def strip(replay: ReplayDir, episodes: list[Episode], reward: np.ndarray, action: np.ndarray,
          width: int) -> tuple[np.ndarray, float, float]:
    """The strip image (STRIP_HEIGHT, width, 3) and the pixel columns of step 0 and the last step."""
    fig = Figure(figsize=(width / 100, STRIP_HEIGHT / 100), dpi=100)
    ax = fig.add_axes((0.06, 0.14, 0.92, 0.8))
    t = np.arange(len(reward))
    names = element_names(replay, episodes[0].stream, ACTION_KEY, action.shape[1])
    for i in range(action.shape[1]):
        ax.plot(t, action[:, i], lw=0.8, label=names[i])
    ax.set_ylim(-1.1, 1.1)
    ax.set_ylabel("action", fontsize=7)
    ax.tick_params(labelsize=6)
    twin = ax.twinx()
    twin.plot(t, reward, c="black", lw=1.2, label="reward")
    twin.set_ylabel("reward", fontsize=7)
    twin.tick_params(labelsize=6)
    edges = np.cumsum([ep.length for ep in episodes])[:-1]
    for edge in edges:
        ax.axvline(edge - 0.5, c="grey", ls="--", lw=0.8)
    ax.set_xlim(-0.5, max(len(reward) - 0.5, 0.5))
    if action.shape[1] <= 8:
        ax.legend(fontsize=5, loc="upper left", ncol=min(action.shape[1], 4))
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    x0, _ = ax.transData.transform((0, 0))
    x1, _ = ax.transData.transform((max(len(reward) - 1, 1), 0))
    return image, float(x0), float(x1)


def frames(replay: ReplayDir, episodes: list[Episode]) -> tuple[np.ndarray, int]:
    """All frames (T, H, W, 3) of the episodes, one per step, and T."""
    images = replay.image_keys()
    parts = [replay.steps(ep, [*images, "reward", ACTION_KEY]) for ep in episodes]
    reward = np.concatenate([p["reward"] for p in parts]).astype(np.float32)
    action = np.concatenate([p[ACTION_KEY] for p in parts]).reshape(len(reward), -1)
    if images:
        h = max(replay.layout[k].shape[0] for k in images)
        scale = max(1, FRAME_HEIGHT // h)
        cams = [episode_frames(np.concatenate([p[k] for p in parts]), scale) for k in images]
        height = max(c.shape[1] for c in cams)
        cams = [np.pad(c, ((0, 0), (0, height - c.shape[1]), (0, 0), (0, 0)), constant_values=255) for c in cams]
        top = np.concatenate(cams, axis=2)
    else:
        top = np.full((len(reward), 8, 480, 3), 255, np.uint8)  # no camera: the strip alone
    width = max(top.shape[2], 320)
    if top.shape[2] < width:
        top = np.pad(top, ((0, 0), (0, 0), (0, width - top.shape[2]), (0, 0)), constant_values=255)
    image, x0, x1 = strip(replay, episodes, reward, action, width)
    out = np.empty((len(reward), top.shape[1] + image.shape[0], width, 3), np.uint8)
    out[:, : top.shape[1]] = top
    for t in range(len(reward)):
        out[t, top.shape[1]:] = image
        x = int(round(x0 + (x1 - x0) * t / max(len(reward) - 1, 1)))
        out[t, top.shape[1]:, max(0, x - 1): x + 1] = CURSOR
    return out, len(reward)


def run(args: argparse.Namespace) -> int:
    replay = open_replay(args.directory)
    selection = selection_of(args)
    episodes = selection.apply(replay.episodes())
    if not episodes:
        raise SelectionError("no episode matches the selection (see `reverie-replay episodes`)")
    if selection.empty:
        episodes = episodes[:1]
        say(f"no episodes selected: writing the first one ({episodes[0].key}); --episodes picks others")
    total = sum(ep.length for ep in episodes)
    if total > MAX_STEPS:
        raise SelectionError(f"{len(episodes)} episodes of {total} steps selected: at most {MAX_STEPS} steps make "
                             "one video (select fewer with --episodes)")
    desc = replay.descriptions.get(episodes[0].stream, {})
    fps = args.fps or float(desc.get("control_hz") or 10.0)
    video, steps = frames(replay, episodes)
    path = write_video(args.out, video, fps=fps)
    print(f"{path}: {steps} frames at {fps:g} fps, episodes {', '.join(ep.key for ep in episodes)}")
    return 0
