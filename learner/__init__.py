"""Reverie learner: the workstation process that trains agents from robot experience (the replay store,
the training and serving loops, checkpoints, metrics and plots).

It builds on `core` (configuration, wire protocol, weights format) and stays out of the robot's
imports, so a robot install carries no training code.
"""
