"""The exploration block: Plan2Explore's ensemble and explorer, CASCADE's population and deployments.

`dreamer.explore` switches exploration on (none, plan2explore, cascade); these are its settings. Only the
learner reads them: a robot acts with an explorer's policy blob as with any Dreamer policy.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from core.config.base import Block, FieldError


class ExploreConfig(Block):
    """Reward-free exploration of the Dreamer agent (used when `dreamer.explore` is not none)."""

    # --- Plan2Explore: the ensemble and its disagreement
    ensemble: int = Field(10, ge=2, le=64, description="one-step predictors in the ensemble (Plan2Explore: 10)")
    target: Literal["stoch", "deter", "embed"] = Field(
        "stoch", description="what each predictor predicts of the next step: the posterior's latent sample, the "
        "recurrent state, or the encoder's embedding of the next observation"
    )
    ensemble_layers: int = Field(2, ge=1, le=8, description="hidden layers of each predictor (Plan2Explore: 4)")
    ensemble_units: int = Field(
        0, ge=0, description="units of each predictor's hidden layers; 0 = dreamer.units (Plan2Explore: 400)"
    )
    ensemble_lr: float = Field(3e-4, gt=0, description="Adam learning rate of the ensemble (Plan2Explore: 3e-4)")
    action_cond: bool = Field(True, description="the predictors see the action taken as well as the state")
    intrinsic: float = Field(1.0, ge=0, description="weight of the normalised disagreement in the explorer's reward")
    extrinsic: float = Field(
        0.0, ge=0, description="weight of the reward head's prediction in the explorer's reward (0: reward-free)"
    )
    intrinsic_norm: Literal["mag", "std", "none"] = Field(
        "mag", description="intrinsic reward normalisation: mag = divided by an EMA of its mean magnitude; std = "
        "minus an EMA of its mean, divided by an EMA of its standard deviation; none"
    )
    norm_rate: float = Field(0.01, gt=0, le=1, description="EMA rate of the intrinsic reward statistics per update")
    reward_free: bool = Field(
        True, description="collect without rewards: the world model sees zero rewards and the task actor-critic does "
        "not train while exploring; `reverie-learner adapt` trains them from the recorded data afterwards. false: "
        "the world model learns the recorded rewards and the task actor-critic trains beside the explorer"
    )
    # --- CASCADE: a population of explorers over deployments
    population: int = Field(4, ge=1, le=64, description="CASCADE: explorers in the population (paper: 10)")
    alpha: float = Field(
        0.1, ge=0, le=1, description="CASCADE: reward = (1 - alpha) disagreement + alpha diversity; 0 = a population "
        "of Plan2Explore explorers"
    )
    diversity_feat: Literal["feat", "deter", "stoch"] = Field(
        "feat", description="CASCADE: what of an imagined final state its diversity is measured on"
    )
    deployments: int = Field(5, ge=1, description="CASCADE: deployments of a run (paper: a handful)")
    deployment_steps: int = Field(
        2000, ge=1, description="CASCADE: steps collected per deployment, over all robots (serve) or explorers (train)"
    )
    deployment_updates: int = Field(
        200, ge=1, description="CASCADE: offline updates between two deployments (world model, ensemble, explorers)"
    )

    @model_validator(mode="after")
    def _weights(self) -> ExploreConfig:
        if self.intrinsic == 0 and self.extrinsic == 0:
            raise FieldError("intrinsic", "a weight > 0 (or extrinsic > 0): the explorer would learn nothing",
                             self.intrinsic)
        return self
