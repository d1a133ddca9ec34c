"""Moved: acting to core.agents.dreamer, training to learner.agents.dreamer. The modules here are aliases
until every import is rewritten (issue 22)."""
