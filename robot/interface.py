"""Moved to core.interface: an alias until every import is rewritten (issue 22)."""
import sys

from core import interface as _moved

sys.modules[__name__] = _moved
