"""What a step must look like to be stored: the layout a store fixes at its first step (`StepSpec`, the
replay's checks around a `core.layout.StepLayout`), and the NaN/inf check that refuses a step."""

from __future__ import annotations

from collections.abc import KeysView
from typing import Any

import numpy as np

from core.layout import BOOL_FLAGS, FLAG_KEYS, Field, StepLayout


def _as_array(value: Any) -> tuple[np.ndarray, bool]:
    """(array, exact): numpy values keep their dtype; Python floats (and lists of them) become float32,
    Python ints int64, Python bools bool."""
    if isinstance(value, np.ndarray | np.generic):
        return np.asarray(value), True
    arr = np.asarray(value)
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    return arr, False


def _reserved(key: str) -> bool:
    return key.startswith("__") or key == "ids" or key.startswith("context/")


def nonfinite_rows(arrays: dict[str, np.ndarray]) -> np.ndarray | None:
    """Which rows (leading axis) hold NaN or +-inf in any floating-point array; None when every value is
    finite (the common case). Such a value would turn every parameter NaN at the next update."""
    bad = None
    for value in arrays.values():
        if value.dtype.kind in "fc" and value.size:
            rows = ~np.isfinite(value.reshape(len(value), -1)).all(axis=1)
            bad = rows if bad is None else bad | rows
    return bad if bad is not None and bad.any() else None


def nonfinite_keys(arrays: dict[str, np.ndarray], row: int | None = None) -> list[str]:
    """The floating-point keys holding NaN or +-inf (in `row` of each array, when given)."""
    return [key for key, value in arrays.items()
            if value.dtype.kind in "fc" and not np.isfinite(value if row is None else value[row]).all()]


def step_count(steps: dict[str, np.ndarray], stream: str) -> int:
    """T of a dict of per-key arrays with a leading step axis; errors name the key and stream."""
    where = f"replay steps from stream {stream!r}"
    if not isinstance(steps, dict) or not steps:
        raise TypeError(f"{where}: expected a non-empty dict of arrays, got {type(steps).__name__}")
    counts = {}
    for key, value in steps.items():
        if not isinstance(value, np.ndarray) or value.ndim == 0:
            raise TypeError(f"{where}: key {key!r} must be a numpy array with a leading step axis")
        counts[key] = value.shape[0]
    if len(set(counts.values())) > 1:
        raise ValueError(f"{where}: keys hold different numbers of steps: {counts}")
    return next(iter(counts.values()))


class StepSpec:
    """The step layout fixed by the first step a store sees (or by the chunk files it loads), so that every
    chunk of a store stacks into one array per key; `origin` says what fixed it, for error messages."""

    def __init__(self, layout: StepLayout, origin: str) -> None:
        self.layout = layout
        self.origin = origin

    @staticmethod
    def from_step(step: dict[str, Any], stream: str) -> StepSpec:
        if not isinstance(step, dict):
            raise TypeError(f"replay step from stream {stream!r}: expected a dict of arrays, got {type(step).__name__}")
        fields = {}
        for key, value in step.items():
            if not isinstance(key, str) or _reserved(key):
                raise ValueError(f"replay step from stream {stream!r}: key {key!r} is reserved or not a string")
            arr, _ = _as_array(value)
            if arr.dtype.kind in "OV":
                raise ValueError(f"replay step from stream {stream!r}: key {key!r} has unsupported dtype {arr.dtype}")
            fields[key] = (arr.shape, arr.dtype)
        return StepSpec(StepLayout(fields), f"the first step, from stream {stream!r}")._checked(f"stream {stream!r}")

    @staticmethod
    def from_arrays(arrays: dict[str, np.ndarray], origin: str) -> StepSpec:
        """The layout of a chunk file's step arrays (rows = steps); ValueError if it lacks what a step needs."""
        return StepSpec(StepLayout.from_rows(arrays), origin)._checked(origin)

    def _checked(self, where: str) -> StepSpec:
        missing = [key for key in FLAG_KEYS if key not in self.layout]
        if missing:
            raise ValueError(f"replay step from {where}: missing required key(s) {missing}")
        for key in BOOL_FLAGS:
            if self.layout[key] != Field((), bool):
                raise ValueError(f"replay step from {where}: key {key!r} must be a bool scalar")
        if self.layout["reward"].shape != () or self.layout["reward"].dtype.kind not in "fiu":
            raise ValueError(f"replay step from {where}: key 'reward' must be a numeric scalar")
        return self

    def convert(self, step: dict[str, Any], stream: str) -> dict[str, np.ndarray]:
        """The step's values as arrays of the stored shapes and dtypes; ValueError names what differs."""
        where = f"replay step from stream {stream!r}"
        self._check_keys(step.keys(), where)
        out = {}
        for key, (shape, dtype) in self.layout.items():
            value = step[key]
            if type(value) is np.ndarray and value.dtype == dtype and value.shape == shape:
                out[key] = value  # the common case, kept cheap
                continue
            arr, exact = _as_array(value)
            if not exact and arr.dtype != dtype and np.can_cast(arr.dtype, dtype, "same_kind"):
                arr = arr.astype(dtype)
            if arr.shape != shape or arr.dtype != dtype:
                raise ValueError(
                    f"{where}: key {key!r} {self._differs(arr.shape, arr.dtype, shape, dtype)} (fixed by {self.origin})"
                )
            out[key] = arr
        return out

    def convert_rows(self, steps: dict[str, np.ndarray], stream: str) -> tuple[dict[str, np.ndarray], int]:
        """(arrays, T) for T steps given as arrays with a leading step axis; numpy arrays are required and
        must have the stored per-step shape and dtype exactly (as numpy values in `convert`)."""
        where = f"replay steps from stream {stream!r}"
        self._check_keys(steps.keys(), where)
        count = step_count(steps, stream)
        for key, (shape, dtype) in self.layout.items():
            value = steps[key]
            if value.shape[1:] != shape or value.dtype != dtype:
                differs = self._differs(value.shape[1:], value.dtype, shape, dtype)
                raise ValueError(f"{where}: key {key!r} {differs} (fixed by {self.origin})")
        return steps, count

    def _check_keys(self, keys: KeysView[str], where: str) -> None:
        if keys != self.layout.keys():
            missing, extra = sorted(self.layout.keys() - keys), sorted(keys - self.layout.keys())
            raise ValueError(
                f"{where}: keys differ from the ones this replay stores (fixed by {self.origin}): "
                f"missing {missing}, unexpected {extra}"
            )

    def mismatch(self, other: StepSpec) -> str | None:
        """How `other` (e.g. a loaded chunk's arrays) differs, or None."""
        if other.layout.keys() != self.layout.keys():
            return f"keys {sorted(other.layout)} instead of {sorted(self.layout)}"
        for key, (shape, dtype) in self.layout.items():
            oshape, odtype = other.layout[key]
            if (oshape, odtype) != (shape, dtype):
                return f"key {key!r} has shape {oshape} dtype {odtype}, expected shape {shape} dtype {dtype}"
        return None

    @staticmethod
    def _differs(got_shape: tuple[int, ...], got_dtype: np.dtype, shape: tuple[int, ...], dtype: np.dtype) -> str:
        parts = []
        if got_shape != shape:
            parts.append(f"has shape {got_shape} but this replay stores shape {shape}")
        if got_dtype != dtype:
            parts.append(f"has dtype {got_dtype} but this replay stores dtype {dtype}")
        return " and ".join(parts)


def per_step(value: Any, default: Any, count: int, dtype: type, where: str) -> np.ndarray:
    """A per-step column (count,) from one value for all steps or an array of count values."""
    arr = np.asarray(default if value is None else value, dtype)
    if arr.ndim == 0:
        return np.full(count, arr)
    if arr.shape != (count,):
        raise ValueError(f"{where} has shape {arr.shape}, expected ({count},) or one value")
    return arr
