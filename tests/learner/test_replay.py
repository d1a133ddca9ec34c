"""Replay store: real chunk files in tmp_path, reloads, crash safety, sampling and replay context."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from core.config.agent import ReplayConfig
from learner.replay import Replay, read_chunk
from learner.replay.chunk_file import is_chunk_name
from learner.replay.context import CONTEXT_PART, restore_context
from learner.replay.index import INDEX_NAME
from learner.replay_cli import main as cli_main

ROOT = Path(__file__).resolve().parents[2]


def step(t: int, stream_no: int = 0, *, first: bool = False, last: bool = False, reward: float = 0.0) -> dict:
    """A step whose `count` says (stream, index) and whose image repeats the index, to check contiguity."""
    return {
        "image": np.full((4, 4, 3), t % 256, np.uint8),
        "count": np.array([stream_no, t], np.float32),
        "action": np.array([t, -t], np.float32),
        "reward": np.float32(reward),
        "is_first": first,
        "is_last": last,
        "is_terminal": False,
    }


def fill(replay: Replay, n: int, streams: int = 1, start: int = 0, episode: int = 0) -> None:
    """n steps per stream, interleaved; with `episode`, is_first/is_last every `episode` steps."""
    for t in range(start, start + n):
        for s in range(streams):
            first = episode > 0 and t % episode == 0
            last = episode > 0 and t % episode == episode - 1
            replay.add(step(t, s, first=first, last=last, reward=1.0), stream=f"s{s}")


def chunk_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if is_chunk_name(p.name))


def assert_contiguous(batch: dict[str, np.ndarray]) -> None:
    count = batch["count"]
    assert (count[:, :, 0] == count[:, :1, 0]).all(), "a sequence mixes streams"
    assert (np.diff(count[:, :, 1], axis=1) == 1).all(), "a sequence skips or repeats steps"
    assert (batch["image"][:, :, 0, 0, 0] == count[:, :, 1] % 256).all()
    assert (batch["action"][:, :, 0] == count[:, :, 1]).all()


def test_round_trip_reload_streams_and_chunk_crossing(tmp_path: Path) -> None:
    with Replay(tmp_path, chunk_length=8, online=False) as replay:
        fill(replay, 30, streams=2)
        assert len(replay) == 60
    # files hold exactly what was added, per stream, in order
    for s in range(2):
        rows = [read_chunk(p) for p in chunk_files(tmp_path)]
        counts = np.concatenate([steps["count"] for meta, steps, _, _ in rows if meta.stream == f"s{s}"])
        np.testing.assert_array_equal(counts, [[s, t] for t in range(30)])
    replay = Replay(tmp_path, chunk_length=8, online=False, seed=1)
    assert len(replay) == 60
    stats = replay.stats()["streams"]
    assert stats["s0"]["steps"] == stats["s1"]["steps"] == 30
    batch = replay.sample(64, 12)  # 12 > 8: many sequences cross a chunk boundary
    assert batch["image"].shape == (64, 12, 4, 4, 3) and batch["ids"].shape == (64, 12)
    assert_contiguous(batch)
    assert set(np.unique(batch["count"][:, 0, 0])) == {0, 1}
    # continue after the reload: new chunks link to the old ones, so sequences cross the reload
    fill(replay, 10, streams=2, start=30)
    starts = np.concatenate([replay.sample(64, 12)["count"][:, 0, 1] for _ in range(4)])
    assert ((starts < 30) & (starts + 12 > 30)).any()
    assert_contiguous(replay.sample(64, 12))
    replay.close()


def test_chunk_files_carry_metadata_and_index(tmp_path: Path) -> None:
    with Replay(tmp_path, chunk_length=4) as replay:
        for t in range(10):
            replay.add(step(t), stream="arm", task="reach", policy_version=t // 3, time=1000.0 + t)
    files = chunk_files(tmp_path)
    assert len(files) == 3  # 4 + 4 + the partial 2 written by close()
    metas = []
    for path in files:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(str(npz["__meta__"]))
            metas.append(meta)
            assert meta["stream"] == "arm" and meta["task"] == "reach" and meta["uuid"] in path.name
            assert npz["count"].shape == (meta["length"], 2)
            first = int(npz["count"][0, 1])
            np.testing.assert_array_equal(npz["__time__"], 1000.0 + np.arange(first, first + meta["length"]))
            np.testing.assert_array_equal(npz["__version__"], np.arange(first, first + meta["length"]) // 3)
    assert [m["length"] for m in metas] == [4, 4, 2]
    assert metas[0]["prev"] == "" and metas[1]["prev"] == metas[0]["uuid"] and metas[2]["prev"] == metas[1]["uuid"]
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert [e["file"] for e in index["chunks"]] == [p.name for p in files]
    assert not list(tmp_path.glob(".*"))  # no temp files left behind


def test_flush_writes_partial_chunks_and_rewrites_them(tmp_path: Path) -> None:
    replay = Replay(tmp_path, chunk_length=8)
    fill(replay, 5)
    assert chunk_files(tmp_path) == []
    replay.flush()
    (path,) = chunk_files(tmp_path)
    assert read_chunk(path)[0].length == 5
    fill(replay, 2, start=5)
    replay.close()
    assert chunk_files(tmp_path) == [path] and read_chunk(path)[0].length == 7
    assert len(Replay(tmp_path, chunk_length=8)) == 7


def test_index_rebuilt_when_missing_or_stale(tmp_path: Path) -> None:
    with Replay(tmp_path, chunk_length=4) as replay:
        fill(replay, 12)
    (tmp_path / INDEX_NAME).unlink()
    assert len(Replay(tmp_path, chunk_length=4)) == 12
    assert len(json.loads((tmp_path / INDEX_NAME).read_text())["chunks"]) == 3
    chunk_files(tmp_path)[0].unlink()  # the index now lists a file that is gone
    assert len(Replay(tmp_path, chunk_length=4)) == 8
    assert len(json.loads((tmp_path / INDEX_NAME).read_text())["chunks"]) == 2
    with Replay(tmp_path, chunk_length=4) as replay:
        fill(replay, 8)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    index["chunks"] = index["chunks"][:2]  # as if killed before the index was rewritten
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    assert len(Replay(tmp_path, chunk_length=4)) == 16
    assert len(json.loads((tmp_path / INDEX_NAME).read_text())["chunks"]) == 4


def test_ram_bound_keeps_files(tmp_path: Path) -> None:
    replay = Replay(tmp_path, chunk_length=4, ram_steps=10, online=False)
    for t in range(50):
        replay.add(step(t))
        assert len(replay) <= 10
    assert len(replay) >= 10 - 4
    batch = replay.sample(32, 3)
    assert batch["count"][:, :, 1].min() >= 50 - 10
    replay.close()
    assert sum(read_chunk(p)[0].length for p in chunk_files(tmp_path)) == 50
    reloaded = Replay(tmp_path, chunk_length=4, ram_steps=10)
    assert 6 <= len(reloaded) <= 10
    assert reloaded.stats()["totals"]["disk_steps"] == 50


def test_ram_smaller_than_open_chunks_stays_bounded(tmp_path: Path) -> None:
    with Replay(tmp_path, chunk_length=16, ram_steps=5) as replay:
        for t in range(20):
            for s in range(3):
                replay.add(step(t, s), stream=f"s{s}")
                assert len(replay) <= 5
    counts = [read_chunk(p)[1]["count"] for p in chunk_files(tmp_path)]
    assert sum(len(c) for c in counts) == 60  # nothing lost: early-cut chunks went to disk first


def test_disk_cap_deletes_oldest(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="learner.replay.store")
    with Replay(tmp_path, chunk_length=4, disk_steps=13) as replay:
        replay.add(step(0, 9), stream="slow")
        replay.flush()  # the oldest file, but its chunk is still being filled: it stays
        (slow,) = chunk_files(tmp_path)
        fill(replay, 40)
        assert slow.exists()
    files = chunk_files(tmp_path)
    assert len(files) == 4
    firsts = sorted(int(read_chunk(p)[1]["count"][0, 1]) for p in files if p != slow)
    assert firsts == [28, 32, 36]
    assert "disk cap" in caplog.text and "deleted" in caplog.text


def test_corrupt_and_truncated_chunks_are_skipped_with_warning(tmp_path: Path) -> None:
    with Replay(tmp_path, chunk_length=4, online=False) as replay:
        fill(replay, 24)
    files = chunk_files(tmp_path)
    truncated, garbage, inconsistent = files[1], files[3], files[5]
    truncated.write_bytes(truncated.read_bytes()[:100])
    garbage.write_bytes(b"not a zip file at all")
    with np.load(inconsistent, allow_pickle=False) as npz:
        members = {k: npz[k] for k in npz.files}
    meta = json.loads(str(members["__meta__"]))
    members["__meta__"] = np.array(json.dumps({**meta, "length": 5}))  # metadata disagrees with the arrays
    with inconsistent.open("wb") as f:
        np.savez(f, **members)
    with pytest.warns(UserWarning) as record:
        replay = Replay(tmp_path, chunk_length=4, online=False)
    messages = " ".join(str(w.message) for w in record)
    assert truncated.name in messages and garbage.name in messages and inconsistent.name in messages
    assert len(replay) == 12
    for _ in range(5):
        assert_contiguous(replay.sample(16, 3))  # never across the holes


def test_crash_safety_sigkill_mid_run(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        from learner.replay import Replay
        replay = Replay(sys.argv[1], chunk_length=16, ram_steps=64)
        t = 0
        while True:
            for s in range(2):
                replay.add({"image": np.full((32, 32, 3), t % 256, np.uint8),
                            "count": np.array([s, t], np.float32), "action": np.array([t, -t], np.float32),
                            "reward": np.float32(0), "is_first": t == 0, "is_last": False, "is_terminal": False},
                           stream=f"s{s}")
            t += 1
            if t == 96:  # 12 chunks sealed; the disk worker queues at most 4
                print("ready", flush=True)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, env=env, cwd=ROOT)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    (tmp_path / ".0000099999-s0-leftover.npz.x.tmp").write_bytes(b"half a chunk")  # a writer killed mid-write
    files = chunk_files(tmp_path)
    assert len(files) >= 6, [p.name for p in tmp_path.iterdir()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        replay = Replay(tmp_path, chunk_length=16, ram_steps=64, online=False)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))
    for path in files:
        assert read_chunk(path)[0].length == 16  # only whole chunks: never flushed, so never partial
    assert len(replay) == 64
    assert_contiguous(replay.sample(32, 20))


def test_online_queue_yields_windows_once_oldest_first(tmp_path: Path) -> None:
    replay = Replay(tmp_path, chunk_length=16, online=True)
    fill(replay, 40)
    starts = [int(replay.sample(1, 8)["count"][0, 0, 1]) for _ in range(5)]
    assert starts == [0, 8, 16, 24, 32]  # each complete window once, in arrival order (FIFO, as official)
    fill(replay, 16, start=40)
    batch = replay.sample(3, 8)
    assert batch["count"][:2, 0, 1].tolist() == [40, 48]  # the queue fills the batch first
    assert replay.stats()["totals"]["online_queue"] == 0
    replay.close()
    # the queue and fresh marks survive a checkpoint (save/load) with a reopened directory
    replay = Replay(tmp_path, chunk_length=16, online=True)
    fill(replay, 16, start=56)
    replay.sample(1, 8)  # consumes window 56..64, queues 64..72
    state = json.loads(json.dumps(replay.save()))
    replay.close()
    again = Replay(tmp_path, chunk_length=16, online=True)
    again.load(state)
    assert int(again.sample(1, 8)["count"][0, 0, 1]) == 64


def test_sampling_is_seeded_and_deterministic(tmp_path: Path) -> None:
    def draws(directory: Path, seed: int, recency: float = 0.0) -> list[np.ndarray]:
        with Replay(directory, chunk_length=8, seed=seed, recency=recency) as replay:
            fill(replay, 50, streams=3, episode=10)
            return [replay.sample(8, 5)["count"] for _ in range(4)]

    a, b = draws(tmp_path / "a", 3), draws(tmp_path / "b", 3)
    c = draws(tmp_path / "c", 4)
    assert all((x == y).all() for x, y in zip(a, b))
    assert any((x != y).any() for x, y in zip(a, c))
    assert all((x == y).all() for x, y in zip(draws(tmp_path / "d", 3, 0.5), draws(tmp_path / "e", 3, 0.5)))
    # the rng state is part of save()/load()
    replay = Replay(tmp_path / "a", chunk_length=8, online=False, seed=9)
    state = replay.save()
    first = replay.sample(8, 5)["count"]
    replay.load(state)
    np.testing.assert_array_equal(replay.sample(8, 5)["count"], first)


def test_uniform_over_valid_starts_and_recency(tmp_path: Path) -> None:
    replay = Replay(tmp_path, chunk_length=16, online=False, seed=0)
    fill(replay, 100)
    for t in range(3):  # a stream shorter than the sequence length contributes nothing
        replay.add(step(t, 7), stream="short")
    for t in range(10):
        replay.add(step(t, 1), stream="s1")
    batch = replay.sample(4000, 5)
    streams = batch["count"][:, 0, 0]
    assert 7 not in streams
    share = (streams == 1).mean()  # s1 has 6 valid starts, s0 has 96
    assert abs(share - 6 / 102) < 0.02
    starts0 = batch["count"][streams == 0, 0, 1]
    assert abs(starts0.mean() - 47.5) < 3  # uniform over 0..95
    recent = Replay(tmp_path / "r", chunk_length=16, online=False, seed=0, recency=1.0)
    fill(recent, 100)
    starts = recent.sample(4000, 5)["count"][:, 0, 1]
    assert starts.mean() > 75 and np.median(starts) > 85 and starts.min() < 40  # favours new, keeps old


def test_not_enough_data_is_a_clear_error(tmp_path: Path) -> None:
    replay = Replay(tmp_path, chunk_length=8)
    with pytest.raises(ValueError, match="no sequence of 4 contiguous steps"):
        replay.sample(2, 4)
    fill(replay, 3, streams=2)
    with pytest.raises(ValueError, match="no sequence of 4 contiguous steps"):
        replay.sample(2, 4)
    replay.add(step(3))
    replay.add(step(3), stream="s0")
    assert replay.sample(2, 4)["count"].shape == (2, 4, 2)


def test_replay_context_valid_flags_and_is_first(tmp_path: Path) -> None:
    replay = Replay(tmp_path, chunk_length=8, online=False, seed=0)
    fill(replay, 40, episode=20)  # is_first at 0 and 20
    batch = replay.sample(16, 5)
    assert not batch["context/valid"].any() and "context/deter" not in batch
    # write latents for every step: value = the step index, so a read says which step it came from
    index_of: dict[int, int] = {}
    for _ in range(40):
        b = replay.sample(16, 5)
        counts = b["count"][:, :, 1]
        index_of.update(zip(b["ids"].ravel().tolist(), counts.ravel().astype(int).tolist()))
        deter = np.repeat(counts[..., None], 6, axis=-1).astype(np.float32)
        replay.write_context(b["ids"], {"deter": deter, "stoch": np.zeros((*counts.shape, 2, 3), np.float32)})
    written = set(index_of.values())
    batch = replay.sample(256, 5)
    assert batch["context/deter"].shape == (256, 6) and batch["context/stoch"].shape == (256, 2, 3)
    first = batch["count"][:, 0, 1].astype(int)
    expected = np.array([t not in (0, 20) and (t - 1) in written for t in first])
    np.testing.assert_array_equal(batch["context/valid"], expected)
    assert expected.any() and (first == 20).any()
    valid = batch["context/valid"]
    np.testing.assert_array_equal(batch["context/deter"][valid, 0], first[valid] - 1)  # the step just before
    assert (batch["context/deter"][~valid] == 0).all()
    with pytest.raises(ValueError, match="deter"):
        replay.write_context(b["ids"], {"deter": np.zeros((16, 5, 7), np.float32), "stoch": deter})
    # eviction drops latents (stale ids are ignored); a reload starts with none
    fill(replay, 40, start=40)
    replay.write_context(b["ids"], {"deter": deter, "stoch": np.zeros((16, 5, 2, 3), np.float32)})
    replay.close()
    reloaded = Replay(tmp_path, chunk_length=8, online=False)
    assert not reloaded.sample(32, 5)["context/valid"].any()


def _write_step_latents(replay: Replay, rounds: int) -> None:
    """Latents whose deter is the step's index, written back as training does after each update."""
    for _ in range(rounds):
        b = replay.sample(8, 5)
        counts = b["count"][:, :, 1]
        replay.write_context(b["ids"], {"deter": np.repeat(counts[..., None], 3, -1).astype(np.float32),
                                        "stoch": np.zeros((*counts.shape, 2, 2), np.float32)})


def test_replay_context_survives_a_reload_through_its_state(tmp_path: Path) -> None:
    replay = Replay(tmp_path, chunk_length=8, online=False, seed=0)
    fill(replay, 37, streams=2)  # the last chunk of each stream is still open (partly filled)
    _write_step_latents(replay, 20)
    state = replay.context_state()
    replay.close()

    reloaded = Replay(tmp_path, chunk_length=8, online=False, seed=1)
    assert not reloaded.sample(64, 5)["context/valid"].any()  # latents live in RAM: none after a reload
    assert reloaded.load_context(state) == len(state["row"]) > 0
    batch = reloaded.sample(256, 5)
    valid = batch["context/valid"]
    assert valid.any()
    first = batch["count"][:, 0, 1]
    np.testing.assert_array_equal(batch["context/deter"][valid, 0], first[valid] - 1)  # the step just before
    after = reloaded.context_state()
    assert after["uuids"] == state["uuids"]
    for key in ("chunk", "row"):
        np.testing.assert_array_equal(after[key], state[key])
    for key, value in state["latents"].items():
        np.testing.assert_array_equal(after["latents"][key], value)


def test_replay_context_state_that_does_not_fit_is_refused_whole(tmp_path: Path) -> None:
    replay = Replay(tmp_path, chunk_length=8, online=False, seed=0)
    assert replay.context_state() == {} and replay.load_context({}) == 0
    fill(replay, 30)
    _write_step_latents(replay, 10)
    state = replay.context_state()
    n = len(state["row"])
    wrong = {**state, "latents": {**state["latents"], "deter": np.zeros((n, 5), np.float32)}}
    with pytest.raises(ValueError, match="'deter'"):
        replay.load_context(wrong)
    with pytest.raises(ValueError, match="'row'"):
        replay.load_context({**state, "row": state["row"][:-1]})
    with pytest.raises(ValueError, match="missing or malformed"):
        replay.load_context({"uuids": state["uuids"]})
    elsewhere = {**state, "uuids": [f"gone-{u}" for u in state["uuids"]]}
    assert replay.load_context(elsewhere) == 0  # chunks no longer in RAM: nothing to restore
    np.testing.assert_array_equal(replay.context_state()["latents"]["deter"], state["latents"]["deter"])
    # From a checkpoint: a misfit is a warning naming the checkpoint, and the resume goes on.
    with pytest.warns(UserWarning, match=r"ckpt-7: replay context not restored.*'deter'"):
        assert restore_context(replay, {CONTEXT_PART: wrong}, "run/checkpoints/ckpt-7") == 0
    assert restore_context(replay, {"model": {}}, "ckpt-old") == 0  # written before the part existed
    assert restore_context(replay, {CONTEXT_PART: state}, "ckpt-8") == n


def test_context_invalid_when_previous_step_left_ram(tmp_path: Path) -> None:
    replay = Replay(tmp_path, chunk_length=4, ram_steps=8, online=False, seed=0)

    def write_all() -> None:  # 256 one-step draws cover every step in RAM
        ids = replay.sample(256, 1)["ids"]
        replay.write_context(ids, {"deter": np.ones((256, 1, 2), np.float32)})

    def valid_by_first() -> dict[int, set[bool]]:
        batch = replay.sample(256, 2)
        out: dict[int, set[bool]] = {}
        for t, ok in zip(batch["count"][:, 0, 1].astype(int).tolist(), batch["context/valid"].tolist()):
            out.setdefault(t, set()).add(ok)
        return out

    fill(replay, 8)
    write_all()
    fill(replay, 7, start=8)  # evicts steps 0..7; steps 12.. reuse the rows of steps 0..
    seen = valid_by_first()
    assert set(seen) == set(range(8, 14))
    assert all(v == {False} for v in seen.values())  # nothing written since: no stale latents leak
    write_all()
    seen = valid_by_first()
    assert seen[8] == {False}  # step 7 left RAM
    assert all(seen[t] == {True} for t in range(9, 14))


def test_key_shape_and_dtype_mismatch_errors_name_key_and_stream(tmp_path: Path) -> None:
    replay = Replay(tmp_path, chunk_length=4)
    replay.add(step(0), stream="left")
    bad = step(1)
    bad["count"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"'right'.*'count'.*shape \(3,\).*\(2,\)"):
        replay.add(bad, stream="right")
    bad = step(1)
    bad["image"] = bad["image"].astype(np.float32)
    with pytest.raises(ValueError, match=r"'right'.*'image'.*dtype float32.*uint8"):
        replay.add(bad, stream="right")
    bad = step(1)
    del bad["action"]
    with pytest.raises(ValueError, match=r"'right'.*missing \['action'\]"):
        replay.add(bad, stream="right")
    with pytest.raises(ValueError, match="is_first"):
        Replay(tmp_path / "other").add({**step(0), "is_first": 1.0})
    replay.add({**step(1), "reward": 0.5, "is_last": True})  # Python scalars are fine
    replay.close()
    reloaded = Replay(tmp_path, chunk_length=4)  # the layout now comes from the files
    with pytest.raises(ValueError, match=r"'x'.*'count'"):
        reloaded.add(bad | {"action": np.zeros(2, np.float32), "count": np.zeros(5, np.float32)}, stream="x")


def test_task_change_starts_a_new_chunk_and_stats(tmp_path: Path) -> None:
    with Replay(tmp_path, chunk_length=100) as replay:
        fill(replay, 10, episode=5)
        replay.add(step(10, first=True, reward=2.0), stream="s0", task="pick")
        replay.add(step(11, last=True, reward=3.0), stream="s0", task="pick")
    stats = replay.stats()
    assert [read_chunk(p)[0].task for p in chunk_files(tmp_path)] == ["", "pick"]
    s0 = stats["streams"]["s0"]
    assert s0["task"] == "pick" and s0["steps"] == 12 and s0["episodes"] == 3 and s0["returns"] == [5.0, 5.0, 5.0]
    assert stats["totals"]["episodes"] == 3 and stats["totals"]["disk_chunks"] == 2


def test_from_config(tmp_path: Path) -> None:
    cfg = ReplayConfig(chunk_length=4, ram_steps=8, disk_steps=100, online=False, recency=0.25)
    replay = Replay.from_config(tmp_path, cfg, seed=5)
    assert (replay.chunk_length, replay.ram_steps, replay.disk_steps, replay.recency) == (4, 8, 100, 0.25)


def _cli_fixture(directory: Path) -> None:
    with Replay(directory, chunk_length=8) as replay:
        for t in range(20):  # stream a: episodes of 5 steps with returns 5, 10, 15, 20
            ep = t // 5
            replay.add(
                step(t, 0, first=t % 5 == 0, last=t % 5 == 4, reward=ep + 1.0),
                stream="a",
                task="reach",
                policy_version=ep,
                time=100.0 + t,
            )
        for t in range(6):
            replay.add(step(t, 1, first=t == 0), stream="b", task="walk", time=200.0 + t)


def test_cli_info_text_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _cli_fixture(tmp_path)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in tmp_path.iterdir())
    assert cli_main(["info", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "2 stream(s), 26 steps" in text and "4 completed episode(s)" in text
    assert "stream 'a': task 'reach'" in text and "return mean 12.5 min 5 max 20" in text
    assert "stream 'b': task 'walk'" in text and "policy versions 0, 1, 2, 3" in text
    assert cli_main(["info", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    a, b = report["streams"]["a"], report["streams"]["b"]
    assert (a["steps"], a["chunks"], a["episodes"]) == (20, 3, 4)
    assert a["returns"] == {"mean": 12.5, "min": 5.0, "max": 20.0, "last": [5.0, 10.0, 15.0, 20.0]}
    assert a["time"] == {"first": 100.0, "last": 119.0, "span_s": 19.0} and a["policy_versions"] == [0, 1, 2, 3]
    assert (b["steps"], b["episodes"], b["returns"]["mean"]) == (6, 0, None)
    assert report["totals"]["steps"] == 26 and report["totals"]["episodes"] == 4
    assert sorted((p.name, p.stat().st_mtime_ns) for p in tmp_path.iterdir()) == before  # read-only


def test_cli_bad_directories_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    assert cli_main(["info", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "no such directory" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    assert cli_main(["info", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "not a replay directory" in err and "its replay store is" not in err
    (tmp_path / "run" / "replay").mkdir(parents=True)  # a run's logdir: point at its store
    assert cli_main(["info", str(tmp_path / "run")]) == 2
    assert f"its replay store is {tmp_path / 'run' / 'replay'}" in capsys.readouterr().err
    assert cli_main([]) == 2  # a subcommand is required


def test_cli_as_module_subprocess(tmp_path: Path) -> None:
    _cli_fixture(tmp_path)
    chunk_files(tmp_path)[0].write_bytes(b"junk")
    cmd = [sys.executable, "-m", "learner.replay_cli", "info", str(tmp_path), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["skipped"] and report["skipped"][0] in done.stderr
    assert report["streams"]["a"]["steps"] == 12
    bad = subprocess.run(
        [sys.executable, "-m", "learner.replay_cli", "info", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and str(tmp_path / "x") in bad.stderr


def _flip_member_byte(path: Path, member: str) -> None:
    """Flip one data byte of one array inside a chunk file: same size, valid zip, only the CRC can tell."""
    import zipfile

    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{member}.npy")
    with path.open("rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = np.frombuffer(f.read(4), "<u2")
    offset = info.header_offset + 30 + int(name_len) + int(extra_len) + info.file_size - 1  # last data byte
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_cli_info_does_not_count_a_chunk_whose_data_fails_its_crc(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _cli_fixture(tmp_path)
    files = [p for p in chunk_files(tmp_path) if read_chunk(p)[0].stream == "a"]
    damaged = files[1]  # 8 steps of stream a; the flipped byte is in 'image', which info does not itself read
    _flip_member_byte(damaged, "image")
    assert cli_main(["info", str(tmp_path), "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["streams"]["a"]["steps"] == 12 and report["streams"]["a"]["chunks"] == 2
    assert report["streams"]["a"]["gaps"] == 1  # the chunk after it no longer continues the stream
    assert report["skipped"] == [damaged.name]
    assert "CRC" in report["problems"][damaged.name] and "'image'" in report["problems"][damaged.name]
    assert damaged.name in captured.err and "corrupt" in captured.err
    assert cli_main(["info", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "18 steps" in text and f"{damaged.name} (corrupt" in text
