"""Config sub-block `dreamer.transformer`: the causal transformer that replaces the GRU of Dreamer's world model
when `dreamer.dynamics: transformer` (STORM-like: one token per step, the latent and the action taken).

Defaults are the issue's (2 layers x 512 wide x 8 heads over 64 steps); imagination starts see the last 8 real
steps, as STORM's imagination context does.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from core.config.base import Block, FieldError


class TransformerConfig(Block):
    """The transformer sequence model of Dreamer's world model (used when `dreamer.dynamics` is transformer)."""

    layers: int = Field(2, ge=1, le=16, description="decoder blocks")
    width: int = Field(512, ge=8, le=8192, description="token width (the blocks' width)")
    heads: int = Field(8, ge=1, le=64, description="attention heads (width must be a multiple)")
    mlp_ratio: int = Field(4, ge=1, le=8, description="hidden width of each block's MLP, x width")
    context: int = Field(
        64, ge=2, le=4096, description="steps a step attends over (itself included): the training mask's window "
        "and the KV cache a robot keeps when acting"
    )
    imag_context: int = Field(
        8, ge=1, le=4096, description="real steps an imagination start keeps in its KV cache (the start's own "
        "included); the imagined steps add theirs"
    )

    @model_validator(mode="after")
    def _checks(self) -> TransformerConfig:
        if self.width % self.heads:
            raise FieldError("width", f"a multiple of heads ({self.heads})", self.width)
        if self.imag_context > self.context:
            raise FieldError("imag_context", f"at most context ({self.context})", self.imag_context)
        return self
