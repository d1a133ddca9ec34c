"""Renderer choice: the CPU renderer by default, EGL when asked, and `auto` never slower."""

from __future__ import annotations

import numpy as np
import pytest

from sim.camera import egl_is_hardware
from sim.tasks import default_config, make_robot


def _image(renderer: str) -> np.ndarray:
    with make_robot(default_config("arm_reach", [f"camera.renderer={renderer}"])) as robot:
        return robot.reset(seed=0)["image"]


def test_auto_uses_cpu_renderer_without_a_gpu() -> None:
    if egl_is_hardware():
        pytest.skip("this machine has hardware EGL; auto uses it")
    np.testing.assert_array_equal(_image("auto"), _image("tiny"))


def test_egl_renders_the_same_scene_or_says_why_not() -> None:
    try:
        egl = _image("egl")
    except RuntimeError as exc:
        assert "EGL" in str(exc)
        return
    tiny = _image("tiny")
    assert egl.shape == tiny.shape and egl.dtype == np.uint8
    # different rasterisers, same scene: the images agree on average colour to within a few levels
    assert np.abs(egl.astype(float).mean(axis=(0, 1)) - tiny.astype(float).mean(axis=(0, 1))).max() < 25
