"""The Gato policy a robot runs: one multi-task transformer, acting as one task's body, prompted with a
demonstration of that task, all from a policy blob.

A blob is exported for one task (its observation and action spaces, as every blob is: the robot checks they
are its own) and holds the whole model (`net.*`) plus the prompt, a successful episode of the task
(`prompt.<observation key>`, `prompt.action`). Each control step the window is the prompt's last steps
(up to `prompt_tokens`), then as many of this episode's latest steps as fit, then the new observation and
the separator; the action's tokens are decoded one by one (a KV cache: one slot per extra token), each
restricted to the ids an action of this body may take, and the step joins the episode's history.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from core.agents.blob import PolicyBlob, blob_meta
from core.agents.blob import check_declared_network as check_blob_network
from core.agents.gato.model import GatoNet, Packed, Segment, pack
from core.agents.gato.tokens import Body
from core.agents.spaces import ActSpace, ObsSpace
from core.config.gato import GatoConfig
from core.layout import ACTION_KEY, StepLayout

ALGORITHM = "gato"  # its name in the registry, the config and a policy blob
MAX_PARAMS = 300_000_000  # far above the benchmark's sizes (the paper's 1.18B Gato would not act at 10 Hz on a CPU)
MAX_PROMPT_STEPS = 10_000
PROMPT = "prompt."  # prefix of the prompt's tensors in a blob
NET = "net."


class Policy:
    """`reset()`, then `act(obs)` once per control step (`core.agents.interface.Policy`)."""

    cost_settings = "gato.context, gato.layers and gato.width"  # what lowers act()'s time (robot's check)

    def __init__(self, cfg: GatoConfig, space: ObsSpace, act: ActSpace, net: GatoNet, device: torch.device,
                 version: int = 0, prompt: Mapping[str, np.ndarray] | None = None) -> None:
        self.cfg, self.space, self.act_space = cfg, StepLayout.of(space), act
        self.body = Body.of(self.space, act, cfg)
        self.net, self.device, self.version = net, device, version
        self.generator = torch.Generator(device=device).manual_seed(0)
        self.prompt = prompt_segment(self.body, prompt, cfg.prompt_tokens)
        prompt_len = 0 if self.prompt is None else self.prompt[1].size
        self.max_history = (cfg.context - prompt_len - self.body.step_len) // self.body.step_len
        if self.max_history < 0:
            raise ValueError(f"gato.context ({cfg.context}) holds no step of {self.body.step_len} tokens after "
                             f"the prompt's {prompt_len}")
        self.history: list[list[tuple[np.ndarray, np.ndarray]]] = []  # per row: (tokens (S,), patches) per step
        self.last_action: np.ndarray | None = None

    @classmethod
    def from_blob(cls, blob: PolicyBlob, device: str | torch.device = "cpu") -> Policy:
        """The policy a `core.agents.read_policy` blob describes; ValueError, before anything is allocated, if
        it is another algorithm's or its tensors are not the network and prompt its config declares."""
        if blob.algorithm != ALGORITHM:
            raise ValueError(f"a policy blob of algorithm {blob.algorithm!r}, not {ALGORITHM!r}")
        body = Body.of(blob.space, blob.act_space, blob.config)
        check_declared_network(blob.config, body, blob.tensors)
        net = GatoNet(blob.config)
        net.load_state_dict({k[len(NET):]: v for k, v in blob.tensors.items() if k.startswith(NET)})
        net.to(device).eval()
        prompt = {k[len(PROMPT):]: v.numpy() for k, v in blob.tensors.items() if k.startswith(PROMPT)}
        return cls(blob.config, blob.space, blob.act_space, net, torch.device(device), blob.version, prompt or None)

    @staticmethod
    def read_config(config: Any, space: ObsSpace, act: ActSpace) -> GatoConfig:
        """The gato config a blob declares, validated, and its observation space tokenisable (ValueError naming
        the field or entry)."""
        cfg = GatoConfig.model_validate(config)
        Body.of(space, act, cfg)
        return cfg

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.body.inputs

    # --- acting
    def reset(self, batch: int = 1) -> None:
        self.history = [[] for _ in range(batch)]

    def prepare(self) -> None:
        """Nothing to do between steps: the window is rebuilt when the observation arrives."""

    @torch.inference_mode()
    def act(self, obs: Mapping[str, Any], mode: str = "sample", noise: float = 0.0, batched: bool = False) -> Any:
        """One control step. mode: sample (each action token drawn from the model's distribution over the ids
        this body's action may take) or mode (the most likely); noise: Gaussian noise on a continuous action."""
        if mode not in ("sample", "mode"):
            raise ValueError(f"mode must be 'sample' or 'mode', not {mode!r}")
        if not batched:
            obs = {k: np.asarray(v)[None] for k, v in obs.items()}
        first = np.asarray(obs["is_first"], bool).reshape(-1)
        if len(self.history) != len(first):
            self.reset(len(first))
        obs_tokens, obs_patches = self.body.tokenise({k: obs[k] for k in self.body.inputs})
        tokens = np.zeros((len(first), self.body.act_len), np.int64)
        for row in range(len(first)):
            if first[row]:
                self.history[row] = []
            tokens[row] = self._decode(row, obs_tokens[row], obs_patches[row], mode)
            step = np.concatenate([obs_tokens[row], tokens[row]])
            self.history[row] = [*self.history[row], (step, obs_patches[row])][-self.max_history:] \
                if self.max_history else []
        action = self.body.action_of(tokens)
        if noise > 0 and not self.act_space.discrete:
            jitter = torch.randn(action.shape, generator=self.generator, device=self.device).cpu().numpy()
            action = np.clip(action + noise * jitter, -1.0, 1.0).astype(np.float32)
        self.last_action = action
        env = action.argmax(-1).astype(np.int64) if self.act_space.discrete else action
        return env if batched else env[0]

    def _decode(self, row: int, obs_tokens: np.ndarray, obs_patches: np.ndarray, mode: str) -> np.ndarray:
        """The action tokens after this row's window and the new observation: one pass over the window, then
        one slot per further action token through the KV cache."""
        segments: list[Segment] = [] if self.prompt is None else [self.prompt]
        if self.history[row]:
            steps, patches = zip(*self.history[row], strict=True)
            segments.append((self.body, np.stack(steps), np.stack(patches)))
        segments.append((self.body, obs_tokens[None], obs_patches[None]))
        batch = pack([segments], self.device)
        logits, cache = self.net(batch)
        start, allowed = batch.tokens.shape[1], self.body.action_range()
        out = []
        for j in range(self.body.act_len):
            choice = self._choose(logits[0, -1, allowed.start:allowed.stop], mode) + allowed.start
            out.append(choice)
            if j + 1 < self.body.act_len:
                logits, cache = self.net(self._one_slot(choice, self.body.obs_len + 1 + j), cache, start)
                start += 1
        return np.asarray(out, np.int64)

    def _choose(self, logits: Tensor, mode: str) -> int:
        if mode == "mode":
            return int(logits.argmax())
        return int(torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=self.generator))

    def _one_slot(self, token: int, local: int) -> Packed:
        d, p = self.device, self.body.patch
        one = torch.tensor([[token]], device=d)
        return Packed(one, torch.tensor([[local]], device=d), torch.zeros((1, 1), dtype=torch.bool, device=d),
                      torch.zeros((0, p, p, 3), dtype=torch.uint8, device=d), torch.zeros((0, 2), dtype=torch.int64,
                                                                                          device=d),
                      torch.ones((1, 1), dtype=torch.bool, device=d), torch.tensor([1], device=d))

    def context(self) -> dict[str, np.ndarray]:
        """No replay context: the history is tokens, rebuilt from replay by whoever needs it."""
        return {}

    def take_state(self, previous: object) -> None:
        """Carry on this episode's history from the Gato policy this one replaces (the same body)."""
        if isinstance(previous, Policy) and previous.body == self.body:
            self.history = [h[-self.max_history:] if self.max_history else [] for h in previous.history]


# --- the prompt
def prompt_segment(body: Body, prompt: Mapping[str, np.ndarray] | None, budget: int) -> Segment | None:
    """The prompt episode's last steps that fit in `budget` tokens, tokenised; None without a prompt."""
    if not prompt or budget < body.step_len:
        return None
    steps = budget // body.step_len
    obs = {k: np.asarray(prompt[k])[-steps:] for k in body.inputs}
    tokens, patches = body.tokenise(obs, np.asarray(prompt[ACTION_KEY], np.float32)[-steps:])
    return body, tokens, patches


# --- the weights blob
def check_declared_network(cfg: GatoConfig, body: Body, tensors: Mapping[str, Tensor]) -> None:
    """Build the declared network on the meta device and check its size, that the blob's `net.*` tensors are
    exactly its tensors and that the prompt (if any) is whole steps of this body (ValueError naming what)."""
    prompt_shapes = {PROMPT + e.key: e.shape for e in body.entries} | {PROMPT + ACTION_KEY: (body.act.dim,)}
    check_blob_network(lambda: GatoNet(cfg), tensors, name="gato", max_params=MAX_PARAMS, prefix=NET,
                       also=prompt_shapes, declared=f"layers {cfg.layers}, width {cfg.width}, context {cfg.context}")
    present = [k for k in prompt_shapes if k in tensors]
    if not present:
        return
    if len(present) != len(prompt_shapes):
        raise ValueError(f"the blob's prompt lacks {sorted(set(prompt_shapes) - set(present))[:3]}")
    steps = tensors[PROMPT + ACTION_KEY].shape[0] if tensors[PROMPT + ACTION_KEY].ndim else 0
    if not 1 <= steps <= MAX_PROMPT_STEPS:
        raise ValueError(f"the blob's prompt has {steps} steps; 1 to {MAX_PROMPT_STEPS} may be given")
    for key, shape in prompt_shapes.items():
        if tuple(tensors[key].shape) != (steps, *shape):
            raise ValueError(f"prompt tensor {key} is {list(tensors[key].shape)}, expected {[steps, *shape]}")


def policy_weights(net: GatoNet, cfg: GatoConfig, space: ObsSpace, act: ActSpace, version: int,
                   prompt: Mapping[str, np.ndarray] | None = None) -> tuple[dict[str, Tensor], dict]:
    """Tensors and metadata of the policy blob of one task: the whole network and the task's prompt episode
    (its observation entries and model-form actions, (T, ...) each)."""
    body = Body.of(space, act, cfg)
    tensors = {NET + k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    if prompt:
        for key in (*body.inputs, ACTION_KEY):
            value = np.ascontiguousarray(prompt[key])
            tensors[PROMPT + key] = torch.from_numpy(value.astype(np.float32) if key == ACTION_KEY else value)
    layout = StepLayout.of(space)
    return tensors, blob_meta(ALGORITHM, cfg.model_dump(mode="json"), layout.without(ACTION_KEY), act, version)
