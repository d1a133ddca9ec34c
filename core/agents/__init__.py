"""Learning algorithms behind one interface (`core.agents.interface`), and the registry that finds them.

Each algorithm is one entry of `ALGORITHMS`: where its policy (acting: `core/agents/<name>/`) and its
trainer (learning: `learner/agents/<name>/`) live, as import paths, so that a robot imports only the
policy and never training code. The config's `agent` names the algorithm a run trains (its settings are
the config block of the same name); a policy blob names the algorithm that built it, and a robot builds
whatever policy it is sent. Adding an algorithm is one package on each side and one entry here.

Importing this package is cheap (no torch): the config validates `agent` against `ALGORITHMS`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from core.agents.blob import PolicyBlob, from_file, read_meta
from core.agents.interface import Agent, Policy
from core.agents.spaces import ActSpace, ObsSpace

if TYPE_CHECKING:
    import torch

__all__ = ["ALGORITHMS", "ActSpace", "Agent", "Algorithm", "AlgorithmName", "ObsSpace", "Policy", "PolicyBlob",
           "PolicyBuilder", "algorithm", "build_policy", "load_policy", "policy_class", "policy_from_file",
           "read_policy", "resolve"]


@dataclass(frozen=True)
class Algorithm:
    """Where an algorithm's code lives, as "module:attribute" import paths."""

    policy: str  # a `PolicyBuilder`: builds its policy from a blob (acting; what a robot imports)
    agent: str  # its `Agent` class (learning; only a learner imports it)


ALGORITHMS: dict[str, Algorithm] = {
    "dreamer": Algorithm(policy="core.agents.dreamer.policy:Policy", agent="learner.agents.dreamer.agent:Dreamer"),
    "planet": Algorithm(policy="core.agents.planet.policy:Policy", agent="learner.agents.planet.agent:Planet"),
    "world_models": Algorithm(policy="core.agents.world_models.policy:Policy",
                              agent="learner.agents.world_models.agent:WorldModels"),
    "gato": Algorithm(policy="core.agents.gato.policy:Policy", agent="learner.gato.agent:Gato"),
}
AlgorithmName = Literal[tuple(ALGORITHMS)]  # the config's `agent`: one of the names above


class PolicyBuilder(Protocol):
    """What the registry's `policy` path names (a policy class with these class methods)."""

    def read_config(self, config: Any, space: ObsSpace, act: ActSpace) -> Any:
        """The algorithm's config a blob declares, validated and bounded before anything is allocated
        (ValueError naming the field)."""
        ...

    def from_blob(self, blob: PolicyBlob, device: str | torch.device = "cpu") -> Policy:
        """Build the policy a checked blob describes (ValueError if its tensors do not fit its config)."""
        ...


def resolve(path: str) -> Any:
    """The object a "module:attribute" import path names."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def algorithm(name: str) -> Algorithm:
    """The registry entry of `name`; ValueError listing the known ones."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {str(name)[:64]!r}; this install knows {', '.join(sorted(ALGORITHMS))}")
    return ALGORITHMS[name]


def policy_class(name: str) -> PolicyBuilder:
    """What builds algorithm `name`'s policies (imports its acting code, never its trainer)."""
    return resolve(algorithm(name).policy)


def read_policy(blob: bytes) -> PolicyBlob:
    """Parse a policy blob and check what it declares against the bounds of its algorithm; allocates only its
    tensors (CheckpointError: not a weights blob; ValueError: a policy blob that declares what it may not)."""
    from core.weights import weights_from_bytes  # torch: only when a blob is read

    tensors, meta = weights_from_bytes(blob)
    name, space, act, version = read_meta(meta)
    config = policy_class(name).read_config(meta[name], space, act)
    return PolicyBlob(name, tensors, config, space, act, version)


def build_policy(blob: PolicyBlob, device: str | torch.device = "cpu") -> Policy:
    """The policy of a `read_policy` blob, of whatever algorithm it names."""
    return policy_class(blob.algorithm).from_blob(blob, device)


def load_policy(blob: bytes, device: str | torch.device = "cpu") -> Policy:
    """A policy blob (from the link, or a file's bytes) as the policy it names."""
    return build_policy(read_policy(blob), device)


def policy_from_file(path: str | Path, device: str | torch.device = "cpu") -> Policy:
    """A policy file (a run's policy.safetensors); whatever is wrong with it is a CheckpointError naming it."""
    return from_file(path, lambda blob: load_policy(blob, device))
