"""The policy a robot runs: encoder + recurrent state + actor, built from a weights blob alone.

It imports no optimiser, replay or loss code, so it stays light on a robot's CPU. The blob
(`core.agents.blob`) holds the Dreamer config, the observation and action spaces and the weights
version, so nothing else is needed to rebuild the network; this module writes and bounds its Dreamer part.
The trainer acts through the same class, sharing its live modules (`Policy.from_model`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from core.agents.blob import PolicyBlob, blob_meta, declared_bounds_problem, from_file
from core.agents.blob import check_declared_network as check_blob_network
from core.agents.dreamer.act_path import LeanPath
from core.agents.dreamer.actor import Actor
from core.agents.dreamer.codec import Encoder
from core.agents.dreamer.preprocess import ObsKeys, preprocess
from core.agents.dreamer.transformer import make_dynamics
from core.agents.spaces import ActSpace, ObsSpace
from core.config.agent import DreamerConfig
from core.layout import StepLayout
from core.weights import weights_to_bytes

ALGORITHM = "dreamer"  # its name in the registry, the config and a policy blob
PREFIXES = {"encoder": "wm.encoder.", "rssm": "wm.rssm.", "actor": "behavior.actor."}
CONTEXT_KEYS = ("deter", "stoch", "action")  # the recurrent state replay keeps as a sequence's start state

# What a policy blob may declare. The network is built from the blob's own description (its dreamer config and
# spaces), so that description is bounded, and must describe exactly the blob's tensors, before anything is
# allocated: a small blob declaring a huge network would otherwise cost a robot seconds and gigabytes first. The
# bounds sit far above the largest preset: size200m acts with ~115M parameters from a 64x64 image and 24 joint
# readings. The spaces' bounds are every algorithm's (`core.agents.blob`).
MAX_PARAMS = 500_000_000
MAX_WIDTH = 1 << 16  # dreamer.deter, hidden, units, stoch, classes, cnn_depth
MAX_LAYERS = 16  # dreamer.mlp_layers, ac_layers, head_layers; entries of cnn_mults
MAX_MULT = 64  # each entry of dreamer.cnn_mults
MAX_BLOCKS = 256  # dreamer.gru_blocks
MAX_PATTERN = 256  # characters of dreamer.image_keys / vector_keys (regexes, matched against observation keys)


class Prepared(NamedTuple):
    """A step's deter and the deter halves of the posterior's and the actor's first layers."""

    deter: Tensor
    post: Tensor
    actor: Tensor
    memory: dict[str, Tensor] | None = None  # what else the next state carries (a transformer's KV cache)


class PolicyNet(nn.Module):
    """Only the modules acting needs, named as in the trainer's model."""

    def __init__(self, cfg: DreamerConfig, space: ObsSpace, act: ActSpace) -> None:
        super().__init__()
        self.keys = ObsKeys.select(space, cfg.image_keys, cfg.vector_keys)
        self.encoder = Encoder(cfg, space, self.keys)
        self.rssm = make_dynamics(cfg, act.dim, self.encoder.out_dim)
        self.actor = Actor(cfg, self.rssm.deter + self.rssm.stoch_dim, act)


class Policy:
    """`reset()`, then `act(obs)` once per control step; keeps its own recurrent state.

    `obs` is one observation (no batch axis) with `is_first`, or a batch when `batched=True`.
    Returns the environment action: an int (discrete) or float32 in [-1, 1] (continuous).
    `last_action` holds the same action as the model sees it (one-hot when discrete).
    `prepare()`, called between control steps, takes what needs no observation off the next act()'s path.
    """

    def __init__(self, cfg: DreamerConfig, space: ObsSpace, act: ActSpace, net: nn.Module,
                 device: torch.device, version: int = 0) -> None:
        self.cfg, self.space, self.act_space = cfg, StepLayout.of(space), act
        self.keys = ObsKeys.select(space, cfg.image_keys, cfg.vector_keys)
        self.encoder, self.rssm, self.actor = net.encoder, net.rssm, net.actor
        self.device, self.version = device, version
        self.generator = np.random.default_rng(0)
        self.state: dict[str, Tensor] | None = None
        self.last_action: np.ndarray | None = None
        self._prepared: Prepared | None = None  # the next step's deter and its layer parts, from prepare()
        # Whether act() runs the lean path (`act_path`: the same arithmetic in fewer kernels, with prepacked
        # copies of the weights): set for a policy built from a blob on CPU with categorical latents, whose
        # weights are a snapshot. The trainer's live policy, CUDA and other dynamics act through the modules.
        self.lean: bool = False
        self._lean: LeanPath | None = None

    # --- construction
    @classmethod
    def from_model(cls, model: nn.Module) -> Policy:
        """The trainer's policy: shares the live modules of a `DreamerModel`."""
        view = nn.Module()
        view.encoder, view.rssm, view.actor = model.wm.encoder, model.wm.rssm, model.behavior.actor
        device = next(model.parameters()).device
        return cls._for(model.cfg)(model.cfg, model.space, model.act_space, view, device)

    @classmethod
    def from_weights(cls, blob: bytes, device: str | torch.device = "cpu") -> Policy:
        from core.agents import read_policy

        return cls.from_blob(read_policy(blob), device)

    @classmethod
    def from_blob(cls, blob: PolicyBlob, device: str | torch.device = "cpu") -> Policy:
        """Build the policy a `core.agents.read_policy` blob describes; ValueError, before anything is allocated,
        if it is another algorithm's, or the network it declares is not the one its tensors fill."""
        if blob.algorithm != ALGORITHM:
            raise ValueError(f"a policy blob of algorithm {blob.algorithm!r}, not {ALGORITHM!r}")
        tensors, cfg, space, act = blob.tensors, blob.config, blob.space, blob.act_space
        check_declared_network(cfg, space, act, tensors)
        net = PolicyNet(cfg, space, act)
        net.load_state_dict(tensors)
        net.to(device).eval()
        # Images arrive as NHWC memory; channels-last conv weights avoid layout reorders per call.
        net.encoder.to(memory_format=torch.channels_last)
        policy = cls._for(cfg)(cfg, space, act, net, torch.device(device), blob.version)
        policy.lean = LeanPath.supports(net.encoder, net.rssm, policy.device) is None
        return policy

    @classmethod
    def _for(cls, cfg: DreamerConfig) -> type[Policy]:
        """The class that acts for `cfg`: a transformer world model's policy carries its KV cache."""
        if cfg.dynamics == "transformer" and cls is Policy:
            from core.agents.dreamer.transformer_policy import TransformerPolicy

            return TransformerPolicy
        return cls

    @classmethod
    def from_file(cls, path: str | Path, device: str | torch.device = "cpu") -> Policy:
        """A policy file (a run's policy.safetensors); whatever is wrong with it is a CheckpointError naming it."""
        return from_file(path, lambda blob: cls.from_weights(blob, device))

    @staticmethod
    def read_config(config: Any, space: ObsSpace, act: ActSpace) -> DreamerConfig:
        """The dreamer config a blob declares, validated and within the bounds above (ValueError naming the field).
        Cheap: it looks at the numbers only (the regexes are not run, nothing is built)."""
        cfg = DreamerConfig.model_validate(config)
        if why := declared_problem(cfg, space, act):
            raise ValueError(why)
        return cfg

    @property
    def inputs(self) -> tuple[str, ...]:
        return (*self.keys.images, *self.keys.vectors)

    # --- acting
    def reset(self, batch: int = 1) -> None:
        self.state = self.rssm.initial(batch, self.device)
        self.state["action"] = torch.zeros(batch, self.act_space.dim, device=self.device)
        self._prepared = None

    @torch.inference_mode()
    def prepare(self) -> None:
        """Run what the next act() needs before its observation now, while the robot waits for its
        next tick: the GRU step (it needs only the state and the action just taken) and the deter
        halves of the posterior's and the actor's first layers.

        act() is left with the encoder, the observation half of the posterior and the actor: the
        latency that counts, from observation to command. The actions are the same as without it
        (tested). Call it only between act() calls of the same weights; a step that starts an
        episode recomputes anyway.
        """
        if self.state is not None and self._prepared is None:
            self._prepared = self._advance()

    def _advance(self) -> Prepared:
        """The next step's deter and parts, from the state and the action just taken."""
        return self._parts(self.rssm.advance(self.state, self.state["action"]))

    def _observed(self, is_first: Tensor) -> Prepared:
        """This step's deter and parts, where rows that start an episode reset the state first."""
        return self._parts(self.rssm.observed_deter(self.state, self.state["action"], is_first))

    def _parts(self, deter: Tensor) -> Prepared:
        return Prepared(deter, self.rssm.post_deter_part(deter), self.actor.deter_part(deter))

    @torch.inference_mode()
    def act(self, obs: Mapping[str, Any], mode: str = "sample", noise: float | None = None,
            batched: bool = False) -> Any:
        """One control step. mode: sample (training) or mode (evaluation); noise: exploration, by default
        `dreamer.act_noise` when sampling (v1: 0.3) and none in mode 'mode'."""
        if mode not in ("sample", "mode"):
            raise ValueError(f"mode must be 'sample' or 'mode', not {mode!r}")
        if noise is None:
            noise = self.cfg.act_noise if mode == "sample" else 0.0
        if not batched:
            obs = {k: np.asarray(v)[None] for k, v in obs.items()}
        batch = len(np.asarray(obs["is_first"]))
        if self.state is None or self.state["deter"].shape[0] != batch:
            self.reset(batch)
        lean = self._lean_path(batch)
        if lean is None:
            data = preprocess(obs, self.keys, self.device)
            embed = self.encoder({k: v[:, None] for k, v in data.items()})[:, 0]
        firsts = np.asarray(obs["is_first"]).reshape(batch)
        prepared, self._prepared = self._prepared, None
        if prepared is None or firsts.any():  # an episode start resets the state first
            prepared = self._observed(torch.as_tensor(firsts, dtype=torch.float32, device=self.device))
        if lean is None:
            stoch = self.rssm.post_from_parts(prepared.deter, prepared.post, self.rssm.post_embed_part(embed))["stoch"]
            dist = self.actor.from_part(prepared.actor, stoch.flatten(1))
        else:  # the same arithmetic in fewer kernels
            stoch, index = lean.stoch(obs, prepared.post)
            dist = lean.action_dist(prepared.actor, index)
        action = dist.rsample() if mode == "sample" else dist.mode()
        action = self._explore(action.float(), noise)
        self.state = {"deter": prepared.deter, "stoch": stoch, "action": action, **(prepared.memory or {})}
        self.last_action = action.cpu().numpy()
        env = self._to_env(self.last_action)
        return env if batched else env[0]

    def _lean_path(self, batch: int) -> LeanPath | None:
        """The lean path for `batch` rows, built on first use (it prepacks weights for that input shape)."""
        if not self.lean:
            return None
        if self._lean is None or self._lean.batch != batch:
            try:
                self._lean = LeanPath(self.encoder, self.rssm, self.actor, self.space, batch)
            except TypeError:  # a layer the lean path has no form for: the modules act, as they always could
                self.lean, self._lean = False, None
        return self._lean

    def _explore(self, action: Tensor, noise: float) -> Tensor:
        if noise <= 0:
            return action if self.act_space.discrete else action.clamp(-1.0, 1.0)
        if self.act_space.discrete:
            swap = torch.as_tensor(self.generator.random(action.shape[0]) < noise, device=action.device)
            rand = torch.as_tensor(self.generator.integers(self.act_space.dim, size=action.shape[0]))
            onehot = torch.nn.functional.one_hot(rand, self.act_space.dim).float().to(action.device)
            return torch.where(swap[:, None], onehot, action)
        jitter = torch.as_tensor(self.generator.normal(0.0, noise, action.shape), dtype=torch.float32)
        return (action + jitter.to(action.device)).clamp(-1.0, 1.0)

    def _to_env(self, action: np.ndarray) -> np.ndarray:
        if self.act_space.discrete:
            return action.argmax(-1).astype(np.int64)
        return action.astype(np.float32)

    def context(self) -> dict[str, np.ndarray]:
        """The posterior latents act() just computed and the action taken (batch first), as replay stores them."""
        assert self.state is not None, "context() after act()"
        return {key: self.state[key].detach().float().cpu().numpy() for key in CONTEXT_KEYS}

    def take_state(self, previous: object) -> None:
        """Carry on the recurrent state of the Dreamer policy this one replaces (same architecture)."""
        if isinstance(previous, Policy) and previous.state is not None:
            self.state = previous.state


# --- the weights blob
def declared_problem(cfg: DreamerConfig, space: Mapping[str, Any], act: ActSpace) -> str | None:
    """Why the network a blob declares is over the bounds (naming the dreamer field), else None. Cheap: it looks
    at the numbers only (the regexes are not run, nothing is built)."""
    limits = {"deter": MAX_WIDTH, "hidden": MAX_WIDTH, "units": MAX_WIDTH, "stoch": MAX_WIDTH,
              "classes": MAX_WIDTH, "cnn_depth": MAX_WIDTH, "mlp_layers": MAX_LAYERS, "ac_layers": MAX_LAYERS,
              "head_layers": MAX_LAYERS, "gru_blocks": MAX_BLOCKS}
    if problem := declared_bounds_problem(cfg, "dreamer", limits, MAX_LAYERS, MAX_MULT, MAX_PATTERN):
        return problem
    if cfg.stoch * cfg.classes > MAX_WIDTH:
        return f"dreamer.stoch x dreamer.classes: {cfg.stoch * cfg.classes} latent units (at most {MAX_WIDTH})"
    return None


def check_declared_network(cfg: DreamerConfig, space: ObsSpace, act: ActSpace, tensors: Mapping[str, Tensor]) -> None:
    """The shared blob check (`core.agents.blob.check_declared_network`) on the network a dreamer config declares."""
    check_blob_network(lambda: PolicyNet(cfg, space, act), tensors, name="dreamer", max_params=MAX_PARAMS,
                                declared=f"size {cfg.size}, deter {cfg.deter}, units {cfg.units}, hidden {cfg.hidden}")


def export_policy(model: nn.Module, version: int) -> bytes:
    """The acting subset of a trainer's `DreamerModel` as a self-describing weights blob."""
    return weights_to_bytes(*policy_weights(model, version))


def policy_weights(model: nn.Module, version: int) -> tuple[dict[str, Tensor], dict]:
    """Tensors and metadata of the policy blob (`core.weights.save_weights` writes them to a file)."""
    state = model.state_dict()
    tensors = {}
    for short, prefix in PREFIXES.items():
        for key, value in state.items():
            if key.startswith(prefix):
                tensors[short + "." + key[len(prefix):]] = value.detach().float().cpu().contiguous()
    return tensors, blob_meta(ALGORITHM, model.cfg.model_dump(mode="json"), model.space, model.act_space, version)
