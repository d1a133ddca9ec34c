"""Training metrics as JSON lines (the record plots and tests read) plus TensorBoard scalars (for people),
and, through `media`, the run's videos and learning curves as TensorBoard images; rerun gets both when
asked (`--rerun`: `learner/viewers/rerun_live.py`).

`metrics.jsonl` is appended to and flushed row by row, so a killed run loses at most the row being
written; `read_metrics` drops such a truncated last line. TensorBoard's event file is flushed row by
row too (its writer would otherwise hold scalars for up to two minutes: a new run would look empty).
Non-finite values are stored as the strings "nan", "inf", "-inf" (strict JSON has no NaN) and read
back as floats.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import KeysView, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch

from learner.viewers.media import MediaWatch, tb_media
from learner.viewers.rerun_live import RERUN_ENV, RerunSink

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
RESERVED = ("step", "time")
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}

Number = float | int | torch.Tensor | np.number


def _scalar(value: Any, key: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {key!r}: expected a single value, got a tensor of shape {tuple(value.shape)}")
        return float(value.item())
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"metric {key!r}: expected a number, got {value!r}") from e


def _json_value(value: float) -> float | str:
    return value if math.isfinite(value) else repr(value)  # 'nan', 'inf', '-inf'


class MetricsLogger:
    """Append one row per `log` call to `logdir/metrics.jsonl` and to TensorBoard in `logdir/tb`.

    Reopening an existing log appends (a resumed run continues the same file).
    """

    def __init__(self, logdir: str | Path, tensorboard: bool = True, rerun: str | None = None) -> None:
        """`rerun`: where live rerun logging goes (rerun_live's targets); None: the REVERIE_RERUN variable,
        unset for none."""
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.path = self.logdir / METRICS_FILE
        # A run killed mid-row leaves no newline: start on a fresh line so the new rows stay readable.
        needs_newline = self.path.exists() and self.path.stat().st_size > 0 and not _ends_with_newline(self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if needs_newline:
            self._file.write("\n")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # lazy: pulls in tensorboard

            self._tb = SummaryWriter(log_dir=str(self.logdir / TB_DIR))
        target = os.environ.get(RERUN_ENV) if rerun is None else rerun
        self._rerun = None if target is None else RerunSink(target, self.logdir)
        self._media = MediaWatch(self.logdir)

    @property
    def rerun(self) -> RerunSink | None:
        """The live rerun sink when `--rerun` is on (serve adds the robots' camera images to it)."""
        return self._rerun

    def log(self, step: int, metrics: Mapping[str, Number]) -> None:
        """Record `metrics` at `step`; tensors are read with `.item()` (a host sync: log sparingly)."""
        clash = [k for k in metrics if k in RESERVED]
        if clash:
            raise ValueError(f"metric names {clash} are reserved for the row's own fields")
        values = {k: _scalar(v, k) for k, v in metrics.items()}
        row = {"step": int(step), "time": time.time(), **{k: _json_value(v) for k, v in values.items()}}
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, int(step), walltime=row["time"])
            self._tb.flush()
        if self._rerun is not None:
            self._rerun.scalars(int(step), values)

    def media(self, step: int) -> None:
        """Hand the videos and learning curves written since the last call to TensorBoard and rerun."""
        if self._tb is None and self._rerun is None:
            return
        for item in self._media.new():
            if self._tb is not None:
                tb_media(self._tb, item, int(step))
            if self._rerun is not None:
                self._rerun.media(int(step), item)
        if self._tb is not None:
            self._tb.flush()

    def flush(self) -> None:
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._rerun is not None:
            self._rerun.close()
            self._rerun = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1) == b"\n"


def _decode_row(row: dict[str, Any]) -> dict[str, Any]:
    return {k: _NONFINITE.get(v, v) if isinstance(v, str) else v for k, v in row.items()}


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl (or of `path/metrics.jsonl` for a log directory), in file order.

    A truncated last line (a run killed mid-write) is dropped silently; a bad line elsewhere is
    skipped with a warning naming it.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError:
            if i < len(lines) - 1:  # the last element is what follows the final newline
                warnings.warn(f"{path}:{i + 1}: skipping malformed metrics row", stacklevel=2)
            continue
        rows.append(_decode_row(row))
    return rows


class Mean:
    """Running means of scalar metrics, cheap on GPU: tensors are summed on their device and read
    with one `.item()` per key in `result()`, never in `add()`. A non-scalar tensor counts as one
    sample: its mean."""

    def __init__(self) -> None:
        self._py: dict[str, float] = {}
        self._tensor: dict[str, torch.Tensor] = {}
        self._count: dict[str, int] = {}

    def add(self, metrics: Mapping[str, Number]) -> None:
        for k, v in metrics.items():
            if isinstance(v, torch.Tensor):
                v = v.detach().float()
                v = v.mean() if v.numel() != 1 else v.reshape(())
                self._tensor[k] = self._tensor[k] + v if k in self._tensor else v.clone()
            else:
                self._py[k] = self._py.get(k, 0.0) + float(v)
            self._count[k] = self._count.get(k, 0) + 1

    def result(self, reset: bool = True) -> dict[str, float]:
        """The mean of every key added since the last reset (keys in first-seen order)."""
        out = {}
        for k, n in self._count.items():
            total = self._py.get(k, 0.0)
            if k in self._tensor:
                total += self._tensor[k].item()
            out[k] = total / n
        if reset:
            self.reset()
        return out

    def keys(self) -> KeysView[str]:
        """The keys added since the last reset."""
        return self._count.keys()

    def reset(self) -> None:
        self._py.clear()
        self._tensor.clear()
        self._count.clear()

    def __len__(self) -> int:
        return len(self._count)
