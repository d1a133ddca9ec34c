"""Moved to core.agents.dreamer.rssm: an alias until every import is rewritten (issue 22)."""
import sys

from core.agents.dreamer import rssm as _moved

sys.modules[__name__] = _moved
