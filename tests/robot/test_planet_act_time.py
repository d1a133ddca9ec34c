"""The robot measures a policy's act() before using it: a planner (PlaNet) whose p99 does not fit the control
period is refused, initially and when it arrives over a real link, with a message naming the measured time and
the settings that shrink it; a policy that fits is used. Real torch policies, real ZeroMQ on loopback."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from dreamer_helpers import make_cfg
from link_helpers import learner, wait_for

from core.agents import load_policy
from core.agents.dreamer.policy import policy_weights as dreamer_weights
from core.agents.planet.net import PlanetNet
from core.agents.planet.policy import policy_weights
from core.config import Config
from core.config.planet import PlanetConfig
from core.interface import ArraySpec, Robot, flag_specs
from core.weights import weights_to_bytes
from learner.agents.dreamer.agent import DreamerModel
from robot.link.spool import Spool
from robot.link.thread import RobotLink
from robot.runner import ControlLoop, act_time_problem, step_spec

TINY = {"deter": 16, "hidden": 16, "stoch": 4, "units": 16, "candidates": 20, "top_k": 2, "iterations": 2,
        "horizon": 3}
# The model at its official width, 1000 candidates: ~2 GFLOP a plan even at 2 iterations of horizon 3, tens to
# hundreds of ms of CPU; the official 10 x 12 would be 20 times that.
HEAVY = {"candidates": 1000, "iterations": 2, "horizon": 3}


class Probe(Robot):
    """A trivial robot: a 3-D reading, 2-D continuous commands."""

    def __init__(self) -> None:
        self.observation_spec = {"proprio": ArraySpec((3,), np.float32), **flag_specs()}
        self.action_spec = ArraySpec((2,), np.float32, -1.0, 1.0)

    def _obs(self, first: bool) -> dict[str, np.ndarray]:
        return {"proprio": np.zeros(3, np.float32), "reward": np.float32(0.0), "is_first": np.bool_(first),
                "is_last": np.bool_(False), "is_terminal": np.bool_(False)}

    def reset(self, seed: int | None = None) -> dict[str, np.ndarray]:
        return self._obs(True)

    def send(self, action: np.ndarray | int) -> None:
        pass

    def observe(self) -> dict[str, np.ndarray]:
        return self._obs(False)

    def stop(self) -> None:
        pass

    def close(self) -> None:
        pass


def planet_blob(settings: dict, version: int) -> bytes:
    torch.manual_seed(0)
    spec, act = step_spec(Probe())
    net = PlanetNet(PlanetConfig(**settings), spec.without("action"), act)
    return weights_to_bytes(*policy_weights(net, version))


def test_act_time_is_measured_for_any_policy_and_a_slow_planner_is_named_with_its_settings() -> None:
    spec, act = step_spec(Probe())
    dreamer = DreamerModel(make_cfg(), spec.without("action"), act)
    assert act_time_problem(load_policy(weights_to_bytes(*dreamer_weights(dreamer, 1))), spec, 1.0) is None
    assert act_time_problem(load_policy(planet_blob(TINY, 1)), spec, 1.0) is None
    why = act_time_problem(load_policy(planet_blob(HEAVY, 2)), spec, 0.005)
    assert why is not None and why.startswith("act() takes ")
    assert "(p99 of 2 calls, CPU time), more than the control period of 5.0 ms (control.hz 200)" in why, why
    assert "planet.candidates (1000), planet.iterations (2) or planet.horizon (3)" in why and "control.hz" in why


def test_a_planner_too_slow_for_the_period_is_refused_initially_and_over_the_link(tmp_path: Path, caplog) -> None:
    cfg = Config.model_validate({"name": "loop-test", "task": "arm_reach", "control": {"hz": 20.0},
                                 "sim": {"physics_hz": 1000.0}, "link": {"chunk_seconds": 0.2}})
    robot = Probe()
    spec, act = step_spec(robot)
    with learner(tmp_path) as server:
        link = RobotLink(server.endpoint, "slow-test", Spool(tmp_path / "spool", 1 << 24),
                         {"spec": spec.to_wire(), "task": "loop-test", "hz": 20.0, "discrete": act.discrete})
        link.start()
        try:
            with pytest.raises(ValueError, match=r"initial policy v2: act\(\) takes .* more than the control period "
                                                 r"of 50.0 ms .*planet.candidates \(1000\)"):
                ControlLoop(cfg, robot, link, initial=load_policy(planet_blob(HEAVY, 2)))
            loop = ControlLoop(cfg, robot, link)
            wait_for(lambda: link.status().connected, "connected")
            runner = threading.Thread(target=loop.run)
            runner.start()
            try:
                with caplog.at_level(logging.WARNING, logger="reverie.robot"):
                    server.publish(planet_blob(HEAVY, 5), version=5, step=5)
                    wait_for(lambda: loop.loader.failures == 1, "the slow planner refused")
                assert loop.version == 0 and loop.stats.swaps == 0  # still acting randomly
                assert "weights v5 could not be turned into a policy (act() takes" in caplog.text
                server.publish(planet_blob(TINY, 6), version=6, step=6)
                wait_for(lambda: loop.version == 6, "a planner that fits swapped in")
            finally:
                loop.stop()
                runner.join()
        finally:
            link.close(5.0)
    assert loop.stats.swaps == 1 and loop.loader.failures == 1
