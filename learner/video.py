"""Moved to core.video: an alias until every import is rewritten (issue 22)."""
import sys

from core import video as _moved

sys.modules[__name__] = _moved
