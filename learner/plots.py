"""Learning-curve and loss PNGs from metrics rows, drawn headless.

Figures go through matplotlib's Agg canvas directly (no pyplot), so nothing needs a display, no
global backend is switched under other code, and figures are not kept alive by pyplot's registry.
The command line redraws a run's learning curve with points and reference lines added (`make demo`
draws its evaluation so, from a process that carries no matplotlib):

    python -m learner.plots runs/demo/learner/metrics.jsonl --out curve.png \\
        --point eval/return 3000 -0.4 --baseline "random policy" -4.1
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from learner.metrics import read_metrics

Rows = Sequence[Mapping[str, Any]] | str | Path
FEW_POINTS = 60  # series this short (e.g. eval returns) also get markers


def _rows(source: Rows) -> Sequence[Mapping[str, Any]]:
    return read_metrics(source) if isinstance(source, str | Path) else source


def _series(rows: Iterable[Mapping[str, Any]], key: str, x: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) sorted by x; a repeated x keeps its last value (a resumed run re-logging old steps)."""
    points: dict[float, float] = {}
    for row in rows:
        xv, yv = row.get(x), row.get(key)
        if _number(xv) and _number(yv):
            points[float(xv)] = float(yv)
    xs = np.array(sorted(points), dtype=float)
    return xs, np.array([points[v] for v in xs], dtype=float)


def _number(v: Any) -> bool:
    return isinstance(v, int | float | np.number) and not isinstance(v, bool | np.bool_) and math.isfinite(v)


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average; the first points average over what exists so far."""
    if window <= 1 or len(y) < 2:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, len(y) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def _save(fig: Figure, out_png: str | Path) -> Path:
    """Render to a temp file beside the target and rename, so a watcher never sees half a PNG."""
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{out.stem}-", suffix=".png", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _curves(
    rows: Sequence[Mapping[str, Any]],
    keys: Sequence[str],
    x: str,
    title: str,
    ylabel: str,
    smooth: int,
    baseline: Mapping[str, float] | None,
    log_y: bool = False,
) -> Figure:
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    drawn = 0
    for key in keys:
        xs, ys = _series(rows, key, x)
        if not len(xs):
            continue
        marker = "o" if len(xs) <= FEW_POINTS else None
        if smooth > 1 and len(xs) > smooth:
            (line,) = ax.plot(xs, ys, alpha=0.25, linewidth=1)
            ax.plot(xs, _smooth(ys, smooth), color=line.get_color(), label=f"{key} (mean of {smooth})")
        else:
            ax.plot(xs, ys, marker=marker, markersize=3, label=key)
        drawn += 1
    for i, (name, value) in enumerate((baseline or {}).items()):
        ax.axhline(value, linestyle="--", linewidth=1, color=f"C{(len(keys) + i) % 10}", label=f"{name} ({value:g})")
    if not drawn:
        ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes, color="grey")
    if log_y and drawn:
        ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if drawn or baseline:
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    return fig


def plot_learning_curve(
    metrics: Rows,
    out_png: str | Path,
    keys: Sequence[str] = ("train/return", "eval/return"),
    x: str = "step",
    baseline: Mapping[str, float] | None = None,
    title: str = "Learning curve",
    smooth: int = 0,
) -> Path:
    """Return curves over `x` from rows or a metrics.jsonl path; keys absent from the rows are skipped.

    `baseline` draws dashed reference lines, e.g. {"random policy": -20.3}. `smooth` > 1 overlays a
    trailing moving average of that many points over the faint raw curve.
    """
    fig = _curves(_rows(metrics), keys, x, title, "return", smooth, baseline)
    return _save(fig, out_png)


def plot_losses(
    metrics: Rows,
    out_png: str | Path,
    keys: Sequence[str] | None = None,
    x: str = "step",
    title: str = "World-model losses",
    smooth: int = 0,
    log_y: bool | None = None,
) -> Path:
    """Loss curves; by default every key with "loss" in its name. Log scale when all values are positive
    (unless `log_y` says otherwise), since losses span decades."""
    rows = _rows(metrics)
    if keys is None:
        keys = sorted({k for row in rows for k in row if "loss" in k})
    if log_y is None:
        values = [v for k in keys for v in _series(rows, k, x)[1]]
        log_y = bool(values) and min(values) > 0
    fig = _curves(rows, keys, x, title, "loss", smooth, None, log_y=log_y)
    return _save(fig, out_png)


def _number_arg(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise SystemExit(f"python -m learner.plots: {what}: expected a finite number, found {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m learner.plots", description="Redraw a run's learning curve.")
    parser.add_argument("metrics", type=Path, help="a metrics.jsonl, or the run directory holding it")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--point", nargs=3, action="append", default=[], metavar=("KEY", "STEP", "VALUE"),
                        help="add a value at a step, e.g. --point eval/return 3000 -0.4 (repeatable)")
    parser.add_argument("--baseline", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a dashed reference line, e.g. --baseline 'random policy' -4.1 (repeatable)")
    parser.add_argument("--title", default="Learning curve")
    args = parser.parse_args(argv)
    try:
        rows = list(read_metrics(args.metrics)) if args.metrics.exists() else []
    except OSError as exc:
        print(f"python -m learner.plots: {args.metrics}: cannot read it ({exc.strerror or exc})", file=sys.stderr)
        return 2
    keys = ["train/return", "eval/return"]
    for key, step, value in args.point:
        rows.append({"step": _number_arg(step, f"--point {key} STEP"), key: _number_arg(value, f"--point {key}")})
        keys += [key] if key not in keys else []
    baseline = {name: _number_arg(value, f"--baseline {name}") for name, value in args.baseline}
    print(plot_learning_curve(rows, args.out, keys=keys, baseline=baseline or None, title=args.title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
