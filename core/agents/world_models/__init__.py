"""World Models' acting code (Ha & Schmidhuber 2018): V's encoder, M's LSTM state and the linear C, built
from a policy blob. The training code (V's decoder, M's mixture head, CMA-ES, dreams) is
`learner.agents.world_models`."""
