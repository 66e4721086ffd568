"""The TOML side of the run config (``node.config``): finding a preset, layering ``extends``, parsing
``section.field=value`` overrides, and checking a TOML value against a field's annotation.

A name is looked up as a path (for ``extends``, relative to the extending file first), then inside the
shipped ``configs/`` directory and its ``model/`` and ``local/`` folders, with or without ``.toml``.
A file's parents are merged first, then its own tables override them key by key. Nothing here knows
the sections: ``node.config`` builds them from the merged tables.
"""

from __future__ import annotations

import json
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from configs import CONFIG_DIR
from protocol.settings import ConfigError


def resolve_config_path(name: str | Path, relative_to: Path | None = None) -> Path:
    """Find a config by path, or by name inside ``configs/`` (``tiny``, ``model/tiny``, ``local/tiny.toml``)."""
    raw = Path(name).expanduser()
    candidates = [raw]
    if relative_to is not None and not raw.is_absolute():
        candidates.insert(0, relative_to / raw)
    for base in (CONFIG_DIR, CONFIG_DIR / "model", CONFIG_DIR / "local"):
        candidates += [base / raw, base / raw.with_suffix(".toml")] if not raw.is_absolute() else []
    for path in candidates:
        if path.is_file():
            return path
    shipped = ", ".join(sorted(str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in CONFIG_DIR.rglob("*.toml")))
    raise ConfigError(f"config {str(name)!r} not found (shipped presets: {shipped})")


def read_layered(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The tables of the TOML file at ``path`` merged over those of the files it ``extends``."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config {path} extends itself (cycle: {' -> '.join(map(str, (*seen, path)))})")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config {path}: invalid TOML: {err}") from err
    merged: dict[str, Any] = {}
    parents = raw.pop("extends", [])
    if isinstance(parents, str):
        parents = [parents]
    for parent in parents:
        merge_tables(merged, read_layered(resolve_config_path(parent, relative_to=path.parent), (*seen, path)))
    merge_tables(merged, raw)
    return merged


def merge_tables(into: dict[str, Any], update: dict[str, Any]) -> None:
    """Merge ``update`` into ``into`` in place: nested tables key by key, anything else replaced."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge_tables(into[key], value)
        else:
            into[key] = value


def parse_override(text: str) -> tuple[str, str, Any]:
    """Parse ``section.field=value``; the value is read as TOML, or taken as a plain string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r} must look like section.field=value (e.g. train.lr=3e-4)")
    key, value_text = text.split("=", 1)
    section, name = key.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {value_text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = value_text.strip()
    return section, name, value


def coerce_value(name: str, hint: Any, value: Any) -> Any:
    """Check ``value`` against a field's annotation, converting only int->float; raise ConfigError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        # TOML has no null: the string "none" stands for None in files and overrides alike.
        if type(None) in options and (value is None or (isinstance(value, str) and value.lower() == "none")):
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce_value(name, option, value)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{name}: {value!r} matches none of {hint}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [coerce_value(f"{name}[{i}]", item, v) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if hint in (int, float, str, bool):
        if isinstance(value, bool) != (hint is bool) or not isinstance(value, hint):
            raise ConfigError(f"{name} must be of type {hint.__name__}, got {value!r}")
        return value
    raise AssertionError(f"unsupported annotation {hint} for {name}")


def toml_value(value: Any) -> str:
    """A Python value as TOML text for an override or a table line (None is "none")."""
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)
