"""QuadrupedWalk: filter, PD control, limits, reward stages, reset modes, determinism, Gymnasium API."""

from __future__ import annotations

from collections.abc import Iterator

import gymnasium as gym
import numpy as np
import pybullet as p
import pytest
from gymnasium.utils.env_checker import check_env
from scipy import signal

import sim  # noqa: F401  (registers the Gymnasium ids)
from sim.filters import LowPassFilter, butter2_lowpass
from sim.quadruped_walk import STAND, QuadrupedWalk, substep_targets
from sim.tasks import default_config

NO_CAMERA = ("camera.enabled=false",)


def make(*overrides: str) -> QuadrupedWalk:
    return QuadrupedWalk(default_config("quadruped_walk", [*NO_CAMERA, *overrides]))


@pytest.fixture
def robots() -> Iterator[list[QuadrupedWalk]]:
    """Robots built by a test, closed after it."""
    made: list[QuadrupedWalk] = []
    yield made
    for robot in made:
        robot.close()


def base_pose(robot: QuadrupedWalk) -> np.ndarray:
    pos, orn = p.getBasePositionAndOrientation(robot.robot, physicsClientId=robot.client)
    q, qd = robot.joint_state()
    return np.concatenate([pos, orn, q, qd])


def bang_bang(rng: np.random.Generator, step: int) -> np.ndarray:
    """Actions that alternate between uniform and full-scale ±1, the hardest on limits and torques."""
    a = rng.choice([-1.0, 1.0], 12) if step % 2 else rng.uniform(-1.0, 1.0, 12)
    return a.astype(np.float32)


# ----- filter ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("cutoff", "rate"), [(1.5, 20.0), (0.3, 20.0), (4.0, 50.0), (9.5, 20.0), (100.0, 1000.0)])
def test_butterworth_coefficients_match_scipy(cutoff: float, rate: float) -> None:
    b, a = butter2_lowpass(cutoff, rate)
    b_ref, a_ref = signal.butter(2, cutoff, btype="low", fs=rate)
    np.testing.assert_allclose(b, b_ref, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(a, a_ref, rtol=1e-10, atol=1e-14)
    assert b.sum() / a.sum() == pytest.approx(1.0, abs=1e-12)  # DC gain 1
    _, h = signal.freqz(b, a, worN=[cutoff], fs=rate)
    assert abs(h[0]) == pytest.approx(2**-0.5, rel=1e-9)  # -3 dB at the cutoff


def test_filter_output_matches_lfilter_and_starts_at_rest() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3))
    filt = LowPassFilter(1.5, 20.0, 3)
    filt.reset(np.zeros(3))
    out = np.array([filt(row) for row in x])
    b, a = butter2_lowpass(1.5, 20.0)
    np.testing.assert_allclose(out, signal.lfilter(b, a, x, axis=0), atol=1e-12)
    filt.reset(np.array([0.5, -1.0, 2.0]))  # at rest: a constant input passes unchanged
    for _ in range(5):
        np.testing.assert_allclose(filt(np.array([0.5, -1.0, 2.0])), [0.5, -1.0, 2.0], atol=1e-12)
    step = [filt(np.array([1.5, -1.0, 2.0]))[0] for _ in range(100)]
    assert step[0] < 0.6 and step[-1] == pytest.approx(1.5, abs=1e-6)  # slow rise, settles on the input


def test_filter_rejects_cutoff_above_nyquist_and_none_disables() -> None:
    with pytest.raises(ValueError, match="Nyquist"):
        butter2_lowpass(10.0, 20.0)
    identity = LowPassFilter(None, 20.0, 2)
    assert np.array_equal(identity(np.array([3.0, -4.0])), [3.0, -4.0])


def test_substep_targets_ramp_linearly() -> None:
    prev, new = np.array([0.0, 1.0]), np.array([1.0, -1.0])
    ramp = substep_targets(prev, new, 50)
    assert ramp.shape == (50, 2)
    np.testing.assert_allclose(ramp[-1], new)
    np.testing.assert_allclose(ramp[0], prev + (new - prev) / 50)
    np.testing.assert_allclose(np.diff(ramp, axis=0), np.tile((new - prev) / 50, (49, 1)))


# ----- control --------------------------------------------------------------------------------------
def test_action_maps_to_clipped_offsets_from_standing(robots: list[QuadrupedWalk]) -> None:
    robot = make("quadruped_walk.filter_cutoff_hz=null", "quadruped_walk.reset_mode=reset",
                 "quadruped_walk.initial_pose=stand")
    robots.append(robot)
    robot.reset()
    action = np.tile(np.array([0.5, -0.25, 1.0], np.float32), 4)
    robot.send(action)
    expected = np.clip(STAND + action * np.tile([0.8, 1.2, 1.2], 4), robot.lower, robot.upper)
    np.testing.assert_allclose(robot.target, expected)
    assert expected[2] == pytest.approx(robot.upper[2])  # lower joint: -1.8 + 1.2 is past the limit, so clipped

    filtered = make("quadruped_walk.reset_mode=reset", "quadruped_walk.initial_pose=stand")
    robots.append(filtered)
    filtered.reset()
    filtered.send(action)
    b, _ = butter2_lowpass(1.5, 20.0)  # from rest, the first output moves b0 of the way to the clipped target
    np.testing.assert_allclose(filtered.target, STAND + b[0] * (expected - STAND), atol=1e-12)
    for _ in range(30):  # a step to the limit: the Butterworth overshoots 4 %, the clip must hold it
        filtered.send(action)
        assert np.all(filtered.target <= filtered.upper) and np.all(filtered.target >= filtered.lower)
    assert filtered.target[2] == pytest.approx(filtered.upper[2])


def test_pd_torques_follow_the_ramp_and_never_exceed_max_torque(
    robots: list[QuadrupedWalk], monkeypatch: pytest.MonkeyPatch
) -> None:
    limits = np.array([5.0, 7.0, 9.0])
    robot = make("quadruped_walk.max_torque=[5.0, 7.0, 9.0]", "quadruped_walk.kp=[40.0, 50.0, 60.0]",
                 "quadruped_walk.kd=[0.5, 1.0, 2.0]", "quadruped_walk.initial_pose=stand")
    robots.append(robot)
    calls: list[tuple[int, np.ndarray, np.ndarray]] = []
    original = p.setJointMotorControlArray

    def spy(*args, **kwargs):  # record each motor command with the joint state it was computed from
        mode = kwargs.get("controlMode", args[2] if len(args) > 2 else None)
        state = np.array([s[:2] for s in p.getJointStates(robot.robot, robot.joints, physicsClientId=robot.client)])
        calls.append((mode, np.asarray(kwargs.get("forces", []), dtype=float), state))
        return original(*args, **kwargs)

    monkeypatch.setattr(p, "setJointMotorControlArray", spy)
    robot.reset()
    rng = np.random.default_rng(0)
    kp, kd = np.tile([40.0, 50.0, 60.0], 4), np.tile([0.5, 1.0, 2.0], 4)
    commands = []
    for i in range(40):
        previous = robot.target.copy()
        calls.clear()
        robot.send(bang_bang(rng, i))
        assert all(mode == p.TORQUE_CONTROL for mode, _, _ in calls)
        assert len(calls) == robot.cfg.substeps  # one torque command per substep
        ramp = substep_targets(previous, robot.target, robot.cfg.substeps)
        for q_des, (_, forces, state) in zip(ramp, calls):
            expected = np.clip(kp * (q_des - state[:, 0]) - kd * state[:, 1], -np.tile(limits, 4), np.tile(limits, 4))
            np.testing.assert_allclose(forces, expected, atol=1e-9)
            commands.append(forces)
    peak = np.abs(np.array(commands)).max(axis=0).reshape(4, 3)
    assert np.all(peak <= limits + 1e-9)
    np.testing.assert_allclose(peak.max(axis=0), limits)  # saturated: the clip is what holds them
    calls.clear()
    robot.reset(seed=0)  # a (re)start disables pybullet's velocity motors so only our torques act
    assert any(mode == p.VELOCITY_CONTROL and np.all(forces == 0) for mode, forces, _ in calls)


def test_random_actions_stay_within_joint_limits(robots: list[QuadrupedWalk], monkeypatch: pytest.MonkeyPatch) -> None:
    """pybullet adds a limit row only after a joint crosses its limit: overshoot ~ speed * dt.

    With the default 1.5 Hz filter the joints reach their stops slowly (measured ~0.001 rad); with
    unfiltered bang-bang actions they hit at up to the 28.6 rad/s clamp (measured ~0.03 rad).
    """
    original = p.stepSimulation
    worst = {"value": 0.0}
    current: list[QuadrupedWalk] = []

    def checked_step(*args, **kwargs):  # measure every substep, not only what observations see
        out = original(*args, **kwargs)
        r = current[-1]
        q, _ = r.joint_state()
        worst["value"] = max(worst["value"], float(np.max(r.lower - q)), float(np.max(q - r.upper)))
        return out

    monkeypatch.setattr(p, "stepSimulation", checked_step)
    cases = [((), 0.02), (("quadruped_walk.filter_cutoff_hz=null", "quadruped_walk.initial_pose=stand"), None),
             (("quadruped_walk.filter_cutoff_hz=null", "quadruped_walk.action_scale=[1.0, 2.5, 2.5]"), None),
             (("quadruped_walk.filter_cutoff_hz=null", "quadruped_walk.initial_pose=random",
               "quadruped_walk.reset_mode=reset"), None)]
    for overrides, tolerance in cases:
        robot = make("control.episode_steps=60", *overrides)
        robots.append(robot)
        current.append(robot)
        tolerance = tolerance or robot.limit_tolerance
        assert robot.limit_tolerance < 0.05
        worst["value"] = 0.0
        robot.reset(seed=1)
        rng = np.random.default_rng(1)
        for i in range(120):
            if robot.observe()["is_last"]:
                robot.reset()
            robot.send(bang_bang(rng, i))
            assert np.all(robot.target >= robot.lower) and np.all(robot.target <= robot.upper)
            obs = robot.observe()
            for key in ("joint_pos", "joint_vel", "imu"):  # speeds too: pybullet clamps them to the URDF limit
                assert robot.observation_spec[key].contains(obs[key]), (key, obs[key])
        assert worst["value"] < tolerance, (overrides, worst["value"])


def test_standing_with_zero_actions_stays_upright(robots: list[QuadrupedWalk]) -> None:
    robot = make("quadruped_walk.reset_mode=reset", "quadruped_walk.initial_pose=stand")
    robots.append(robot)
    robot.reset()
    start = robot.base_position()
    for _ in range(100):  # 5 s
        robot.send(np.zeros(12, np.float32))
        assert robot.info["upright"] > 0.99
    end = robot.base_position()
    assert end[2] > 0.22 and np.linalg.norm(end[:2] - start[:2]) < 0.05  # stands tall, does not wander
    assert robot.info["stages"] == 5 and robot.observe()["reward"] > 3.8

    weak = make("quadruped_walk.reset_mode=reset", "quadruped_walk.initial_pose=stand",
                "quadruped_walk.kp=[3.0, 3.0, 3.0]")
    robots.append(weak)
    weak.reset()
    for _ in range(40):
        weak.send(np.zeros(12, np.float32))
    assert weak.base_position()[2] < 0.15  # the same test with feeble gains: it sinks


# ----- observations and reward ---------------------------------------------------------------------
def test_observations_match_spec_and_imu_is_in_base_frame(robots: list[QuadrupedWalk]) -> None:
    robot = make("quadruped_walk.reset_mode=reset", "quadruped_walk.initial_pose=back")
    robots.append(robot)
    obs = robot.reset()
    assert set(obs) == set(robot.observation_spec)
    for key, spec in robot.observation_spec.items():
        assert spec.contains(np.asarray(obs[key])), key
    assert abs(obs["imu"][0]) == pytest.approx(np.pi, abs=1e-3)  # on its back: rolled half a turn
    # Base rotated by pi about x (heading 0): a world +y spin is a -y spin in the base frame.
    pos, _ = p.getBasePositionAndOrientation(robot.robot, physicsClientId=robot.client)
    p.resetBasePositionAndOrientation(robot.robot, pos, p.getQuaternionFromEuler([np.pi, 0.0, 0.0]),
                                      physicsClientId=robot.client)
    p.resetBaseVelocity(robot.robot, [0, 0, 0], [0.0, 1.0, 0.0], physicsClientId=robot.client)
    np.testing.assert_allclose(robot.observe()["imu"][2:], [0.0, -1.0], atol=1e-5)


def test_lying_on_back_scores_lower_than_standing(robots: list[QuadrupedWalk]) -> None:
    rewards, infos = {}, {}
    for pose in ("stand", "back"):
        robot = make("quadruped_walk.reset_mode=reset", f"quadruped_walk.initial_pose={pose}")
        robots.append(robot)
        robot.reset()
        for _ in range(5):
            robot.send(np.zeros(12, np.float32))
        rewards[pose], infos[pose] = robot.observe()["reward"], robot.info
    assert infos["stand"]["upright"] > 0.99 and infos["back"]["upright"] < 0.01
    assert infos["back"]["hip"] > 0.9  # the legs are in the standing pose, but the stage is locked...
    assert infos["back"]["stages"] == 1
    assert rewards["back"] == pytest.approx(infos["back"]["upright"], abs=1e-6)  # ...so only upright counts
    terms = ("upright", "hip", "upper", "lower", "velocity")
    assert rewards["stand"] == pytest.approx(sum(infos["stand"][k] for k in terms), abs=1e-5)
    assert rewards["stand"] > rewards["back"] + 3.0


def test_forward_velocity_term_uses_heading(robots: list[QuadrupedWalk]) -> None:
    robot = make("quadruped_walk.reset_mode=reset", "quadruped_walk.initial_pose=stand")
    robots.append(robot)
    robot.reset()
    pos, _ = p.getBasePositionAndOrientation(robot.robot, physicsClientId=robot.client)
    yaw = p.getQuaternionFromEuler([0.0, 0.0, np.pi / 2])  # facing +y
    p.resetBasePositionAndOrientation(robot.robot, pos, yaw, physicsClientId=robot.client)
    period = robot.cfg.substeps / robot.cfg.sim.physics_hz
    robot._prev_base = np.array(pos) - [0.0, 0.15 * period, 0.0]  # moved 0.15 m/s along +y
    terms = robot.reward_terms()
    assert terms["forward_velocity"] == pytest.approx(0.15) and terms["velocity"] == pytest.approx(0.5)
    robot._prev_base = np.array(pos) - [0.15 * period, 0.0, 0.0]  # sideways: no forward progress
    assert robot.reward_terms()["forward_velocity"] == pytest.approx(0.0, abs=1e-9)


# ----- episodes -------------------------------------------------------------------------------------
def test_reset_free_never_teleports(robots: list[QuadrupedWalk], monkeypatch: pytest.MonkeyPatch) -> None:
    robot = make("control.episode_steps=15", "quadruped_walk.initial_pose=stand")
    robots.append(robot)
    first = robot.reset()
    start = base_pose(robot)
    teleports: list[str] = []
    for name in ("resetBasePositionAndOrientation", "resetJointState", "restoreState", "resetBaseVelocity"):
        original = getattr(p, name)
        monkeypatch.setattr(p, name, lambda *a, _n=name, _f=original, **k: (teleports.append(_n), _f(*a, **k))[1])
    assert first["is_first"]
    rng = np.random.default_rng(3)
    for episode in range(4):
        steps = 0
        while not robot.observe()["is_last"]:
            robot.send(bang_bang(rng, steps))
            steps += 1
        obs = robot.observe()
        assert steps == 15 and obs["is_last"] and not obs["is_terminal"]
        before = base_pose(robot)
        after_obs = robot.reset()  # no seed: the run goes on
        np.testing.assert_array_equal(base_pose(robot), before, err_msg=f"episode {episode}")
        assert after_obs["is_first"] and not after_obs["is_last"]
    assert teleports == []
    assert np.abs(base_pose(robot) - start).max() > 0.05  # it did move: a teleport home would have shown


def test_reset_mode_returns_to_initial_pose(robots: list[QuadrupedWalk]) -> None:
    for pose, upright in (("stand", 1.0), ("back", 0.0)):
        robot = make("control.episode_steps=20", "quadruped_walk.reset_mode=reset",
                     f"quadruped_walk.initial_pose={pose}")
        robots.append(robot)
        robot.reset()
        start = base_pose(robot)
        rng = np.random.default_rng(0)
        headings = []
        for episode in range(3):
            i = 0
            while not robot.observe()["is_last"]:
                robot.send(bang_bang(rng, i))
                i += 1
            assert np.abs(base_pose(robot) - start).max() > 0.05, (pose, episode)
            robot.reset()
            now = base_pose(robot)  # position (3), quaternion (4), joint angles (12), joint speeds (12)
            np.testing.assert_allclose(now[:3], start[:3], atol=1e-9, err_msg=pose)  # same spot, same height
            np.testing.assert_allclose(now[7:19], STAND, atol=1e-9)
            np.testing.assert_allclose(now[19:], 0.0, atol=1e-9)
            lin, ang = p.getBaseVelocity(robot.robot, physicsClientId=robot.client)
            np.testing.assert_allclose([*lin, *ang], 0.0, atol=1e-9)
            assert robot.reward_terms()["upright"] == pytest.approx(upright, abs=1e-6)
            np.testing.assert_allclose(robot.target, STAND)
            headings.append(p.getEulerFromQuaternion(now[3:7])[2])
        assert len(set(np.round(headings, 6))) == 3  # a new random heading each episode


def test_seeded_reset_restarts_a_reset_free_run(robots: list[QuadrupedWalk]) -> None:
    robot = make("control.episode_steps=10")
    robots.append(robot)
    robot.reset(seed=5)
    start = base_pose(robot)
    rng = np.random.default_rng(0)
    for i in range(10):
        robot.send(bang_bang(rng, i))
    assert np.abs(base_pose(robot) - start).max() > 0.05
    robot.reset(seed=5)
    np.testing.assert_allclose(base_pose(robot), start, atol=1e-9)
    assert robot.reward_terms()["upright"] < 0.01  # back where the run began: on its back


def test_same_seed_and_actions_give_identical_observations(robots: list[QuadrupedWalk]) -> None:
    def rollout(seed: int) -> list[dict[str, np.ndarray]]:
        robot = QuadrupedWalk(default_config("quadruped_walk", [
            "quadruped_walk.initial_pose=random", "quadruped_walk.reset_mode=reset", "control.episode_steps=12",
            "camera.width=32", "camera.height=32"]))
        robots.append(robot)
        out = [robot.reset(seed=seed)]
        rng = np.random.default_rng(42)
        for i in range(20):
            if out[-1]["is_last"]:
                out.append(robot.reset())
            robot.send(bang_bang(rng, i))
            out.append(robot.observe())
        return out

    a, b, c = rollout(7), rollout(7), rollout(8)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert np.array_equal(x[key], y[key]), key
    assert not np.array_equal(a[0]["imu"], c[0]["imu"])  # the seed does change the random drop


def test_gymnasium_check_env_passes() -> None:
    env = gym.make("reverie/QuadrupedWalk-v0")
    try:
        check_env(env.unwrapped, skip_render_check=True)
        obs, _ = env.reset(seed=0)
        assert obs["image"].shape == (64, 64, 3) and obs["joint_pos"].dtype == np.float32
        _, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert not terminated and not truncated and set(info) >= {"upright", "hip", "upper", "lower", "velocity"}
    finally:
        env.close()
