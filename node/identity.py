"""A daemon's persistent identity, and the lock that keeps two daemons from sharing it.

The libp2p key file itself is created by hivemind on first use (``identity_path``); the peer id
derives from it, so a node keeps its name across restarts. Two running daemons with one identity
would fight over that name in the swarm, so :class:`IdentityLock` takes an exclusive ``flock`` on
``<identity>.lock`` for the daemon's lifetime and refuses a second one with a message saying what
to do. The lock is released by the kernel when the process dies, so a crash never leaves it stale.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class IdentityInUse(RuntimeError):
    """Another running daemon holds this identity."""


class IdentityLock:
    def __init__(self, identity_path: str | os.PathLike[str]):
        self.path = Path(identity_path).expanduser().resolve()
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> IdentityLock:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise IdentityInUse(
                f"identity {self.path} is already used by a running daemon (pid {holder}). Each daemon needs "
                f"its own identity: pass --identity PATH (one daemon per GPU, each with its own key file)."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> IdentityLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
