"""`reverie-learner serve --rerun`: the robots' camera images reach rerun as their chunks arrive (a real link
server on loopback ZeroMQ, a robot speaking the protocol, the real replay), rate-limited by the robots' own
clock, and the world model's open-loop predictions with each checkpoint (a real serve loop training a tiny
agent); checked by reading the .rrd back with rerun's own reader, and TensorBoard's event files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from link_helpers import SPEC, RawRobot, serve_with_robot, wait_for

rr = pytest.importorskip("rerun", reason="rerun-sdk (the offline extra: pip install -e '.[offline]') is missing")
from rerun.chunk import RrdReader  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from core.config import load_config  # noqa: E402
from learner.serve import Server  # noqa: E402
from learner.viewers.rerun_live import IMAGE_EVERY_S, RERUN_ENV  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "hardware_configs" / "sim_arm_reach.yaml"
SERVE_SPEC = SPEC | {"image": ["uint8", [16, 16, 3]]}  # the config's CNN needs 16 x 16 or more
HZ = 10.0
T0 = 1.75e9


def _chunk(rows: np.ndarray, t0: float) -> dict[str, np.ndarray]:
    """Steps `rows` of 10-step episodes; each image holds its row number, so the one shown can be named."""
    n = rows.size
    image = np.zeros((n, 16, 16, 3), np.uint8)
    image[:] = (rows % 256).astype(np.uint8)[:, None, None, None]
    image[:, 0, :, 1] = np.arange(16, dtype=np.uint8)  # not flat: rows and columns must come back in place
    return {"obs": np.zeros((n, 3), np.float32), "image": image, "action": np.zeros((n, 2), np.float32),
            "reward": np.zeros(n, np.float32), "is_first": rows % 10 == 0, "is_last": rows % 10 == 9,
            "is_terminal": np.zeros(n, bool), "policy_version": np.zeros(n, np.int64),
            "time": t0 + rows / HZ}


def _images(path: Path, entity: str) -> tuple[list[float], list[np.ndarray]]:
    """(recorded time in seconds, image) of every image logged at `entity`, as rerun's reader reads them."""
    times, images = [], []
    for chunk in RrdReader(path).stream().to_chunks():
        if chunk.entity_path != entity:
            continue
        batch = chunk.to_record_batch()
        for t, buf in zip(batch.column("time").to_pylist(), batch.column("Image:buffer").to_pylist(), strict=True):
            times.append(t.timestamp() if hasattr(t, "timestamp") else t / 1e9)
            images.append(np.asarray(buf, np.uint8).reshape(16, 16, 3))
    order = np.argsort(times)
    return [times[i] for i in order], [images[i] for i in order]


def test_serve_rerun_shows_robot_camera_images_as_chunks_arrive(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "live.rrd"
    monkeypatch.setenv(RERUN_ENV, str(out))
    server = Server(load_config(CONFIG, ["dreamer.size=tiny", "link.heartbeat_s=0.1"]), tmp_path / "run",
                    bind="tcp://127.0.0.1:*", progress=False)
    server.link.start()
    try:
        with RawRobot(server.link.endpoint, "arm.1") as arm1, RawRobot(server.link.endpoint, "arm-2") as arm2:
            for peer in (arm1, arm2):
                welcome = peer.hello(spec=SERVE_SPEC, task="arm_reach", hz=HZ)
                assert welcome.kind == "welcome", welcome.meta
            arm1.steps(0, _chunk(np.arange(0, 12), T0))  # 1.2 s of robot time: images at 0, 0.5, 1.0 s
            assert arm1.ack() == 0
            arm1.steps(1, _chunk(np.arange(12, 20), T0))  # the next chunk continues the schedule: 1.5 s
            assert arm1.ack() == 1
            arm2.steps(0, _chunk(np.arange(0, 3), T0 + 100))  # another robot: its own schedule
            assert arm2.ack() == 0
            wait_for(lambda: server.replay.stats()["totals"]["steps"] == 23, "every step stored")
        server.link.check()
    finally:
        server.link.close()
        server.replay.close()
        server.logger.close()
    every = round(IMAGE_EVERY_S * HZ)  # steps between two images shown
    times, images = _images(out, f"/robots/{rr.escape_entity_path_part('arm.1')}/image")
    shown = list(range(0, 20, every))
    assert times == pytest.approx([T0 + r / HZ for r in shown], abs=1e-6)
    expected = _chunk(np.arange(20), T0)["image"]
    for row, image in zip(shown, images, strict=True):
        assert np.array_equal(image, expected[row])
    times, images = _images(out, "/robots/arm-2/image")
    assert times == pytest.approx([T0 + 100], abs=1e-6)
    assert np.array_equal(images[0], _chunk(np.arange(1), 0)["image"][0])
    assert server.replay.on_steps_added.images == len(shown) + 1


def test_serve_without_rerun_hooks_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RERUN_ENV, raising=False)
    server = Server(load_config(CONFIG, ["dreamer.size=tiny"]), tmp_path / "run", bind="tcp://127.0.0.1:*",
                    progress=False)
    try:
        assert server.replay.on_steps_added is None and not list((tmp_path / "run").glob("*.rrd"))
    finally:
        server.link.close()
        server.replay.close()
        server.logger.close()


def test_serve_rerun_logs_the_world_models_openloop_prediction_with_each_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 28 s3: serve logged scalars and camera images but no world-model prediction. A robot sends four
    10-step episodes; the serve loop trains on them and checkpoints at 40 received steps, with an open-loop
    truth / prediction / error video that reaches rerun and TensorBoard at that step."""
    out = tmp_path / "live.rrd"
    monkeypatch.setenv(RERUN_ENV, str(out))
    logdir = tmp_path / "run"
    cfg = load_config(CONFIG, ["dreamer.size=tiny", "dreamer.threads=1", "link.heartbeat_s=0.1",
                               "train.batch_size=2", "train.batch_length=8", "train.prefill=20",
                               "train.train_ratio=4", "train.checkpoint_every=40", "train.log_every=1000"])
    server = Server(cfg, logdir, bind="tcp://127.0.0.1:*", progress=False)

    def robot(server: Server) -> None:
        with RawRobot(server.link.endpoint, "arm-1") as peer:
            welcome = peer.hello(spec=SERVE_SPEC, task="arm_reach", hz=HZ)
            assert welcome.kind == "welcome", welcome.meta
            peer.steps(welcome.meta["next_seq"], _chunk(np.arange(40), T0))
            wait_for(lambda: any((logdir / "videos").glob("openloop_*.mp4")), "the open-loop video")

    summary = serve_with_robot(server, robot, duration=300)
    assert summary["updates"] >= 1
    # One video at the checkpoint of 40 received steps; the final checkpoint at the same step makes no other.
    assert [p.name for p in (logdir / "videos").iterdir()] == [f"openloop_{40:09d}.mp4"]
    steps, frames = [], []
    for chunk in RrdReader(out).stream().to_chunks():
        if chunk.entity_path == "/videos/openloop":
            batch = chunk.to_record_batch()
            steps += batch.column("step").to_pylist()
            frames += batch.column("Image:buffer").to_pylist()
    assert set(steps) == {40}
    # 40 frames (the replay's 40 steps; at most openloop.LENGTH), each truth / prediction / error rows of the
    # 16 x 16 camera by 4 sequences side by side.
    grid = np.array([np.asarray(f, np.uint8).reshape(3 * 16, 4 * 16, 3) for f in frames])
    assert grid.shape == (40, 48, 64, 3)
    # The truth row is the robot's camera in order (each image holds its step number, through MP4's losses).
    truth = np.median(grid[:, 2:16, :, 0].reshape(40, -1), axis=1)
    assert np.abs(truth - np.arange(40)).max() <= 4, truth
    tb = EventAccumulator(str(logdir / "tb"), size_guidance={"images": 0}).Reload()
    (image,) = tb.Images("videos/openloop")
    assert image.step == 40 and image.encoded_image_string[:6] == b"GIF89a"
