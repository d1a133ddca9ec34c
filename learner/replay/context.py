"""Replay-context latents: the posterior latents the world model (or the acting policy) computed at a
step, kept beside the step so that a sequence starting right after it starts from them (the 2024
recipe's replay context). Also the checkpoint part that keeps them, and putting them back on resume."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from learner.replay.runs import Chunk
    from learner.replay.store import Replay

CONTEXT_PART = "replay_context"  # checkpoint part holding `Replay.context_state()`


class Context:
    """Latents per slab row (the slab grows them and clears a slot's rows when its chunk leaves RAM);
    `ok[row]` says the row holds latents of the step now in it. Keys and per-step shapes are fixed by
    the first latents stored."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self.ok = np.zeros(0, bool)

    def put(self, rows: np.ndarray, latents: dict[str, np.ndarray]) -> None:
        """Store latents (each (len(rows), ...)) at slab `rows`; nothing changes if they do not fit."""
        if not self.arrays:
            if not latents:
                raise ValueError("write_context: no latents given")
            size = len(self.ok)
            self.arrays = {key: np.zeros((size, *v.shape[1:]), v.dtype) for key, v in latents.items()}
        if latents.keys() != self.arrays.keys():
            raise ValueError(
                f"write_context: latents {sorted(latents)} differ from the stored ones {sorted(self.arrays)}")
        for key, value in latents.items():
            if value.shape[1:] != self.arrays[key].shape[1:]:
                raise ValueError(
                    f"write_context: latent {key!r} has per-step shape {value.shape[1:]}, "
                    f"stored ones have {self.arrays[key].shape[1:]}"
                )
        for key, value in latents.items():
            self.arrays[key][rows] = value
        self.ok[rows] = True

    def gather(self, prev: np.ndarray, valid: np.ndarray, out: dict[str, np.ndarray]) -> None:
        """Add the latents of slab rows `prev` to a batch as `context/<key>`, zero where not `valid`."""
        for key, arr in self.arrays.items():
            context = arr[prev]
            context[~valid] = 0
            out[f"context/{key}"] = context
        out["context/valid"] = valid

    def state(self, chunks: Iterable[Chunk], slot_size: int) -> dict[str, Any]:
        """The latents of `chunks`' steps that have them, addressed by chunk uuid and row (stable across
        a reload). Empty when none were ever stored."""
        if not self.arrays:
            return {}
        chunks = [c for c in chunks if c.meta.length]
        parts = [np.flatnonzero(self.ok[c.slot * slot_size : c.slot * slot_size + c.meta.length]) for c in chunks]
        rows = np.concatenate([np.zeros(0, np.int64), *parts])
        chunk = np.repeat(np.arange(len(chunks), dtype=np.int64), [len(p) for p in parts])
        slab = np.array([c.slot * slot_size for c in chunks], np.int64)[chunk] + rows
        return {"uuids": [c.meta.uuid for c in chunks], "chunk": chunk, "row": rows,
                "latents": {key: arr[slab] for key, arr in self.arrays.items()}}


def state_ids(
    state: dict[str, Any], by_uuid: Mapping[str, Chunk], slot_size: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The step ids (as `Replay.sample` hands out) and latents of a `Context.state()`'s rows whose chunks
    are in RAM (`by_uuid`). Raises ValueError, naming the field, on a state that does not fit."""
    try:
        uuids, latents = list(state["uuids"]), dict(state["latents"])
        chunk, row = (np.asarray(state[k], np.int64) for k in ("chunk", "row"))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"replay context state: missing or malformed field ({exc})") from exc
    n = chunk.shape[0]
    if chunk.shape != (n,) or row.shape != (n,) or (n and (chunk.min() < 0 or chunk.max() >= len(uuids))):
        raise ValueError("replay context state: 'chunk' and 'row' must be equal-length index vectors into 'uuids'")
    arrays = {key: np.asarray(value) for key, value in latents.items()}
    for key, value in arrays.items():
        if value.shape[:1] != (n,):
            raise ValueError(f"replay context state: latent {key!r} has {value.shape[:1]} rows, expected {n}")
    if not arrays:
        raise ValueError("replay context state: no latents")
    found = [by_uuid.get(u) for u in uuids]
    seqs = np.array([c.meta.seq if c else -1 for c in found], np.int64)[chunk]
    lengths = np.array([c.meta.length if c else 0 for c in found], np.int64)[chunk]
    ok = (seqs >= 0) & (row >= 0) & (row < lengths)
    return (seqs * slot_size + row)[ok], {key: value[ok] for key, value in arrays.items()}


def restore_context(replay: Replay, parts: Mapping[str, Any], source: str | Path) -> int:
    """Put a checkpoint's replay-context latents back into `replay`; returns the steps restored.

    A checkpoint without the part (written before it existed, or before any update) restores none.
    Latents that no longer fit the store are left out with a warning naming the checkpoint: they
    are a head start that training rebuilds, never a reason to refuse a resume.
    """
    state = parts.get(CONTEXT_PART)
    if not state:
        return 0
    try:
        return replay.load_context(state)
    except ValueError as exc:
        warnings.warn(f"{source}: replay context not restored, training rebuilds it: {exc}", stacklevel=2)
        return 0
