"""Disk-backed, chunked replay store of the learner (see `store.Replay`)."""

from learner.replay.chunk_file import ChunkError, ChunkMeta, read_chunk
from learner.replay.store import Replay
from learner.replay.validation import StepSpec

__all__ = ["ChunkError", "ChunkMeta", "Replay", "StepSpec", "read_chunk"]
