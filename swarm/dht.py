"""The node's DHT membership: start hivemind's DHT without ever blocking on bootstrap, publish and read records.

:class:`SwarmDHT` starts ``hivemind.DHT`` (one background process with one libp2p daemon) in a thread.
With ``initial_peers`` it keeps retrying with exponential backoff until one of them answers, and
reports its state (``starting → bootstrapping → online``, ``retrying`` between attempts) so the node
can serve /health and /metrics the whole time. An initial peer may also be the URL of a node's
metrics port (``http://bootstrap:9464``): it is resolved through that node's /health to its multiaddrs
at every attempt, so containers can join a peer whose id they cannot know in advance. Reads and writes go through
:mod:`swarm.records`: signed, schema-checked, counted when rejected.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial

import hivemind
from hivemind.utils import get_dht_time

from protocol.messages import RunRecord, StageRecord, encode_message
from swarm.access import SwarmAccess
from swarm.procs import descendants, p2pd_sockets, remove_unbound_sockets
from swarm.records import (
    RECORD_LIMITS,
    RUNS_KEY,
    SwarmRecordValidator,
    load_identity_key,
    parse_entries,
    run_subkey_name,
    stage_key,
)

logger = logging.getLogger(__name__)

BOOTSTRAP_STATES = ("starting", "bootstrapping", "online", "retrying", "failed")
_LOOPBACK = ("/ip4/127.", "/ip6/::1/")


def is_join_url(peer: str) -> bool:
    return peer.startswith(("http://", "https://"))


def maddrs_from_health(url: str, timeout: float = 5.0) -> list[str]:
    """A node's multiaddrs, read from its /health endpoint (``http://host:port`` means ``…/health``).

    Loopback addresses are dropped unless the URL's host is itself loopback: they would point at the
    reader's own machine. Raises ``OSError`` (unreachable) or ``ValueError`` (not a node's /health).
    """
    parts = urllib.parse.urlsplit(url)
    if parts.path in ("", "/"):
        url = urllib.parse.urlunsplit(parts._replace(path="/health"))
    with urllib.request.urlopen(url, timeout=timeout) as response:
        health = json.load(response)
    if not isinstance(health, dict) or not isinstance(health.get("maddrs", []), list):
        raise ValueError(f"{url} did not answer with a node's /health JSON")
    maddrs = [m for m in health.get("maddrs") or [] if isinstance(m, str) and m.startswith("/")]
    host = parts.hostname or ""
    if host not in ("localhost", "::1") and not host.startswith("127."):
        maddrs = [m for m in maddrs if not m.startswith(_LOOPBACK)]
    return maddrs


def resolve_initial_peers(peers: Sequence[str], timeout: float = 5.0) -> tuple[list[str], list[str]]:
    """Multiaddrs to bootstrap from: multiaddrs as given, URLs through /health. Returns (maddrs, errors)."""
    maddrs, errors = [], []
    for peer in peers:
        if not is_join_url(peer):
            maddrs.append(peer)
            continue
        try:
            found = maddrs_from_health(peer, timeout)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            errors.append(f"{peer}: {getattr(exc, 'reason', exc)}")
            continue
        if not found:
            errors.append(f"{peer}: that node is not in a swarm yet")
        maddrs += found
    return maddrs, errors


class _DHTProcess(hivemind.DHT):
    """hivemind's DHT process in its own session and deaf to SIGINT/SIGTERM: the daemon's main process
    decides when it stops (after announcing OFFLINE), so a Ctrl-C sent to the terminal's process group
    cannot cut it short. It exits by itself when the daemon process disappears."""

    def run(self) -> None:
        # Own session: a Ctrl-C (SIGINT to the terminal's process group) reaches neither this process nor
        # the libp2p daemon it spawns, so both are still up when the daemon announces OFFLINE.
        try:
            os.setsid()
        except OSError:
            pass
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _die_with_parent()
        super().run()


def _die_with_parent() -> None:
    """Exit when the daemon's process is gone (e.g. OOM-killed), so this process cannot linger holding the
    daemon's identity lock (inherited across fork) and its sockets. Polled: PR_SET_PDEATHSIG would fire
    when the *thread* that forked us ends, which the bootstrap thread does right after start-up."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class SwarmDHT:
    """hivemind DHT with background bootstrap, record publishing and validated reads.

    Lifecycle: ``run_in_background()`` → (``wait_online()``) → … → ``shutdown()``.
    ``on_state(state)`` is called on every bootstrap state change; ``time_op(op)`` is an optional
    context-manager factory used around every store/get (metrics).
    """

    def __init__(
        self,
        *,
        initial_peers: Sequence[str] = (),
        host_maddrs: Sequence[str] = ("/ip4/0.0.0.0/tcp/0",),
        announce_maddrs: Sequence[str] = (),
        identity_path: str | None = None,
        retry_max_s: float = 30.0,
        client_mode: bool = False,
        call_timeout: float = 30.0,
        on_state: Callable[[str], None] | None = None,
        time_op: Callable[[str], object] | None = None,
        access: SwarmAccess | None = None,
    ):
        self.initial_peers = list(initial_peers)
        self.host_maddrs = list(host_maddrs)
        self.announce_maddrs = list(announce_maddrs)
        if identity_path is None:  # a throwaway identity (status readers, tests), still one key per peer
            self._tmpdir = tempfile.TemporaryDirectory(prefix="protoswarm-id-")
            identity_path = os.path.join(self._tmpdir.name, "identity.key")
        self.identity_path = identity_path
        self.retry_max_s = retry_max_s
        self.client_mode = client_mode
        self.call_timeout = call_timeout  # every call into the DHT process: it may have died
        self._maddrs: list[str] = []
        # Records are signed with the identity's own key, so readers can check signer == peer id.
        self.validator = SwarmRecordValidator(load_identity_key(identity_path))
        self.state = "starting"
        self.attempts = 0
        self.last_error: str | None = None
        self.dht: hivemind.DHT | None = None
        self._on_state = on_state
        self._time_op = time_op
        # Record traffic of this node's own calls (not hivemind's routing and replication): stores and
        # the bytes of their values; gets, the entries they returned and those entries' bytes.
        self.traffic: Counter[str] = Counter(stores=0, store_bytes=0, gets=0, entries_read=0, read_bytes=0)
        self.access = access or SwarmAccess()  # records failing it are skipped by readers (swarm/access.py)
        self._online = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # lifecycle -----------------------------------------------------------------------------------------

    def run_in_background(self) -> None:
        self._thread = threading.Thread(target=self._bootstrap_loop, name="dht-bootstrap", daemon=True)
        self._thread.start()

    def wait_online(self, timeout: float | None = None) -> bool:
        return self._online.wait(timeout)

    @property
    def online(self) -> bool:
        return self._online.is_set()

    def shutdown(self, graceful: bool = True) -> None:
        """Stop the DHT process and its libp2p daemon; SIGKILL whatever of them outlives the grace period
        (``graceful=False``: at once, for a one-shot reader such as `node status` that stores nothing).

        The DHT process ignores SIGTERM (see ``_DHTProcess``), so hivemind's own fallback (terminate)
        would not work; the process tree is collected first because killing the DHT process reparents
        its libp2p daemon.
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30 if graceful else 2)
        if self.dht is not None:
            dht, self.dht = self.dht, None
            tree = [dht.pid, *descendants(dht.pid)] if dht.pid else []
            if graceful:
                dht.shutdown()
                dht.join(5)
            for pid in tree:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass  # already gone: the normal case
        self._online.clear()

    def _set_state(self, state: str) -> None:
        self.state = state
        if self._on_state is not None:
            self._on_state(state)

    def _bootstrap_loop(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            self.attempts += 1
            self._set_state("bootstrapping")
            initial_peers, errors = resolve_initial_peers(self.initial_peers)
            if self.initial_peers and not initial_peers:  # only URLs, none of them answering yet
                self.last_error = "; ".join(errors)[:300]
                self._set_state("retrying")
                logger.warning("cannot reach any of %s (attempt %d: %s); retrying in %.0f s",
                               self.initial_peers, self.attempts, self.last_error, delay)
                if self._stop.wait(delay):
                    return
                delay = min(delay * 2, self.retry_max_s)
                continue
            dht = _DHTProcess(
                initial_peers=initial_peers or None,
                start=False,
                host_maddrs=self.host_maddrs,
                announce_maddrs=self.announce_maddrs or None,
                identity_path=self.identity_path,
                record_validators=[self.validator],
                client_mode=self.client_mode,
                shutdown_timeout=3,
            )
            sockets_before = p2pd_sockets()
            try:
                dht.run_in_background(await_ready=True)
            except Exception as exc:  # hivemind raises P2PDaemonError/RuntimeError/… for unreachable peers
                self.last_error = f"{type(exc).__name__}: {exc}".strip()[:300]
                dht.shutdown()
                remove_unbound_sockets(p2pd_sockets() - sockets_before)
                if not self.initial_peers:
                    self._set_state("failed")  # nothing to retry: the local daemon itself cannot start
                    logger.error("cannot start the DHT: %s", self.last_error)
                    return
                self._set_state("retrying")
                logger.warning(
                    "cannot reach any of %s (attempt %d: %s); retrying in %.0f s",
                    self.initial_peers, self.attempts, self.last_error, delay,
                )
                if self._stop.wait(delay):
                    return
                delay = min(delay * 2, self.retry_max_s)
                continue
            if self._stop.is_set():
                dht.shutdown()
                return
            self.dht = dht
            self._maddrs = [str(m) for m in dht.get_visible_maddrs()]
            self.last_error = None
            self._set_state("online")
            self._online.set()
            logger.info("DHT online as %s after %d attempt(s)", dht.peer_id, self.attempts)
            return

    # identity ------------------------------------------------------------------------------------------

    @property
    def peer_id(self) -> str | None:
        return str(self.dht.peer_id) if self.dht is not None else None

    def visible_maddrs(self) -> list[str]:
        """This node's addresses, as seen when it came online (no call into the DHT process)."""
        return list(self._maddrs) if self.dht is not None else []

    # records -------------------------------------------------------------------------------------------

    def _timed(self, op: str):
        if self._time_op is None:
            return _NullContext()
        return self._time_op(op)

    def _count_store(self, value: bytes) -> None:
        self.traffic["stores"] += 1
        self.traffic["store_bytes"] += len(value)

    def _count_get(self, found) -> None:
        entries = found.value if found is not None and isinstance(found.value, dict) else {}
        self.traffic["gets"] += 1
        self.traffic["entries_read"] += len(entries)
        self.traffic["read_bytes"] += sum(len(v) for e in entries.values() if isinstance(v := getattr(e, "value", None), bytes))

    def store_stage_record(self, record: StageRecord, expiry_s: float) -> bool:
        """Store this node's record for ``expiry_s`` seconds. The DHT keeps, per subkey, the value that expires
        last, so a longer-lived record of this identity (the "left on purpose" record a shutdown leaves) would
        refuse this one until it expires: a node restarted within that time would be invisible. Such a record is
        read and outlasted by a hair (this one then lives as long as it would have)."""
        assert self.dht is not None, "store before the DHT is online"
        key, subkey = stage_key(record.run_id, record.stage), self.validator.subkey(record.peer_id)
        value = encode_message(record, RECORD_LIMITS)
        expiration = get_dht_time() + expiry_s
        if self._store(key, subkey, value, expiration):
            return True
        with self._timed("get"):
            found = self.dht.get(key, latest=True, return_future=True).result(self.call_timeout)
        self._count_get(found)  # the DHT traffic /health reports counts this read too
        entries = found.value if found is not None and isinstance(found.value, dict) else {}
        held = getattr(entries.get(subkey), "expiration_time", None)
        if held is None or held < expiration:
            return False  # refused for another reason (no peer reachable, a validator)
        return self._store(key, subkey, value, held + 0.01)

    def _store(self, key: str, subkey: bytes, value: bytes, expiration: float) -> bool:
        self._count_store(value)
        with self._timed("store"):
            ok = self.dht.store(key, subkey=subkey, value=value, expiration_time=expiration,
                                return_future=True).result(self.call_timeout)
        return bool(ok)

    def get_stage_records(self, run_id: str, num_stages: int) -> tuple[dict[int, list[StageRecord]], Counter]:
        """Valid records per stage (newest per peer), and the entries skipped by reason."""
        assert self.dht is not None, "get before the DHT is online"
        rejected: Counter[str] = Counter()
        by_stage: dict[int, list[StageRecord]] = {}
        for stage in range(num_stages):
            with self._timed("get"):
                found = self.dht.get(stage_key(run_id, stage), latest=True, return_future=True).result(
                    self.call_timeout
                )
            self._count_get(found)
            parsed = parse_entries(found.value if found is not None else None, StageRecord)
            rejected.update(parsed.rejected)
            # A record filed under another stage's key is not trusted for this one.
            by_stage[stage] = [r for r in parsed.records if r.stage == stage and r.run_id == run_id]
            if len(parsed.records) > len(by_stage[stage]):
                rejected["wrong_kind"] += len(parsed.records) - len(by_stage[stage])
            admitted = [r for r in by_stage[stage] if self.access.admits_record(run_id, r.peer_id, r.access)]
            rejected["access"] += len(by_stage[stage]) - len(admitted)
            by_stage[stage] = admitted
        return by_stage, rejected

    def store_run_record(self, record: RunRecord, expiry_s: float) -> bool:
        assert self.dht is not None, "store before the DHT is online"
        return self._store(RUNS_KEY, self.validator.subkey(run_subkey_name(record.run_id, record.publisher)),
                           encode_message(record, RECORD_LIMITS), get_dht_time() + expiry_s)

    def get_run_records(self) -> tuple[list[RunRecord], list[bytes], Counter]:
        """Valid run records, the key that signed each, and the entries skipped by reason."""
        assert self.dht is not None, "get before the DHT is online"
        with self._timed("get"):
            found = self.dht.get(RUNS_KEY, latest=True, return_future=True).result(self.call_timeout)
        self._count_get(found)
        parsed = parse_entries(found.value if found is not None else None, RunRecord)
        records, owners, rejected = [], [], parsed.rejected
        for record, owner in zip(parsed.records, parsed.owners, strict=True):
            if self.access.admits_record(record.run_id, record.publisher, record.access):
                records.append(record)
                owners.append(owner)
            else:
                rejected["access"] += 1
        return records, owners, rejected

    def rejected_inside_dht(self) -> Counter:
        """Records this node's DHT process refused (stores from peers and fetched values), by reason."""
        if self.dht is None:
            return Counter()
        return Counter(self.dht.run_coroutine(partial(_validator_counts), return_future=True).result(self.call_timeout))

    def become_client(self) -> bool:
        """Stop serving DHT requests (a node peers cannot dial: keep it out of their routing tables). True
        if it was a server until now. The node still reads and stores records through the others."""
        if self.dht is None:
            return False
        return bool(self.dht.run_coroutine(partial(_become_client), return_future=True).result(self.call_timeout))


async def _become_client(dht: hivemind.DHT, node) -> bool:
    """In the DHT process: what hivemind's ``client_mode=True`` sets up at start, done now."""
    from hivemind.proto import dht_pb2

    protocol = node.protocol
    if protocol.client_mode:
        return False
    protocol.client_mode = True
    protocol.node_info = dht_pb2.NodeInfo()  # empty: peers that hear from it do not add it to routing tables
    await protocol.remove_p2p_handlers(protocol.p2p)
    return True


async def _validator_counts(dht: hivemind.DHT, node) -> dict[str, int]:
    validator = node.protocol.record_validator
    for inner in getattr(validator, "_validators", [validator]):
        if isinstance(inner, SwarmRecordValidator):
            return dict(inner.rejected)
    return {}


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False
