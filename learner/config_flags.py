"""Moved to core.config.flags: an alias until every import is rewritten (issue 22)."""
import sys

from core.config import flags as _moved

sys.modules[__name__] = _moved
