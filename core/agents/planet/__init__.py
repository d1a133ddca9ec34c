"""PlaNet (Hafner et al. 2019), acting: the Gaussian-latent RSSM (`rssm`), the networks a policy carries
(`net`: encoder, RSSM, reward head), the cross-entropy method (`cem`) and the planner policy (`policy`).
What training adds (decoder, losses, optimiser) is `learner.agents.planet`, which a robot never imports.
"""
