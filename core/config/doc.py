"""Writes the configuration reference (docs/configuration.md) from the schema itself, so the
documentation cannot drift from what the loader accepts.

    python -m core.config.doc > docs/configuration.md
"""

from __future__ import annotations

import json
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from core.config.agent import RECIPES, SIZES
from core.config.schema import Config

HEADER = """# Configuration reference

Generated from `core/config/` by `python -m core.config.doc > docs/configuration.md`;
a test fails when this file and the schema disagree.

A config file has the top-level keys below; each block is a mapping. Unknown keys are errors, and
so are a key given twice in one mapping, a number that is not finite (`.nan`, `.inf`) and nesting
deeper than 16 levels.
Override any key on the command line with `--set block.key=value` (the value is read as YAML).
Only the block named by `task` is used (and written to the resolved config).
"""


def _type_name(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin in (Union, UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    return getattr(annotation, "__name__", str(annotation))


def _constraints(info: FieldInfo) -> str:
    parts = []
    for meta in info.metadata:
        for attr, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="), ("min_length", "len >=")):
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{sym} {value}")
    return ", ".join(parts)


def _preset_default(name: str) -> str | None:
    """Dreamer fields filled from the recipe or size presets show every preset's value."""
    if name in RECIPES["2024"]:
        return "recipe: " + ", ".join(f"{r}: `{json.dumps(v[name])}`" for r, v in RECIPES.items())
    if name in SIZES["size1m"]:
        return "size: " + ", ".join(f"{s}: `{v.get(name, '-')}`" for s, v in SIZES.items())
    return None


def _default(info: FieldInfo, name: str = "") -> str:
    if info.is_required():
        return _preset_default(name) or "required"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(block)"
    return f"`{json.dumps(value)}`"


def block_table(model: type[BaseModel]) -> list[str]:
    rows = ["| key | type | default | range | meaning |", "| --- | --- | --- | --- | --- |"]
    for name, info in model.model_fields.items():
        rows.append(
            f"| `{name}` | {_type_name(info.annotation)} | {_default(info, name)} | {_constraints(info)} "
            f"| {info.description or ''} |"
        )
    return rows


def render() -> str:
    lines = [HEADER, "## Top level", "", *block_table(Config), ""]
    for name, info in Config.model_fields.items():
        lines += _block_section(name, info.annotation)
    return "\n".join(lines)


def _block_of(annotation: Any) -> type[BaseModel] | None:
    """The block model of a field: `Block`, `Block | None` or `list[Block]`; None for plain values."""
    candidates = get_args(annotation) if get_origin(annotation) in (Union, UnionType, list) else (annotation,)
    for sub in candidates:
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            return sub
    return None


def _block_section(name: str, annotation: Any) -> list[str]:
    sub = _block_of(annotation)
    if sub is None:
        return []
    doc = (sub.__doc__ or "").strip().splitlines()
    intro = doc[0] if doc and not doc[0].startswith("Base of") else ""
    lines = [f"## `{name}`", "", *([intro, ""] if intro else []), *block_table(sub), ""]
    for field, info in sub.model_fields.items():  # blocks inside blocks (motors.servos[], dreamer.transformer)
        if get_origin(info.annotation) is list:
            lines += _block_section(f"{name}.{field}[]", info.annotation)
        elif _block_of(info.annotation) is not None:
            lines += _block_section(f"{name}.{field}", info.annotation)
    return lines


if __name__ == "__main__":
    print(render(), end="")
