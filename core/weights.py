"""The policy weights format: one safetensors blob, flat tensors and JSON metadata in its header, that
the learner exports and a robot verifies and loads. No pickle, so a blob from the network never runs code.

A blob is checked before use: its header must name `WEIGHTS_FORMAT` at a version this code reads, and its
metadata must decode; anything else is a CheckpointError naming the file or "weights blob".
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from safetensors import safe_open

from core.atomic import atomic_write_file
from core.tensor_tree import CheckpointError, detach_storage, meta_from_json, meta_to_json

WEIGHTS_FORMAT = "reverie-weights"
WEIGHTS_VERSION = 1

__all__ = [
    "WEIGHTS_FORMAT",
    "WEIGHTS_VERSION",
    "CheckpointError",
    "load_weights",
    "save_weights",
    "weights_from_bytes",
    "weights_to_bytes",
]


def _weights_payload(state_dict: Mapping[str, torch.Tensor], meta: Mapping) -> tuple[dict, dict[str, str]]:
    for k, v in state_dict.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise TypeError(f"weights must map str to tensor; {k!r} -> {type(v).__name__}")
    metadata = {
        "format": WEIGHTS_FORMAT,
        "version": str(WEIGHTS_VERSION),
        "meta": json.dumps(meta_to_json(meta, "weights meta"), allow_nan=False),
    }
    return detach_storage({k: v.detach() for k, v in state_dict.items()}), metadata


def _weights_meta(metadata: Mapping[str, str] | None, source: str) -> dict[str, Any]:
    metadata = metadata or {}
    if metadata.get("format") != WEIGHTS_FORMAT:
        raise CheckpointError(f"{source}: not a {WEIGHTS_FORMAT} file (header format {metadata.get('format')!r})")
    if int(metadata.get("version", "0")) > WEIGHTS_VERSION:
        raise CheckpointError(
            f"{source}: weights version {metadata['version']}, this code reads up to {WEIGHTS_VERSION}"
        )
    try:
        return meta_from_json(json.loads(metadata["meta"]))
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
