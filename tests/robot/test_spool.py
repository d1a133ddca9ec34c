"""The robot's on-disk spool: nothing recorded may be lost, seqs are never reused, bad files are kept aside."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from robot.link.spool import Spool, SpoolCorrupt, SpoolFull


def _frames(seq: int, n: int = 100) -> list[bytes | memoryview]:
    arr = np.arange(n, dtype=np.float32) + seq
    return [f"header-{seq}".encode(), memoryview(arr), b""]


def _expected(seq: int, n: int = 100) -> list[bytes]:
    return [f"header-{seq}".encode(), (np.arange(n, dtype=np.float32) + seq).tobytes(), b""]


def _chunk_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".rvsp"))


def test_put_ack_pending_load_round_trip(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=1 << 20)
    assert (spool.next_seq, spool.count, spool.bytes, spool.pending()) == (0, 0, 0, [])
    for seq in range(4):
        spool.put(seq, _frames(seq))
    assert spool.next_seq == 4
    assert spool.pending() == [0, 1, 2, 3]
    assert spool.count == 4
    assert spool.bytes == sum(p.stat().st_size for p in (tmp_path / "spool").glob("*.rvsp"))
    for seq in range(4):
        assert spool.load(seq) == _expected(seq)
    assert spool.ack(1) == 2
    assert spool.pending() == [2, 3]
    assert spool.ack(1) == 0  # repeated ack is harmless
    assert _chunk_files(tmp_path / "spool") == ["000000000002.rvsp", "000000000003.rvsp"]
    with pytest.raises(KeyError, match="seq 0"):
        spool.load(0)
    assert spool.ack(10) == 2
    assert (spool.count, spool.bytes, spool.pending()) == (0, 0, [])


def test_put_with_wrong_seq_raises_and_writes_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.put(0, _frames(0))
    for bad in (0, 2, -1):
        with pytest.raises(ValueError, match=f"put seq {bad}, expected next_seq 1"):
            spool.put(bad, _frames(bad))
    assert spool.pending() == [0]
    assert spool.next_seq == 1


def test_restart_reloads_pending_and_keeps_next_seq(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    for seq in range(5):
        spool.put(seq, _frames(seq))
    spool.ack(1)
    again = Spool(tmp_path, max_bytes=1 << 20)
    assert again.pending() == [2, 3, 4]
    assert again.next_seq == 5
    assert again.bytes == spool.bytes
    assert again.load(3) == _expected(3)
    again.put(5, _frames(5))
    again.ack(5)
    assert again.count == 0
    # Every chunk acknowledged: the counter file alone must keep seqs from being reused.
    third = Spool(tmp_path, max_bytes=1 << 20)
    assert third.next_seq == 6
    assert third.pending() == []
    third.put(6, _frames(6))
    assert Spool(tmp_path, max_bytes=1 << 20).pending() == [6]


def test_next_seq_takes_max_of_counter_and_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.put(0, _frames(0))
    spool.ack(0)  # counter says 1
    for seq in range(1, 4):
        spool.put(seq, _frames(seq))  # files up to 3, counter file still says 1
    assert (tmp_path / "next_seq").read_text().strip() == "1"
    assert Spool(tmp_path, max_bytes=1 << 20).next_seq == 4


def test_spool_full_leaves_nothing_written(tmp_path: Path) -> None:
    probe = Spool(tmp_path / "probe", max_bytes=1 << 20)
    probe.put(0, _frames(0))
    one = probe.bytes
    spool = Spool(tmp_path / "s", max_bytes=2 * one + one // 2)
    spool.put(0, _frames(0))
    spool.put(1, _frames(1))
    before = sorted(p.name for p in (tmp_path / "s").iterdir())
    with pytest.raises(SpoolFull) as info:
        spool.put(2, _frames(2))
    text = str(info.value)
    assert str(tmp_path / "s") in text and str(2 * one) in text and str(2 * one + one // 2) in text
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == before  # no chunk, no temp file
    assert spool.next_seq == 2 and spool.pending() == [0, 1]
    spool.ack(0)  # room again: the same seq goes in
    spool.put(2, _frames(2))
    assert spool.pending() == [1, 2]


def test_corrupt_and_truncated_files_are_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    for seq in range(5):
        spool.put(seq, _frames(seq))
    truncated = tmp_path / "000000000001.rvsp"
    with open(truncated, "r+b") as f:
        f.truncate(truncated.stat().st_size - 3)
    bad_magic = tmp_path / "000000000003.rvsp"
    data = bytearray(bad_magic.read_bytes())
    data[:5] = b"XXXXX"
    bad_magic.write_bytes(bytes(data))
    extended = tmp_path / "000000000004.rvsp"
    with open(extended, "ab") as f:
        f.write(b"junk")
    with caplog.at_level(logging.WARNING):
        again = Spool(tmp_path, max_bytes=1 << 20, log=logging.getLogger("test.spool"))
    assert again.pending() == [0, 2]
    assert again.load(0) == _expected(0) and again.load(2) == _expected(2)
    for path in (truncated, bad_magic, extended):
        assert not path.exists()
        assert path.with_name(path.name + ".corrupt").exists()  # moved aside, never deleted
        assert any(str(path) in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    # Seqs of the bad files were used once: they must not be reused, even when the counter says less.
    assert again.next_seq == 5
    again.ack(10)
    assert Spool(tmp_path, max_bytes=1 << 20).next_seq == 5
    assert len(list(tmp_path.glob("*.corrupt"))) == 3  # a rescan leaves them as they are


def test_file_damaged_after_start_fails_load_with_name_and_seq(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.put(0, _frames(0))
    spool.put(1, _frames(1))
    path = tmp_path / "000000000000.rvsp"
    with open(path, "r+b") as f:
        f.truncate(10)
    with pytest.raises(SpoolCorrupt, match=r"000000000000\.rvsp.*seq 0"):
        spool.load(0)
    assert spool.pending() == [1]
    assert path.with_name(path.name + ".corrupt").exists()


def test_leftover_temp_file_is_kept_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.put(0, _frames(0))
    leftover = tmp_path / ".tmp-000000000001.rvsp-abc"
    leftover.write_bytes(b"RVSP1partial")
    with caplog.at_level(logging.WARNING):
        again = Spool(tmp_path, max_bytes=1 << 20)
    assert again.pending() == [0]
    assert not leftover.exists() and (tmp_path / (leftover.name + ".corrupt")).exists()
    assert any(str(leftover) in r.getMessage() for r in caplog.records)
    Spool(tmp_path, max_bytes=1 << 20)  # a rescan leaves what was moved aside alone
    assert sorted(os.listdir(tmp_path)) == sorted(["000000000000.rvsp", leftover.name + ".corrupt"])


def test_skip_to_never_lowers_and_survives_restart(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.put(0, _frames(0))
    spool.skip_to(10)
    spool.skip_to(3)  # never goes back
    assert spool.next_seq == 10
    with pytest.raises(ValueError, match="expected next_seq 10"):
        spool.put(1, _frames(1))
    assert Spool(tmp_path, max_bytes=1 << 20).next_seq == 10
