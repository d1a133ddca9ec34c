"""Moved to core.config.base: an alias until every import is rewritten (issue 22)."""
import sys

from core.config import base as _moved

sys.modules[__name__] = _moved
