"""Moved to core.link.protocol: an alias until every import is rewritten (issue 22)."""
import sys

from core.link import protocol as _moved

sys.modules[__name__] = _moved
