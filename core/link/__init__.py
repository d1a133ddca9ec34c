"""Robot <-> learner link, the parts both ends share: the wire protocol, CURVE security and key tooling.
The learner's server is `learner.link.server`; the robot's client is `robot.link`."""
