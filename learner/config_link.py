"""Moved to core.config.link: an alias until every import is rewritten (issue 22)."""
import sys

from core.config import link as _moved

sys.modules[__name__] = _moved
