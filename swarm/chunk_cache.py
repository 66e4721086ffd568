"""Verified chunks of a stage state kept on disk, so a retried or restarted download fetches only what it lacks.

A chunk is written as ``<directory>/<sha256>`` once its bytes matched a manifest's SHA-256 for it,
and it is used again only where a manifest names that same SHA-256, after its bytes were hashed
again: a file damaged on disk is deleted and its chunk fetched. So no byte of another state can be
mixed in, while chunks two states share are reused (the consensus state a stage serves under a new
digest when nothing in it changed; the frozen tensors of a stage that trained on).

:meth:`ChunkCache.restore` fills a download's buffer from the chunks on disk and deletes every file
the manifest does not name (the directory holds at most one state's chunks); :meth:`keep` writes one
(a temporary file renamed into place, so a kill never leaves a torn chunk under a real name);
:meth:`clear` removes the directory once the state is loaded. A disk error is logged once and the
cache stops keeping chunks: it never fails a download. Chunks are raw state bytes, never unpickled.
The methods block on the disk: call them from a worker thread.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from protocol.messages import StateManifest
from swarm.state_codec import sha256_hex

logger = logging.getLogger(__name__)

_TMP = ".tmp-"


class ChunkCache:
    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory)
        self.broken = False  # a disk error: stop writing chunks for the rest of this download

    def _path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a SHA-256 hex digest: {sha256[:80]!r}")  # manifests are checked; never a path
        return self.directory / sha256

    def restore(self, manifest: StateManifest, view: memoryview) -> list[int]:
        """Copy the verified chunks on disk that ``manifest`` names into ``view`` (the state's buffer)
        and return their indices; delete every other file in the directory."""
        named = set(manifest.chunk_sha256)
        try:
            entries = list(self.directory.iterdir()) if self.directory.is_dir() else []
        except OSError as exc:
            logger.warning("cannot read the download directory %s: %s", self.directory, exc)
            return []
        present = set()
        for path in entries:
            if path.name in named and path.is_file():
                present.add(path.name)
            else:
                _remove(path)  # another state's chunk, or a write a kill interrupted
        restored, size, total = [], manifest.chunk_bytes, manifest.total_bytes
        for index, sha in enumerate(manifest.chunk_sha256):
            if sha not in present:
                continue
            start = index * size
            part = view[start : start + min(size, total - start)]
            if self._read_verified(sha, part):
                restored.append(index)
            else:
                present.discard(sha)
        return restored

    def _read_verified(self, sha256: str, into: memoryview) -> bool:
        path = self._path(sha256)
        try:
            with open(path, "rb") as f:
                n = f.readinto(into)
                extra = f.read(1)
        except OSError:
            return False
        if n == len(into) and not extra and sha256_hex(into) == sha256:
            return True
        logger.warning("kept chunk %s… is damaged (%d bytes): fetching it again", sha256[:12], n)
        _remove(path)
        return False

    def keep(self, sha256: str, data: bytes | memoryview) -> None:
        """Write one chunk whose bytes were verified against ``sha256``."""
        if self.broken:
            return
        final = self._path(sha256)
        tmp = self.directory / f"{_TMP}{sha256}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, final)
        except OSError as exc:
            self.broken = True
            _remove(tmp)
            logger.warning("cannot keep downloaded chunks in %s (%s): a failed download starts over", self.directory,
                           exc)

    def clear(self) -> None:
        """Remove the directory and every chunk in it."""
        shutil.rmtree(self.directory, ignore_errors=True)

    def chunks(self) -> int:
        """How many complete chunk files the directory holds now."""
        try:
            return sum(1 for p in self.directory.iterdir() if not p.name.startswith(_TMP))
        except OSError:
            return 0


def _remove(path: Path) -> None:
    try:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass
