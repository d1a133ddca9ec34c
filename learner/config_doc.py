"""Moved to core.config.doc: an alias until every import is rewritten (issue 22)."""
import sys

from core.config import doc as _moved

sys.modules[__name__] = _moved
