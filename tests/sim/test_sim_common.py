"""Properties every simulated task must have, checked on all of them: the Gymnasium contract,
observations that match their specs, determinism, and randomisation hooks that are off by default."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import sim  # noqa: F401 - registers the reverie/* ids
from core.interface import DiscreteSpec
from core.layout import FLAG_KEYS
from sim.tasks import TASKS, default_config, make_policy, make_robot

TASK_NAMES = list(TASKS)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_gymnasium_env_checker(task: str) -> None:
    env = gym.make(TASKS[task].gym_id, render_mode="rgb_array")
    try:
        check_env(env.unwrapped)
        assert env.unwrapped.render().shape == (256, 256, 3)
    finally:
        env.close()


@pytest.mark.parametrize("task", TASK_NAMES)
def test_gym_step_reports_flags_consistently(task: str) -> None:
    env = gym.make(TASKS[task].gym_id, overrides=["control.episode_steps=3"])
    try:
        obs, _ = env.reset(seed=0)
        assert set(obs) & set(FLAG_KEYS) == set()
        for i in range(3):
            obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
            assert isinstance(reward, float)
            if i < 2:
                assert not truncated
        assert terminated or truncated
    finally:
        env.close()


@pytest.mark.parametrize("task", TASK_NAMES)
def test_observations_match_specs(task: str) -> None:
    with make_robot(default_config(task)) as robot:
        policy = make_policy("random", robot, seed=0)
        obs = robot.reset(seed=0)
        assert obs["is_first"] and not obs["is_last"]
        for step in range(10):
            assert set(obs) == set(robot.observation_spec), sorted(obs)
            for key, spec in robot.observation_spec.items():
                assert spec.contains(obs[key], atol=0.02), (step, key, obs[key], spec)
            robot.send(policy(obs))
            obs = robot.observe()
            assert not obs["is_first"]


@pytest.mark.parametrize("task", TASK_NAMES)
def test_same_seed_and_actions_give_identical_observations(task: str) -> None:
    def rollout(seed: int) -> list[dict[str, np.ndarray]]:
        with make_robot(default_config(task)) as robot:
            policy = make_policy("random", robot, seed=123)
            out = [robot.reset(seed=seed)]
            for _ in range(15):
                robot.send(policy(out[-1]))
                out.append(robot.observe())
            out.append(robot.reset(seed=seed))  # a second reset with the same seed repeats the first
            return out

    a, b = rollout(5), rollout(5)
    for i, (x, y) in enumerate(zip(a, b)):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=f"step {i}, key {key}")
    for key in a[0]:
        np.testing.assert_array_equal(a[0][key], a[-1][key], err_msg=f"reset repeat, key {key}")
    c = rollout(6)
    assert any(not np.array_equal(a[i][k], c[i][k]) for i in range(len(a)) for k in a[i]), "seed has no effect"


@pytest.mark.parametrize("task", TASK_NAMES)
def test_randomisation_is_off_by_default_and_seeded_when_on(task: str) -> None:
    on = ["randomization.colors=true", "randomization.lighting=true", "randomization.camera_jitter=0.02",
          "randomization.friction=[0.5, 1.5]", "randomization.mass_scale=[0.8, 1.2]"]
    with make_robot(default_config(task)) as plain, make_robot(default_config(task, on)) as rand, \
            make_robot(default_config(task, on)) as rand2:
        assert not plain.randomizer.active and rand.randomizer.active
        img_plain = plain.reset(seed=1)["image"]
        img_rand = rand.reset(seed=1)["image"]
        np.testing.assert_array_equal(img_rand, rand2.reset(seed=1)["image"])
        assert not np.array_equal(img_plain, img_rand)
        body = rand.randomized_bodies()[0]
        import pybullet as p

        frictions = {p.getDynamicsInfo(body, -1, physicsClientId=c.client)[1] for c in (plain, rand)}
        assert len(frictions) == 2, "friction randomisation had no effect"


@pytest.mark.parametrize("task", TASK_NAMES)
def test_close_is_idempotent_and_context_manager_closes(task: str) -> None:
    robot = make_robot(default_config(task))
    with robot:
        robot.reset(seed=0)
    robot.close()
    assert robot.client == -1


def test_discrete_and_continuous_specs_are_exposed() -> None:
    kinds = {task: isinstance(make_robot_spec(task), DiscreteSpec) for task in TASK_NAMES}
    assert kinds["arm_reach"] is False


def make_robot_spec(task: str):  # noqa: ANN201 - small helper
    with make_robot(default_config(task)) as robot:
        return robot.action_spec
