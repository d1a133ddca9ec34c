"""Nested state as flat tensors plus a JSON skeleton: the encoding checkpoints and policy weights share.

No pickle, so a file can never run code. `flatten_state` splits nested state into {dotted key: tensor}
(for safetensors) and a JSON skeleton with tagged nodes for what JSON cannot say itself (int dict keys,
tuples, big ints, NaN, numpy values, bytes); `meta_to_json` writes small metadata with its tensors inline.
"""

from __future__ import annotations

import base64
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

TAG = "__t__"  # marks a skeleton node that is not a plain JSON value
MAX_JSON_INT = 2**53  # beyond this other JSON readers lose digits, so such ints are written as strings


class CheckpointError(RuntimeError):
    """A checkpoint or weights file that cannot be read; the message names the file. One type for both
    formats: a weights blob is what a checkpoint exports, and every caller loading either catches this."""


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
    return detach_storage(tensors), skeleton


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


def detach_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


def meta_to_json(meta: Mapping, what: str) -> Any:
    """Metadata (a mapping of the values `flatten_state` takes, tensors inline) as plain JSON; `what` names it
    in the error."""
    if not isinstance(meta, Mapping):
        raise TypeError(f"{what} must be a mapping, got {type(meta).__name__}")
    return _encode(meta, "", None)


def meta_from_json(node: Any) -> Any:
    """Inverse of `meta_to_json`; CheckpointError on a node it cannot read."""
    return _decode(node, None)
