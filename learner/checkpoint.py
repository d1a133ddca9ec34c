"""Checkpoints and policy-weight blobs as safetensors + JSON: no pickle, so a file can never run code.

A checkpoint is a directory `ckpt-{step:09d}/` holding one `{part}.safetensors` per named state
(agent, optimizer, ...) and `meta.json` (user metadata, the JSON skeletons that rebuild each nested
state, sizes and sha256 of every file, and a sha256 of its own other fields). It is written into a
hidden temp directory beside it, fsynced and renamed, so a run killed mid-save leaves either the old
set or the new one, never half of one. `load_latest_checkpoint` verifies every checksum and falls
back past a damaged newest checkpoint to the previous intact one.

Nested state is split by `flatten_state` into {dotted key: tensor} and a JSON skeleton with tagged
nodes for what JSON cannot say itself (int dict keys, tuples, big ints, NaN, numpy values, bytes).
Loading is always onto the CPU unless a device is given; tensors come back as plain tensors.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from safetensors import safe_open

from learner.atomic import atomic_write_file, fsync_dir

FORMAT = "reverie-checkpoint"
VERSION = 1
WEIGHTS_FORMAT = "reverie-weights"
WEIGHTS_VERSION = 1
TAG = "__t__"  # marks a skeleton node that is not a plain JSON value
DIGEST = "header_sha256"  # meta.json's digest of itself (every other field)
MAX_JSON_INT = 2**53  # beyond this other JSON readers lose digits, so such ints are written as strings
STALE_TMP_S = 3600.0  # a temp dir this old belongs to a save that died
_DIR_RE = re.compile(r"^ckpt-(\d+)$")
_PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

__all__ = [
    "CheckpointError",
    "CheckpointWarning",
    "checkpoint_step",
    "flatten_state",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest_checkpoint",
    "load_weights",
    "save_checkpoint",
    "save_weights",
    "unflatten_state",
    "weights_from_bytes",
    "weights_to_bytes",
]


class CheckpointError(RuntimeError):
    """A checkpoint or weights file that cannot be read; the message names the file."""


class CheckpointWarning(UserWarning):
    """A checkpoint directory that was skipped (incomplete or corrupt)."""


# --- nested state <-> flat tensors + JSON skeleton -------------------------------------------------

Store = Callable[[str, torch.Tensor], str] | None  # None: write tensors inline (base64) into the JSON


def flatten_state(state: Mapping) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split nested state into {dotted key: tensor} for safetensors and a JSON-able skeleton.

    Handles dicts (any hashable scalar/tuple keys; OrderedDict and its `_metadata` kept), lists,
    tuples, tensors, numpy arrays and scalars, str, bytes, int (any size), float (NaN/inf too), bool
    and None. Other mapping types come back as dict and tuple subclasses (torch.Size) as tuple.
    A tensor reached twice is stored twice and comes back as two tensors.
    Returned tensors alias the inputs unless a copy was needed (other device, non-contiguous or shared
    storage, which safetensors refuses), exactly like `state_dict()` does: save them before mutating.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"flatten_state expects a mapping, got {type(state).__name__}")
    tensors: dict[str, torch.Tensor] = {}

    def store(path: str, tensor: torch.Tensor) -> str:
        key, n = path or "_", 1
        while key in tensors:
            key, n = f"{path}#{n}", n + 1
        tensors[key] = tensor
        return key

    skeleton = _encode(state, "", store)
    return _detach_storage(tensors), skeleton


def unflatten_state(tensors: Mapping[str, torch.Tensor], skeleton: Mapping[str, Any]) -> dict:
    """Inverse of `flatten_state`: the same nesting, container and leaf types, dict keys and values."""
    return _decode(skeleton, tensors)


def _encode(obj: Any, path: str, store: Store) -> Any:
    if isinstance(obj, np.generic):  # first: np.float64 and np.str_ subclass float and str
        if obj.dtype.hasobject:
            raise TypeError(f"{path or '<root>'}: cannot store a numpy object scalar")
        return {TAG: "npscalar", "dtype": obj.dtype.str, "hex": obj.tobytes().hex()}
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, int):
        return int(obj) if abs(obj) < MAX_JSON_INT else {TAG: "int", "v": str(int(obj))}
    if isinstance(obj, float):
        return float(obj) if np.isfinite(obj) else {TAG: "float", "v": repr(float(obj))}
    if isinstance(obj, bytes | bytearray):
        return {TAG: type(obj).__name__, "b64": base64.b64encode(obj).decode()}
    if isinstance(obj, torch.Tensor):
        if obj.is_sparse or obj.layout != torch.strided:
            raise TypeError(f"{path or '<root>'}: only dense tensors can be stored")
        if store is None:
            data = obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            dtype = str(obj.dtype).removeprefix("torch.")
            return {TAG: "tensor", "dtype": dtype, "shape": list(obj.shape), "b64": base64.b64encode(data).decode()}
        return {TAG: "tensor", "key": store(path, obj.detach())}
    if isinstance(obj, np.ndarray):
        return _encode_array(obj, path, store)
    if isinstance(obj, Mapping):
        if isinstance(obj, OrderedDict):
            node: dict[str, Any] = {TAG: "odict", "items": _encode_items(obj, path, store)}
            if getattr(obj, "_metadata", None) is not None:  # module versions that load_state_dict reads
                node["metadata"] = _encode(obj._metadata, f"{path}._metadata", None)
            return node
        if all(isinstance(k, str) for k in obj) and TAG not in obj:
            return {k: _encode(v, _join(path, k), store) for k, v in obj.items()}
        return {TAG: "dict", "items": _encode_items(obj, path, store)}
    if isinstance(obj, tuple):
        return {TAG: "tuple", "items": [_encode(v, _join(path, i), store) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, _join(path, i), store) for i, v in enumerate(obj)]
    raise TypeError(f"{path or '<root>'}: cannot store a value of type {type(obj).__name__}")


def _encode_items(obj: Mapping, path: str, store: Store) -> list[list[Any]]:
    items = []
    for k, v in obj.items():
        if not (k is None or isinstance(k, bool | int | float | str | tuple)):
            raise TypeError(f"{path or '<root>'}: dict key {k!r} of type {type(k).__name__} cannot be stored")
        items.append([_encode(k, path, None), _encode(v, _join(path, k), store)])
    return items


def _encode_array(arr: np.ndarray, path: str, store: Store) -> dict[str, Any]:
    if arr.dtype.hasobject:
        raise TypeError(f"{path or '<root>'}: cannot store a numpy array of dtype object")
    node: dict[str, Any] = {TAG: "ndarray", "dtype": arr.dtype.str, "shape": list(arr.shape)}
    if not (arr.flags.c_contiguous and arr.flags.writeable):  # torch.from_numpy warns on read-only memory
        arr = arr.copy(order="C")  # (not np.ascontiguousarray: it turns 0-d arrays into 1-d)
    if store is None:
        node["b64"] = base64.b64encode(arr.tobytes()).decode()
        return node
    try:  # native tensor when torch knows the dtype, so the file stays readable by other tools
        tensor = torch.from_numpy(arr)
    except (TypeError, ValueError):  # e.g. big-endian or datetime dtypes: keep the raw bytes
        tensor, node["raw"] = torch.from_numpy(np.frombuffer(arr.tobytes(), np.uint8).copy()), True
    node["key"] = store(path, tensor)
    return node


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _decode(node: Any, tensors: Mapping[str, torch.Tensor] | None) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    tag = node.get(TAG)
    if tag is None:
        return {k: _decode(v, tensors) for k, v in node.items()}
    if tag in ("dict", "odict"):
        items = [(_decode(k, None), _decode(v, tensors)) for k, v in node["items"]]
        if tag == "dict":
            return dict(items)
        out = OrderedDict(items)
        if "metadata" in node:
            out._metadata = _decode(node["metadata"], None)  # type: ignore[attr-defined]
        return out
    if tag == "tuple":
        return tuple(_decode(v, tensors) for v in node["items"])
    if tag == "int":
        return int(node["v"])
    if tag == "float":
        return float(node["v"])
    if tag in ("bytes", "bytearray"):
        data = base64.b64decode(node["b64"])
        return data if tag == "bytes" else bytearray(data)
    if tag == "npscalar":
        return np.frombuffer(bytes.fromhex(node["hex"]), dtype=np.dtype(node["dtype"]))[0]
    if tag == "tensor":
        if "b64" in node:
            raw = torch.from_numpy(np.frombuffer(base64.b64decode(node["b64"]), np.uint8).copy())
            return raw.view(getattr(torch, node["dtype"])).reshape(node["shape"])
        return _tensor(tensors, node["key"])
    if tag == "ndarray":
        dtype, shape = np.dtype(node["dtype"]), tuple(node["shape"])
        if "b64" in node:
            return np.frombuffer(base64.b64decode(node["b64"]), dtype).reshape(shape).copy()
        tensor = _tensor(tensors, node["key"]).cpu()
        if node.get("raw"):
            return np.frombuffer(tensor.numpy().tobytes(), dtype).reshape(shape).copy()
        arr = tensor.numpy()
        if arr.dtype != dtype or arr.shape != shape:
            raise CheckpointError(f"tensor {node['key']!r}: expected {dtype} {shape}, found {arr.dtype} {arr.shape}")
        return arr
    raise CheckpointError(f"unknown skeleton node type {tag!r}")


def _tensor(tensors: Mapping[str, torch.Tensor] | None, key: str) -> torch.Tensor:
    if tensors is None or key not in tensors:
        raise CheckpointError(f"skeleton refers to tensor {key!r}, which the tensor file lacks")
    return tensors[key]


def _detach_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy only the tensors safetensors would refuse: off-CPU, non-contiguous, or sharing storage."""
    owners: dict[int, int] = {}
    for t in tensors.values():
        if t.device.type == "cpu" and t.numel():
            ptr = t.untyped_storage().data_ptr()
            owners[ptr] = owners.get(ptr, 0) + 1
    out = {}
    for key, t in tensors.items():
        alone = (
            t.device.type == "cpu"
            and t.is_contiguous()
            and t.numel() > 0
            and owners.get(t.untyped_storage().data_ptr()) == 1
            and t.storage_offset() == 0
            and t.numel() * t.element_size() == t.untyped_storage().nbytes()
        )
        out[key] = t if alone else t.to("cpu", copy=True, memory_format=torch.contiguous_format)
    return out


def _meta_to_json(meta: Mapping, what: str) -> Any:
    if not isinstance(meta, Mapping):
        raise TypeError(f"{what} must be a mapping, got {type(meta).__name__}")
    return _encode(meta, "", None)


# --- checkpoint directories --------------------------------------------------------------------------


def save_checkpoint(
    directory: str | Path, step: int, parts: Mapping[str, Mapping], meta: Mapping, keep: int = 3
) -> Path:
    """Write `directory/ckpt-{step:09d}/` atomically, then delete all but the newest `keep` by step.

    The checkpoint just written is never pruned, even if older-step ones exist beside it. An existing
    checkpoint of the same step is replaced. Temp dirs of saves that died over an hour ago are removed.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    for name in parts:
        if not isinstance(name, str) or not _PART_RE.match(name) or name == "meta":
            raise ValueError(f"part name {name!r}: use letters, digits, '_', '.', '-' (and not 'meta')")
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"ckpt-{step:09d}"
    meta_json = _meta_to_json(meta, "meta")
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-ckpt-{step:09d}-", dir=root))
    try:
        os.chmod(tmp, 0o755)
        files, skeletons = {}, {}
        for name, state in parts.items():
            tensors, skeletons[name] = flatten_state(state)
            path = tmp / f"{name}.safetensors"
            safetensors.torch.save_file(tensors, path, metadata={"format": FORMAT, "part": name})
            files[name] = {"bytes": path.stat().st_size, "sha256": _fsync_and_hash(path)}
        header = {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            "created": time.time(),
            "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
            "parts": list(parts),
            "files": files,
            "meta": meta_json,
            "skeletons": skeletons,
        }
        header[DIGEST] = _header_digest(header)
        _write_synced(tmp / "meta.json", json.dumps(header, allow_nan=False, indent=1).encode())
        fsync_dir(tmp)
        old = _move_to_trash(final) if final.exists() else None
        os.rename(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _prune(root, keep, final)
    return final


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Every `ckpt-N` directory, complete or not, oldest step first (temp dirs excluded)."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _DIR_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The highest-step complete checkpoint; newer broken ones are skipped with a CheckpointWarning.

    The check is cheap (meta.json parses, every part file exists with its recorded size and a valid
    safetensors header); `load_checkpoint` also verifies the checksums.
    """
    for path in reversed(list_checkpoints(directory)):
        problem = _problem(path)
        if problem is None:
            return path
        warnings.warn(f"skipping checkpoint {path}: {problem}", CheckpointWarning, stacklevel=2)
    return None


def load_latest_checkpoint(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[Path, dict[str, Any], dict[str, Any]] | None:
    """(path, parts, meta) of the newest checkpoint that loads whole with every checksum right, or None.

    Newer ones that are incomplete or corrupt (truncated, or bytes flipped in place, which only the
    checksums reveal) are skipped with a CheckpointWarning naming the file, so a damaged newest
    checkpoint costs the training since the previous one instead of every start of the run.
    """
    for path in reversed(list_checkpoints(directory)):
        problem = _problem(path)
        if problem is None:
            try:
                parts, meta = load_checkpoint(path, device)
            except CheckpointError as e:
                problem = str(e)
            else:
                return path, parts, meta
        warnings.warn(f"skipping checkpoint {path}: {problem}; falling back to an older one",
                      CheckpointWarning, stacklevel=2)
    return None


def checkpoint_step(path: str | Path) -> int:
    """The step a checkpoint directory was saved at (from its name)."""
    m = _DIR_RE.match(Path(path).name)
    if m is None:
        raise ValueError(f"{path}: not a checkpoint directory name (ckpt-<step>)")
    return int(m.group(1))


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", verify: bool = True
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a checkpoint directory back as ({part: nested state}, meta).

    With `verify`, each file's sha256 is checked first (reads each file once, into memory).
    Any problem raises CheckpointError naming the offending file.
    """
    path = Path(path)
    header = _read_header(path)
    parts: dict[str, Any] = {}
    for name in header["parts"]:
        file = path / f"{name}.safetensors"
        try:
            if verify:
                data = file.read_bytes()
                want = header["files"][name]["sha256"]
                if hashlib.sha256(data).hexdigest() != want:
                    raise CheckpointError(f"{file}: checksum mismatch, the file is corrupt")
                tensors = safetensors.torch.load(data)
                if torch.device(device).type != "cpu":
                    tensors = {k: v.to(device) for k, v in tensors.items()}
            else:
                tensors = safetensors.torch.load_file(file, device=str(device))
            parts[name] = unflatten_state(tensors, header["skeletons"][name])
        except CheckpointError as e:
            raise CheckpointError(str(e) if str(file) in str(e) else f"{file}: {e}") from e
        except Exception as e:
            raise CheckpointError(f"{file}: cannot load part {name!r}: {e}") from e
    try:
        meta = _decode(header["meta"], None)
    except Exception as e:
        raise CheckpointError(f"{path / 'meta.json'}: bad metadata: {e}") from e
    return parts, meta


def _read_header(path: Path) -> dict[str, Any]:
    file = path / "meta.json"
    try:
        header = json.loads(file.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{file}: missing (not a checkpoint, or an incomplete one)") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable: {e}") from e
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not a {FORMAT} header")
    if not isinstance(header.get("version"), int) or header["version"] > VERSION:
        raise CheckpointError(f"{file}: format version {header.get('version')!r}, this code reads up to {VERSION}")
    for key in ("parts", "files", "skeletons", "meta"):
        if key not in header:
            raise CheckpointError(f"{file}: header lacks {key!r}")
    # Checkpoints written before the digest existed have none; any other header must match its own.
    if DIGEST in header and header[DIGEST] != _header_digest(header):
        raise CheckpointError(f"{file}: digest mismatch, the file is corrupt (bytes changed after it was written)")
    return header


def _header_digest(header: Mapping[str, Any]) -> str:
    """sha256 of the header without its digest, serialised canonically (sorted keys), so a reader can
    recompute it from the parsed JSON: a changed digit in valid JSON is caught, not just a broken file."""
    rest = {k: v for k, v in header.items() if k != DIGEST}
    return hashlib.sha256(json.dumps(rest, allow_nan=False, sort_keys=True).encode()).hexdigest()


def _problem(path: Path) -> str | None:
    """Why a checkpoint directory cannot be used, or None when it looks complete."""
    try:
        header = _read_header(path)
    except CheckpointError as e:
        return str(e)
    for name in header["parts"]:
        file = path / f"{name}.safetensors"
        info = header["files"].get(name, {})
        try:
            size = file.stat().st_size
        except OSError:
            return f"{file}: missing"
        if size != info.get("bytes"):
            return f"{file}: {size} bytes, expected {info.get('bytes')} (truncated or overwritten)"
        try:
            with safe_open(file, "pt") as f:
                f.keys()
        except Exception as e:
            return f"{file}: bad safetensors header: {e}"
    return None


def _prune(root: Path, keep: int, newest: Path) -> None:
    others = [p for p in list_checkpoints(root) if p != newest]
    for path in others[: max(0, len(others) - (keep - 1))]:
        trash = _move_to_trash(path)
        shutil.rmtree(trash, ignore_errors=True)
    now = time.time()
    for p in root.iterdir():
        if p.name.startswith(".trash-"):
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(".tmp-ckpt-"):
            try:
                if now - p.stat().st_mtime > STALE_TMP_S:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass


def _move_to_trash(path: Path) -> Path:
    """Rename out of the `ckpt-N` namespace first, so a crash mid-delete leaves nothing half-valid."""
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    os.rename(path, trash)
    return trash


# --- file helpers ------------------------------------------------------------------------------------


def _fsync_and_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb+") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
        os.fsync(f.fileno())
    return digest.hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# --- policy weights blob -----------------------------------------------------------------------------


def _weights_payload(state_dict: Mapping[str, torch.Tensor], meta: Mapping) -> tuple[dict, dict[str, str]]:
    for k, v in state_dict.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise TypeError(f"weights must map str to tensor; {k!r} -> {type(v).__name__}")
    metadata = {
        "format": WEIGHTS_FORMAT,
        "version": str(WEIGHTS_VERSION),
        "meta": json.dumps(_meta_to_json(meta, "weights meta"), allow_nan=False),
    }
    return _detach_storage({k: v.detach() for k, v in state_dict.items()}), metadata


def _weights_meta(metadata: Mapping[str, str] | None, source: str) -> dict[str, Any]:
    metadata = metadata or {}
    if metadata.get("format") != WEIGHTS_FORMAT:
        raise CheckpointError(f"{source}: not a {WEIGHTS_FORMAT} file (header format {metadata.get('format')!r})")
    if int(metadata.get("version", "0")) > WEIGHTS_VERSION:
        raise CheckpointError(
            f"{source}: weights version {metadata['version']}, this code reads up to {WEIGHTS_VERSION}"
        )
    try:
        return _decode(json.loads(metadata["meta"]), None)
    except Exception as e:
        raise CheckpointError(f"{source}: bad metadata: {e}") from e


def save_weights(path: str | Path, state_dict: Mapping[str, torch.Tensor], meta: Mapping) -> Path:
    """One safetensors file a robot loads: flat weights, meta JSON-encoded in the header; atomic."""
    path = Path(path)
    tensors, metadata = _weights_payload(state_dict, meta)
    atomic_write_file(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata))
    return path


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Read a `save_weights` file back as (state_dict, meta); CheckpointError names a bad file."""
    path = Path(path)
    try:
        with safe_open(path, "pt", device=str(device)) as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read weights: {e}") from e
    return tensors, _weights_meta(metadata, str(path))


def weights_to_bytes(state_dict: Mapping[str, torch.Tensor], meta: Mapping) -> bytes:
    """The same blob as `save_weights`, in memory, for sending over a network."""
    tensors, metadata = _weights_payload(state_dict, meta)
    return safetensors.torch.save(tensors, metadata=metadata)


def weights_from_bytes(blob: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    """Inverse of `weights_to_bytes`; CheckpointError if the bytes are not a weights blob."""
    try:
        tensors = safetensors.torch.load(bytes(blob))
        (n,) = np.frombuffer(blob[:8], "<u8")
        metadata = json.loads(bytes(blob[8 : 8 + int(n)])).get("__metadata__")
    except Exception as e:
        raise CheckpointError(f"weights blob ({len(blob)} bytes): cannot read: {e}") from e
    return tensors, _weights_meta(metadata, "weights blob")
