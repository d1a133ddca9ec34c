"""The policy blob: what every algorithm's exported policy holds, and its checks before anything is built.

A blob is the project's weights format (`core.weights`: safetensors, metadata in the header). Its metadata
names the format, the `algorithm` (blobs written before there was more than one have none: they are
Dreamer's), the algorithm's config under the algorithm's name, the observation and action spaces and the
weights version: nothing else is needed to rebuild the network. A robot bounds what a blob declares before
building it, so a small blob declaring a huge network costs milliseconds, not seconds and gigabytes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from core.agents.spaces import ActSpace, ObsSpace
from core.layout import DTYPES, StepLayout

if TYPE_CHECKING:
    from torch import Tensor, nn

FORMAT = "reverie-policy-1"
DEFAULT_ALGORITHM = "dreamer"  # the algorithm of a blob that names none
MAX_OBS_KEYS = 64  # entries of the observation space
MAX_DIM = 4096  # each dimension of an observation entry, and the action's width

T = TypeVar("T")


class PolicyBlob(NamedTuple):
    """A policy blob read and its declaration checked, nothing built yet (`core.agents.build_policy` builds it)."""

    algorithm: str
    tensors: dict[str, Tensor]
    config: Any  # the algorithm's config, as the blob declares it (validated and bounded by the algorithm)
    space: ObsSpace
    act_space: ActSpace
    version: int


def blob_meta(algorithm: str, config: Mapping[str, Any], space: ObsSpace, act: ActSpace, version: int) -> dict:
    """The metadata of a policy blob (its tensors are the algorithm's)."""
    return {
        "format": FORMAT,
        "algorithm": algorithm,
        algorithm: dict(config),
        "obs_space": StepLayout.of(space).to_meta(),
        "act_space": act.to_dict(),
        "version": int(version),
    }


def read_meta(meta: Mapping[str, Any]) -> tuple[str, ObsSpace, ActSpace, int]:
    """(algorithm, observation space, action space, version) of a blob's metadata; ValueError naming the entry
    that is missing, malformed or over the bounds. The algorithm's own config is left to the algorithm."""
    if meta.get("format") != FORMAT:
        raise ValueError(f"not a Reverie policy blob (format {meta.get('format')!r}, expected {FORMAT!r})")
    algorithm = meta.get("algorithm", DEFAULT_ALGORITHM)
    if not isinstance(algorithm, str):
        raise ValueError(f"policy blob metadata: algorithm must be a name, found {str(algorithm)[:64]!r}")
    for key in (algorithm, "obs_space", "act_space", "version"):
        if key not in meta:
            raise ValueError(f"policy blob metadata lacks {key!r}")
    space, act = _declared_spaces(meta["obs_space"], meta["act_space"])
    version = meta["version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"policy blob metadata: version must be a non-negative integer, found {version!r}")
    return algorithm, space, act, version


def _declared_spaces(obs: Any, act: Any) -> tuple[ObsSpace, ActSpace]:
    """The observation and action spaces of a blob's metadata, in bounds (ValueError naming the entry)."""
    if not isinstance(obs, Mapping) or not 0 < len(obs) <= MAX_OBS_KEYS:
        raise ValueError(f"policy blob obs_space: expected 1 to {MAX_OBS_KEYS} entries, found "
                         f"{len(obs) if isinstance(obs, Mapping) else type(obs).__name__}")
    for key, entry in obs.items():
        ok = isinstance(entry, list | tuple) and len(entry) == 2 and isinstance(entry[0], list | tuple)
        shape = tuple(entry[0]) if ok else ()
        if (not ok or not isinstance(key, str) or len(key) > 64 or not isinstance(entry[1], str) or len(shape) > 3
                or not all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= MAX_DIM for d in shape)):
            raise ValueError(f"policy blob obs_space[{str(key)[:64]!r}]: expected [shape of at most 3 dimensions "
                             f"of 1 to {MAX_DIM}, dtype name], found {str(entry)[:100]}")
        if entry[1] not in DTYPES:
            raise ValueError(f"policy blob obs_space[{key!r}]: dtype {entry[1][:32]!r} is not one of {sorted(DTYPES)}")
    space = StepLayout.from_meta(obs)
    if (not isinstance(act, Mapping) or set(act) != {"dim", "discrete"} or not isinstance(act["discrete"], bool)
            or isinstance(act["dim"], bool) or not isinstance(act["dim"], int) or not 1 <= act["dim"] <= MAX_DIM):
        raise ValueError(f"policy blob act_space: expected {{dim: 1 to {MAX_DIM}, discrete: true/false}}, "
                         f"found {str(act)[:100]}")
    return space, ActSpace(act["dim"], act["discrete"])


def from_file(path: str | Path, build: Callable[[bytes], T]) -> T:
    """`build` from the bytes of a policy file (a run's policy.safetensors). Whatever is wrong with it
    (unreadable, not safetensors, another format, weights that do not fit their config) is a CheckpointError
    naming the file."""
    from core.weights import CheckpointError

    try:
        blob = Path(path).read_bytes()
    except OSError as exc:
        raise CheckpointError(f"policy file {path}: cannot read it ({exc.strerror or exc})") from exc
    try:
        return build(blob)
    except (CheckpointError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"policy file {path}: {exc}") from exc


def check_declared_network(build: Callable[[], nn.Module], tensors: Mapping[str, Tensor], *, name: str, declared: str,
                           max_params: int, prefix: str = "", also: Collection[str] = ()) -> None:
    """Build the network a blob declares on the meta device (no memory, no initialisation) and check that it has
    at most `max_params` parameters and exactly the blob's tensors (each name `prefix` + its state-dict key, and
    any of `also` beside them). ValueError says what differs; `name` is the algorithm's config block and
    `declared` its settings that size the network, both quoted in the message."""
    import torch  # only when a blob is checked

    try:
        with torch.device("meta"):
            net = build()
    except (RuntimeError, ValueError, TypeError, OverflowError, re.error) as exc:
        raise ValueError(f"the network the blob declares cannot be built: {exc}") from None
    shapes = {prefix + k: tuple(v.shape) for k, v in net.state_dict().items()}
    total = sum(math.prod(s) for s in shapes.values())
    if total > max_params:
        raise ValueError(f"the blob declares a network of {total:,} parameters ({name}: {declared}), more than a "
                         f"policy may have ({max_params:,})")
    for key, shape in shapes.items():
        if key not in tensors:
            raise ValueError(f"the network the blob declares has {key} {list(shape)}, which the blob lacks")
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"tensor {key} is {list(tensors[key].shape)} in the blob, but the network its {name} "
                             f"config declares ({declared}) has {list(shape)}")
    if extra := sorted(set(tensors) - set(shapes) - set(also)):
        raise ValueError(f"the blob holds tensors its declared network does not have: {extra[:3]}")


def declared_bounds_problem(cfg: Any, name: str, limits: Mapping[str, int], max_layers: int, max_mult: int,
                            max_pattern: int) -> str | None:
    """Why the sizes a blob's `name` config declares are over the bounds (naming the field), else None. Cheap:
    numbers and pattern lengths only, nothing built. The widths in `limits`, then `cnn_mults`, then the
    observation-key patterns."""
    for field, limit in limits.items():
        if getattr(cfg, field) > limit:
            return f"{name}.{field}: {getattr(cfg, field)} is more than a policy blob may declare ({limit})"
    if len(cfg.cnn_mults) > max_layers or max(cfg.cnn_mults) > max_mult:
        return (f"{name}.cnn_mults: {str(cfg.cnn_mults)[:80]} is more than a policy blob may declare "
                f"(at most {max_layers} layers of at most x{max_mult})")
    for field in ("image_keys", "vector_keys"):
        if len(getattr(cfg, field)) > max_pattern:
            return f"{name}.{field}: a pattern of {len(getattr(cfg, field))} characters (at most {max_pattern})"
    return None
