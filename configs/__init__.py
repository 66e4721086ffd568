"""Shipped TOML presets. This package holds data only; ``node.config`` loads it (reading
the files through ``node.config_toml``).

- ``model/*.toml``  model shapes: tiny (CPU tests), small (~25M), 125m, 1b, 8b (node0-like)
- ``local/*.toml``  complete single-process runs for ``node train-local``
"""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
