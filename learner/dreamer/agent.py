"""Moved to learner.agents.dreamer.agent: an alias until every import is rewritten (issue 22)."""
import sys

from learner.agents.dreamer import agent as _moved

sys.modules[__name__] = _moved
