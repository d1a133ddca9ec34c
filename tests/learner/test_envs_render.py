"""Evaluation videos of Gymnasium envs: rendered when the env's render backend is installed (the learner extra
brings pygame, for the classic-control envs such as Pendulum), and said in one line when it is not."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from core.config import load_config
from learner.envs import Env


def _pendulum() -> Env:
    env = Env(load_config("hardware_configs/gym_pendulum.yaml"), render=True)
    env.reset()
    return env


def test_pendulum_renders_with_the_learner_extra() -> None:
    env = _pendulum()
    try:
        frame = env.render()
    finally:
        env.close()
    assert isinstance(frame, np.ndarray) and frame.ndim == 3 and frame.dtype == np.uint8 and frame.std() > 0


def test_a_missing_render_backend_is_said_once_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "pygame", None)  # `import pygame` fails as if it were not installed
    monkeypatch.setitem(sys.modules, "pygame.gfxdraw", None)
    env = _pendulum()
    try:
        assert env.render() is None and env.render() is None
    finally:
        env.close()
    err = capsys.readouterr().err
    assert err.splitlines() == ['Pendulum-v1: no episode videos: pygame is not installed, run '
                                '`pip install "gymnasium[classic_control]"`']
