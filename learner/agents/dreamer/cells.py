"""The recurrent steps of an update as functions of plain tensors, run eagerly or torch.compile'd.

An update runs 64 observed and 15 imagined steps one after the other, each a few hundred small
kernels forward and backward: on a CPU at the small sizes that is mostly per-kernel overhead.
Compiling one step (`dreamer.compile: cell`) fuses its elementwise work and is traced once, then
reused by every step; compiling the whole unrolled update (`full`) took 634 s for size1m on a
2-core CPU. The random numbers a step samples with are drawn outside it, in the eager order, so
the compiled update samples exactly what the eager one does from the same generator state.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from torch._dynamo.exc import FailOnRecompileLimitHit

from core.agents.dreamer.actor import Actor
from core.agents.dreamer.rssm import RSSM, State
from core.config.agent import DreamerConfig

log = logging.getLogger(__name__)

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def compile_cache_dir() -> Path:
    """Where inductor keeps compiled kernels and graphs between runs (FX graph and AOTAutograd
    caches): $TORCHINDUCTOR_CACHE_DIR if set, else ~/.cache/reverie/inductor, so that a second run
    starts in seconds instead of recompiling (torch's default is a per-user folder in /tmp)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get(CACHE_ENV)
    if not chosen or chosen == default_cache_dir():  # unset, or torch's own default filled in on import
        chosen = str(Path.home() / ".cache" / "reverie" / "inductor")
    os.environ[CACHE_ENV] = chosen
    return Path(chosen)


class CompiledStep:
    """torch.compile for one recurrent step: static shapes, one graph (a break would be a bug).

    Each step compiled here keeps its own cache of compiled variants (`isolate_recompiles`): dynamo
    caches per code object, which every agent's and explorer's cell shares, and allows 8 variants (default
    `torch._dynamo.config.recompile_limit`) to all of them together; a step takes two (the first
    step's inputs differ from the later ones') per shape, so a process holding agents of several
    shapes (A/B benchmarks, tests, adapt) ran out and the next agent's step fell back to eager.

    If compiling fails (no working C++ toolchain, an inductor bug, the recompile limit hit all the
    same), the step says so once and runs eagerly: the same arithmetic, only slower. An error of
    the eager step itself still surfaces.
    """

    def __init__(self, fn: Callable) -> None:
        compile_cache_dir()
        self.fn = fn
        self._compiled = torch.compile(fn, fullgraph=True, dynamic=False, isolate_recompiles=True)
        self.eager = False  # set when compiling failed: the step then runs `fn` as it is

    def __call__(self, *args: Tensor) -> tuple[Tensor, ...]:
        if self.eager:
            return self.fn(*args)
        try:
            return self._compiled(*args)
        except Exception as exc:  # noqa: BLE001 - any compile failure: fall back to the eager step
            self.eager = True
            name = getattr(self.fn, "__name__", "step")
            if isinstance(exc, FailOnRecompileLimitHit):  # fullgraph makes the limit this error
                log.warning("dreamer.compile: %s needed more than torch._dynamo.config.recompile_limit (%s) "
                            "compiled variants; running it eagerly (slower)", name,
                            torch._dynamo.config.recompile_limit)
            else:
                log.warning("dreamer.compile: compiling %s failed (%s: %s); running it eagerly", name,
                            type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
            return self.fn(*args)


def compile_step(fn: Callable) -> CompiledStep:
    """`fn` compiled as one step (`CompiledStep`), falling back to eager with a warning."""
    return CompiledStep(fn)


class Cells:
    """The observe and imagination steps of one trainer, compiled when `compiled`.

    `dynamics`: the imagined actions keep their gradient (2023 recipe's dynamics backpropagation),
    else they are constants to the rollout (REINFORCE).
    """

    def __init__(self, rssm: RSSM, actor: Actor, dynamics: bool, compiled: bool) -> None:
        self.rssm, self.actor, self.dynamics = rssm, actor, dynamics
        self.post: Callable[..., tuple[Tensor, Tensor, Tensor]] = rssm.post_cell
        self.imag: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]] = self.imag_cell
        if compiled:
            self.post, self.imag = compile_step(self.post), compile_step(self.imag)

    def imag_cell(self, deter: Tensor, stoch: Tensor, act_noise: Tensor,
                  stoch_noise: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One imagined step: the actor's raw outputs in (deter, stoch), its sampled action, and the
        next prior state (deter, stoch).

        The actor sees sg(state), as in the reference implementations, so its outputs here are the
        very ones its loss needs: kept with their graph instead of a second actor pass.
        """
        state = {"deter": deter, "stoch": stoch}
        out = self.actor.params(self.rssm.feat(state).detach())
        action = self.actor.dist(out).rsample(noise=act_noise)
        # Backprop through the dynamics needs the sample's gradient; REINFORCE must not have it.
        if not self.dynamics:
            action = action.detach()
        nxt = self.rssm.img_step(state, action, stoch_noise)
        return out, action, nxt["deter"], nxt["stoch"]

    def imagine(self, start: State, horizon: int) -> tuple[State, Tensor, Tensor]:
        """Roll the prior forward under the actor: states s_0..s_H (H+1, N, ...), the actions taken
        in s_0..s_{H-1} (H, N, A) and the actor's raw outputs there (H, N, ...). No action is drawn
        in s_H: no loss uses one."""
        deter, stoch = start["deter"], start["stoch"]
        n, device = deter.shape[0], deter.device
        deters, stochs, actions, outs = [deter], [stoch], [], []
        for _ in range(horizon):
            # The eager order: the action's noise, then the prior sample's.
            act_noise = self.actor.noise(n, device)
            stoch_noise = self.rssm.sample_noise(stoch.shape, device)  # uniforms, or normals (Gaussian)
            out, action, deter, stoch = self.imag(deter, stoch, act_noise, stoch_noise)
            deters.append(deter)
            stochs.append(stoch)
            actions.append(action)
            outs.append(out)
        states = {"deter": torch.stack(deters), "stoch": torch.stack(stochs)}
        return states, torch.stack(actions), torch.stack(outs)


def compile_mode(cfg: DreamerConfig, device: torch.device) -> str:
    """`dreamer.compile` resolved for `device`: off, cell or full.

    auto is cell for a float32 update on CPU above the tiny test size when a C++ compiler is on the
    PATH (inductor needs one), else off: about a minute of compiling the first time (seconds from the
    cache after) against an update that then costs ~40 % less at size1m.
    """
    if cfg.compile != "auto":
        return cfg.compile
    cpu_float32 = device.type == "cpu" and cfg.precision != "bfloat16"
    has_cxx = any(shutil.which(c) for c in (os.environ.get("CXX") or "g++", "c++", "clang++"))
    return "cell" if cpu_float32 and cfg.size != "tiny" and has_cxx and sys.platform != "win32" else "off"
