"""The wire protocol: round trips (in memory and over real loopback sockets), zero copy, and every reject rule."""

from __future__ import annotations

import hashlib
import logging

import msgpack
import numpy as np
import pytest
import zmq

from core.link.protocol import (
    DTYPES,
    KINDS,
    MAX_CHUNK_STEPS,
    MAX_FRAMES,
    MAX_HEADER_BYTES,
    PROTOCOL_VERSION,
    REJECT_KINDS,
    Message,
    ProtocolError,
    RejectLog,
    check_steps,
    decode,
    encode,
    printable,
    spec_of,
    weights_checksum,
)

SPEC_META = {
    "image": ["uint8", [8, 8, 3]],
    "joints": ["float32", [6]],
    "reward": ["float32", []],
    "is_first": ["bool", []],
    "is_last": ["bool", []],
    "is_terminal": ["bool", []],
    "action": ["float32", [6]],
}


def steps_arrays(t: int = 5, spec: dict | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(t)
    arrays = {}
    for name, (dtype, dims) in (spec or SPEC_META).items():
        arrays[name] = (rng.random((t, *dims)) * 100).astype(dtype)
    arrays["policy_version"] = np.arange(t, dtype=np.int64)
    arrays["time"] = np.linspace(0.0, 1.0, t)
    return arrays


def blob_message(version: int = 3) -> Message:
    blob = np.frombuffer(b"pretend these are safetensors bytes" * 10, dtype=np.uint8)
    meta = {"step": 40, "sha256": weights_checksum(blob), "dtype": "float16"}
    return Message("weights", run="learner-run", seq=version, meta=meta, arrays={"blob": blob})


def valid_messages() -> dict[str, Message]:
    return {
        "hello": Message("hello", robot="arm-1", run="a1b2", meta={"spec": SPEC_META, "task": "reach", "hz": 20}),
        "welcome": Message("welcome", run="l1", meta={"server": "l1", "next_seq": 7, "version": 0}),
        "steps": Message("steps", robot="arm-1", run="a1b2", seq=7, arrays=steps_arrays()),
        "ack": Message("ack", robot="arm-1", seq=7),
        "weights": blob_message(),
        "heartbeat": Message("heartbeat", robot="arm-1", meta={"fps": 19.5, "queue": [1, 2], "ok": True}),
        "bye": Message("bye", robot="arm-1", meta={"reason": "operator stop"}),
    }


def header_of(msg: Message) -> dict:
    return msgpack.unpackb(encode(msg)[0], raw=False)


def crafted(header: dict, payloads: list[bytes]) -> list[bytes]:
    """Frames that bypass encode's checks, as a hostile or buggy peer would send them."""
    return [msgpack.packb(header, use_bin_type=True), *payloads]


def payloads_of(msg: Message) -> list[bytes]:
    return [bytes(f) for f in encode(msg)[1:]]


def reject(frames: list, kind: str, *words: str, max_bytes: int | None = None) -> ProtocolError:
    kwargs = {} if max_bytes is None else {"max_bytes": max_bytes}
    with pytest.raises(ProtocolError) as info:
        decode(frames, **kwargs)
    assert info.value.kind == kind, f"expected a {kind!r} reject, got {info.value.kind!r}: {info.value}"
    for word in words:
        assert word in str(info.value), f"{word!r} not in {str(info.value)!r}"
    return info.value


def assert_same(a: Message, b: Message) -> None:
    assert (a.kind, a.robot, a.run, a.seq, a.meta) == (b.kind, b.robot, b.run, b.seq, b.meta)
    assert list(a.arrays) == list(b.arrays)
    for name, arr in a.arrays.items():
        got = b.arrays[name]
        assert got.dtype == arr.dtype and got.shape == arr.shape, name
        np.testing.assert_array_equal(got, arr)


# --- round trips -----------------------------------------------------------------------------------------------


def test_every_kind_has_a_valid_example() -> None:
    assert sorted(valid_messages()) == sorted(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_every_kind(kind: str) -> None:
    msg = valid_messages()[kind]
    frames = encode(msg)
    assert len(frames) == 1 + len(msg.arrays)
    assert msgpack.unpackb(frames[0], raw=False)["v"] == PROTOCOL_VERSION
    assert_same(msg, decode(frames))


def test_arrays_of_every_dtype_and_shape_are_zero_copy_and_read_only() -> None:
    shapes = [(3,), (3, 4), (3, 2, 2, 2), (3, 0)]
    arrays = {}
    for i, dtype in enumerate(sorted(DTYPES)):
        arrays[f"x_{dtype}"] = (np.arange(np.prod(shapes[i % 4])) % 2).astype(dtype).reshape(shapes[i % 4])
    arrays["policy_version"] = np.zeros(3, np.int64)
    arrays["time"] = np.arange(3.0)
    msg = Message("steps", robot="r1", arrays=arrays)
    frames = encode(msg)
    out = decode(frames)
    assert_same(msg, out)
    for name, arr in arrays.items():
        if arr.size:
            assert np.shares_memory(out.arrays[name], arr), f"{name} was copied"
        assert not out.arrays[name].flags.writeable
    with pytest.raises(ValueError):
        out.arrays["time"][0] = 5.0


def test_non_contiguous_and_big_endian_arrays_are_sent_correctly() -> None:
    arrays = steps_arrays(4)
    base = np.arange(4 * 8 * 8 * 3 * 2, dtype=np.uint8).reshape(4, 8, 8, 6)
    arrays["image"] = base[..., ::2]  # strided view
    arrays["joints"] = np.arange(24, dtype=">f4").reshape(4, 6)  # foreign byte order
    out = decode(encode(Message("steps", robot="r1", arrays=arrays)))
    np.testing.assert_array_equal(out.arrays["image"], base[..., ::2])
    np.testing.assert_array_equal(out.arrays["joints"], np.arange(24, dtype=np.float32).reshape(4, 6))
    assert out.arrays["joints"].dtype == np.float32
    assert check_steps(out, spec_of(SPEC_META)) == 4


def test_round_trip_over_tcp_without_copies() -> None:
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    push = ctx.socket(zmq.PUSH)
    try:
        for s in (pull, push):
            s.setsockopt(zmq.LINGER, 0)
        pull.bind("tcp://127.0.0.1:*")
        push.connect(pull.getsockopt(zmq.LAST_ENDPOINT).decode())
        msg = Message("steps", robot="arm-1", run="r", seq=11, arrays=steps_arrays(300))  # ~170 KB of images
        push.send_multipart(encode(msg), copy=False)
        assert pull.poll(5000), "nothing arrived over loopback"
        frames = pull.recv_multipart(copy=False)
        out = decode(frames)
        assert_same(msg, out)
        for frame, name in zip(frames[1:], msg.arrays):
            assert np.shares_memory(out.arrays[name], np.frombuffer(frame.buffer, np.uint8)), f"{name} was copied"
        assert check_steps(out, spec_of(SPEC_META)) == 300
        weights = blob_message(9)
        push.send_multipart(encode(weights), copy=False)
        assert pull.poll(5000)
        got = decode(pull.recv_multipart(copy=False))
        assert got.seq == 9 and weights_checksum(got.arrays["blob"]) == got.meta["sha256"]
    finally:
        push.close(0)
        pull.close(0)
        ctx.term()


def test_weights_checksum_agrees_for_every_input_type() -> None:
    data = bytes(range(256)) * 3
    expected = hashlib.sha256(data).hexdigest()
    arr = np.frombuffer(data, np.uint8)
    assert weights_checksum(data) == weights_checksum(memoryview(data)) == weights_checksum(arr) == expected
    assert weights_checksum(arr.reshape(3, 256)[:, :].copy()) == expected
    assert weights_checksum(data[:-1]) != expected


# --- rejects -----------------------------------------------------------------------------------------------------


def test_no_frames_and_too_many_frames() -> None:
    reject([], "frames", "no frames")
    header = header_of(Message("heartbeat"))
    reject(crafted(header, [b""] * MAX_FRAMES), "frames", str(MAX_FRAMES + 1))


def test_random_bytes_header() -> None:
    garbage = np.random.default_rng(0).bytes(200)
    reject([garbage], "header", "msgpack")
    reject([msgpack.packb([1, 2, 3])], "header", "map")


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"x": 1}, ["unexpected", "'x'"]),
        ({"s": -1}, ["'s'", ">= 0"]),
        ({"s": "7"}, ["'s'", "int"]),
        ({"r": 5}, ["'r'", "str"]),
        ({"m": [1]}, ["'m'", "map"]),
        ({"m": {b"k": 2}}, ["str keys"]),
        ({"m": {1: 2}}, ["map key"]),
        ({"a": [["time", "float64"]]}, ["array entry 0"]),
    ],
)
def test_malformed_header_fields(change: dict, words: list[str]) -> None:
    header = header_of(Message("heartbeat", robot="r1"))
    header.update(change)
    reject(crafted(header, []), "header", *words)


def test_missing_header_key() -> None:
    header = header_of(Message("heartbeat"))
    del header["u"]
    reject(crafted(header, []), "header", "missing ['u']")


def test_truncated_and_padded_multipart() -> None:
    frames = encode(valid_messages()["steps"])
    reject(frames[:-1], "frames", "lists 9 arrays but 8 array frames")
    reject([*frames, b"\x00" * 8], "frames", "lists 9 arrays but 10 array frames")


def test_wrong_version() -> None:
    header = header_of(Message("heartbeat"))
    header["v"] = PROTOCOL_VERSION + 1
    header["new_field_of_v2"] = True  # a future version may change the layout: still a version reject
    reject(crafted(header, []), "version", f"version {PROTOCOL_VERSION + 1}", f"speaks {PROTOCOL_VERSION}")


def test_unknown_type() -> None:
    header = header_of(Message("heartbeat"))
    header["k"] = "exec_python"
    reject(crafted(header, []), "type", "'exec_python'")


def test_bad_dtype_names_the_array() -> None:
    msg = valid_messages()["steps"]
    header = header_of(msg)
    header["a"][1][1] = "object"
    reject(crafted(header, payloads_of(msg)), "dtype", "'joints'", "'object'")
    with pytest.raises(ProtocolError) as info:
        encode(Message("steps", robot="r1", arrays={**steps_arrays(), "c": np.zeros(5, np.complex64)}))
    assert info.value.kind == "dtype" and "'c'" in str(info.value)


def test_shape_frame_length_mismatch_names_the_array() -> None:
    msg = valid_messages()["steps"]
    header = header_of(msg)
    header["a"][0][2] = [5, 8, 8, 4]
    reject(crafted(header, payloads_of(msg)), "shape", "'image'", "1280 bytes", "960")


@pytest.mark.parametrize("dims", [[5, -1], [5, 1.5], [5, True], "5", [1] * 9])
def test_bad_dims(dims: object) -> None:
    msg = Message("steps", robot="r1", arrays={"policy_version": np.zeros(5, np.int64), "time": np.zeros(5)})
    header = header_of(msg)
    header["a"][1][2] = dims
    reject(crafted(header, payloads_of(msg)), "shape", "'time'")


def test_oversized_total_and_header() -> None:
    frames = encode(valid_messages()["steps"])
    total = sum(memoryview(f).nbytes for f in frames)
    reject(frames, "size", str(total), max_bytes=total - 1)
    assert decode(frames, max_bytes=total).kind == "steps"
    header = header_of(Message("heartbeat"))
    header["m"] = {"log": "x" * MAX_HEADER_BYTES}
    reject(crafted(header, []), "size", "header frame")
    with pytest.raises(ProtocolError) as info:  # the sender finds out too
        encode(Message("heartbeat", meta={"log": "x" * MAX_HEADER_BYTES}))
    assert info.value.kind == "size"


@pytest.mark.parametrize("robot", ["robot 1", "../../etc", "r" * 65, "robot\nWARNING fake"])
def test_bad_robot_id(robot: str) -> None:
    header = header_of(Message("heartbeat", robot="ok"))
    header["r"] = robot
    reject(crafted(header, []), "field", "robot id")


def test_duplicate_and_bad_array_names() -> None:
    msg = valid_messages()["steps"]
    header = header_of(msg)
    payloads = payloads_of(msg)
    dup = {**header, "a": [*header["a"], header["a"][-1]]}
    reject(crafted(dup, [*payloads, payloads[-1]]), "field", "'time'", "twice")
    header["a"][0][0] = "n" * 65
    reject(crafted(header, payloads), "field", "array name")


def test_missing_weights_meta() -> None:
    msg = blob_message()
    for key in ("step", "sha256", "dtype"):
        header = header_of(msg)
        del header["m"][key]
        reject(crafted(header, payloads_of(msg)), "field", f"meta['{key}']", "missing")
    with pytest.raises(ProtocolError) as info:  # encode refuses it at the sender
        encode(Message("weights", seq=1, meta={"step": 0, "dtype": "float32"}, arrays=msg.arrays))
    assert info.value.kind == "field" and "sha256" in str(info.value)


@pytest.mark.parametrize(
    ("change", "kind", "words"),
    [
        ({"sha256": "A" * 64}, "field", ["meta['sha256']", "lowercase"]),
        ({"dtype": "int8"}, "field", ["meta['dtype']"]),
        ({"step": -1}, "field", ["meta['step']"]),
        ({"seq": 0}, "field", ["seq", ">= 1"]),
        ({"arrays": {"blob": np.zeros(4, np.float32)}}, "dtype", ["'blob'", "uint8"]),
        ({"arrays": {"blob": np.zeros((2, 2), np.uint8)}}, "shape", ["'blob'", "1-D"]),
        ({"arrays": {"blob": np.zeros(4, np.uint8), "x": np.zeros(1, np.uint8)}}, "field", ["exactly one"]),
    ],
)
def test_bad_weights(change: dict, kind: str, words: list[str]) -> None:
    msg = blob_message()
    meta = {**msg.meta, **{k: v for k, v in change.items() if k not in ("seq", "arrays")}}
    bad = Message("weights", seq=change.get("seq", 3), meta=meta, arrays=change.get("arrays", msg.arrays))
    with pytest.raises(ProtocolError) as info:
        encode(bad)
    assert info.value.kind == kind
    for word in words:
        assert word in str(info.value)


def test_steps_with_unequal_t() -> None:
    arrays = steps_arrays(5)
    arrays["joints"] = arrays["joints"][:4]
    msg_header = {"v": PROTOCOL_VERSION, "k": "steps", "r": "r1", "u": "", "s": 0, "m": {},
                  "a": [[n, a.dtype.name, list(a.shape)] for n, a in arrays.items()]}
    payloads = [np.ascontiguousarray(a).tobytes() for a in arrays.values()]
    reject(crafted(msg_header, payloads), "shape", "'joints' has 4", "has 5")


@pytest.mark.parametrize(
    ("arrays", "kind", "words"),
    [
        ({}, "field", ["no arrays"]),
        ({"time": np.zeros(0), "policy_version": np.zeros(0, np.int64)}, "shape", ["0 steps"]),
        (steps_arrays(MAX_CHUNK_STEPS + 1, {"x": ["bool", []]}), "shape", [str(MAX_CHUNK_STEPS + 1)]),
        ({"time": np.zeros(3)}, "field", ["'policy_version'", "missing"]),
        ({"time": np.zeros(3, np.float32), "policy_version": np.zeros(3, np.int64)}, "dtype", ["'time'", "float64"]),
        ({"time": np.zeros((3, 1)), "policy_version": np.zeros(3, np.int64)}, "shape", ["'time'", "(T,)"]),
    ],
)
def test_bad_steps(arrays: dict, kind: str, words: list[str]) -> None:
    with pytest.raises(ProtocolError) as info:
        encode(Message("steps", robot="r1", arrays=arrays))
    assert info.value.kind == kind, str(info.value)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    ("msg", "words"),
    [
        (Message("hello", meta={"spec": SPEC_META, "task": "t", "hz": 10}), ["robot id is empty"]),
        (Message("hello", robot="r1", meta={"task": "t", "hz": 10}), ["meta['spec']"]),
        (Message("hello", robot="r1", meta={"spec": SPEC_META, "hz": 10}), ["meta['task']"]),
        (Message("hello", robot="r1", meta={"spec": SPEC_META, "task": "t", "hz": 0}), ["meta['hz']"]),
        (Message("hello", robot="r1", meta={"spec": SPEC_META, "task": "t", "hz": True}), ["meta['hz']"]),
        (Message("welcome", meta={"server": "l", "version": 0}), ["meta['next_seq']"]),
        (Message("welcome", meta={"server": "l", "next_seq": -1, "version": 0}), ["meta['next_seq']"]),
        (Message("ack", seq=3, arrays={"x": np.zeros(1)}), ["ack", "no arrays"]),
        (Message("heartbeat", meta={"n": np.int64(3)}), ["meta['n']"]),
    ],
)
def test_bad_per_kind_fields(msg: Message, words: list[str]) -> None:
    with pytest.raises(ProtocolError) as info:
        encode(msg)
    assert info.value.kind == "field", str(info.value)
    for word in words:
        assert word in str(info.value)


def test_reject_kinds_are_closed() -> None:
    with pytest.raises(ValueError, match="unknown ProtocolError kind"):
        ProtocolError("oops", "x")
    assert ProtocolError("size", "too big").kind in REJECT_KINDS


# --- spec and check_steps ------------------------------------------------------------------------------------------


def test_spec_of_parses_lists_and_tuples() -> None:
    spec = spec_of(SPEC_META)
    assert spec["image"] == ((8, 8, 3), "uint8") and spec["reward"] == ((), "float32")
    assert spec_of({k: tuple(v) for k, v in SPEC_META.items()}) == spec


@pytest.mark.parametrize(
    ("meta_spec", "words"),
    [
        ([], ["non-empty map"]),
        ({k: v for k, v in SPEC_META.items() if k != "action"}, ["'action'"]),
        ({**SPEC_META, "time": ["float64", []]}, ["'time'", "reserved"]),
        ({**SPEC_META, "depth": ["float128", [4]]}, ["'depth'", "float128"]),
        ({**SPEC_META, "depth": ["float32", [-4]]}, ["'depth'"]),
        ({**SPEC_META, "depth": ["float32"]}, ["'depth'"]),
        ({**SPEC_META, "": ["float32", []]}, ["name"]),
        # numpy accepts these shapes but no machine allocates them (issue 20 item 7)
        ({**SPEC_META, "depth": ["float32", [2**34]]}, ["'depth'", "bytes", "limit"]),
        ({**SPEC_META, "depth": ["float32", [2**48]]}, ["'depth'", "limit"]),
        ({**SPEC_META, "depth": ["uint8", [2**15, 2**15]]}, ["'depth'", "bytes a step", "limit"]),
        ({**SPEC_META, "d1": ["uint8", [2**14, 2**14]], "d2": ["uint8", [2**14, 2**14]]}, ["one step", "limit"]),
        ({**SPEC_META, "depth": ["float32", [0, 2**62]]}, ["'depth'", "dimension", "limit"]),
    ],
)
def test_spec_of_rejects(meta_spec: object, words: list[str]) -> None:
    with pytest.raises(ProtocolError) as info:
        spec_of(meta_spec)
    assert info.value.kind == "field"
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    ("edit", "kind", "words"),
    [
        (lambda a: a.pop("joints"), "field", ["missing arrays ['joints']"]),
        (lambda a: a.update(extra=np.zeros(5)), "field", ["not in the hello spec ['extra']"]),
        (lambda a: a.update(joints=a["joints"].astype(np.float64)), "dtype", ["'joints'", "float32", "float64"]),
        (lambda a: a.update(image=np.zeros((5, 8, 8, 4), np.uint8)), "shape", ["'image'", "(5, 8, 8, 3)", "8, 4)"]),
        (lambda a: a.update(reward=np.zeros((5, 1), np.float32)), "shape", ["'reward'", "(5,)"]),
    ],
)
def test_check_steps_mismatches(edit, kind: str, words: list[str]) -> None:
    arrays = steps_arrays(5)
    edit(arrays)
    msg = decode(encode(Message("steps", robot="r1", arrays=arrays)))
    with pytest.raises(ProtocolError) as info:
        check_steps(msg, spec_of(SPEC_META))
    assert info.value.kind == kind, str(info.value)
    for word in words:
        assert word in str(info.value)


def test_check_steps_needs_a_steps_message() -> None:
    with pytest.raises(ProtocolError) as info:
        check_steps(Message("ack"), spec_of(SPEC_META))
    assert info.value.kind == "type"


# --- RejectLog ----------------------------------------------------------------------------------------------------


class FakeClock:
    """A clock the test moves by hand: rate limits are checked without waiting or timing anything."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "test.link.rejects" and r.levelno == logging.WARNING]


def test_reject_log_counts_all_and_logs_each_peer_and_kind_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    log = RejectLog(logging.getLogger("test.link.rejects"), interval_s=60.0, clock=clock)
    caplog.set_level(logging.DEBUG, logger="test.link.rejects")
    for i in range(3):
        log.reject(ProtocolError("size", f"message is {1000 + i} bytes"), source="robot-0")
    log.reject(ProtocolError("size", "message is 77 bytes"), source="robot-1")  # another peer is not hidden
    log.reject(ProtocolError("header", "header frame is not valid msgpack"), source="robot-0")
    assert log.counts == {"size": 4, "header": 1} and log.total == 5
    lines = _warnings(caplog)
    assert len(lines) == 3, lines
    assert "robot-0" in lines[0] and "1000 bytes" in lines[0]
    assert "robot-1" in lines[1] and "77 bytes" in lines[1]
    assert "robot-0" in lines[2] and "msgpack" in lines[2]
    clock.now += 61.0  # a minute later robot-0's size rejects are worth a line again, with what went unlogged
    log.reject(ProtocolError("size", "message is 5000 bytes"), source="robot-0")
    lines = _warnings(caplog)
    assert len(lines) == 4 and "5000 bytes" in lines[3] and "2 repeats from this peer not logged" in lines[3]


def test_reject_log_caps_its_lines_however_many_peers(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    log = RejectLog(logging.getLogger("test.link.rejects"), interval_s=60.0, max_lines=5, clock=clock)
    caplog.set_level(logging.DEBUG, logger="test.link.rejects")
    for i in range(1000):
        log.reject(ProtocolError("header", "bad"), source=f"peer-{i}")
    assert log.total == 1000 and len(_warnings(caplog)) == 5
    clock.now += 61.0
    log.reject(ProtocolError("header", "bad"), source="peer-1000")
    lines = _warnings(caplog)
    assert len(lines) == 6 and "995 rejects not logged" in lines[5]


def test_reject_log_escapes_what_a_peer_chose(caplog: pytest.LogCaptureFixture) -> None:
    log = RejectLog(logging.getLogger("test.link.rejects"))
    caplog.set_level(logging.DEBUG, logger="test.link.rejects")
    log.reject(ProtocolError("field", "robot 'x'\nWARNING forged\r\x1b[2J" + "y" * 5000), source="p\nWARNING forged")
    (line,) = _warnings(caplog)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert "p\\nWARNING" in line and len(line) < 1000


def test_printable_escapes_control_characters_and_cuts_long_text() -> None:
    assert printable("plain text") == "plain text"
    assert printable("a\nb\rc\td\x1be\u2028f\x00") == "a\\nb\\rc\\td\\x1be\\u2028f\\x00"
    assert printable("z" * 500, limit=20) == "z" * 17 + "..."
    assert printable(b"evil\nline") == "evil\\nline"
    assert printable(b"\x00\x8b\x45\x67\x89") == "0x008b456789"  # a ZeroMQ-made identity

