"""CMA-ES for C, through the `cma` package, as a maximiser whose whole state is checkpointable without pickle.

`cma` minimises, so `tell` passes it the negated fitness (the reference wrapper does the same; its extra
weight-decay term, whose sign rewards large weights, is left out). Its samples come from our own numpy
Generator (the `randn` option), whose state is plain JSON, instead of numpy's global one.

Checkpointing: `cma.CMAEvolutionStrategy` holds its state in plain attributes (mean, step size, covariance
and its eigendecomposition, evolution paths, counters, fitness history) of itself and of a few helper
objects (sampler, step-size adaptation, best solution, ...). `state()` walks those attributes and keeps the
arrays, numbers, strings and lists of them: what `core.tensor_tree` stores as safetensors + JSON; an array
that two attributes share (the strategy's covariance is its sampler's) is kept as one, or the resumed
search would update one copy and read the other. `from_state()` builds a fresh strategy with the same
options and writes the values back. What is skipped is either
derived from the options (parameters, constants, the genotype map) or not state (logger, timers, the
archive of sent solutions, emptied by each `tell`). The test suite checks that a resumed search asks for
exactly the solutions an uninterrupted one does.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import cma
import numpy as np
from cma.utilities import utils

# Attributes that are options, derived from them, or bookkeeping that is not search state.
SKIP = frozenset({
    "opts", "inopts", "inputargs", "logger", "timer", "const", "sp", "sp0", "gp", "boundary_handler",
    "integer_centering", "_round_integer_variables", "callbackstop", "_stopdict", "archive", "sent_solutions",
    "_injected_solutions_archive", "more_to_write", "randn", "eigenmethod", "_es_opts", "_parameters",
})
MAX_DEPTH = 3
OBJECT = "__object__"  # marks a helper object's own attribute tree
ALIAS = "__alias__"  # marks an array that is another attribute's very array
FORTRAN = "__fortran__"  # marks an array kept in column-major order (stored transposed)
_MISSING = object()


class Evolution:
    """Maximise a fitness over `dim` parameters: `ask()` a population, `tell(fitness)` its scores."""

    def __init__(self, dim: int, sigma0: float, population: int, seed: int, x0: np.ndarray | None = None) -> None:
        self.dim, self.sigma0, self.population, self.seed = dim, sigma0, population, seed
        self.rng = np.random.default_rng(seed)
        start = np.zeros(dim) if x0 is None else np.asarray(x0, np.float64)
        opts = {"popsize": population, "seed": seed, "randn": self._randn, "verbose": -9, "verb_log": 0,
                "verb_disp": 0, "tolfun": 0, "tolx": 0, "tolflatfitness": 10**9, "maxiter": np.inf}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "seed will never be used": we sample from self.rng instead
            self.es = cma.CMAEvolutionStrategy(start, sigma0, opts)
        self.solutions: np.ndarray | None = None  # the population asked and not yet told

    def _randn(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)

    @property
    def generation(self) -> int:
        return int(self.es.countiter)

    @property
    def mean(self) -> np.ndarray:
        """The search distribution's mean: the controller to act with."""
        return np.asarray(self.es.mean, np.float64).copy()

    @property
    def sigma(self) -> float:
        return float(self.es.sigma)

    def ask(self) -> np.ndarray:
        """The next population, (population, dim)."""
        self.solutions = np.asarray(self.es.ask(), np.float64)
        return self.solutions

    def tell(self, fitness: np.ndarray) -> None:
        """Scores (higher is better) of the population `ask` returned, in its order."""
        fitness = np.asarray(fitness, np.float64)
        if self.solutions is None:
            raise RuntimeError("tell() before ask()")
        if fitness.shape != (len(self.solutions),):
            raise ValueError(f"fitness of shape {fitness.shape} for a population of {len(self.solutions)}")
        if not np.isfinite(fitness).all():
            raise ValueError(f"non-finite fitness for candidates {np.flatnonzero(~np.isfinite(fitness))[:5].tolist()}")
        self.es.tell(list(self.solutions), list(-fitness))  # cma minimises
        self.solutions = None

    # --- checkpoint state: plain arrays and JSON values, no pickle
    def state(self) -> dict[str, Any]:
        if self.solutions is not None:
            raise RuntimeError("state() between ask() and tell(): checkpoint between generations")
        return {"dim": self.dim, "sigma0": self.sigma0, "population": self.population, "seed": self.seed,
                "rng": self.rng.bit_generator.state, "es": _tree(self.es, 0, {})}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Evolution:
        """The strategy `state()` saved, resumed where it stopped."""
        evo = cls(int(state["dim"]), float(state["sigma0"]), int(state["population"]), int(state["seed"]))
        evo.rng.bit_generator.state = dict(state["rng"])
        _restore(evo.es, state["es"], {})
        if not hasattr(evo.es, "timer"):  # made by the first ask(), which a resumed strategy has had
            evo.es.timer = utils.ElapsedWCTime()
        return evo


def _tree(obj: Any, depth: int, seen: dict[int, str], path: str = "") -> dict[str, Any]:
    out = {}
    for key, value in vars(obj).items():
        if key not in SKIP and (encoded := _value(value, depth, seen, f"{path}.{key}")) is not _MISSING:
            out[key] = encoded
    return out


def _value(value: Any, depth: int, seen: dict[int, str], path: str) -> Any:
    if value is None or isinstance(value, bool | int | float | str | np.generic):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            return _MISSING
        if id(value) in seen:  # one array under two names (the strategy's C is its sampler's): keep it one
            return {ALIAS: seen[id(value)]}
        seen[id(value)] = path
        if value.ndim > 1 and value.flags.f_contiguous and not value.flags.c_contiguous:
            return {FORTRAN: value.T.copy()}  # eigh's B: the memory order picks BLAS's kernel, and its rounding
        return value.copy()
    if isinstance(value, list | tuple):
        items = [_value(v, depth, seen, f"{path}.{i}") for i, v in enumerate(value)]
        return _MISSING if any(v is _MISSING for v in items) else items
    if type(value) is dict and all(isinstance(k, str) for k in value):
        items = {k: _value(v, depth, seen, f"{path}.{k}") for k, v in value.items()}
        return _MISSING if any(v is _MISSING for v in items.values()) else items
    if hasattr(value, "__dict__") and type(value).__module__.startswith("cma") and depth < MAX_DEPTH:
        return {OBJECT: _tree(value, depth + 1, seen, path)}
    return _MISSING


def _restore(obj: Any, tree: Mapping[str, Any], arrays: dict[str, np.ndarray], path: str = "") -> None:
    for key, node in tree.items():
        current, here = getattr(obj, key, None), f"{path}.{key}"
        if isinstance(node, Mapping) and OBJECT in node:
            _restore(current, node[OBJECT], arrays, here)
        elif isinstance(node, Mapping) and ALIAS in node:
            setattr(obj, key, arrays[node[ALIAS]])
        elif isinstance(node, Mapping) and FORTRAN in node:
            arrays[here] = np.asarray(node[FORTRAN]).copy().T
            setattr(obj, key, arrays[here])
        elif isinstance(node, np.ndarray):
            arrays[here] = node.copy()
            setattr(obj, key, arrays[here])
        elif isinstance(current, tuple) and isinstance(node, list):
            setattr(obj, key, tuple(node))
        else:
            setattr(obj, key, node)
