"""The registry's trainer entry for `agent: gato`: Gato learns offline, from recorded expert episodes of
several tasks, not from one environment's online experience, so `train` and `serve` refuse it and say what
to run instead (`reverie-learner gato`). Its policies are ordinary policy blobs (`core.agents.gato`)."""

from __future__ import annotations

from typing import Any, NoReturn

from core.config import ConfigError

REFUSAL = ("agent: gato learns from recorded expert episodes of several tasks, not online: record them with "
           "`reverie-learner gato data`, train with `reverie-learner gato train`, and run a task's policy blob "
           "(RUN/policies/TASK.safetensors) with `reverie-robot run --set link.initial_weights=...`")


class Gato:
    """Refuses to be built by `train` or `serve` (a ConfigError naming the commands to use instead)."""

    @classmethod
    def from_config(cls, *_: Any) -> NoReturn:
        raise ConfigError([REFUSAL], "agent")

    @classmethod
    def parameter_count(cls, *_: Any) -> NoReturn:
        raise ConfigError([REFUSAL], "agent")
