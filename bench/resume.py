"""Resumable long benches: every finished unit of work (one variant at one seed) is kept on disk.

A bench that takes hours on 2 cores is run as many units; each unit's result is written, atomically,
as one JSON file named by its key under a state directory, together with the commit it ran at and
the bench's *fingerprint* (the settings that make results comparable: steps, H, P, ...). Rerunning
the same command loads every unit already there with the same fingerprint and runs only the rest, so
a run can be stopped at any point (Ctrl-C, a session's end) and continued later. A unit run at
another commit is kept and reused, and its commit is reported with it; ``--fresh`` runs everything
again.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def commit() -> dict[str, Any]:
    """The checkout's short commit and whether it has uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"commit": git("rev-parse", "--short", "HEAD") or "unknown", "dirty": bool(git("status", "--porcelain"))}


class ResultStore:
    """Finished units of one bench configuration, one JSON file each under ``directory``."""

    def __init__(self, directory: str | Path, fingerprint: dict[str, Any], fresh: bool = False) -> None:
        self.directory = Path(directory)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it will read back
        self.fresh = fresh
        self.directory.mkdir(parents=True, exist_ok=True)
        self.here = commit()

    def _path(self, key: str) -> Path:
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"a unit key must be a plain file name, got {key!r}")
        return self.directory / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """The saved result of ``key``, or None (none yet, another fingerprint, unreadable, or --fresh)."""
        path = self._path(key)
        if self.fresh or not path.exists():
            return None
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # a torn or foreign file: the unit runs again and replaces it
        if not isinstance(saved, dict) or saved.get("fingerprint") != self.fingerprint:
            return None
        return saved.get("result")

    def put(self, key: str, result: dict[str, Any]) -> None:
        """Save ``result`` for ``key`` with the commit it ran at (written whole or not at all)."""
        body = json.dumps({"fingerprint": self.fingerprint, **self.here, "result": result})
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(body)
            os.replace(tmp, self._path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def commit_of(self, key: str) -> dict[str, Any] | None:
        """The commit a saved unit ran at."""
        path = self._path(key)
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return {"commit": saved.get("commit"), "dirty": saved.get("dirty")}


# What an in-process training result depends on (the swarm's sections -- exchange, swarm, dataplane -- do
# not train there): the sections the training benches hash.
TRAINING_SECTIONS = ("model", "pipeline", "data", "train", "wire")


def config_digest(settings: dict[str, Any], sections: tuple[str, ...] | None = None) -> str:
    """Short hash of a resolved configuration (nested dicts of settings), for a unit's key: a result is
    reused only for the same settings, so a changed default makes it another unit.

    ``sections``: only those top-level sections count (a bench names the ones its result depends on, so a
    setting added to, say, the exchange does not orphan a training bench's results). Settings that are
    None or False (off, unset, automatic) are left out, so adding an optional setting whose default is
    off does not orphan the results already kept; turning it on does."""
    def kept(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: kept(v) for k, v in value.items() if v is not None and v is not False}
        return value
    if sections is not None:
        settings = {k: v for k, v in settings.items() if k in sections}
    return hashlib.sha256(json.dumps(kept(settings), sort_keys=True, default=str).encode()).hexdigest()[:12]
