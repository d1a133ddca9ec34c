"""The robot <-> learner wire protocol, imported by both processes.

A message is one ZeroMQ multipart message: frame 0 is a small msgpack header, then one raw frame
per array. Arrays therefore cross the wire without serialisation (no pickle: a peer that can reach
the port must never be able to run code) and are rebuilt as read-only views of the received
frames. Everything a peer sends is untrusted: `decode` bounds sizes before touching the header,
checks every field, and reports problems as `ProtocolError` with a `kind` a receiver can count.

Byte order on the wire is little-endian; dtypes are named by `DTYPES`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import zmq

from core.config.link import ROBOT_ID_PATTERN
from core.describe import check_description
from core.layout import ACTION_KEY, DTYPES, FLAG_KEYS, Field, StepLayout

PROTOCOL_VERSION = 1
DEFAULT_MAX_BYTES = 256 * 2**20  # whole multipart message, all frames
MAX_HEADER_BYTES = 64 * 1024
MAX_FRAMES = 256
MAX_CHUNK_STEPS = 4096
MAX_DIMS = 8
# One step of a hello's spec may declare at most this many bytes (and no dimension above it, so a zero
# elsewhere cannot hide an absurd one): numpy accepts shapes like (2**40,) that no machine allocates.
MAX_STEP_BYTES = DEFAULT_MAX_BYTES
KINDS = ("hello", "welcome", "steps", "ack", "weights", "heartbeat", "bye")
ID_RE = re.compile(ROBOT_ID_PATTERN)  # robot ids, the config's rule (may be "" for messages from the learner)
REJECT_KINDS = ("size", "frames", "header", "version", "type", "field", "dtype", "shape")
# Entries every hello spec must announce besides the observation keys; `policy_version` and `time`
# are bookkeeping arrays every steps message carries, so a spec may not claim those names.
REQUIRED_SPEC_KEYS = (*FLAG_KEYS, ACTION_KEY)
BOOKKEEPING = {"policy_version": "int64", "time": "float64"}
WEIGHTS_DTYPES = ("float32", "float16")

_HEADER_KEYS = frozenset({"v", "k", "r", "u", "s", "m", "a"})
# Little-endian on the wire; on a little-endian host that is the native dtype (no byte swapping, clean reprs).
_WIRE_DTYPES = {
    name: np.dtype(name) if sys.byteorder == "little" else np.dtype(name).newbyteorder("<") for name in DTYPES
}
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_MAX_NAME = 64


@dataclass
class Message:
    """One protocol message; `arrays` are sent as raw frames, everything else in the header."""

    kind: str
    robot: str = ""  # robot id
    run: str = ""  # id of the sending process's run (uuid hex or similar)
    seq: int = 0  # steps: per-robot chunk number; ack: highest seq durably stored (cumulative); weights: version
    meta: dict[str, Any] = field(default_factory=dict)  # small msgpack-able values
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


class ProtocolError(ValueError):
    """A message that breaks the protocol; `kind` (one of REJECT_KINDS) says which rule, for counting."""

    def __init__(self, kind: str, message: str) -> None:
        if kind not in REJECT_KINDS:
            raise ValueError(f"unknown ProtocolError kind {kind!r}; expected one of {REJECT_KINDS}")
        self.kind = kind
        self.message_kind = ""  # set by `decode` when the header parsed: which kind of message broke the rule
        super().__init__(message)


def _show(value: Any, limit: int = 80) -> str:
    """repr of an untrusted value, cut short so a hostile peer cannot flood or forge log lines."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _escape(char: str) -> str:
    return char if char.isprintable() else char.encode("unicode_escape").decode("ascii")


def printable(value: str | bytes, limit: int = 200) -> str:
    """Text a peer chose (a connection identity, run id, spec name, heartbeat value), safe for one log line:
    control characters (newlines, terminal escapes) escaped, cut to `limit` characters. Bytes that are not
    text, such as the identities ZeroMQ makes up, are shown as hex."""
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            value = "0x" + raw.hex()
        if value.startswith("\x00"):
            value = "0x" + raw.hex()
    text = "".join(_escape(c) for c in str(value)[: limit + 1])  # one over: enough to tell it was longer
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _byte_view(arr: np.ndarray) -> memoryview:
    """Flat byte view of a C-contiguous array (memoryview.cast refuses zero-size arrays)."""
    return memoryview(arr.reshape(-1).view(np.uint8))


def _wire_array(name: Any, value: Any) -> np.ndarray:
    """The array as it goes on the wire: known dtype, little-endian, C-contiguous (copies only if needed)."""
    arr = np.asarray(value)
    if arr.dtype.name not in DTYPES:
        raise ProtocolError(
            "dtype", f"array {_show(name)}: dtype {arr.dtype} is not sendable; use one of {sorted(DTYPES)}"
        )
    wire = _WIRE_DTYPES[arr.dtype.name]
    if arr.dtype != wire:
        arr = arr.astype(wire)
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr).reshape(arr.shape)  # reshape keeps 0-d arrays 0-d
    return arr


def _pack(header: dict[str, Any]) -> bytes:
    try:
        return msgpack.packb(header, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        meta = header.get("m")
        if isinstance(meta, dict):
            for key, value in meta.items():
                try:
                    msgpack.packb(value, use_bin_type=True)
                except (TypeError, ValueError, OverflowError) as inner:
                    raise ProtocolError("field", f"meta[{_show(key)}] cannot be sent: {inner}") from None
        fields = {"robot": "r", "run": "u", "seq": "s", "kind": "k"}
        for label, key in fields.items():
            try:
                msgpack.packb(header[key], use_bin_type=True)
            except (TypeError, ValueError, OverflowError):
                raise ProtocolError("header", f"{label} {_show(header[key])} cannot be sent: {exc}") from None
        raise ProtocolError("header", f"header cannot be sent: {exc}") from None


def encode(msg: Message) -> list[bytes | memoryview]:
    """Frame 0: msgpack header; then one raw frame per array (C-contiguous, sent without copying: memoryview
    of the array's buffer; non-contiguous arrays are made contiguous first).

    The frames are checked with the same rules as `decode`, so a bad message fails at the sender with a
    ProtocolError instead of being dropped silently by the receiver. Tuples in meta arrive as lists.
    Send with copy=False and keep the arrays unmodified until the send completes.
    """
    if not isinstance(msg.arrays, dict):
        raise ProtocolError("field", f"arrays must be a dict of name -> ndarray, got {type(msg.arrays).__name__}")
    wire = {name: _wire_array(name, value) for name, value in msg.arrays.items()}
    entries = [[name, arr.dtype.name, list(arr.shape)] for name, arr in wire.items()]
    header = {"v": PROTOCOL_VERSION, "k": msg.kind, "r": msg.robot, "u": msg.run, "s": msg.seq, "m": msg.meta,
              "a": entries}
    frames: list[bytes | memoryview] = [_pack(header)]
    frames.extend(_byte_view(arr) for arr in wire.values())
    decode(frames, max_bytes=sum(memoryview(f).nbytes for f in frames))  # same rules as the receiver
    return frames


def _frame_view(frame: Any, index: int) -> memoryview:
    if isinstance(frame, zmq.Frame):
        return frame.buffer
    try:
        view = memoryview(frame)
    except TypeError:
        raise ProtocolError("frames", f"frame {index} is a {type(frame).__name__}, not bytes") from None
    if view.ndim != 1 or view.itemsize != 1:
        try:
            view = view.cast("B") if view.nbytes else memoryview(b"")
        except TypeError:
            raise ProtocolError("frames", f"frame {index} is not a contiguous buffer") from None
    return view


def _reject_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not allowed")


def _read_header(view: memoryview) -> dict[str, Any]:
    try:
        header = msgpack.unpackb(view, raw=False, strict_map_key=True, ext_hook=_reject_ext)
    except Exception as exc:  # msgpack raises several unrelated types for malformed input
        reason = f"{type(exc).__name__}: {_show(str(exc))}"
        raise ProtocolError("header", f"header frame is not valid msgpack ({reason})") from None
    if not isinstance(header, dict):
        raise ProtocolError("header", f"header must be a msgpack map, got {type(header).__name__}")
    version = header.get("v")
    if _is_int(version) and version != PROTOCOL_VERSION:
        raise ProtocolError("version", f"peer speaks protocol version {version}, this side speaks {PROTOCOL_VERSION}")
    keys = set(header)
    if keys != _HEADER_KEYS:
        missing = sorted(_HEADER_KEYS - keys)
        extra = sorted(map(_show, keys - _HEADER_KEYS))
        raise ProtocolError("header", f"header keys wrong: missing {missing}, unexpected {extra}")
    types = {"v": (_is_int, "int"), "k": (_is_str, "str"), "r": (_is_str, "str"), "u": (_is_str, "str"),
             "s": (_is_int, "int"), "m": (_is_dict, "map"), "a": (_is_list, "list")}
    for key, (check, label) in types.items():
        if not check(header[key]):
            raise ProtocolError("header", f"header field {key!r} must be {label}, got {_show(header[key])}")
    if header["s"] < 0:
        raise ProtocolError("header", f"header field 's' (seq) must be >= 0, got {header['s']}")
    if not all(isinstance(k, str) for k in header["m"]):
        raise ProtocolError("header", "header field 'm' (meta) must have str keys")
    for i, entry in enumerate(header["a"]):
        if not (isinstance(entry, list) and len(entry) == 3):
            raise ProtocolError("header", f"array entry {i} must be [name, dtype, dims], got {_show(entry)}")
    return header


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_dict(value: Any) -> bool:
    return isinstance(value, dict)


def _is_list(value: Any) -> bool:
    return isinstance(value, list)


def _check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= _MAX_NAME:
        raise ProtocolError("field", f"{what} name must be a str of 1..{_MAX_NAME} characters, got {_show(name)}")
    return name


def _check_dims(dims: Any, name: str, max_dims: int, what: str = "array") -> tuple[int, ...]:
    ok = isinstance(dims, list | tuple) and len(dims) <= max_dims and all(_is_int(d) and d >= 0 for d in dims)
    if not ok:
        raise ProtocolError(
            "shape", f"{what} {name!r}: shape must be a list of at most {max_dims} non-negative ints, got {_show(dims)}"
        )
    return tuple(dims)


def _build_arrays(entries: list[list[Any]], views: list[memoryview]) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for (name, dtype, dims), view in zip(entries, views):
        _check_name(name, "array")
        if name in arrays:
            raise ProtocolError("field", f"array {name!r} appears twice")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ProtocolError("dtype", f"array {name!r}: dtype {_show(dtype)} is not one of {sorted(DTYPES)}")
        shape = _check_dims(dims, name, MAX_DIMS)
        wire = _WIRE_DTYPES[dtype]
        expected = math.prod(shape) * wire.itemsize
        if expected != view.nbytes:
            raise ProtocolError(
                "shape", f"array {name!r}: {dtype}{list(shape)} needs {expected} bytes but its frame has {view.nbytes}"
            )
        arr = np.frombuffer(view, dtype=wire).reshape(shape)
        arr.flags.writeable = False
        arrays[name] = arr
    return arrays


def decode(frames: Sequence[bytes | memoryview | zmq.Frame], max_bytes: int = DEFAULT_MAX_BYTES) -> Message:
    """Validate and rebuild. Arrays are np.frombuffer views (read-only) of the frames: no copy. Raises ProtocolError.

    Sizes are checked before the header is parsed, so a hostile peer cannot make this side allocate.
    """
    if len(frames) == 0:
        raise ProtocolError("frames", "message has no frames")
    if len(frames) > MAX_FRAMES:
        raise ProtocolError("frames", f"message has {len(frames)} frames, more than the limit {MAX_FRAMES}")
    views = [_frame_view(f, i) for i, f in enumerate(frames)]
    total = sum(v.nbytes for v in views)
    if total > max_bytes:
        raise ProtocolError("size", f"message is {total} bytes, more than the limit {max_bytes}")
    if views[0].nbytes > MAX_HEADER_BYTES:
        raise ProtocolError("size", f"header frame is {views[0].nbytes} bytes, more than the limit {MAX_HEADER_BYTES}")
    header = _read_header(views[0])
    kind = header["k"]
    if kind not in KINDS:
        raise ProtocolError("type", f"unknown message type {_show(kind)}; known: {', '.join(KINDS)}")
    robot = header["r"]
    if robot and not ID_RE.fullmatch(robot):
        raise ProtocolError("field", f"robot id {_show(robot)} is not 1..64 of letters, digits, '_', '.', '-'")
    entries = header["a"]
    if len(entries) != len(views) - 1:
        raise ProtocolError(
            "frames", f"{kind} header lists {len(entries)} arrays but {len(views) - 1} array frames arrived"
        )
    try:
        msg = Message(kind, robot, header["u"], header["s"], header["m"], _build_arrays(entries, views[1:]))
        _CHECKS[kind](msg)
    except ProtocolError as err:
        err.message_kind = kind  # lets a receiver answer a refused hello with the reason
        raise
    return msg


# ---------------------------------------------------------------------------------------------------------------
# Per-kind schema


def _meta(msg: Message, key: str, check: Any, expected: str) -> Any:
    if key not in msg.meta:
        raise ProtocolError("field", f"{msg.kind}: meta[{key!r}] is missing ({expected})")
    value = msg.meta[key]
    if not check(value):
        raise ProtocolError("field", f"{msg.kind}: meta[{key!r}] must be {expected}, got {_show(value)}")
    return value


def _need_robot(msg: Message) -> None:
    if not msg.robot:
        raise ProtocolError("field", f"{msg.kind}: robot id is empty; a robot must name itself")


def _no_arrays(msg: Message) -> None:
    if msg.arrays:
        raise ProtocolError("field", f"{msg.kind}: carries no arrays, got {sorted(msg.arrays)}")


def _check_hello(msg: Message) -> None:
    _need_robot(msg)
    if "spec" not in msg.meta:
        raise ProtocolError("field", "hello: meta['spec'] is missing ({name: [dtype, [dims...]]})")
    spec_of(msg.meta["spec"])
    _meta(msg, "task", _is_str, "str")
    _meta(msg, "hz", lambda v: _is_number(v) and math.isfinite(v) and v > 0, "a finite number > 0")
    if "describe" in msg.meta:  # optional: what the arrays mean (older robots send none)
        try:
            check_description(msg.meta["describe"], "hello: meta['describe']")
        except ValueError as exc:
            raise ProtocolError("field", str(exc)) from None
    _no_arrays(msg)


def _check_welcome(msg: Message) -> None:
    _meta(msg, "server", _is_str, "str (learner process id)")
    _meta(msg, "next_seq", lambda v: _is_int(v) and v >= 0, "int >= 0")
    _meta(msg, "version", lambda v: _is_int(v) and v >= 0, "int >= 0 (weights version, 0 = none)")
    _no_arrays(msg)


def _check_steps_arrays(msg: Message) -> int:
    _need_robot(msg)
    if not msg.arrays:
        raise ProtocolError("field", "steps: no arrays")
    lengths: dict[int, str] = {}
    for name, arr in msg.arrays.items():
        if arr.ndim == 0:
            raise ProtocolError("shape", f"steps: array {name!r} has no step axis (0-d)")
        lengths.setdefault(arr.shape[0], name)
    if len(lengths) > 1:
        seen = ", ".join(f"{name!r} has {t}" for t, name in lengths.items())
        raise ProtocolError("shape", f"steps: arrays disagree on the number of steps: {seen}")
    (steps,) = lengths
    if not 1 <= steps <= MAX_CHUNK_STEPS:
        raise ProtocolError("shape", f"steps: {steps} steps in a chunk; allowed 1..{MAX_CHUNK_STEPS}")
    for name, dtype in BOOKKEEPING.items():
        if name not in msg.arrays:
            raise ProtocolError("field", f"steps: bookkeeping array {name!r} ({dtype}, (T,)) is missing")
        arr = msg.arrays[name]
        if arr.dtype.name != dtype:
            raise ProtocolError("dtype", f"steps: array {name!r} must be {dtype}, got {arr.dtype.name}")
        if arr.ndim != 1:
            raise ProtocolError("shape", f"steps: array {name!r} must have shape (T,), got {arr.shape}")
    return steps


def _check_weights(msg: Message) -> None:
    if msg.seq < 1:
        raise ProtocolError("field", f"weights: seq (the weights version) must be >= 1, got {msg.seq}")
    _meta(msg, "step", lambda v: _is_int(v) and v >= 0, "int >= 0 (training updates)")
    _meta(msg, "sha256", lambda v: isinstance(v, str) and _SHA256_RE.fullmatch(v), "64 lowercase hex characters")
    _meta(msg, "dtype", lambda v: v in WEIGHTS_DTYPES, f"one of {WEIGHTS_DTYPES}")
    if set(msg.arrays) != {"blob"}:
        raise ProtocolError("field", f"weights: must carry exactly one array 'blob', got {sorted(msg.arrays)}")
    blob = msg.arrays["blob"]
    if blob.dtype.name != "uint8":
        raise ProtocolError("dtype", f"weights: array 'blob' must be uint8, got {blob.dtype.name}")
    if blob.ndim != 1:
        raise ProtocolError("shape", f"weights: array 'blob' must be 1-D, got shape {blob.shape}")


_CHECKS = {
    "hello": _check_hello,
    "welcome": _check_welcome,
    "steps": _check_steps_arrays,
    "ack": _no_arrays,
    "weights": _check_weights,
    "heartbeat": _no_arrays,
    "bye": _no_arrays,
}


def spec_of(meta_spec: Any) -> StepLayout:
    """Parse and validate a hello's meta['spec'] ({name: [dtype, [dims...]]}, the wire's order) into the step
    layout; raises ProtocolError('field', ...).

    The spec is what every later steps message from that robot is checked against, so it must be exact:
    known dtypes, per-step dims, the REQUIRED_SPEC_KEYS present, and no bookkeeping names.
    """
    if not isinstance(meta_spec, dict) or not meta_spec:
        expected = "a non-empty map {name: [dtype, [dims...]]}"
        raise ProtocolError("field", f"spec must be {expected}, got {_show(meta_spec)}")
    if len(meta_spec) > MAX_FRAMES - 1 - len(BOOKKEEPING):
        raise ProtocolError("field", f"spec has {len(meta_spec)} entries; at most {MAX_FRAMES - 1 - len(BOOKKEEPING)}")
    spec: dict[str, Field] = {}
    for name, entry in meta_spec.items():
        _check_name(name, "spec entry")
        if name in BOOKKEEPING:
            raise ProtocolError("field", f"spec entry {name!r} is reserved for bookkeeping and cannot be announced")
        if not (isinstance(entry, list | tuple) and len(entry) == 2):
            raise ProtocolError("field", f"spec entry {name!r} must be [dtype, [dims...]], got {_show(entry)}")
        dtype, dims = entry
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ProtocolError("field", f"spec entry {name!r}: dtype {_show(dtype)} is not one of {sorted(DTYPES)}")
        try:
            shape = _check_dims(dims, name, MAX_DIMS - 1, "spec entry")
        except ProtocolError as err:
            raise ProtocolError("field", str(err)) from None
        spec[name] = Field(shape, dtype)
    missing = [key for key in REQUIRED_SPEC_KEYS if key not in spec]
    if missing:
        raise ProtocolError("field", f"spec lacks required entries {missing}")
    layout = StepLayout(spec)
    step_bytes(layout)
    return layout


def step_bytes(spec: StepLayout, limit: int = MAX_STEP_BYTES) -> int:
    """Bytes of one step of `spec`; ProtocolError('field') naming the entry when a dimension or the step is over
    `limit` (computed with Python ints: no overflow, nothing allocated)."""
    total = 0
    for name, (shape, dtype) in spec.items():
        for dim in shape:
            if dim > limit:
                raise ProtocolError("field", f"spec entry {_show(name)}: dimension {dim} is over the limit {limit} "
                                             f"(the bytes one step may take)")
        size = math.prod(shape) * dtype.itemsize
        if size > limit:
            raise ProtocolError("field", f"spec entry {_show(name)}: {dtype.name}{list(shape)} is {size} bytes a step, "
                                         f"over the limit {limit}")
        total += size
    if total > limit:
        raise ProtocolError("field", f"one step of this spec is {total} bytes, over the limit {limit}")
    return total


def check_steps(msg: Message, spec: StepLayout) -> int:
    """Check a 'steps' message against the per-step layout announced in 'hello' (name -> (per-step shape, dtype));
    returns T (the number of steps). Every spec key must be present with that dtype and shape (T, *shape); extra
    arrays are rejected; plus the bookkeeping arrays "policy_version" (int64, (T,)) and "time" (float64, (T,)).

    Values are deliberately not checked here: a message this refuses is never acknowledged, so the robot would
    resend it forever and every later chunk would wait behind it. NaN and inf are refused step by step by the
    replay store (`Replay.add_steps`), and the chunk is acknowledged.
    """
    if msg.kind != "steps":
        raise ProtocolError("type", f"check_steps needs a steps message, got {_show(msg.kind)}")
    steps = _check_steps_arrays(msg)
    expected = set(spec) | set(BOOKKEEPING)
    missing = sorted(expected - set(msg.arrays))
    extra = sorted(set(msg.arrays) - expected)
    if missing or extra:
        raise ProtocolError("field", f"steps from {msg.robot!r} seq {msg.seq}: missing arrays {missing}, "
                                     f"arrays not in the hello spec {extra}")
    for name, (shape, dtype) in spec.items():
        arr = msg.arrays[name]
        if arr.dtype.name != dtype.name:
            raise ProtocolError("dtype", f"steps: array {name!r}: expected {dtype.name}, got {arr.dtype.name}")
        if arr.shape != (steps, *shape):
            raise ProtocolError("shape", f"steps: array {name!r}: expected shape {(steps, *shape)}, got {arr.shape}")
    return steps


def weights_checksum(blob: bytes | memoryview | np.ndarray) -> str:
    """sha256 hex of the weights bytes: the learner puts it in meta['sha256'], the robot compares before loading."""
    if isinstance(blob, np.ndarray):
        view = _byte_view(np.ascontiguousarray(blob))
    else:
        view = memoryview(blob)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B") if view.nbytes else memoryview(b"")
    return hashlib.sha256(view).hexdigest()


class RejectLog:
    """Counts rejected messages per ProtocolError.kind and logs them at WARNING, rate-limited so that hostile peers
    can neither flood the log nor hide one another: each (peer, kind) at most once every `interval_s`, and at most
    `max_lines` lines in all every `interval_s`; a logged line says how many rejects went unlogged before it. What a
    peer chose (its identity, the reason's quoted values) is escaped, so it cannot forge log lines."""

    MAX_PEERS = 1024  # (peer, kind) pairs remembered; the oldest are forgotten first

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0, max_lines: int = 20,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.interval_s, self.max_lines, self.clock = logger, interval_s, max_lines, clock
        self.counts: dict[str, int] = {}
        # (peer, kind) -> [when last logged, repeats not logged since]
        self._logged: OrderedDict[tuple[str, str], list[float]] = OrderedDict()
        self._window, self._lines, self._capped = clock(), 0, 0

    def reject(self, err: ProtocolError, source: str = "") -> None:
        """Count one rejected message; log it unless this peer's kind, or the log as a whole, is over its rate."""
        self.counts[err.kind] = self.counts.get(err.kind, 0) + 1
        key, now = (source, err.kind), self.clock()
        if now - self._window >= self.interval_s:
            self._window, self._lines = now, 0
        entry = self._logged.get(key)
        if entry is not None and now - entry[0] < self.interval_s:
            entry[1] += 1
            return
        if self._lines >= self.max_lines:
            self._capped += 1
            return
        repeats = int(entry[1]) if entry is not None else 0
        notes = [f"{repeats} repeats from this peer not logged"] if repeats else []
        if self._capped:
            notes.append(f"{self._capped} rejects not logged while the log was at its limit")
        self._lines, self._capped = self._lines + 1, 0
        self._logged[key] = [now, 0]
        self._logged.move_to_end(key)
        while len(self._logged) > self.MAX_PEERS:
            self._logged.popitem(last=False)
        where = f" from {printable(source, 80)}" if source else ""
        more = "".join(f"; {note}" for note in notes)
        self.logger.warning("rejected a message%s (%s): %s%s; repeats from this peer are logged at most every %g s",
                            where, err.kind, printable(str(err), 400), more, self.interval_s)

    @property
    def total(self) -> int:
        """All rejected messages so far."""
        return sum(self.counts.values())
