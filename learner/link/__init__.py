"""Robot <-> learner link: the wire protocol, CURVE security and key tooling."""
