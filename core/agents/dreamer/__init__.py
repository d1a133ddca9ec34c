"""DreamerV3, acting: what a robot builds from a policy blob (the trainer is `learner.agents.dreamer`).

Modules, from the bottom up: `onehot` (one-hot inputs as row gathers), `dists` (symlog, two-hot,
categorical latents), `layers` (norms, MLPs, block-diagonal linear, CNN encoder/decoder), `preprocess`
(the one observation transform, shared by acting and training), `codec` (observation encoder and decoder),
`rssm` (the sequence model), `actor`, and `policy` (the policy and its blob).
"""
