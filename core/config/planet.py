"""Config block of PlaNet (Hafner et al. 2019): a recurrent state-space model with Gaussian latents,
trained on replayed sequences, and the cross-entropy method planning in its latent space (no actor).

Defaults are the official configs' (../shared/reference/lineage.md): deter 200, stoch 30, min std 0.1,
300-unit heads, free nats 3, reward loss scale 10, Adam 1e-3 (eps 1e-4, clip 1000), horizon 12, 10 CEM
iterations, 1000 candidates, top 100, exploration noise 0.3, overshooting off. The batch (50 x 50 in the
paper) is `train.batch_size` and `train.batch_length`; `hardware_configs/gym_pendulum_planet.yaml` sets it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from core.config.base import Block, FieldError


class PlanetConfig(Block):
    """PlaNet: a Gaussian-latent RSSM, its reward head, and the CEM planner that acts with them."""

    # --- the model
    deter: int = Field(200, ge=8, description="recurrent (deterministic) state size")
    hidden: int = Field(200, ge=8, description="hidden units of the RSSM's input, prior and posterior layers")
    stoch: int = Field(30, ge=1, description="Gaussian latent size")
    min_std: float = Field(0.1, gt=0, description="floor of the latents' standard deviation (softplus + min_std)")
    units: int = Field(300, ge=8, description="units of the reward head and of the vector encoder/decoder MLPs")
    head_layers: int = Field(2, ge=1, description="hidden layers of the reward head")
    mlp_layers: int = Field(2, ge=1, description="layers of the vector encoder/decoder MLPs")
    cnn_depth: int = Field(32, ge=1, description="image encoder base channels (layer i has depth x cnn_mults[i])")
    cnn_mults: list[int] = Field([1, 2, 4, 8], min_length=1,
                                 description="channel multipliers per 4x4 stride-2 conv (PlaNet: 32-64-128-256)")
    image_keys: str = Field("image", description="regex: observation keys encoded by the CNN (full match)")
    vector_keys: str = Field(".*", description="regex: other observation keys encoded by the symlog MLP (full match)")
    # --- the loss
    free_nats: float = Field(3.0, ge=0, description="free nats on the KL summed over latents")
    free_nats_placement: Literal["step", "mean"] = Field(
        "step", description="where the free nats apply: step = to each (batch, time) KL, as PlaNet does; mean = "
        "once, to the KL averaged over batch and time, as Dreamer v1 does (dreamer.free_nats_placement)"
    )
    kl_scale: float = Field(1.0, ge=0, description="scale of KL(posterior || prior)")
    reward_scale: float = Field(10.0, ge=0, description="reward loss scale (Gaussian log-likelihood, unit variance)")
    dec_scale: float = Field(1.0, ge=0, description="observation loss scale (Gaussian log-likelihood, unit variance)")
    overshooting: int = Field(0, ge=0, description="latent overshooting distance D: priors rolled 2..D steps "
                              "open-loop are pulled to the posteriors too; 0 = off (the official default)")
    overshooting_scale: float = Field(1.0, ge=0, description="beta of latent overshooting: its KL terms' weight, "
                                      "averaged over the distances")
    # --- optimisation
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    eps: float = Field(1e-4, gt=0, description="Adam epsilon")
    clip: float = Field(1000.0, gt=0, description="gradient global-norm clip")
    # --- planning (what act() costs: candidates x iterations x horizon x action_repeat RSSM steps a plan)
    horizon: int = Field(12, ge=1, le=1000, description="planning horizon, decisions (each held action_repeat steps)")
    iterations: int = Field(10, ge=1, le=1000, description="CEM iterations per plan")
    candidates: int = Field(1000, ge=2, le=100_000, description="action sequences scored per CEM iteration")
    top_k: int = Field(100, ge=1, description="best candidates the CEM Gaussian is refit to (<= candidates)")
    explore: float = Field(0.3, ge=0, description="std of the Gaussian noise added to the planned action while "
                           "collecting (act mode 'sample'); none in evaluation (mode 'mode')")
    action_repeat: int = Field(1, ge=1, le=100, description="control steps each planned action is held (per "
                               "task: cartpole 8, cheetah 4, walker 2 in the paper); the policy replans every "
                               "action_repeat steps; the model learns every step")
    # --- compute
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="training device: auto = cuda when available")

    @model_validator(mode="after")
    def _checks(self) -> PlanetConfig:
        if self.top_k > self.candidates:
            raise FieldError("top_k", f"at most candidates ({self.candidates})", self.top_k)
        if min(self.cnn_mults) < 1:
            raise FieldError("cnn_mults", "channel multipliers of at least 1", self.cnn_mults)
        return self
