"""Building blocks of the config sections every layer defines (``[wire]`` here, ``[dataplane]``,
``[diloco]``, ``[exchange]`` in swarm/, the rest in node/config.py).

A config section is a ``@dataclass(kw_only=True)`` with a ``SECTION`` name; each field is declared
with :func:`setting` (or :func:`setting_list`) so it carries a ``doc`` with units, and
``__post_init__`` raises :class:`ConfigError` naming ``section.field`` for a user mistake. The
section object is what the component takes: there is no second settings class to copy it into.
node/config.py composes the sections into a run config and loads them from TOML.
"""

from __future__ import annotations

import math
from dataclasses import field
from typing import Any


class ConfigError(ValueError):
    """A configuration value or file is invalid; the message names the field or file."""


def setting(default: Any, doc: str) -> Any:
    """A config field with its default and its documentation (units included)."""
    return field(default=default, metadata={"doc": doc})


def setting_list(default: list[Any], doc: str) -> Any:
    """A list-valued config field (each instance gets its own copy of the default)."""
    return field(default_factory=lambda: list(default), metadata={"doc": doc})


def section_name(obj: object) -> str:
    """The TOML table a config section is loaded from (its ``SECTION``), for error messages."""
    return getattr(obj, "SECTION", type(obj).__name__)


def check_positive(obj: object, *names: str) -> None:
    """Raise ConfigError unless each named field is None or a finite number > 0."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"{section_name(obj)}.{name} must be positive, got {value!r}")
