"""LeRobotDataset v3.0 export and import (`learner/formats/`): the layout LeRobot's description names, read
back by an independent reader (rerun's LeRobot loader), a dataset written here from the published
description imported, and the round trip replay -> LeRobot -> replay exact for everything but lossy video."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow", reason="the offline extra (pip install -e '.[offline]') is not installed")
pq = pytest.importorskip("pyarrow.parquet", reason="the offline extra is not installed")
av = pytest.importorskip("av", reason="the offline extra (PyAV) is not installed")

from learner.formats import FormatError  # noqa: E402
from learner.formats.lerobot_export import export_lerobot  # noqa: E402
from learner.formats.lerobot_import import import_lerobot  # noqa: E402
from learner.offline.reader import ReplayDir  # noqa: E402
from learner.replay import Replay  # noqa: E402
from learner.replay.describe import write_descriptions  # noqa: E402
from learner.replay_cli import main as replay_main  # noqa: E402

H, W = 32, 48
JOINTS = ["shoulder", "elbow", "wrist"]


def _image(t: int, stream: int) -> np.ndarray:
    """A smooth picture that changes every step (video codecs keep such images close)."""
    y, x = np.mgrid[0:H, 0:W]
    r = 128 + 100 * np.sin((x + 3 * t) / 7.0)
    g = 128 + 100 * np.cos((y + 2 * t + 20 * stream) / 9.0)
    b = np.full_like(r, 60 + 10 * (t % 5))
    return np.stack([r, g, b], -1).astype(np.uint8)


def _episode(rng: np.random.Generator, length: int, t0: int, stream: int, terminal: bool, end: bool = True) -> dict:
    t = np.arange(t0, t0 + length)
    return {
        "image": np.stack([_image(i, stream) for i in t]),
        "joint_pos": rng.normal(size=(length, 3)).astype(np.float32),
        "tool_pos": rng.normal(size=(length, 2)).astype(np.float32),
        "contact": (t % 3 == 0).astype(np.int32),  # not a float vector: its own feature
        "action": rng.uniform(-1, 1, (length, 2)).astype(np.float32),
        "reward": np.concatenate([[0.0], rng.normal(size=length - 1)]).astype(np.float32),
        "is_first": np.arange(length) == 0,
        "is_last": (np.arange(length) == length - 1) & end,
        "is_terminal": (np.arange(length) == length - 1) & terminal & end,
    }


def _description(hz: float = 10.0) -> dict:
    return {"format": 1, "task": "arm_reach", "control_hz": hz, "source": "test",
            "observations": {"joint_pos": {"shape": [3], "dtype": "float32", "unit": "rad", "names": JOINTS,
                                           "low": None, "high": None, "description": ""}},
            "action": {"discrete": False, "shape": [2], "dtype": "float32", "unit": "", "names": ["dx", "dy"],
                       "low": -1.0, "high": 1.0, "description": "", "form": "model form"},
            "success": None}


def make_replay(directory: Path, hz: float = 10.0) -> Path:
    """Two streams of real chunk files: terminal and time-limit episodes, and one left open at the end."""
    rng = np.random.default_rng(0)
    with Replay(directory, chunk_length=16) as replay:
        for stream, lengths in (("arm-0", (12, 9, 20)), ("arm-1", (7, 11))):
            t0 = 0
            for i, n in enumerate(lengths):
                ep = _episode(rng, n, t0, int(stream[-1]), terminal=i % 2 == 0)
                replay.add_steps(ep, stream, task=f"sim:reach-{stream}", policy_version=np.arange(t0, t0 + n),
                                 time=1.7e9 + np.arange(t0, t0 + n) / hz)
                t0 += n
        replay.add_steps(_episode(rng, 5, 100, 0, terminal=False, end=False), "arm-0", task="sim:reach-arm-0",
                         time=1.7e9 + 100.0)
    write_descriptions(directory, {"arm-0": _description(hz), "arm-1": _description(hz)})
    return directory


@pytest.fixture(scope="module")
def replay_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_replay(tmp_path_factory.mktemp("replay") / "replay")


@pytest.fixture(scope="module")
def exported(replay_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lerobot") / "ds"
    replay = ReplayDir(replay_dir)
    report = export_lerobot(replay, replay.episodes(), out)
    assert report.episodes == 5 and report.frames == 12 + 9 + 20 + 7 + 11
    assert report.skipped == {"incomplete (data starts or ends mid-way)": 1}
    return out


def test_export_has_the_v3_layout(exported: Path) -> None:
    info = json.loads((exported / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 10
    assert info["total_episodes"] == 5 and info["total_frames"] == 59 and info["total_tasks"] == 2
    assert info["splits"] == {"train": "0:5"}
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["video_path"] == "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    assert {"chunks_size", "data_files_size_in_mb", "video_files_size_in_mb"} <= info.keys()
    f = info["features"]
    assert f["observation.images.image"]["dtype"] == "video" and f["observation.images.image"]["shape"] == [H, W, 3]
    assert f["observation.images.image"]["info"]["video.fps"] == 10
    assert f["observation.state"] == {"dtype": "float32", "shape": [5], "names": [
        "joint_pos.shoulder", "joint_pos.elbow", "joint_pos.wrist", "tool_pos[0]", "tool_pos[1]"]}
    assert f["observation.contact"]["dtype"] == "int32" and f["action"]["names"] == ["dx", "dy"]
    for name in ("timestamp", "frame_index", "episode_index", "index", "task_index", "next.reward", "next.done"):
        assert f[name]["shape"] == [1]

    data = pq.read_table(exported / "data/chunk-000/file-000.parquet")
    assert data.num_rows == 59 and data.schema.field("observation.state").type == pa.list_(pa.float32(), 5)
    ep = data.column("episode_index").to_numpy()
    assert list(np.unique(ep)) == [0, 1, 2, 3, 4]
    assert np.array_equal(data.column("index").to_numpy(), np.arange(59))
    first = ep == 0
    assert np.allclose(data.column("timestamp").to_numpy()[first], np.arange(12) / 10)
    done = data.column("next.done").to_numpy(zero_copy_only=False)[first]
    assert list(np.flatnonzero(done)) == [10, 11]  # the last action's frame and the final observation

    episodes = pq.read_table(exported / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [e["length"] for e in episodes] == [12, 9, 20, 7, 11]
    assert [e["dataset_from_index"] for e in episodes] == [0, 12, 21, 41, 48]
    assert episodes[1]["videos/observation.images.image/from_timestamp"] == pytest.approx(1.2)
    assert episodes[1]["videos/observation.images.image/to_timestamp"] == pytest.approx(2.1)
    assert episodes[0]["tasks"] == ["sim:reach-arm-0"] and "stats/action/mean" in episodes[0]

    tasks = pq.read_table(exported / "meta/tasks.parquet")
    assert tasks.column("task").to_pylist() == ["sim:reach-arm-0", "sim:reach-arm-1"]
    assert json.loads(tasks.schema.metadata[b"pandas"])["index_columns"] == ["task"]  # read back as the index
    stats = json.loads((exported / "meta/stats.json").read_text())
    assert stats["action"]["count"] == [59] and len(stats["action"]["q50"]) == 2
    assert np.array(stats["observation.images.image"]["mean"]).shape == (3, 1, 1)
    with av.open(str(exported / "videos/observation.images.image/chunk-000/file-000.mp4")) as v:
        assert sum(1 for _ in v.decode(video=0)) == 59


def test_rerun_reads_the_export_as_a_lerobot_dataset(exported: Path, replay_dir: Path) -> None:
    """rerun's own LeRobot v3 loader, written independently of ours, finds the episodes and their values."""
    rerun_ex = pytest.importorskip("rerun.experimental", reason="rerun-sdk (offline extra) is not installed")
    reader = rerun_ex.LeRobotReader(exported)
    assert reader.version == "v3" and reader.episodes() == [0, 1, 2, 3, 4]
    replay = ReplayDir(replay_dir)
    want = replay.steps(replay.episodes()[1])["action"]  # LeRobot's episode 1 is arm-0's second episode
    for chunk in reader.stream(1, video_mode="skip").to_chunks():
        if chunk.entity_path == "/action" and "frame_index" in chunk.timeline_names:
            batch = chunk.to_record_batch()
            got = np.array(batch.column("Scalars:scalars").to_pylist(), np.float32)
            assert np.array_equal(got, want)
            break
    else:
        pytest.fail("rerun's reader found no action series")


@pytest.mark.parametrize("images", ["h264", "png"])
def test_round_trip_is_exact_but_for_lossy_video(replay_dir: Path, exported: Path, tmp_path: Path,
                                                 images: str) -> None:
    dataset = exported
    if images != "h264":
        dataset = tmp_path / "ds"
        replay = ReplayDir(replay_dir)
        export_lerobot(replay, replay.episodes(), dataset, images=images)
    report = import_lerobot(dataset, tmp_path / "back", chunk_length=8)
    assert report.episodes == 5 and report.streams == ["arm-0", "arm-1"]
    a, b = ReplayDir(replay_dir), ReplayDir(tmp_path / "back")
    complete = [ep for ep in a.episodes() if ep.complete]
    assert len(b.episodes()) == len(complete)
    for ea, eb in zip(complete, b.episodes()):
        assert (ea.stream, ea.task, ea.length, ea.end, ea.ret) == (eb.stream, eb.task, eb.length, eb.end, eb.ret)
        sa, sb = a.steps(ea), b.steps(eb)
        assert sa.keys() == sb.keys()
        for key in sa:
            assert sa[key].dtype == sb[key].dtype, key
            if key == "image" and images == "h264":
                err = np.abs(sa[key].astype(int) - sb[key].astype(int))
                assert err.mean() < 6.0, err.mean()  # lossy (yuv420p at 32x48), but the same pictures
            else:
                assert np.array_equal(sa[key], sb[key]), key
    assert b.descriptions == a.descriptions


def _write_fixture(root: Path) -> dict:
    """A LeRobotDataset v3.0 written from the published description alone (as lerobot-record would lay it
    out): two episodes in one data file and one video file, the second starting mid-file."""
    fps, lengths, cam = 15, [6, 9], "observation.images.front"
    n = sum(lengths)
    rng = np.random.default_rng(3)
    frames = np.stack([_image(i, 1) for i in range(n)])
    state = rng.normal(size=(n, 4)).astype(np.float32)
    action = rng.normal(size=(n, 2)).astype(np.float32)
    reward = rng.normal(size=n).astype(np.float32)
    episode = np.repeat([0, 1], lengths)
    frame_index = np.concatenate([np.arange(k) for k in lengths])
    done = np.concatenate([np.arange(k) == k - 1 for k in lengths])
    features = {
        cam: {"dtype": "video", "shape": [H, W, 3], "names": ["height", "width", "channels"],
              "info": {"video.fps": fps, "video.codec": "h264", "video.pix_fmt": "rgb24"}},
        "observation.state": {"dtype": "float32", "shape": [4], "names": ["a", "b", "c", "d"]},
        "action": {"dtype": "float32", "shape": [2], "names": ["x", "y"]},
        "next.reward": {"dtype": "float32", "shape": [1], "names": None},
        "next.done": {"dtype": "bool", "shape": [1], "names": None},
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        "episode_index": {"dtype": "int64", "shape": [1], "names": None},
        "index": {"dtype": "int64", "shape": [1], "names": None},
        "task_index": {"dtype": "int64", "shape": [1], "names": None},
    }
    (root / "meta/episodes/chunk-000").mkdir(parents=True)
    (root / "data/chunk-000").mkdir(parents=True)
    (root / f"videos/{cam}/chunk-000").mkdir(parents=True)
    info = {"codebase_version": "v3.0", "robot_type": "so101", "total_episodes": 2, "total_frames": n,
            "total_tasks": 2, "chunks_size": 1000, "data_files_size_in_mb": 100, "video_files_size_in_mb": 500,
            "fps": fps, "splits": {"train": "0:2"},
            "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
            "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
            "features": features}
    (root / "meta/info.json").write_text(json.dumps(info))
    pq.write_table(pa.table({"task_index": [0, 1], "task": ["pick the cube", "stack the cube"]}),
                   root / "meta/tasks.parquet")
    pq.write_table(pa.table({
        "episode_index": [0, 1], "tasks": [["pick the cube"], ["stack the cube"]], "length": lengths,
        "data/chunk_index": [0, 0], "data/file_index": [0, 0],
        "dataset_from_index": [0, lengths[0]], "dataset_to_index": [lengths[0], n],
        f"videos/{cam}/chunk_index": [0, 0], f"videos/{cam}/file_index": [0, 0],
        f"videos/{cam}/from_timestamp": [0.0, lengths[0] / fps],
        f"videos/{cam}/to_timestamp": [lengths[0] / fps, n / fps],
        "meta/episodes/chunk_index": [0, 0], "meta/episodes/file_index": [0, 0],
    }), root / "meta/episodes/chunk-000/file-000.parquet")
    pq.write_table(pa.table({
        "observation.state": pa.FixedSizeListArray.from_arrays(pa.array(state.reshape(-1)), 4),
        "action": pa.FixedSizeListArray.from_arrays(pa.array(action.reshape(-1)), 2),
        "next.reward": reward, "next.done": done, "timestamp": (frame_index / fps).astype(np.float32),
        "frame_index": frame_index, "episode_index": episode, "index": np.arange(n), "task_index": episode,
    }), root / "data/chunk-000/file-000.parquet")
    with av.open(str(root / f"videos/{cam}/chunk-000/file-000.mp4"), "w") as out:
        stream = out.add_stream("libx264rgb", rate=fps, options={"crf": "0", "bf": "0"})
        stream.width, stream.height, stream.pix_fmt = W, H, "rgb24"
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return {"frames": frames, "state": state, "action": action, "reward": reward, "lengths": lengths}


def test_imports_a_dataset_laid_out_as_the_v3_description_says(tmp_path: Path) -> None:
    want = _write_fixture(tmp_path / "ds")
    assert replay_main(["import", str(tmp_path / "ds"), "--out", str(tmp_path / "replay")]) == 0
    replay = ReplayDir(tmp_path / "replay")
    eps = replay.episodes()
    assert [ep.length for ep in eps] == want["lengths"] and all(ep.end == "terminal" for ep in eps)
    assert [ep.task for ep in eps] == ["pick the cube", "stack the cube"] and eps[0].stream == "lerobot"
    start = 0
    for ep, n in zip(eps, want["lengths"]):
        s = replay.steps(ep)
        rows = slice(start, start + n)
        assert set(s) >= {"front", "state", "action", "reward", "is_first", "is_last", "is_terminal"}
        assert np.array_equal(s["front"], want["frames"][rows])  # the second episode starts mid-file
        assert np.array_equal(s["state"], want["state"][rows]) and np.array_equal(s["action"], want["action"][rows])
        assert s["reward"][0] == 0 and np.array_equal(s["reward"][1:], want["reward"][rows][:-1])
        assert s["is_first"][0] and s["is_last"][-1] and s["is_terminal"][-1] and not s["is_last"][:-1].any()
        start += n
    assert replay.descriptions["lerobot"]["control_hz"] == 15.0
    assert replay.descriptions["lerobot"]["observations"]["state"]["names"] == ["a", "b", "c", "d"]


def test_cli_export_then_import(replay_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ds"
    assert replay_main(["export", str(replay_dir), "--format", "lerobot", "--out", str(out),
                        "--stream", "arm-1", "--images", "lossless"]) == 0
    assert "2 episode(s), 18 frame(s)" in capsys.readouterr().out
    assert replay_main(["import", str(out), "--out", str(tmp_path / "back")]) == 0
    assert [ep.stream for ep in ReplayDir(tmp_path / "back").episodes()] == ["arm-1", "arm-1"]


def test_clear_errors(replay_dir: Path, exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert replay_main(["export", str(replay_dir), "--out", str(exported)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert replay_main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "not a replay directory" in capsys.readouterr().err
    assert replay_main(["export", str(replay_dir), "--out", str(tmp_path / "x"), "--fps", "7.5"]) == 2
    assert "whole number of frames per second" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

    old = tmp_path / "v21"
    (old / "meta").mkdir(parents=True)
    (old / "meta/info.json").write_text(json.dumps({"codebase_version": "v2.1", "fps": 30, "features": {}}))
    assert replay_main(["import", str(old), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "codebase_version 'v2.1'" in err and "convert_dataset_v21_to_v30" in err
    assert replay_main(["import", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    assert "no such directory" in capsys.readouterr().err

    broken = tmp_path / "broken"
    _write_fixture(broken)
    (broken / "videos/observation.images.front/chunk-000/file-000.mp4").unlink()
    assert replay_main(["import", str(broken), "--out", str(tmp_path / "r")]) == 2
    assert "file-000.mp4: missing" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing half-written is left


def test_a_replay_without_a_control_rate_needs_fps(tmp_path: Path) -> None:
    directory = make_replay(tmp_path / "replay")
    (directory / "streams.json").unlink()
    replay = ReplayDir(directory)
    with pytest.raises(FormatError, match="give --fps"):
        export_lerobot(replay, replay.episodes(), tmp_path / "ds")
    assert export_lerobot(replay, replay.episodes(), tmp_path / "ds", fps=20).frames == 59
