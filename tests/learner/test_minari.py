"""Minari export (`reverie-replay export --format minari`, learner/formats/minari.py): replays recorded by the
real tools (scripted ArmReach demonstrations in PyBullet; CartPole and Pendulum stepped through the learner's
own env adapter) exported with Minari's API and loaded back with `minari.load_dataset`: episodes,
observations, actions, rewards, terminations and truncations exactly as recorded, the environment recovered
where the recorded spaces are the task's, clear errors otherwise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

minari = pytest.importorskip("minari", reason="minari (the offline extra: pip install -e '.[offline]') is missing")
pytest.importorskip("pyarrow", reason="the offline extra is not installed")

from core.config import load_config  # noqa: E402
from learner.envs import Env  # noqa: E402
from learner.offline.reader import ReplayDir  # noqa: E402
from learner.replay import Replay  # noqa: E402
from learner.replay.chunk_file import TIME, VERSION  # noqa: E402
from learner.replay_cli import main as replay_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _load(root: Path, dataset_id: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return minari.load_dataset(dataset_id)


def _check_exact(replay_dir: Path, dataset, keys: list[str] | None) -> list:
    """Every exported episode equals the replay's complete episodes, in order; returns the replay episodes."""
    replay = ReplayDir(replay_dir)
    episodes = [ep for ep in replay.episodes() if ep.complete]
    assert dataset.total_episodes == len(episodes)
    assert dataset.total_steps == sum(ep.length - 1 for ep in episodes)
    for ep, got in zip(episodes, dataset.iterate_episodes(), strict=True):
        s = replay.steps(ep)
        n = ep.length
        if keys is None:  # a Gymnasium env's plain vector
            assert np.array_equal(got.observations, s["vector"])
        else:
            assert set(got.observations) == set(keys)
            for key in keys:
                assert got.observations[key].dtype == s[key].dtype, key
                assert np.array_equal(got.observations[key], s[key]), key
        assert len(got.rewards) == n - 1
        assert np.array_equal(np.asarray(got.rewards, np.float32), s["reward"][1:])
        assert np.array_equal(got.terminations, s["is_terminal"][1:])
        assert np.array_equal(got.truncations, s["is_last"][1:] & ~s["is_terminal"][1:])
        assert np.array_equal(got.infos["wall_time"], s[TIME].astype(np.float64))
        assert np.array_equal(got.infos["policy_version"], s[VERSION].astype(np.int64))
    return episodes


def test_scripted_arm_reach_demonstrations_load_back_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    demos = tmp_path / "demos"
    assert replay_main(["record", "--config", str(ROOT / "hardware_configs/sim_arm_reach.yaml"), "--episodes", "3",
                        "--out", str(demos), "--set", "control.episode_steps=6"]) == 0
    root = tmp_path / "datasets"
    assert replay_main(["export", str(demos), "--format", "minari", "--out", str(root)]) == 0
    out, err = capsys.readouterr()
    assert "reverie/ArmReach/demos-v0" in out and "Traceback" not in err
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # nothing left of the temp root
    dataset = _load(root, "reverie/ArmReach/demos-v0", monkeypatch)
    episodes = _check_exact(demos, dataset, ["image", "joint_pos", "joint_vel", "tool_pos"])
    replay = ReplayDir(demos)
    for ep, got in zip(episodes, dataset.iterate_episodes(), strict=True):  # sim actions are [-1, 1]: as recorded
        assert np.array_equal(got.actions, replay.steps(ep)["action"][:-1])
    assert dataset.observation_space["joint_pos"].low.tolist() == pytest.approx(
        replay.descriptions["demo-scripted"]["observations"]["joint_pos"]["low"])
    env = dataset.recover_environment()  # the default ArmReach has the recorded spaces
    try:
        assert env.observation_space["image"].shape == dataset.observation_space["image"].shape
        assert env.action_space.shape == (3,)
    finally:
        env.close()

    # Chosen episodes, JPEG images; an existing dataset is refused and left alone.
    assert replay_main(["export", str(demos), "--format", "minari", "--out", str(root), "--dataset-id",
                        "reach-v3", "--episodes", "1", "--images", "jpeg"]) == 0
    small = _load(root, "reach-v3", monkeypatch)
    assert small.total_episodes == 1 and small.total_steps == 6  # 7 steps: the reset's and 6 more
    jpeg = next(small.iterate_episodes()).observations["image"]
    exact = replay.steps(replay.episodes()[1], ["image"])["image"]
    assert jpeg.shape == exact.shape and np.abs(jpeg.astype(int) - exact).mean() < 12  # lossy, close
    assert replay_main(["export", str(demos), "--format", "minari", "--out", str(root), "--dataset-id",
                        "reach-v3"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert _load(root, "reach-v3", monkeypatch).total_episodes == 1


def _record_gym(config: str, out: Path, steps: int, seed: int = 0) -> Env:
    """Random actions in a Gymnasium env through the learner's env adapter, stored as `train` stores them;
    the last episode is left open (cut by the end of the data)."""
    cfg = load_config(ROOT / "hardware_configs" / config)
    env = Env(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    replay = Replay.from_config(out, cfg.replay, seed=0)
    replay.describe("0", env.describe(cfg))
    obs = env.reset()
    for i in range(steps):
        action = env.random_action(rng)
        replay.add({**obs, "action": action}, "0", task=env.id, policy_version=i // 25)  # weights that changed
        obs = env.reset() if obs["is_last"] else env.step(action)
    replay.close()
    return env


@pytest.mark.parametrize("config, steps", [("gym_cartpole.yaml", 80), ("gym_pendulum.yaml", 230)])
def test_gymnasium_episodes_terminal_discrete_and_bounded_actions(config: str, steps: int, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "replay"
    env = _record_gym(config, out, steps)
    root = tmp_path / "datasets"
    assert replay_main(["export", str(out), "--format", "minari", "--out", str(root), "--dataset-id", "gym-v0"]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 episode(s): incomplete" in err  # the open last episode
    dataset = _load(root, "gym-v0", monkeypatch)
    episodes = _check_exact(out, dataset, None)
    replay = ReplayDir(out)
    for ep, got in zip(episodes, dataset.iterate_episodes(), strict=True):
        recorded = replay.steps(ep)["action"][:-1]
        sent = [env.to_env(a) for a in recorded]  # what the env received when it was recorded
        assert np.array_equal(np.asarray(got.actions), np.asarray(sent)), config
    recovered = dataset.recover_environment()
    try:
        assert recovered.spec.id == env.id and recovered.action_space == env.env.action_space
    finally:
        recovered.close()
        env.close()
    if config == "gym_cartpole.yaml":
        assert any(ep.end == "terminal" for ep in episodes)  # the pole fell: terminations, not truncations
        assert dataset.action_space.n == 2
    else:
        assert dataset.action_space.high.tolist() == [2.0]
        assert all(ep.end == "time limit" for ep in episodes)


def test_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert replay_main(["export", str(tmp_path / "empty"), "--format", "minari", "--out", str(tmp_path / "d")]) == 2
    assert "not a replay directory" in capsys.readouterr().err
    out = tmp_path / "replay"
    _record_gym("gym_cartpole.yaml", out, 30).close()
    for args, message in ((["--dataset-id", "not an id"], "--dataset-id 'not an id'"),
                          (["--images", "h264"], "--images h264: minari takes raw, jpeg"),
                          (["--dataset-id", "x-v0", "--episodes", "99"], "no episode matches")):
        assert replay_main(["export", str(out), "--format", "minari", "--out", str(tmp_path / "d"), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert replay_main(["export", str(out), "--out", str(tmp_path / "lr"), "--dataset-id", "x-v0"]) == 2
    assert "--dataset-id is for --format minari" in capsys.readouterr().err
