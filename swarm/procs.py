"""What a node's child processes leave behind on this machine: their descendants and libp2p socket files.

hivemind's DHT runs in a child process that starts a libp2p daemon (``p2pd``) of its own, which
listens on a unix socket under /tmp. A process that dies by SIGKILL cannot remove that socket file,
and killing the DHT process reparents its daemon, so the callers collect what they must clean up
first: :func:`descendants` (before killing a process tree) and :func:`p2pd_sockets` (before starting
one, to :func:`remove_unbound_sockets` the new ones that nothing serves afterwards). Used by
``SwarmDHT`` and the daemon, and by the localhost simulator (swarm/sim/).
"""

from __future__ import annotations

import glob
import os
import socket

_SOCKET_GLOB = "/tmp/hivemind-p2p*.sock"


def p2pd_sockets() -> set[str]:
    return set(glob.glob(_SOCKET_GLOB))


def remove_unbound_sockets(paths: set[str]) -> None:
    """Delete socket files a failed libp2p start left behind (hivemind removes them only when its daemon
    is still running). A path some live process still has bound (another node on this machine) is kept."""
    if not paths:
        return
    try:
        with open("/proc/net/unix") as f:
            bound = {line.split()[-1] for line in f.readlines()[1:] if len(line.split()) >= 8}
    except OSError:
        return  # cannot tell which are in use: leave them
    for path in paths - bound:
        # /proc/net/unix lists only this network namespace's sockets; a node in another namespace
        # (a link-emulation lab) may still serve this path: ask the path itself.
        if _accepts_connections(path):
            continue
        try:
            os.remove(path)
        except OSError:
            pass


def _accepts_connections(path: str) -> bool:
    """Whether a live process listens on the unix socket ``path`` (unknown errors count as yes)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(1.0)
    try:
        sock.connect(path)
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True
    finally:
        sock.close()


def descendants(pid: int) -> list[int]:
    """PIDs of every descendant of ``pid`` (from /proc; empty where /proc is unavailable)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def process_age_s() -> float | None:
    """Seconds since this process started (from /proc; None where it is unavailable)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None
