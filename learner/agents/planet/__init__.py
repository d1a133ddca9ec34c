"""PlaNet, learning: the model with its observation decoder, the loss (reconstruction, reward, KL with free
nats, optional latent overshooting) and one Adam update (`agent`). What acting needs is
`core.agents.planet`, which imports nothing from here.
"""
