"""Moved to learner.agents.dreamer.world_model: an alias until every import is rewritten (issue 22)."""
import sys

from learner.agents.dreamer import world_model as _moved

sys.modules[__name__] = _moved
