"""The layout of one step: which keys a step holds, and each key's per-step shape and dtype.

The robot announces it, the link checks every chunk against it, the replay stores by it and an agent
is built for its observation part, so it is one type here (`StepLayout` of key -> `Field(shape,
dtype)`, always in that order) with one converter per external format: the wire's `[dtype, dims]`
(robots already deployed send that order in their hello; a run's link_spec.json holds it too) and a
policy blob's `[dims, dtype]` metadata. The episode-flag keys every step carries are defined here once.
"""

from __future__ import annotations

import math
from collections.abc import ItemsView, Iterator, KeysView, Mapping, Sequence, ValuesView
from typing import Any, NamedTuple

import numpy as np

FLAG_KEYS: tuple[str, ...] = ("reward", "is_first", "is_last", "is_terminal")
BOOL_FLAGS: tuple[str, ...] = ("is_first", "is_last", "is_terminal")  # the flags that are bools (reward is not)
ACTION_KEY = "action"  # the model-form action, stored beside the observation of the step it led to
# The dtypes a layout that crosses a process boundary (the wire, a policy blob) may name.
DTYPES = frozenset(
    {"bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "int64", "float16", "float32", "float64"}
)


class _FieldTuple(NamedTuple):
    shape: tuple[int, ...]
    dtype: np.dtype


class Field(_FieldTuple):
    """One key's per-step shape and dtype. A tuple, so `shape, dtype = field` unpacks; the dtype is always a
    numpy dtype (which compares equal to its name: `field.dtype == "uint8"`)."""

    __slots__ = ()

    def __new__(cls, shape: Sequence[int], dtype: Any) -> Field:
        return super().__new__(cls, tuple(int(d) for d in shape), np.dtype(dtype))

    @property
    def nbytes(self) -> int:
        """Bytes of this key in one step (Python ints: no overflow for any shape)."""
        return math.prod(self.shape) * self.dtype.itemsize


class StepLayout(Mapping[str, Field]):
    """An immutable mapping key -> Field, in the order the keys were given."""

    __slots__ = ("_fields",)

    def __init__(self, fields: Mapping[str, Sequence[Any]] | None = None) -> None:
        self._fields = {key: Field(*value) for key, value in (fields or {}).items()}

    @classmethod
    def of(cls, layout: Mapping[str, Sequence[Any]]) -> StepLayout:
        """`layout` itself if it is a StepLayout, else one made of its (shape, dtype) pairs."""
        return layout if isinstance(layout, StepLayout) else cls(layout)

    @classmethod
    def from_example(cls, step: Mapping[str, Any]) -> StepLayout:
        """The layout of one step's values (arrays or numpy scalars)."""
        return cls({key: (np.shape(value), np.asarray(value).dtype) for key, value in step.items()})

    @classmethod
    def from_rows(cls, arrays: Mapping[str, np.ndarray]) -> StepLayout:
        """The per-step layout of arrays holding several steps along their first axis (a chunk)."""
        return cls({key: (value.shape[1:], value.dtype) for key, value in arrays.items()})

    @classmethod
    def from_wire(cls, spec: Mapping[str, Sequence[Any]]) -> StepLayout:
        """From the wire's order, {key: [dtype, dims]} (a hello's spec, link_spec.json). Unchecked:
        `core.link.protocol.spec_of` validates what a peer sent."""
        return cls({key: (dims, dtype) for key, (dtype, dims) in spec.items()})

    def to_wire(self) -> dict[str, list[Any]]:
        """{key: [dtype name, dims]}: the hello's spec, msgpack- and JSON-able."""
        return {key: [f.dtype.name, list(f.shape)] for key, f in self.items()}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Sequence[Any]]) -> StepLayout:
        """From a policy blob's obs_space metadata, {key: [dims, dtype]}. Unchecked (see core.agents.blob)."""
        return cls({key: (dims, dtype) for key, (dims, dtype) in meta.items()})

    def to_meta(self) -> dict[str, list[Any]]:
        """{key: [dims, dtype name]}: a policy blob's obs_space metadata."""
        return {key: [list(f.shape), f.dtype.name] for key, f in self.items()}

    def observations(self) -> StepLayout:
        """The observation keys alone: neither the episode flags nor the action."""
        return self.without(*FLAG_KEYS, ACTION_KEY)

    def without(self, *keys: str) -> StepLayout:
        """This layout less `keys` (those it lacks are ignored)."""
        return StepLayout({key: f for key, f in self.items() if key not in keys})

    def step_bytes(self) -> int:
        """Bytes of one step of every key."""
        return sum(f.nbytes for f in self.values())

    def __getitem__(self, key: str) -> Field:
        return self._fields[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    # The dict's own views: as read-only as the Mapping's, and cheaper on the replay's per-step path.
    def keys(self) -> KeysView[str]:
        return self._fields.keys()

    def values(self) -> ValuesView[Field]:
        return self._fields.values()

    def items(self) -> ItemsView[str, Field]:
        return self._fields.items()

    def __len__(self) -> int:
        return len(self._fields)

    def __repr__(self) -> str:
        inner = ", ".join(f"{key}: {f.dtype.name}{list(f.shape)}" for key, f in self.items())
        return f"StepLayout({{{inner}}})"
