"""Checkpoints as safetensors + JSON: no pickle, so a file can never run code.

A checkpoint is a directory `ckpt-{step:09d}/` holding one `{part}.safetensors` per named state
(agent, optimizer, ...) and `meta.json` (user metadata, the JSON skeletons that rebuild each nested
state, sizes and sha256 of every file, and a sha256 of its own other fields). It is written into a
hidden temp directory beside it, fsynced and renamed, so a run killed mid-save leaves either the old
set or the new one, never half of one. `load_latest_checkpoint` verifies every checksum and falls
back past a damaged newest checkpoint to the previous intact one.

Nested state is split into tensors and a skeleton by `core.tensor_tree`; the policy weights a robot
loads are `core.weights`. Loading is always onto the CPU unless a device is given; tensors come back
as plain tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
import warnings
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import safe_open

from core.atomic import fsync_dir
from core.tensor_tree import CheckpointError, flatten_state, meta_from_json, meta_to_json, unflatten_state

FORMAT = "reverie-checkpoint"
VERSION = 1
DIGEST = "header_sha256"  # meta.json's digest of itself (every other field)
STALE_TMP_S = 3600.0  # a temp dir this old belongs to a save that died
_DIR_RE = re.compile(r"^ckpt-(\d+)$")
_PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

__all__ = [
    "CheckpointError",
    "CheckpointWarning",
    "checkpoint_step",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest_checkpoint",
    "save_checkpoint",
]


class CheckpointWarning(UserWarning):
    """A checkpoint directory that was skipped (incomplete or corrupt)."""


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
    meta_json = meta_to_json(meta, "meta")
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
        meta = meta_from_json(header["meta"])
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
