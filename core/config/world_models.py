"""Config block of World Models (Ha & Schmidhuber 2018): V (a convolutional VAE), M (an LSTM with a
mixture-density head) and C (a linear controller evolved with CMA-ES), trained stage by stage.

Defaults are the reference code's car-racing values (../shared/reference/lineage.md): z 32, KL tolerance
0.5 nat per dimension, LSTM 256 with 5 Gaussians, population 64 x 16 rollouts, sigma0 0.1, tau 1.15.
The stage lengths (updates of V and M, CMA-ES generations) are counted in `Agent.train` calls, which the
run loop makes at `train.train_ratio`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from core.config.base import Block

IMAGE_SIZE = 64  # V's input: frames are resized to 64 x 64, as the reference crops and resizes its frames


class WorldModelsConfig(Block):
    """World Models: V, M and C, and the staged pipeline that trains them."""

    image_key: str = Field("image", description="the observation V encodes (a uint8 H x W x 3 image, resized "
                           "to 64 x 64); C sees nothing else: World Models acts from pixels")
    # --- V
    z: int = Field(32, ge=1, le=1024, description="V's latent size (32 car racing, 64 Doom)")
    vae_depth: int = Field(32, ge=1, le=256, description="channels of V's first conv (four convs: x1, x2, x4, x8)")
    kl_tolerance: float = Field(0.5, ge=0, description="free bits: the KL term is max(KL, kl_tolerance x z), nats")
    vae_lr: float = Field(1e-4, gt=0, description="Adam learning rate of V")
    vae_batch: int = Field(100, ge=1, description="frames per V update, drawn from the replayed batch")
    vae_updates: int = Field(2000, ge=0, description="V updates per iteration (Agent.train calls)")
    # --- M
    lstm: int = Field(256, ge=1, le=8192, description="M's LSTM units (256 car racing, 512 Doom)")
    mixtures: int = Field(5, ge=1, le=64, description="Gaussians per latent dimension in M's mixture-density head")
    mdn_lr: float = Field(1e-3, gt=0, description="Adam learning rate of M")
    mdn_clip: float = Field(1.0, gt=0, description="M's gradient value clip")
    reward_scale: float = Field(1.0, ge=0, description="weight of M's reward loss (squared error)")
    done_scale: float = Field(10.0, ge=0, description="weight of M's done loss (the Doom code's 10)")
    mdn_updates: int = Field(2000, ge=0, description="M updates per iteration (Agent.train calls)")
    # --- C and CMA-ES
    population: int = Field(64, ge=2, description="CMA-ES population")
    rollouts: int = Field(16, ge=1, description="rollouts per candidate (each dream rollout a row of one batch)")
    sigma0: float = Field(0.1, gt=0, description="CMA-ES initial step size")
    generations: int = Field(200, ge=0, description="CMA-ES generations per iteration (Agent.train calls)")
    evolve_in: Literal["dream", "real"] = Field(
        "dream", description="dream: candidates roll out inside M, the whole population as one batch; real: in the "
        "environment of the config, one episode after another"
    )
    temperature: float = Field(1.15, gt=0, description="tau: M samples with mixture logits / tau and std x sqrt(tau)")
    dream_horizon: int = Field(50, ge=1, description="steps of a dream rollout (unless M's done head ends it)")
    dream_start: Literal["first", "any"] = Field(
        "first", description="dreams start from replayed episode starts (first) or from any replayed step, with M's "
        "state there (any)"
    )
    # --- the pipeline
    iterations: int = Field(
        1, ge=1, description="rounds of V, M, C; after the first, C collects and V and M retrain on all the data "
        "(the iterative loop the paper lacked); 1 = the paper"
    )
    random_policy: Literal["smooth", "uniform"] = Field(
        "smooth", description="how the policy acts before C is evolved: smooth a' = clip(a + sqrt(dt) N(0, 1)), or "
        "uniform"
    )
    smooth_dt: float = Field(0.02, gt=0, le=1, description="dt of the smooth random policy")
    collect_noise: float = Field(0.1, ge=0, description="Gaussian noise on C's actions when acting with mode sample")
    # --- compute
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available (CPU threads: "
                                                    "dreamer.threads, the run's compute settings)")
