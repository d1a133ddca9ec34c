"""Gato's acting code (Reed et al. 2022): the tokeniser, the decoder-only transformer and the prompted
policy a robot builds from a blob. Training (behaviour cloning on recorded expert episodes of several tasks)
is `learner.gato`, run as `reverie-learner gato`."""
