"""The Dreamer policy over a transformer world model (`dreamer.dynamics: transformer`): its state carries the
transformer's KV cache, so that each control step runs the transformer on one new token."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from core.agents.dreamer.policy import Policy, Prepared


class TransformerPolicy(Policy):
    """The Dreamer policy over a transformer world model: its state carries the KV cache (the last
    `context` - 1 steps), so each step runs the transformer on one token."""

    def _advance(self) -> Prepared:
        assert self.state is not None
        deter, memory = self.rssm.act_step(self.state, self.state["action"])
        return self._parts(deter)._replace(memory=memory)

    def _observed(self, is_first: Tensor) -> Prepared:
        assert self.state is not None
        deter, memory = self.rssm.act_step(self.state, self.state["action"], is_first)
        return self._parts(deter)._replace(memory=memory)

    def cache_bytes(self) -> int:
        """The KV cache's size now (bytes)."""
        return 0 if self.state is None else int(np.prod(self.state["kv"].shape)) * self.state["kv"].element_size()
