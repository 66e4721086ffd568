"""Who may take part in a run: an optional swarm key and an optional allow-list of peer ids.

Without either, a swarm is open (anyone who reaches a peer may join). With them (docs/security.md):

- **Swarm key** (``swarm.access_key_file``: a file holding a shared secret of at least 16 bytes,
  never published). Every stage and run record a node writes carries ``access = HMAC-SHA256(key,
  "protoswarm-access-v1|<run>|<peer id>")``. The record is signed by the peer's identity key and
  readers check that the signer *is* that peer (swarm/records.py), so the proof cannot be lifted onto
  another peer id: a peer without the key cannot produce a record that keyed nodes read. Their
  readers skip records without a valid proof (counted as ``records_rejected_total{reason="access"}``),
  so such a peer never serves a stage, joins an exchange group or publishes run parameters in their
  view.
  The libp2p protocol names of protoswarm's stream handlers carry a tag derived from the key as
  well, so a peer without it cannot open a pipeline, exchange or state stream to a keyed node at all
  (libp2p answers "protocol not supported"), and keyed nodes only ever dial peers whose records
  they accepted, so the tag is never shown to an outsider.
- **Allow-list** (``swarm.allow_peers``: peer ids). Records of other peers are skipped the same way,
  streams they open are closed before a byte is read (``access_denied_total``), and the node never
  dials them.

What it does not do: the DHT itself stays open (anyone may store values under any key; readers
ignore what fails the checks), and a member who holds the key is trusted as any member is
(poisoning defences apply to them: docs/diloco.md, docs/pipeline.md).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MIN_KEY_BYTES = 16
_PROOF_CONTEXT = b"protoswarm-access-v1|"
_HANDLER_CONTEXT = b"protoswarm-handlers-v1|"


class AccessError(ValueError):
    """The swarm key file cannot be used."""


def load_key(path: str | Path) -> bytes:
    """The secret in a key file (surrounding whitespace stripped); at least 16 bytes."""
    file = Path(path).expanduser()
    try:
        key = file.read_bytes().strip()
    except OSError as exc:
        raise AccessError(f"swarm key file {file}: {exc.strerror or exc}") from None
    if len(key) < MIN_KEY_BYTES:
        raise AccessError(f"swarm key file {file} holds {len(key)} bytes; a key needs at least {MIN_KEY_BYTES} "
                          "(e.g. `head -c 32 /dev/urandom | base64 > swarm.key`)")
    return key


class SwarmAccess:
    """The access rules of one node for one run. ``SwarmAccess()`` is an open swarm (everything passes)."""

    def __init__(self, key: bytes | None = None, allow: Iterable[str] = (), self_id: str | None = None):
        self.key = key
        self.allow = frozenset(allow)
        self.self_id = self_id

    @classmethod
    def from_config(cls, swarm_cfg: Any) -> SwarmAccess:
        key = load_key(swarm_cfg.access_key_file) if swarm_cfg.access_key_file else None
        return cls(key, swarm_cfg.allow_peers)

    @property
    def open(self) -> bool:
        return self.key is None and not self.allow

    def describe(self) -> str:
        parts = (["swarm key"] if self.key else []) + ([f"{len(self.allow)} allowed peer(s)"] if self.allow else [])
        return " + ".join(parts) or "open"

    # records ---------------------------------------------------------------------------------------

    def proof(self, run_id: str, peer_id: str) -> str:
        """The ``access`` field this node writes into its records ("" without a key)."""
        if self.key is None:
            return ""
        message = _PROOF_CONTEXT + f"{run_id}|{peer_id}".encode()
        return hmac.new(self.key, message, hashlib.sha256).hexdigest()

    def admits_record(self, run_id: str, peer_id: str, access: str) -> bool:
        """Whether a record by ``peer_id`` (already checked to be signed by that peer) may be read."""
        if not self.admits_peer(peer_id):
            return False
        return self.key is None or hmac.compare_digest(self.proof(run_id, peer_id), access)

    def admits_peer(self, peer_id: str) -> bool:
        return not self.allow or peer_id in self.allow or peer_id == self.self_id

    # streams ---------------------------------------------------------------------------------------

    def protocol(self, name: str) -> str:
        """The libp2p protocol name of handler ``name``: tagged with the key, if any."""
        if self.key is None:
            return name
        tag = hmac.new(self.key, _HANDLER_CONTEXT + name.encode(), hashlib.sha256).hexdigest()[:24]
        return f"{name}.k{tag}"


class GatedP2P:
    """hivemind's P2P with the access rules applied to protoswarm's stream handlers.

    ``add_binary_stream_handler`` registers under the keyed protocol name and closes streams from
    peers outside the allow-list before the handler sees them (``on_denied(peer)``);
    ``call_binary_stream_handler`` refuses to dial such peers. Everything else is hivemind's P2P.
    """

    def __init__(self, p2p: Any, access: SwarmAccess, on_denied: Callable[[str], None] | None = None):
        self._p2p = p2p
        self.access = access
        self._on_denied = on_denied

    async def add_binary_stream_handler(self, name: str, handler, *args, **kwargs):
        access = self.access

        async def gated(info, reader, writer):
            peer = str(info.peer_id)
            if not access.admits_peer(peer):
                if self._on_denied is not None:
                    self._on_denied(peer)
                writer.close()
                return
            await handler(info, reader, writer)

        return await self._p2p.add_binary_stream_handler(access.protocol(name), gated, *args, **kwargs)

    async def call_binary_stream_handler(self, peer_id, name: str, *args, **kwargs):
        if not self.access.admits_peer(str(peer_id)):
            raise PermissionError(f"peer {peer_id} is not on this node's allow-list")
        return await self._p2p.call_binary_stream_handler(peer_id, self.access.protocol(name), *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._p2p, name)
