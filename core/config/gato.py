"""Config block of the Gato-style policy (Reed et al. 2022): the tokeniser, the decoder-only transformer that
reads tokenised observations and predicts action tokens, and its behaviour-cloning training on recorded expert
episodes (`reverie-learner gato`).

Tokeniser defaults are the paper's: continuous values mu-law encoded (mu 100, M 256) and cut into 1024 uniform
bins, image patches of 16 x 16, prompts on 25 % of training sequences (half taken from an episode's end).
The model defaults are a small Gato (the paper's smallest is 79M parameters: 8 layers, 768 wide); the
benchmark's tasks need far less.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from core.config.base import Block, FieldError


class GatoConfig(Block):
    """Gato: tokeniser, transformer and its training on expert episodes of several tasks at once."""

    # --- tokeniser (a policy blob carries these: the robot tokenises as training did)
    mu: float = Field(100.0, gt=0, description="mu of the mu-law encoding of continuous observations")
    mu_max: float = Field(256.0, gt=0, description="M of the mu-law encoding: |x| = M maps to 1")
    bins: int = Field(1024, ge=2, le=8192, description="uniform bins of [-1, 1] for continuous values (tokens "
                      "0 .. bins-1)")
    discrete_values: int = Field(1024, ge=2, le=8192, description="discrete values 0 .. n-1 (tokens bins .. "
                                 "bins+n-1); a discrete action's choices must fit")
    patch: int = Field(16, ge=2, le=64, description="side of the square image patches, pixels (images must be "
                       "whole multiples)")
    max_patch_side: int = Field(16, ge=1, le=64, description="patches per image row or column the learned row "
                                "and column position encodings cover")
    step_tokens: int = Field(256, ge=2, le=4096, description="most tokens one step may take (observation, "
                             "separator, action): the learned local position encodings")
    # --- transformer
    layers: int = Field(4, ge=1, le=48, description="decoder blocks")
    width: int = Field(256, ge=8, le=4096, description="embedding width")
    heads: int = Field(8, ge=1, le=64, description="attention heads (width must be a multiple)")
    mlp_ratio: int = Field(4, ge=1, le=8, description="hidden width of each block's MLP, x width")
    patch_channels: int = Field(32, ge=4, le=512, description="channels of the ResNet block that embeds a patch")
    context: int = Field(1024, ge=16, le=8192, description="tokens the transformer attends over (prompt included)")
    # --- prompts
    prompt_tokens: int = Field(384, ge=0, description="most tokens a prompt (a demonstration of the task) takes "
                               "of the context; 0 = never prompted")
    prompt_fraction: float = Field(0.25, ge=0, le=1, description="share of training sequences that get a "
                                   "demonstration of the same task prepended")
    prompt_end_fraction: float = Field(0.5, ge=0, le=1, description="share of those prompts taken from an "
                                       "episode's end (the rest from anywhere in it)")
    # --- training
    batch_size: int = Field(32, ge=1, le=4096, description="sequences per update")
    lr: float = Field(3e-4, gt=0, description="AdamW learning rate after warm-up (cosine decay to 10 %)")
    warmup: int = Field(500, ge=0, description="updates of linear learning-rate warm-up")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (not on embeddings, norms, biases)")
    grad_clip: float = Field(1.0, gt=0, description="global gradient-norm clip")
    updates: int = Field(20000, ge=1, description="updates of a training run")
    log_every: int = Field(100, ge=1, description="updates between metric rows")
    checkpoint_every: int = Field(1000, ge=1, description="updates between checkpoints (and the policy files)")
    eval_episodes: int = Field(10, ge=1, description="episodes per task of `gato eval` and the final evaluation")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the model's initialisation and the batches")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available")
    threads: int = Field(0, ge=0, le=256, description="torch CPU threads (0 = torch's default)")

    @model_validator(mode="after")
    def _shapes(self) -> GatoConfig:
        if self.width % self.heads:
            raise FieldError("heads", f"a divisor of width ({self.width})", self.heads)
        if self.prompt_tokens >= self.context:
            raise FieldError("prompt_tokens", f"fewer than context ({self.context}): the episode needs room",
                             self.prompt_tokens)
        return self
