"""Split into chunk_file, index, disk, streams and validation: an alias until every import is rewritten
(issue 22)."""

from learner.replay.chunk_file import NAME_RE, ChunkError, ChunkMeta, is_chunk_name, read_chunk
from learner.replay.index import INDEX_NAME
from learner.replay.validation import StepSpec, nonfinite_keys

__all__ = ["INDEX_NAME", "NAME_RE", "ChunkError", "ChunkMeta", "StepSpec", "is_chunk_name", "nonfinite_keys",
           "read_chunk"]
