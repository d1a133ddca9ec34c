"""`python -m learner.plots` redraws a run's learning curve with an evaluation point and reference lines
(what `make demo` draws after its final evaluation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from learner.metrics import MetricsLogger
from learner.plots import main

ORANGE = (255, 127, 14)  # matplotlib's C1: the second key drawn (eval/return)
GREEN = (44, 160, 44)  # C2: the first baseline after the two keys


def _pixels(png: Path, rgb: tuple[int, int, int]) -> int:
    image = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return int((np.abs(image - np.array(rgb)).sum(axis=-1) < 30).sum())


def _metrics(tmp_path: Path) -> Path:
    with MetricsLogger(tmp_path / "run", tensorboard=False) as log:
        for step, ret in ((250, -3.7), (500, -3.1), (750, -2.0)):
            log.log(step, {"train/return": ret})
    return tmp_path / "run" / "metrics.jsonl"


def test_the_curve_carries_the_point_and_the_baseline(tmp_path: Path) -> None:
    metrics = _metrics(tmp_path)
    plain, marked = tmp_path / "plain.png", tmp_path / "marked.png"
    assert main([str(metrics), "--out", str(plain)]) == 0
    assert main([str(metrics), "--out", str(marked), "--point", "eval/return", "750", "-0.9",
                 "--baseline", "random policy", "-4.2"]) == 0
    assert _pixels(plain, ORANGE) == 0 and _pixels(plain, GREEN) == 0
    assert _pixels(marked, ORANGE) > 20  # the evaluation's marker (and its legend entry)
    assert _pixels(marked, GREEN) > 200  # the dashed line across the axes


def test_a_run_without_metrics_still_gets_its_baselines(tmp_path: Path) -> None:
    out = tmp_path / "curve.png"
    assert main([str(tmp_path / "none" / "metrics.jsonl"), "--out", str(out), "--baseline", "random policy", "-4"]) == 0
    assert _pixels(out, GREEN) > 200


@pytest.mark.parametrize("value", ["nan", "inf", "x"])
def test_a_value_that_is_not_a_number_is_refused(tmp_path: Path, value: str) -> None:
    with pytest.raises(SystemExit) as info:
        main([str(_metrics(tmp_path)), "--out", str(tmp_path / "c.png"), "--baseline", "random policy", value])
    expected = f"python -m learner.plots: --baseline random policy: expected a finite number, found {value!r}"
    assert str(info.value) == expected
    assert not (tmp_path / "c.png").exists()
