"""The trainers of the algorithms `core.agents.ALGORITHMS` lists, built by name from a run's config."""

from __future__ import annotations

from core.agents import Agent, algorithm, resolve
from core.agents.spaces import ActSpace, ObsSpace
from core.config import Config


def agent_class(name: str) -> type[Agent]:
    """The trainer class of algorithm `name` (ValueError naming the known ones)."""
    return resolve(algorithm(name).agent)


def make_agent(cfg: Config, space: ObsSpace, act: ActSpace) -> Agent:
    """The agent `cfg.agent` names, from its config block, for this step layout."""
    return agent_class(cfg.agent).from_config(cfg, space, act)
