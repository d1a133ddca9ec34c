"""Moved to core.atomic: an alias until every import is rewritten (issue 22)."""
import sys

from core import atomic as _moved

sys.modules[__name__] = _moved
