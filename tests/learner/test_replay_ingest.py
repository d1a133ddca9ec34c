"""Replay ingest for robot streams: add_steps, robot source positions across kills and restarts,
abandoned episodes, and ingest on one thread while another samples. Real files in tmp_path."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from learner.replay import Replay, read_chunk
from learner.replay.chunk_file import is_chunk_name
from learner.replay.index import INDEX_NAME
from learner.replay_cli import main as cli_main

ROOT = Path(__file__).resolve().parents[2]


def robot_chunk(seq: int, n: int, t0: int = 0, *, episode: int = 0) -> dict[str, np.ndarray]:
    """n steps of robot chunk `seq`; `count` = (seq, global step t) and the image repeats t, so a stored
    row says where it came from; with `episode`, is_first/is_last every `episode` steps of t."""
    t = np.arange(t0, t0 + n)
    return {
        "image": np.broadcast_to((t % 256).astype(np.uint8)[:, None, None, None], (n, 4, 4, 3)).copy(),
        "count": np.stack([np.full(n, seq), t], 1).astype(np.float32),
        "action": np.stack([t, -t], 1).astype(np.float32),
        "reward": (t % 3).astype(np.float32),
        "is_first": t % episode == 0 if episode else np.zeros(n, bool),
        "is_last": t % episode == episode - 1 if episode else np.zeros(n, bool),
        "is_terminal": t % (2 * episode) == 2 * episode - 1 if episode else np.zeros(n, bool),
    }


def rows(steps: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    return {key: value[i] for key, value in steps.items()}


def chunk_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if is_chunk_name(p.name))


def stored_counts(directory: Path, stream: str) -> np.ndarray:
    """`count` rows of a stream over all its chunk files, in order."""
    parts = [steps["count"] for meta, steps, _, _ in map(read_chunk, chunk_files(directory)) if meta.stream == stream]
    return np.concatenate(parts) if parts else np.zeros((0, 2), np.float32)


def assert_contiguous(batch: dict[str, np.ndarray]) -> None:
    t = batch["count"][:, :, 1]
    assert (np.diff(t, axis=1) == 1).all(), "a sequence skips or repeats steps"
    assert (batch["image"][:, :, 0, 0, 0] == t % 256).all(), "image and count of a step disagree"
    assert (batch["action"][:, :, 0] == t).all()


@pytest.mark.parametrize("ram_steps", [10_000, 13, 5])
def test_add_steps_equals_add_calls(tmp_path: Path, ram_steps: int) -> None:
    """Same files, samples and stats as one `add` per step, also when RAM is small enough to cut chunks."""
    rng = np.random.default_rng(0)
    one, many = (Replay(tmp_path / name, chunk_length=8, ram_steps=ram_steps, seed=3) for name in ("one", "many"))
    t = {0: 0, 1: 0}
    while min(t.values()) < 40:
        s = int(rng.integers(2))
        n = int(rng.integers(1, 12))
        steps = robot_chunk(s, n, t[s], episode=6)
        task = "reach" if t[s] < 20 else "pick"  # a task change seals the open chunk
        times, versions = 1000.0 + steps["count"][:, 1], steps["count"][:, 1].astype(np.int64) // 5
        for i in range(n):
            one.add(rows(steps, i), f"s{s}", task=task, policy_version=int(versions[i]), time=float(times[i]))
        many.add_steps(steps, f"s{s}", task=task, policy_version=versions, time=times)
        t[s] += n
    assert len(one) == len(many) and one.stats() == many.stats()
    length = 5 if ram_steps > 10 else 2
    for _ in range(3):
        a, b = one.sample(16, length), many.sample(16, length)
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    one.close()
    many.close()
    files_one, files_many = chunk_files(tmp_path / "one"), chunk_files(tmp_path / "many")
    assert len(files_one) == len(files_many) > 5
    for p, q in zip(files_one, files_many):
        (ma, sa, ta, va), (mb, sb, tb, vb) = read_chunk(p), read_chunk(q)
        assert (ma.stream, ma.task, ma.seq, ma.length, ma.source) == (mb.stream, mb.task, mb.seq, mb.length, None)
        assert sa.keys() == sb.keys() and all((sa[k] == sb[k]).all() for k in sa)
        assert (ta == tb).all() and (va == vb).all()


def test_add_steps_crosses_chunk_boundaries_and_records_source(tmp_path: Path) -> None:
    replay = Replay(tmp_path, chunk_length=8, online=False)
    assert replay.source_position("arm") is None
    replay.add_steps(robot_chunk(0, 5, 0), "arm", source=0)
    assert replay.source_position("arm") == (0, 4, 5)
    replay.add_steps(robot_chunk(1, 20, 5), "arm", source=1)  # fills 3 + 8 + 8 rows and opens a 4th chunk
    assert replay.source_position("arm") == (1, 19, 20)
    big = robot_chunk(2, 9, 25)
    replay.add_steps({k: v[4:] for k, v in big.items()}, "arm", source=2, first_index=4, total=9)  # a tail
    assert replay.source_position("arm") == (2, 8, 9)
    replay.flush()
    metas = [read_chunk(p)[0] for p in chunk_files(tmp_path)]
    assert [m.length for m in metas] == [8, 8, 8, 6]
    assert [m.source for m in metas] == [(1, 2, 20), (1, 10, 20), (1, 18, 20), (2, 8, 9)]
    assert all(b.prev == a.uuid for a, b in zip(metas, metas[1:]))
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert [e["source"] for e in index["chunks"]] == [[1, 2, 20], [1, 10, 20], [1, 18, 20], [2, 8, 9]]
    expected = [[0, t] for t in range(5)] + [[1, t] for t in range(5, 25)] + [[2, t] for t in range(29, 34)]
    np.testing.assert_array_equal(stored_counts(tmp_path, "arm"), expected)
    replay.close()
    reopened = Replay(tmp_path, chunk_length=8, ram_steps=10)  # only the newest chunks fit in RAM
    assert reopened.source_position("arm") == (2, 8, 9) and reopened.stats()["streams"]["arm"]["source"] == [2, 8, 9]
    assert reopened.source_position("other") is None


def test_source_skips_chunk_that_fails_to_load_and_old_files_load(tmp_path: Path) -> None:
    with Replay(tmp_path, chunk_length=4) as replay:
        for seq in range(3):
            replay.add_steps(robot_chunk(seq, 4, 4 * seq), "arm", source=seq)
        replay.add(rows(robot_chunk(9, 1), 0), "plain")  # no robot numbering
    by_stream = [(read_chunk(p)[0].stream, p) for p in chunk_files(tmp_path)]
    newest = [p for s, p in by_stream if s == "arm"][-1]
    (plain,) = [p for s, p in by_stream if s == "plain"]
    with np.load(newest, allow_pickle=False) as npz:
        members = {k: npz[k] for k in npz.files}
    meta = json.loads(str(members["__meta__"]))
    members["__meta__"] = np.array(json.dumps({**meta, "length": 5}))  # its arrays no longer match
    with newest.open("wb") as f:
        np.savez(f, **members)
    with np.load(plain, allow_pickle=False) as npz:  # a file written before source/abandoned existed
        members = {k: npz[k] for k in npz.files}
    old = {k: v for k, v in json.loads(str(members["__meta__"])).items() if k not in ("source", "abandoned")}
    members["__meta__"] = np.array(json.dumps(old))
    with plain.open("wb") as f:
        np.savez(f, **members)
    (tmp_path / INDEX_NAME).unlink()
    with pytest.warns(UserWarning, match=newest.name):
        replay = Replay(tmp_path, chunk_length=4)
    assert replay.source_position("arm") == (1, 3, 4)  # the rows that are here, not the unreadable ones
    assert len(replay) == 9 and replay.source_position("plain") is None


def test_add_steps_errors_name_key_and_stream(tmp_path: Path) -> None:
    replay = Replay(tmp_path)
    replay.add_steps(robot_chunk(0, 0), "arm")  # nothing to add, no layout fixed
    replay.add_steps(robot_chunk(0, 3), "arm")
    bad = robot_chunk(1, 3)
    bad["count"] = bad["count"][:2]
    with pytest.raises(ValueError, match=r"'arm'.*different numbers of steps.*'count': 2"):
        replay.add_steps(bad, "arm")
    bad = robot_chunk(1, 3)
    bad["image"] = bad["image"].astype(np.float32)
    with pytest.raises(ValueError, match=r"'leg'.*'image'.*dtype float32.*uint8"):
        replay.add_steps(bad, "leg")
    bad = robot_chunk(1, 3)
    bad["reward"] = [0.0, 1.0, 2.0]  # type: ignore[assignment]
    with pytest.raises(TypeError, match=r"'arm'.*'reward'.*numpy array"):
        replay.add_steps(bad, "arm")
    with pytest.raises(ValueError, match=r"'arm'.*policy_version has shape \(2,\)"):
        replay.add_steps(robot_chunk(1, 3), "arm", policy_version=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match=r"'arm'.*bad robot position.*total 4 for 3 steps"):
        replay.add_steps(robot_chunk(1, 3), "arm", source=1, first_index=2, total=4)
    assert replay.stats()["streams"]["arm"]["steps"] == 3 and "leg" not in replay.stats()["streams"]


SIGKILL_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    from learner.replay import Replay

    def robot_chunk(seq, n, t0):
        t = np.arange(t0, t0 + n)
        flags = np.zeros(n, bool)
        return {"image": np.broadcast_to((t % 256).astype(np.uint8)[:, None, None, None], (n, 4, 4, 3)).copy(),
                "count": np.stack([np.full(n, seq), t], 1).astype(np.float32),
                "action": np.stack([t, -t], 1).astype(np.float32), "reward": np.zeros(n, np.float32),
                "is_first": t == 0, "is_last": flags, "is_terminal": flags}

    directory, seed = sys.argv[1], int(sys.argv[2])
    lengths = np.random.default_rng(seed).integers(1, 40, size=100_000)
    split = np.random.default_rng(seed + 1)
    replay = Replay(directory, chunk_length=16, ram_steps=200)
    t = 0
    for seq, n in enumerate(lengths.tolist()):
        steps = robot_chunk(seq, n, t)
        cut = int(split.integers(0, n)) if split.random() < 0.3 else 0  # sometimes sent in two parts
        if cut:
            replay.add_steps({k: v[:cut] for k, v in steps.items()}, "robot", source=seq, total=n)
            if split.random() < 0.5:
                replay.flush()
        replay.add_steps({k: v[cut:] for k, v in steps.items()}, "robot", source=seq, first_index=cut, total=n)
        t += n
        if seq % 3 == 2:
            replay.flush()
            print(seq, flush=True)  # acknowledged: the robot may forget this chunk
    """
)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_source_position_matches_rows_after_sigkill(tmp_path: Path, seed: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", SIGKILL_SCRIPT, str(tmp_path), str(seed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, cwd=ROOT)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"2"
        time.sleep(np.random.default_rng(seed).uniform(0.0, 0.5))
    finally:
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    acked = int(out.split()[-1]) if out.split() else 2
    lengths = np.random.default_rng(seed).integers(1, 40, size=100_000)
    replay = Replay(tmp_path, chunk_length=16, ram_steps=10**6, online=False)
    position = replay.source_position("robot")
    assert position is not None
    seq, index, total = position
    assert seq >= acked and total == lengths[seq], "an acknowledged robot chunk was lost"
    starts = np.concatenate([[0], np.cumsum(lengths)])
    expected = np.stack([np.repeat(np.arange(seq + 1), lengths[: seq + 1]), np.arange(starts[seq + 1])], 1)
    expected = expected[: starts[seq] + index + 1]  # every robot row up to (seq, index), each once
    np.testing.assert_array_equal(stored_counts(tmp_path, "robot"), expected)
    assert len(replay) == len(expected) == replay.stats()["streams"]["robot"]["steps"]
    assert_contiguous(replay.sample(32, 10))


def test_close_episode_open_chunk_flush_and_reopen(tmp_path: Path) -> None:
    replay = Replay(tmp_path, chunk_length=16, online=False)
    assert not replay.close_episode("arm")  # no steps yet
    replay.add_steps(robot_chunk(0, 6, 0, episode=4), "arm")  # an episode 0..3, then 4, 5 of the next
    assert replay.close_episode("arm")
    assert not replay.close_episode("arm")  # its last step is already is_last
    stats = replay.stats()
    assert stats["streams"]["arm"]["abandoned"] == 1 and stats["totals"]["abandoned"] == 1
    assert stats["streams"]["arm"]["returns"] == [3.0]  # the abandoned episode is not a completed one
    replay.add(rows(robot_chunk(0, 1, 6, episode=4), 0), "arm")  # the robot resumes mid-episode (t=6)
    replay.add_steps(robot_chunk(0, 2, 7, episode=4), "arm")
    replay.flush()
    (path,) = chunk_files(tmp_path)
    meta, steps, _, _ = read_chunk(path)
    assert steps["is_last"].tolist() == [False, False, False, True, False, True, False, True, False]
    assert steps["is_terminal"].tolist() == [False] * 7 + [True, False]  # the abandoned row 5 is not terminal
    assert steps["is_first"].tolist() == [True, False, False, False, True, False, True, False, True]
    assert meta.abandoned == (5,)
    batch = replay.sample(64, 4)
    crossing = batch["count"][:, 0, 1] == 4
    assert crossing.any() and (batch["is_last"][crossing, 1] & batch["is_first"][crossing, 2]).all()
    replay.close()
    reopened = Replay(tmp_path, chunk_length=16)
    s = reopened.stats()["streams"]["arm"]
    assert (s["abandoned"], s["episodes"], s["returns"]) == (1, 2, [3.0, 1.0])
    assert cli_main(["info", str(tmp_path)]) == 0  # `reverie-replay info` reads these files


def test_close_episode_rewrites_sealed_chunk_and_forces_first_after_reopen(tmp_path: Path) -> None:
    replay = Replay(tmp_path, chunk_length=4)
    replay.add_steps(robot_chunk(0, 8, 0), "arm")  # two full chunks, both sealed and handed to the disk
    replay.flush()
    newest = chunk_files(tmp_path)[-1]
    assert replay.close_episode("arm")
    assert not read_chunk(newest)[1]["is_last"].any()  # written at the next flush, not before
    replay.flush()
    meta, steps, _, _ = read_chunk(newest)
    assert steps["is_last"].tolist() == [False, False, False, True] and not steps["is_terminal"].any()
    assert meta.abandoned == (3,) and len(chunk_files(tmp_path)) == 2
    assert not list(tmp_path.glob(".*"))
    replay.close()
    reopened = Replay(tmp_path, chunk_length=4)  # killed right after the flush: the cut is remembered
    assert reopened.stats()["streams"]["arm"]["abandoned"] == 1
    reopened.add_steps(robot_chunk(0, 2, 8), "arm")
    reopened.close()
    _, steps, _, _ = read_chunk(chunk_files(tmp_path)[-1])
    assert steps["is_first"].tolist() == [True, False]


def test_close_episode_when_last_step_left_ram(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="learner.replay.store")
    replay = Replay(tmp_path, chunk_length=4, ram_steps=8)
    replay.add_steps(robot_chunk(0, 3, 0), "arm")
    replay.add_steps(robot_chunk(0, 12, 0), "leg")  # pushes arm's chunk out of RAM (written first)
    assert not replay.close_episode("arm")
    assert "'arm'" in caplog.text and "left RAM" in caplog.text
    replay.add_steps(robot_chunk(0, 2, 3), "arm")  # still starts a new episode
    replay.close()
    arm = [read_chunk(p)[1] for p in chunk_files(tmp_path) if read_chunk(p)[0].stream == "arm"]
    assert [a["is_first"].tolist() for a in arm] == [[False] * 3, [True, False]]
    assert not any(a["is_last"].any() for a in arm)


def test_ingest_thread_while_sampling(tmp_path: Path) -> None:
    replay = Replay(tmp_path, chunk_length=16, ram_steps=300, online=True)
    replay.add_steps(robot_chunk(0, 40, 0), "r0", source=0)
    stop, errors, sent = threading.Event(), [], [40]

    def ingest() -> None:
        try:
            seq = 1
            while not stop.is_set():
                replay.add_steps(robot_chunk(seq, 7, sent[0]), "r0", source=seq)
                sent[0] += 7
                if seq % 5 == 0:
                    replay.flush()
                seq += 1
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)

    thread = threading.Thread(target=ingest)
    thread.start()
    samples, deadline = 0, time.monotonic() + 1.0
    try:
        while time.monotonic() < deadline and not errors:
            batch = replay.sample(16, 8)
            assert_contiguous(batch)
            replay.write_context(batch["ids"], {"deter": batch["count"][..., 1:].copy()})
            replay.stats()
            samples += 1
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not errors, errors
    assert samples > 10 and sent[0] > 40 + 70
    replay.close()
    assert replay.stats()["streams"]["r0"]["steps"] == sent[0] == len(stored_counts(tmp_path, "r0"))
