"""The base every config block derives from (kept apart so block modules can import it)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Block(BaseModel):
    """Base of every config block: strict types, unknown keys rejected, immutable, numbers finite
    (a `.nan` or `.inf` slips past every range check and then stalls or crashes the process using it)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)
