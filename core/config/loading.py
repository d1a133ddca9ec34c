"""Reading a config: strict YAML, `--set` overrides, validation into a `Config` with readable errors,
and writing the resolved config next to a run's outputs."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from core.atomic import atomic_write_bytes
from core.config.base import ConfigError, describe_errors
from core.config.schema import Config

RESOLVED_NAME = "config.yaml"
MAX_DEPTH = 16  # a config nests a few levels; far deeper is a mistake or an attack, not a config


class ShapeError(yaml.MarkedYAMLError):
    """Valid YAML that no config file has: a duplicated key, or nesting deeper than MAX_DEPTH."""


class _Loader(yaml.SafeLoader):
    """Safe YAML that also reads `3e-4` as a number (YAML 1.1 wants a dot: `3.0e-4`), refuses a key given
    twice in one mapping (YAML keeps the last silently: a second `control:` block would replace the first)
    and refuses deep nesting before the recursive composer runs out of stack."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise ShapeError(problem=f"nested more than {MAX_DEPTH} levels deep", problem_mark=mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges are meant to be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: the base class says so
                continue
            if first is not key_node.start_mark:
                raise ShapeError(problem=f"duplicate key {key!r} (first at line {first.line + 1}; YAML would keep "
                                 "only the last)", problem_mark=key_node.start_mark)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """`line L, column C: what was wrong` for a YAML error."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if not isinstance(exc, ShapeError):
        problem = f"not valid YAML ({problem})"
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def _yaml_scalar(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`["control.hz=10", ...]` -> `{"control.hz": 10}`; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    if isinstance(items, str):
        items = [items]
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError([f"{item!r}: expected KEY.PATH=VALUE, for example control.hz=10"], "--set")
        try:
            out[key] = _yaml_scalar(text) if text.strip() else None
        except yaml.YAMLError as exc:
            shown = text if len(text) <= 40 else text[:40] + "..."
            raise ConfigError([f"{key}: value {shown!r}: {_yaml_problem(exc)}"], "--set") from None
    return out


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Set dotted keys in plain config data, creating blocks as needed."""
    for key, value in overrides.items():
        node = raw
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                path = ".".join(parts[: i + 1])
                raise ConfigError([f"{key}: {path} is a value ({child!r}), not a block"], f"--set {key}")
            node = child
        node[parts[-1]] = value


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError([f"file not found (looked for {path.resolve()})"], str(path))
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"cannot read it ({exc.strerror or exc})"], str(path)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        problem = f"line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        raise ConfigError([problem], str(path)) from None
    try:
        raw = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_problem(exc)], str(path)) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"<top level>: expected a mapping of blocks, found {type(raw).__name__}"], str(path))
    return raw


def config_from_dict(raw: dict[str, Any], source: str, overrides: dict[str, Any] | None = None) -> Config:
    """Validate plain data (already merged with overrides) into a Config."""
    texts = {k: f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
             for k, v in (overrides or {}).items()}
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, Config, texts), source) from None


def load_config(path: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load and validate a YAML config, applying `--set`-style dotted overrides first."""
    path = Path(path)
    raw = _read_yaml(path)
    parsed = parse_overrides(overrides)
    apply_overrides(raw, parsed)
    return config_from_dict(raw, str(path), parsed)


def write_resolved(cfg: Config, outdir: str | os.PathLike[str], name: str = RESOLVED_NAME) -> Path:
    """Write the resolved config into `outdir` atomically; every run calls this next to its outputs."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    target = outdir / name
    atomic_write_bytes(target, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode(), prefix=".config.")
    return target
