"""Reverie learner: configuration, (later) Dreamer, replay and the wire protocol.

Lowest layer of the stack: `robot` and `sim` import from here, never the reverse.
Importing this package must stay cheap (no torch) because the robot imports its config.
"""
