"""What every config block is built from: the strict `Block` base, the shared field types, and the
errors that turn validation failures into messages naming file, key, expectation and value.

Kept apart from the schema so every block module reuses the same base and the same wording.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

Vec2 = Annotated[list[float], Field(min_length=2, max_length=2)]
Vec3 = Annotated[list[float], Field(min_length=3, max_length=3)]
Range = Annotated[list[float], Field(min_length=2, max_length=2)]


class Block(BaseModel):
    """Base of every config block: strict types, unknown keys rejected, immutable, numbers finite
    (a `.nan` or `.inf` slips past every range check and then stalls or crashes the process using it)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class ConfigError(ValueError):
    """A configuration problem; the message names the file, the key path and what was wrong."""

    def __init__(self, problems: Iterable[str], source: str) -> None:
        self.problems = list(problems)
        self.source = source
        lines = [f"invalid configuration in {source}:"] + [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class FieldError(ValueError):
    """Raised by cross-field validators to point at one key inside the block being checked."""

    def __init__(self, key: str, expected: str, found: Any) -> None:
        self.key, self.expected, self.found = key, expected, found
        super().__init__(f"{key}: expected {expected}, found {found!r}")


def _key_path(loc: Iterable[Any]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int) and parts:
            parts[-1] = f"{parts[-1]}[{item}]"
        else:
            parts.append(str(item))
    return ".".join(parts) or "<top level>"


def _allowed_keys(model: Any, loc: tuple[Any, ...]) -> list[str]:
    """Walk the schema along `loc` (minus its last item) and list the keys allowed there."""
    current = model
    for item in loc[:-1]:
        fields = getattr(current, "model_fields", None)
        if fields is None or not isinstance(item, str) or item not in fields:
            return []
        current = fields[item].annotation
    fields = getattr(current, "model_fields", None)
    return sorted(fields) if fields else []


def describe_errors(
    err: ValidationError, model: Any, overrides: Mapping[str, str] | None = None
) -> list[str]:
    """One readable line per pydantic error: `key: expected …, found …`."""
    overrides = overrides or {}
    lines = []
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        found = e.get("input")
        ctx_err = (e.get("ctx") or {}).get("error")
        if isinstance(ctx_err, FieldError):
            loc = loc + (ctx_err.key,)
            line = f"{_key_path(loc)}: expected {ctx_err.expected}, found {ctx_err.found!r}"
        elif e["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_keys(model, loc)) or "none"
            line = f"{_key_path(loc)}: unknown key (allowed here: {allowed})"
        elif e["type"] == "missing":
            line = f"{_key_path(loc)}: missing required key"
        elif e["type"] in ("too_short", "too_long"):
            ctx = e.get("ctx") or {}
            n = ctx.get("min_length") if e["type"] == "too_short" else ctx.get("max_length")
            more = "at least" if e["type"] == "too_short" else "at most"
            line = f"{_key_path(loc)}: expected a list of {more} {n} items, found {found!r}"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            msg = msg[0].lower() + msg[1:] if msg else msg
            msg = msg.removeprefix("input should be ")
            if msg.startswith(("greater", "less")):
                msg = "a value " + msg
            line = f"{_key_path(loc)}: expected {msg}, found {found!r}"
        origin = _override_for(loc, overrides)
        if origin:
            line += f" (set on the command line by --set {origin})"
        lines.append(line)
    return lines


def _override_for(loc: tuple[Any, ...], overrides: Mapping[str, str]) -> str | None:
    path = [str(x) for x in loc if not isinstance(x, int)]
    for key, text in overrides.items():
        parts = key.split(".")
        if path[: len(parts)] == parts or parts[: len(path)] == path:
            return text
    return None
