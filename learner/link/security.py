"""Moved to core.link.security: an alias until every import is rewritten (issue 22)."""
import sys

from core.link import security as _moved

sys.modules[__name__] = _moved
