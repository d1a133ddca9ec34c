"""Moved to core.config: an alias until every import is rewritten (issue 22)."""
import sys

import core.config as _moved

sys.modules[__name__] = _moved
