"""Restarting is resuming: the run an identity was last in, and where a node listens.

``<identity key>.last-run.json`` (next to the key, so one per identity) holds the run id, whether this
identity founded the run, the addresses of the run's peers it last saw (their stage records' ``addrs``
and its own ``--join``) and the directory its checkpoints went to. :class:`RunMemory` writes it once the
node is online and again whenever the peers it sees change; ``node start`` without ``--join`` and
without ``--new`` reads it (:func:`plan_start`): rejoin the run through those peers, or, as its founder
when no other peer is known or none answers, resume it alone under the same id (and checkpoint).

:func:`busy_listen_port` checks a fixed listen port before the libp2p daemon starts: the daemon binds
with ``SO_REUSEPORT``, so on a busy port it would quietly share it with another node instead of failing.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
import socket
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.config import ConfigError, RunConfig

logger = logging.getLogger(__name__)

MEMORY_VERSION = 1
MAX_PEERS = 8  # peers remembered (newest sightings first)
ADDRS_PER_PEER = 3
PROBE_TIMEOUT_S = 2.0  # a TCP connect to a remembered peer: does anyone of the run still answer?
_RUN_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_TCP = re.compile(r"/(?:ip4|ip6|dns|dns4|dns6)/([^/]+)/tcp/(\d+)")
_LOOPBACK = ("/ip4/127.", "/ip6/::1/")
_STATE_RANK = {"online": 0, "joining": 1}  # offline records last: those peers left on purpose


class LastRunError(ConfigError):
    """The identity's run memory cannot be used (names the file, or says what to pass instead)."""


@dataclass(frozen=True)
class LastRun:
    """What an identity remembers of the run it was last in."""

    run_id: str
    founder: bool  # this identity created the run (its run record's creator)
    peers: tuple[str, ...] = ()  # multiaddrs (…/p2p/<id>) or metrics URLs of the run's other peers
    checkpoint_dir: str = ""  # absolute train.checkpoint_dir at the time
    # The run's parameters as its record publishes them (node/run_params.run_parameters): a founder that
    # resumes alone takes them, not its preset's, which may have changed since (a memory from before they
    # were kept has none).
    params: dict[str, Any] | None = None

    def to_json(self) -> str:
        body = {"version": MEMORY_VERSION, "run_id": self.run_id, "founder": self.founder, "peers": list(self.peers),
                "checkpoint_dir": self.checkpoint_dir}
        return json.dumps({**body, **({"params": self.params} if self.params is not None else {})}, indent=1) + "\n"

    @property
    def peer_count(self) -> int:
        return len({_peer_key(p) for p in self.peers})


def last_run_path(identity_path: str | os.PathLike[str]) -> Path:
    path = Path(identity_path).expanduser().resolve()
    return path.with_name(path.name + ".last-run.json")


def load_last_run(identity_path: str | os.PathLike[str]) -> LastRun | None:
    """The identity's run memory; None when it has none; LastRunError when the file is unusable."""
    path = last_run_path(identity_path)
    fix = "--new starts a new swarm (and rewrites the file), --join ADDR joins one"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LastRunError(f"{path} cannot be read ({exc}): {fix}") from None
    try:
        return _parse(data)
    except (TypeError, ValueError) as exc:
        raise LastRunError(f"{path} is not a run memory ({exc}): {fix}") from None


def _parse(data: Any) -> LastRun:
    if not isinstance(data, dict) or data.get("version") != MEMORY_VERSION:
        raise ValueError(f"expected a JSON object with version {MEMORY_VERSION}")
    run_id, founder, peers = data.get("run_id"), data.get("founder"), data.get("peers", [])
    checkpoint_dir = data.get("checkpoint_dir", "")
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise ValueError(f"run_id {run_id!r} is not a run id")
    if not isinstance(founder, bool):
        raise ValueError("founder must be true or false")
    if not isinstance(peers, list) or not all(isinstance(p, str) and _is_peer_address(p) for p in peers):
        raise ValueError("peers must be a list of multiaddrs or http(s) URLs")
    if not isinstance(checkpoint_dir, str):
        raise ValueError("checkpoint_dir must be a string")
    params = data.get("params")
    if params is not None and not (isinstance(params, dict) and all(isinstance(v, dict) for v in params.values())):
        raise ValueError("params must be a table of config sections")
    return LastRun(run_id=run_id, founder=founder, peers=tuple(peers), checkpoint_dir=checkpoint_dir, params=params)


def save_last_run(identity_path: str | os.PathLike[str], last: LastRun) -> None:
    """Write the memory atomically (a crash leaves the old file or the new one, never half of one)."""
    path = last_run_path(identity_path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(last.to_json())
    os.replace(tmp, path)


def _is_peer_address(text: str) -> bool:
    return len(text) <= 512 and (text.startswith("/") or text.startswith(("http://", "https://")))


def _peer_key(address: str) -> str:
    """Addresses of one peer share a key: its peer id (a URL is its own key)."""
    return address.rsplit("/p2p/", 1)[1] if "/p2p/" in address else address


def merge_peers(*lists: Iterable[str], limit: int = MAX_PEERS) -> tuple[str, ...]:
    """Addresses grouped by peer in first-seen order, the first ``limit`` peers, ADDRS_PER_PEER each."""
    by_peer: dict[str, list[str]] = {}
    for address in (a for addresses in lists for a in addresses):
        group = by_peer.setdefault(_peer_key(address), [])
        if address not in group and len(group) < ADDRS_PER_PEER:
            group.append(address)
    return tuple(a for group in list(by_peer.values())[:limit] for a in group)


def peers_from_records(records: dict[int, list[Any]], me: str) -> list[str]:
    """The run's other peers' announced addresses (StageRecord.addrs), serving peers first; loopback
    addresses only for a peer that has no other."""
    best: dict[str, tuple[int, list[str]]] = {}
    for record in (r for recs in records.values() for r in recs):
        if record.peer_id == me:
            continue
        rank = _STATE_RANK.get(record.state, 2)
        own = [a for a in record.addrs if isinstance(a, str) and _is_peer_address(a)
               and a.endswith(f"/p2p/{record.peer_id}")]
        if own and (record.peer_id not in best or rank < best[record.peer_id][0]):
            routable = [a for a in own if not a.startswith(_LOOPBACK)]
            best[record.peer_id] = (rank, (routable or own)[:ADDRS_PER_PEER])
    return [a for _, (_, addrs) in sorted(best.items(), key=lambda item: (item[1][0], item[0])) for a in addrs]


class RunMemory:
    """Keeps the identity's run memory current while the node serves (node/daemon.py)."""

    def __init__(self, identity_path: str, peer_id: str, last: LastRun):
        self.identity_path, self.peer_id, self.last = identity_path, peer_id, last

    @classmethod
    def online(cls, cfg: RunConfig, run_record: Any, dht: Any) -> RunMemory:
        """Remember the run this node is now in (and the peers it joined through); written at once."""
        from node.run_params import run_parameters  # torch, through the model: only where a node runs

        me = dht.peer_id
        try:
            previous = load_last_run(cfg.swarm.identity_path)
        except LastRunError as exc:
            logger.warning("%s; rewriting it", exc)
            previous = None
        kept = previous.peers if previous is not None and previous.run_id == run_record.run_id else ()
        joined = [p for p in cfg.swarm.initial_peers if _peer_key(p) != me]
        memory = cls(cfg.swarm.identity_path, me, LastRun(
            run_id=run_record.run_id, founder=run_record.creator == me, peers=merge_peers(joined, kept),
            checkpoint_dir=str(Path(cfg.train.checkpoint_dir).expanduser().resolve()), params=run_parameters(cfg)))
        memory._save()
        return memory

    def refresh(self, records: dict[int, list[Any]] | None) -> None:
        """Take in the peers of the swarm as just read; rewrite the file only when they changed."""
        if not records:
            return
        peers = merge_peers(peers_from_records(records, self.peer_id), self.last.peers)
        if peers != self.last.peers:
            self.last = dataclasses.replace(self.last, peers=peers)
            self._save()

    def _save(self) -> None:
        try:
            save_last_run(self.identity_path, self.last)
        except OSError as exc:  # a read-only home must not stop a node that trains fine
            logger.warning("cannot write the run memory %s: %s", last_run_path(self.identity_path), exc)


# --- node start: which run, which swarm -----------------------------------------------------------------

@dataclass
class StartPlan:
    """What ``node start`` without ``--join``/``--new`` does: found a swarm or join one, with these overrides."""

    create: bool
    overrides: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    params: dict[str, Any] | None = None  # resuming as founder: the run's own parameters, where remembered


def plan_start(cfg: RunConfig, last: LastRun | None,
               reachable: Callable[[Sequence[str]], bool] | None = None) -> StartPlan:
    """Rejoin the identity's last run when it has one (see the module docstring); a new swarm otherwise.

    ``reachable(peers)``: does any remembered peer answer (default :func:`any_reachable`)."""
    if last is None:
        return StartPlan(create=True)
    if cfg.swarm.run_id and cfg.swarm.run_id != last.run_id:
        return StartPlan(create=True, notes=[f"starting run {cfg.swarm.run_id} (--run-id); this identity was last "
                                             f"in run {last.run_id}"])
    run = [f"swarm.run_id={json.dumps(last.run_id)}"]
    notes = []
    here = str(Path(cfg.train.checkpoint_dir).expanduser().resolve())
    if last.checkpoint_dir and last.checkpoint_dir != here:
        notes.append(f"note: run {last.run_id}'s checkpoints were written under {last.checkpoint_dir}; this start "
                     f"uses {here} (--set train.checkpoint_dir=... to resume from them)")
    n, new = last.peer_count, "`--new` starts a new swarm"
    if n == 0:
        if not last.founder:
            raise LastRunError(f"this identity was last in run {last.run_id} but knows none of its peers: "
                               f"--join ADDR rejoins it, {new}")
        return StartPlan(create=True, overrides=run, params=last.params,
                         notes=[f"resuming run {last.run_id} as its founder (no other peer known); {new}", *notes])
    answering = (reachable or any_reachable)(last.peers)
    if not answering and last.founder:
        return StartPlan(create=True, overrides=run, params=last.params, notes=[
            f"resuming run {last.run_id} as its founder: none of its {n} known peer(s) answers; {new}", *notes])
    notes.insert(0, f"rejoining run {last.run_id} via {n} known peer(s); {new}")
    if not answering:
        notes.insert(1, "none of them answers yet: the node keeps trying in the background (--join ADDR names "
                        "another peer of the run)")
    return StartPlan(create=False, overrides=[*run, f"swarm.initial_peers={json.dumps(list(last.peers))}"],
                     notes=notes)


def _tcp_target(address: str) -> tuple[str, int] | None:
    if address.startswith(("http://", "https://")):
        parts = urllib.parse.urlsplit(address)
        return (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)) if parts.hostname else None
    match = _TCP.match(address)
    return (match.group(1), int(match.group(2))) if match else None


def _connects(target: tuple[str, int], timeout: float) -> bool:
    try:
        socket.create_connection(target, timeout=timeout).close()
        return True
    except OSError:
        return False


def any_reachable(addresses: Sequence[str], timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether any address accepts a TCP connection within ``timeout`` (all tried at once)."""
    targets = sorted({t for t in map(_tcp_target, addresses) if t is not None})
    if not targets:
        return False
    pool = ThreadPoolExecutor(max_workers=min(16, len(targets)), thread_name_prefix="peer-probe")
    try:
        return any(f.result() for f in as_completed([pool.submit(_connects, t, timeout) for t in targets]))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def busy_listen_port(host_maddrs: Sequence[str]) -> str | None:
    """Why a fixed TCP listen port in ``host_maddrs`` cannot be used (in use, or not allowed), else None."""
    for maddr in host_maddrs:
        match = re.fullmatch(r"/(ip4|ip6)/([^/]+)/tcp/(\d+)", maddr)
        if match is None or int(match.group(3)) == 0:
            continue
        family = socket.AF_INET if match.group(1) == "ip4" else socket.AF_INET6
        port = int(match.group(3))
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart's TIME_WAIT is no conflict
            try:
                probe.bind((match.group(2), port))
            except OSError as exc:
                if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                    continue  # e.g. no IPv6 here: the libp2p daemon reports that itself
                why = "is already in use (another node on this machine?)" if exc.errno == errno.EADDRINUSE else \
                    "needs privileges"
                ip = "0.0.0.0" if family == socket.AF_INET else "::"
                return (f"TCP port {port} ({maddr}) {why}. Listen on another port with --host-maddrs "
                        f"/{match.group(1)}/{ip}/tcp/PORT (forward that one instead; docs/networking.md), or on "
                        f"any free port with --host-maddrs /{match.group(1)}/{ip}/tcp/0 (peers outside this "
                        f"network then cannot dial in)")
    return None
