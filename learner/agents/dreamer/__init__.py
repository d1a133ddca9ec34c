"""DreamerV3, learning: world model, actor-critic in imagination, optimisers and one update.

Modules: `world_model` (encoder, decoder, reward and continuation heads, and its loss), `behavior` (actor,
critic, returns), `optim` (LaProp and Adam), `openloop` (video predictions) and `agent` (the `Dreamer`
trainer). What acting needs is `core.agents.dreamer`, which imports nothing from here.
"""
