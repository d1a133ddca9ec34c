"""Disk-backed, chunked replay store of the learner (see `store.Replay`)."""

from learner.replay.chunk import ChunkError, ChunkMeta, StepSpec, read_chunk
from learner.replay.store import Replay

__all__ = ["ChunkError", "ChunkMeta", "Replay", "StepSpec", "read_chunk"]
