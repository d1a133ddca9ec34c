"""The agent interface: a `Policy` that acts and an `Agent` that learns. `train`, `serve`, checkpoints,
policy export, evaluation and the robot name only these; `core.agents` says which algorithm implements them.

Dreamer is the first implementation; the interface is shaped for the ones that come next:
- a planner that acts by search (PlaNet): its `Policy.act` runs the search (CEM over the world model's
  imagined returns) and keeps the belief state inside, as Dreamer keeps its RSSM state; `prepare` can
  start the next search from the action just taken.
- an evolved controller (World Models): `Agent.train` fits the world model on the batch and steps CMA-ES
  on the controller; the CMA-ES state (mean, step size, covariance, generation) is one more entry of
  `state_dict`, so a resumed run continues the same search.
- a population of exploration policies (Plan2Explore, CASCADE): the agent exports one blob per member,
  each naming its algorithm and version, and robots act with whichever they are sent, so several policy
  versions are deployed at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from core.agents.spaces import ActSpace, ObsSpace

if TYPE_CHECKING:
    from torch import Tensor

    from core.config import Config

Metrics = Mapping[str, "float | Tensor"]  # tensors may be read lazily: reading one waits for the device
Weights = tuple[dict[str, "Tensor"], dict[str, Any]]  # a policy blob's tensors and metadata


class Policy(Protocol):
    """Acting, with its recurrent state kept inside: `reset()`, then `act(obs)` once per control step.

    Built from a policy blob alone on a robot (`core.agents.load_policy`), or by the trainer sharing its
    live weights (`Agent.policy`). Imports nothing of training, so it stays light on a robot's CPU.
    """

    space: ObsSpace  # the observation space it was built for
    act_space: ActSpace
    version: int  # the updates behind its weights; the robot stamps it on every step it records
    last_action: np.ndarray | None  # the action act() just took, as the model sees it (batch first)

    @property
    def inputs(self) -> tuple[str, ...]:
        """The observation keys it reads (a robot must have each, with the shape in `space`)."""
        ...

    def reset(self, batch: int = 1) -> None:
        """Start afresh: the recurrent state of `batch` new episodes."""
        ...

    def prepare(self) -> None:
        """Between control steps, do what the next act() can do before its observation arrives."""
        ...

    def act(self, obs: Mapping[str, Any], mode: str = "sample", noise: float = 0.0, batched: bool = False) -> Any:
        """One step: the environment's action (an int when discrete, else float32 in [-1, 1]). mode: sample
        (training) or mode (evaluation); noise: exploration; `batched`: `obs` has a leading batch axis."""
        ...

    def context(self) -> dict[str, np.ndarray]:
        """The recurrent state after the last act() (batch first): what replay stores with the step as the
        start state of a sequence beginning after it."""
        ...

    def take_state(self, previous: Policy) -> None:
        """Carry on the recurrent state of the policy this one replaces (newer weights of the same run)."""
        ...


class Agent(Protocol):
    """Learning: updates on replayed batches, the policy it acts with, the blob it exports, its checkpoint state.

    Built by `learner.agents.make_agent` from the config block that `Config.agent` names.
    """

    updates: int  # updates applied so far: the version of the policy it exports
    skipped: int  # updates refused for non-finite inputs, losses or gradients (this process)

    @classmethod
    def from_config(cls, cfg: Config, space: ObsSpace, act: ActSpace) -> Agent:
        """The agent for a run's config (it reads its own block) and step layout."""
        ...

    @classmethod
    def parameter_count(cls, cfg: Config, space: ObsSpace, act: ActSpace) -> int:
        """The trainable parameters an agent for this layout would have, counted without allocating them;
        raises what building it would (a layout it cannot be built for)."""
        ...

    @property
    def replay_context(self) -> bool:
        """Whether replay keeps its latents as context: written back after updates and stored by acting."""
        ...

    @property
    def image_keys(self) -> tuple[str, ...]:
        """The image observations it reads and predicts (evaluation videos and open-loop predictions)."""
        ...

    def train(self, batch: Mapping[str, Any]) -> tuple[Metrics, Mapping[str, Tensor] | None]:
        """One update on a replay batch (B, T, ...): metrics, and the latents (B, T, ...) to write back into
        replay as context (empty or None when there are none: a skipped update, or no replay context)."""
        ...

    def policy(self) -> Policy:
        """A policy acting with the live weights: it follows every update without an export."""
        ...

    def policy_weights(self) -> Weights:
        """The policy blob's tensors and metadata, naming its algorithm; version = `updates`."""
        ...

    def openloop(self, batch: Mapping[str, Any], context: int) -> tuple[np.ndarray, np.ndarray]:
        """(truth, prediction) uint8 (B, T, H, W, C) of the first image key: the model sees `context` steps
        and imagines the rest from the recorded actions."""
        ...

    def refuse_nonfinite(self, refused: str) -> bool:
        """True, with an error logged saying what is `refused`, when its weights hold NaN or inf: then no
        checkpoint, policy file or weights for robots may be written from them."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint state: 'updates' and one entry per checkpoint part (each a nested state)."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()` (entries it does not own are ignored)."""
        ...
