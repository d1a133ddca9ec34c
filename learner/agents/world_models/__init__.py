"""World Models' training code: V's decoder and loss, M's mixture-density head, CMA-ES, batched dreams and
the staged agent (`agent.WorldModels`). The acting code is `core.agents.world_models`."""
