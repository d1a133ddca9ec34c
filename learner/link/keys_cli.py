"""Moved to core.link.keys_cli: an alias until every import is rewritten (issue 22)."""
import sys

from core.link import keys_cli as _moved

sys.modules[__name__] = _moved
