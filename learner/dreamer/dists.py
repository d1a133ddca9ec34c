"""Moved to core.agents.dreamer.dists: an alias until every import is rewritten (issue 22)."""
import sys

from core.agents.dreamer import dists as _moved

sys.modules[__name__] = _moved
