"""Gato's tokeniser: how one step of a task (its observations and its action) becomes tokens, and back.

Per step: the observation entries in the order of their keys (lexicographic, as Gato orders them), a
separator, then the action. Continuous observations are mu-law encoded to [-1, 1] and cut into `bins`
uniform bins; actions are already in [-1, 1] (the agent interface's model form), so they are binned as
they are (Gato encodes a value "if not already there"). Discrete values (integer and bool observations, a
discrete action's index) are tokens of their own range. Each kind has a disjoint range of ids:

    [0, bins)                              continuous values
    [bins, bins + discrete_values)         discrete values
    bins + discrete_values                 the separator between observation and action

Images are not ids: each 16 x 16 patch is a slot in the sequence that the model fills with the patch's
embedding (a ResNet block plus learned row and column encodings); the token array holds 0 there and
`Body.patch_slots` says where. Every step of one task has the same layout, so a task's steps tokenise as
one (T, S) array and a sequence is steps laid end to end.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from core.agents.spaces import ActSpace, ObsSpace
from core.config.gato import GatoConfig
from core.layout import ACTION_KEY, FLAG_KEYS

Kind = Literal["image", "continuous", "discrete"]


def mu_law(x: np.ndarray, mu: float, m: float) -> np.ndarray:
    """sign(x) log(|x| mu + 1) / log(M mu + 1): |x| <= M lands in [-1, 1], small values get most bins."""
    x = np.asarray(x, np.float64)
    return np.sign(x) * np.log1p(np.abs(x) * mu) / math.log1p(m * mu)


def mu_law_inverse(y: np.ndarray, mu: float, m: float) -> np.ndarray:
    y = np.asarray(y, np.float64)
    return np.sign(y) * np.expm1(np.abs(y) * math.log1p(m * mu)) / mu


def to_bins(y: np.ndarray, bins: int) -> np.ndarray:
    """Values of [-1, 1] (clipped) as bin indices 0 .. bins-1."""
    y = np.clip(np.nan_to_num(np.asarray(y, np.float64)), -1.0, 1.0)
    return np.minimum(((y + 1.0) * 0.5 * bins).astype(np.int64), bins - 1)


def from_bins(index: np.ndarray, bins: int) -> np.ndarray:
    """Bin indices as the centres of their bins in [-1, 1]."""
    return (np.asarray(index, np.float64) + 0.5) / bins * 2.0 - 1.0


@dataclass(frozen=True)
class Vocabulary:
    """The disjoint id ranges of the token kinds."""

    bins: int
    discrete_values: int

    @classmethod
    def of(cls, cfg: GatoConfig) -> Vocabulary:
        return cls(cfg.bins, cfg.discrete_values)

    @property
    def continuous(self) -> range:
        return range(0, self.bins)

    @property
    def discrete(self) -> range:
        return range(self.bins, self.bins + self.discrete_values)

    @property
    def separator(self) -> int:
        return self.bins + self.discrete_values

    @property
    def size(self) -> int:
        return self.separator + 1


@dataclass(frozen=True)
class Entry:
    """One observation entry of a step: its key, kind, per-step shape and how many slots it takes."""

    key: str
    kind: Kind
    shape: tuple[int, ...]
    slots: int


def entry_kind(key: str, shape: tuple[int, ...], dtype: np.dtype, cfg: GatoConfig) -> Entry:
    """How an observation entry tokenises (ValueError naming the key when it cannot)."""
    if dtype == np.uint8 and len(shape) == 3:
        h, w, c = shape
        if c != 3 or h % cfg.patch or w % cfg.patch:
            raise ValueError(f"observation {key!r}: an image must be H x W x 3 with H and W multiples of "
                             f"gato.patch ({cfg.patch}); it is {list(shape)}")
        if max(h, w) // cfg.patch > cfg.max_patch_side:
            raise ValueError(f"observation {key!r}: {list(shape)} has more than gato.max_patch_side "
                             f"({cfg.max_patch_side}) patches of {cfg.patch} per side")
        return Entry(key, "image", shape, (h // cfg.patch) * (w // cfg.patch))
    kind: Kind = "discrete" if dtype.kind in "biu" else "continuous"
    if dtype.kind not in "biuf":
        raise ValueError(f"observation {key!r}: dtype {dtype.name} is neither a number nor a uint8 image")
    return Entry(key, kind, shape, math.prod(shape))


@dataclass(frozen=True)
class Body:
    """How one task's steps (its observation layout and action space) become a (T, S) token array."""

    entries: tuple[Entry, ...]
    act: ActSpace
    vocab: Vocabulary
    mu: float
    mu_max: float
    patch: int

    @classmethod
    def of(cls, space: ObsSpace, act: ActSpace, cfg: GatoConfig) -> Body:
        """The body of an observation space (flags and action excluded) and action space; ValueError naming
        what cannot be tokenised or what does not fit the config."""
        keys = sorted(k for k in space if k not in FLAG_KEYS and k != ACTION_KEY)
        if not keys:
            raise ValueError("gato: the observation space has no entry to tokenise (only episode flags)")
        entries = tuple(entry_kind(k, tuple(space[k][0]), np.dtype(space[k][1]), cfg) for k in keys)
        vocab = Vocabulary.of(cfg)
        if act.discrete and act.dim > vocab.discrete_values:
            raise ValueError(f"gato: a discrete action of {act.dim} choices needs gato.discrete_values >= {act.dim}")
        body = cls(entries, act, vocab, cfg.mu, cfg.mu_max, cfg.patch)
        if body.step_len > cfg.step_tokens:
            raise ValueError(f"gato: one step takes {body.step_len} tokens ({body.obs_len} observation, 1 separator, "
                             f"{body.act_len} action), more than gato.step_tokens ({cfg.step_tokens})")
        return body

    # --- the layout of a step
    @property
    def obs_len(self) -> int:
        return sum(e.slots for e in self.entries)

    @property
    def act_len(self) -> int:
        return 1 if self.act.discrete else self.act.dim

    @property
    def step_len(self) -> int:
        return self.obs_len + 1 + self.act_len

    @property
    def images(self) -> tuple[Entry, ...]:
        return tuple(e for e in self.entries if e.kind == "image")

    @property
    def inputs(self) -> tuple[str, ...]:
        return tuple(e.key for e in self.entries)

    def patch_slots(self) -> np.ndarray:
        """Positions within a step that hold image patches, in the order `patches` returns them."""
        slots, at = [], 0
        for e in self.entries:
            if e.kind == "image":
                slots.extend(range(at, at + e.slots))
            at += e.slots
        return np.asarray(slots, np.int64)

    def patch_grid(self) -> np.ndarray:
        """(P, 2) row and column of each patch within its image (the learned position encodings' indices)."""
        rc = [np.stack(np.divmod(np.arange(e.slots), e.shape[1] // self.patch), -1) for e in self.images]
        return np.concatenate(rc).astype(np.int64) if rc else np.zeros((0, 2), np.int64)

    def action_slots(self) -> np.ndarray:
        return np.arange(self.obs_len + 1, self.step_len)

    def action_range(self) -> range:
        """The ids an action token may take (decoding is restricted to them)."""
        if self.act.discrete:
            return range(self.vocab.discrete.start, self.vocab.discrete.start + self.act.dim)
        return self.vocab.continuous

    # --- tokenising
    def tokenise(self, obs: Mapping[str, Any], actions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(tokens (T, S) int64, patches (T, P, p, p, 3) uint8) of T steps; `obs` has a leading T axis on every
        entry. Without `actions` only the observation and separator are tokenised (S = obs_len + 1)."""
        length = len(np.asarray(obs[self.entries[0].key]))
        parts, patches = [], []
        for e in self.entries:
            value = np.asarray(obs[e.key])
            if value.shape != (length, *e.shape):
                raise ValueError(f"observation {e.key!r}: expected {length} steps of {list(e.shape)}, got "
                                 f"{list(value.shape)}")
            if e.kind == "image":
                patches.append(self._patches(value))
                parts.append(np.zeros((length, e.slots), np.int64))
            elif e.kind == "discrete":
                parts.append(self.discrete_tokens(value.reshape(length, -1).astype(np.int64), e.key))
            else:
                parts.append(self.continuous_tokens(value.reshape(length, -1), encode=True))
        parts.append(np.full((length, 1), self.vocab.separator, np.int64))
        if actions is not None:
            parts.append(self.action_tokens(actions))
        grid = (np.concatenate(patches, 1) if patches
                else np.zeros((length, 0, self.patch, self.patch, 3), np.uint8))
        return np.concatenate(parts, 1), grid

    def _patches(self, images: np.ndarray) -> np.ndarray:
        """(T, H, W, 3) -> (T, H/p * W/p, p, p, 3), patches in row-major order."""
        t, h, w, c = images.shape
        p = self.patch
        grid = images.reshape(t, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return grid.reshape(t, (h // p) * (w // p), p, p, c)

    def continuous_tokens(self, values: np.ndarray, encode: bool) -> np.ndarray:
        """Continuous values as ids; `encode`: mu-law first (observations), else already in [-1, 1] (actions)."""
        y = mu_law(values, self.mu, self.mu_max) if encode else values
        return to_bins(y, self.vocab.bins) + self.vocab.continuous.start

    def continuous_values(self, tokens: np.ndarray, encoded: bool) -> np.ndarray:
        y = from_bins(np.asarray(tokens) - self.vocab.continuous.start, self.vocab.bins)
        return mu_law_inverse(y, self.mu, self.mu_max) if encoded else y

    def discrete_tokens(self, values: np.ndarray, key: str) -> np.ndarray:
        values = np.asarray(values, np.int64)
        if values.size and (values.min() < 0 or values.max() >= self.vocab.discrete_values):
            raise ValueError(f"{key!r}: discrete values must lie in 0 .. {self.vocab.discrete_values - 1} "
                             f"(gato.discrete_values), found {values.min()} .. {values.max()}")
        return values + self.vocab.discrete.start

    def action_tokens(self, actions: np.ndarray) -> np.ndarray:
        """Model-form actions (T, dim): one-hot -> one discrete id; a [-1, 1] vector -> dim continuous ids."""
        actions = np.asarray(actions, np.float32)
        if actions.ndim != 2 or actions.shape[1] != self.act.dim:
            raise ValueError(f"actions: expected (steps, {self.act.dim}), got {list(actions.shape)}")
        if self.act.discrete:
            return self.discrete_tokens(actions.argmax(-1)[:, None], ACTION_KEY)
        return self.continuous_tokens(actions, encode=False)

    def action_of(self, tokens: np.ndarray) -> np.ndarray:
        """Action ids (..., act_len) as model-form actions (..., dim) float32: one-hot or bin centres."""
        tokens = np.asarray(tokens)
        if self.act.discrete:
            index = np.clip(tokens[..., 0] - self.vocab.discrete.start, 0, self.act.dim - 1)
            return np.eye(self.act.dim, dtype=np.float32)[index]
        return self.continuous_values(tokens, encoded=False).astype(np.float32)
