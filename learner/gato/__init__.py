"""Gato's training (Reed et al. 2022) as its own command, `reverie-learner gato`: scripted experts'
episodes recorded into replay directories (`experts`), read back offline and tokenised (`episodes`),
sampled as prompted multi-task sequences (`sampler`), behaviour-cloned into one transformer (`train`) and
evaluated per task against the expert, exported as one policy blob per task (`evaluate`). The acting code
a robot builds from a blob is `core.agents.gato`."""
