"""Moved to core.config.agent: an alias until every import is rewritten (issue 22)."""
import sys

from core.config import agent as _moved

sys.modules[__name__] = _moved
