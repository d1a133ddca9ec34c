"""rerun: `reverie-replay view` and the live sink behind `reverie-learner train|serve --rerun`, checked by
reading the written .rrd back with rerun's own reader; the run's videos and curves as TensorBoard images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

rr = pytest.importorskip("rerun", reason="rerun-sdk (the offline extra: pip install -e '.[offline]') is missing")
from rerun.chunk import RrdReader  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from core.config import load_config  # noqa: E402
from learner.cli import main as learner_main  # noqa: E402
from learner.offline.reader import ReplayDir  # noqa: E402
from learner.replay import Replay  # noqa: E402
from learner.replay_cli import main as replay_main  # noqa: E402
from learner.train import Trainer  # noqa: E402
from learner.viewers.rerun_live import RERUN_ENV  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _replay(directory: Path) -> Path:
    rng = np.random.default_rng(1)
    with Replay(directory, chunk_length=8) as replay:
        for stream, lengths in (("arm/0", (6, 5)), ("arm-1", (4,))):
            for n in lengths:
                replay.add_steps({
                    "image": rng.integers(0, 255, (n, 6, 8, 3), dtype=np.uint8),
                    "joint_pos": rng.normal(size=(n, 3)).astype(np.float32),
                    "action": rng.uniform(-1, 1, (n, 2)).astype(np.float32),
                    "reward": rng.normal(size=n).astype(np.float32),
                    "is_first": np.arange(n) == 0, "is_last": np.arange(n) == n - 1,
                    "is_terminal": np.zeros(n, bool)}, stream, task="t", time=1.7e9 + np.arange(n) * 0.1)
    return directory


def _chunks(path: Path) -> dict[str, list]:
    """Every chunk of the recording in `path`, by entity path, as read by rerun's own RRD reader."""
    reader = RrdReader(path)
    assert len(reader.recordings()) == 1
    out: dict[str, list] = {}
    for chunk in reader.stream().to_chunks():
        out.setdefault(chunk.entity_path, []).append(chunk)
    return out


def _column(chunks: list, name: str) -> tuple[list, list]:
    """(step timeline values, column values) over the chunks of one entity that hold `name`."""
    steps, values = [], []
    for chunk in chunks:
        batch = chunk.to_record_batch()
        if name in batch.schema.names:
            steps += batch.column("step").to_pylist()
            values += batch.column(name).to_pylist()
    order = np.argsort(steps, kind="stable")
    return [steps[i] for i in order], [values[i] for i in order]


def test_view_saves_every_episode_on_its_own_step_axis(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = _replay(tmp_path / "replay")
    out = tmp_path / "view.rrd"
    assert replay_main(["view", str(directory), "--save", str(out)]) == 0
    assert "3 episode(s), 15 step(s), 15 image(s)" in capsys.readouterr().out
    chunks = _chunks(out)
    replay = ReplayDir(directory)
    for ep in replay.episodes():
        s = replay.steps(ep)
        base = f"/{rr.escape_entity_path_part(ep.stream)}/episode_{ep.index:05d}"
        steps, actions = _column(chunks[f"{base}/action"], "Scalars:scalars")
        assert steps == list(range(ep.length))  # every episode starts at step 0
        assert np.allclose(actions, s["action"])
        _, rewards = _column(chunks[f"{base}/reward"], "Scalars:scalars")
        assert np.allclose(np.ravel(rewards), s["reward"])
        _, joints = _column(chunks[f"{base}/obs/joint_pos"], "Scalars:scalars")
        assert np.allclose(joints, s["joint_pos"])
        _, images = _column(chunks[f"{base}/image/image"], "Image:buffer")
        assert np.array_equal(np.array(images, np.uint8).reshape(s["image"].shape), s["image"])
    assert not list(tmp_path.glob(".view.rrd.tmp-*"))


def test_view_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = _replay(tmp_path / "replay")
    assert replay_main(["view", str(tmp_path), "--save", str(tmp_path / "x.rrd")]) == 2
    assert "not a replay directory" in capsys.readouterr().err
    assert replay_main(["view", str(directory), "--save", str(tmp_path / "x.txt")]) == 2
    assert "expected a .rrd file" in capsys.readouterr().err
    assert replay_main(["view", str(directory), "--save", str(tmp_path / "x.rrd"), "--stream", "nope"]) == 2
    assert "no episode matches" in capsys.readouterr().err
    assert learner_main(["train", "--logdir", str(tmp_path / "run"), "--rerun", "nonsense"]) == 2
    assert "--rerun 'nonsense'" in capsys.readouterr().err


def test_train_logs_scalars_videos_and_curves_live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real (tiny) training run with rerun on: the metrics, the evaluation video and the world model's
    open-loop prediction reach the .rrd; TensorBoard gets the same videos and the curves as images."""
    monkeypatch.setenv(RERUN_ENV, str(tmp_path / "live.rrd"))
    cfg = load_config(ROOT / "hardware_configs/sim_arm_reach.yaml", [
        "dreamer.size=tiny", "dreamer.threads=1", "camera.width=32", "camera.height=32",
        "control.episode_steps=9", "train.batch_size=2", "train.batch_length=8", "train.prefill=20",
        "train.train_ratio=8", "train.log_every=10", "replay.chunk_length=16", "train.steps=40",
        "train.eval_every=30", "train.eval_episodes=1"])
    Trainer(cfg, tmp_path / "run", progress=False).run()
    chunks = _chunks(tmp_path / "live.rrd")
    steps, values = _column(chunks["/metrics/eval/return"], "Scalars:scalars")
    assert steps and all(np.isfinite(v).all() for v in values)
    assert "/metrics/wm/dec" in chunks or any(k.startswith("/metrics/wm/") for k in chunks)
    for tag in ("/videos/eval", "/videos/openloop", "/curves/learning_curve"):
        assert tag in chunks, sorted(chunks)
    frames = sum(c.num_rows for c in chunks["/videos/eval"])
    assert frames >= 9  # one evaluation episode's frames
    tb = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"images": 0}).Reload()
    tags = tb.Tags()["images"]
    assert {"videos/eval", "videos/openloop", "curves/learning_curve"} <= set(tags)
    assert tb.Images("videos/eval")[0].encoded_image_string[:6] == b"GIF89a"  # plays in the Images tab
