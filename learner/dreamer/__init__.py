"""DreamerV3 in PyTorch: world model, actor-critic in imagination, and the standalone policy.

Modules, from the bottom up: `dists` (symlog, two-hot, categorical latents), `layers` (norms, MLPs,
block-diagonal linear, CNN encoder/decoder), `rssm` (the sequence model), `world_model`,
`behavior` (actor, critic, returns), `optim` (LaProp and Adam), `agent` (one update), `policy`
(acting only: what a robot runs), `preprocess` (the one observation transform, shared by both).
"""
