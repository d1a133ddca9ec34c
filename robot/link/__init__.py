"""The robot <-> learner link, robot side: the `Link` contract, its thread and process variants, the factory
that picks one from `link.process`, and the on-disk spool that keeps every chunk until the learner has it."""
