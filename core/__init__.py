"""Reverie's shared core: what the robot process and the learner process agree on.

The configuration schema (`core.config`), the robot interface (`core.interface`), the robot <-> learner
wire protocol and its CURVE keys (`core.link`), the policy weights format (`core.weights`, on
`core.tensor_tree`), atomic files (`core.atomic`) and video writing (`core.video`).

The lowest layer: `robot`, `learner` and `sim` import from here, and this package imports none of
them (tests/core/test_architecture.py checks it). Importing it stays cheap (no torch) because the robot
reads its config first; torch loads only with the modules that need it.
"""
