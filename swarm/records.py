"""What peers store in the DHT, under which keys, and how every node validates it.

Keys (hivemind hashes them; each holds one value per *subkey*):

- ``protoswarm.runs``              subkey per (run, publisher): :class:`~protocol.messages.RunRecord`
- ``protoswarm.<run>.stage.<s>``   subkey per peer: :class:`~protocol.messages.StageRecord`

A protoswarm subkey is ``b"psw1:" + <peer id or run id> + b"[owner:<RSA public key>]"``. The owner
part makes hivemind's signature scheme apply: the value carries a signature by that key, so only
the owner can write or overwrite its own subkey. The key is the node's libp2p identity key, and
validators require the peer id derived from it to be the peer the record speaks for. :class:`SwarmRecordValidator` runs inside every
node's DHT and refuses, for any ``psw1:`` subkey, records that are unsigned, badly signed, not a
decodable record of the right kind and protocol version, or whose peer id disagrees with the
subkey. Records under our keys with foreign subkeys cannot be recognised inside the DHT (it sees
only key hashes), so readers (:func:`parse_stage_entries`) check every entry again and skip the rest.
Both places count rejections by reason.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
import time
from collections import Counter

import base58
import msgpack
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord
from hivemind.utils.crypto import RSAPrivateKey

from protocol.errors import ProtocolError, VersionMismatch
from protocol.messages import RunRecord, StageRecord, decode_message
from protocol.tensors import WireLimits

SUBKEY_PREFIX = b"psw1:"
RUNS_KEY = "protoswarm.runs"
MAX_STAGES = 1024
RECORD_LIMITS = WireLimits(max_frame_bytes=256 * 1024, max_header_bytes=256 * 1024, max_tensors=1)

REJECT_REASONS = (
    "unsigned", "bad_signature", "malformed", "version", "wrong_kind", "wrong_owner", "foreign", "future",
    "access",  # readers only: no valid proof of the swarm key, or not on the allow-list (swarm/access.py)
)
_OWNER = re.compile(rb"\[owner:.+?\]", re.S)
_OWNER_KEY = re.compile(rb"\[owner:(.+?)\]", re.S)


def stage_key(run_id: str, stage: int) -> str:
    return f"protoswarm.{run_id}.stage.{stage}"


class IdentityError(ValueError):
    """The identity file cannot be used to sign records (unreadable, or not an RSA key)."""


def load_identity_key(identity_path: str) -> RSAPrivateKey:
    """The RSA key inside a libp2p identity file (created with hivemind's generator if missing).

    Records are signed with the same key that defines the peer id, so a reader can check that a
    record's signer *is* the peer it speaks for (:func:`peer_id_of`).
    """
    from hivemind.p2p import P2P
    from hivemind.proto import crypto_pb2

    if not os.path.isfile(identity_path):
        P2P.generate_identity(identity_path)
    try:
        with open(identity_path, "rb") as f:
            proto = crypto_pb2.PrivateKey.FromString(f.read())
    except Exception as exc:  # unreadable or not a libp2p key file
        raise IdentityError(f"identity {identity_path} is not a libp2p key file ({exc})") from None
    if proto.key_type != crypto_pb2.KeyType.RSA:
        raise IdentityError(
            f"identity {identity_path} holds a non-RSA key; protoswarm signs records with the identity's RSA "
            "key: point --identity at a new path to create one"
        )
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key.__setstate__({"_private_key": proto.data})  # hivemind's own (un)pickling format: DER bytes
    return key


@functools.lru_cache(maxsize=4096)
def peer_id_of(owner_key: bytes) -> str | None:
    """The libp2p peer id (base58) of the RSA public key in an ``[owner:…]`` marker; None if unparsable."""
    from cryptography.hazmat.primitives import serialization
    from hivemind.proto import crypto_pb2
    from hivemind.utils.crypto import RSAPublicKey

    try:
        public = RSAPublicKey.from_bytes(owner_key)._public_key
        der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    except Exception:  # not a key: a forged marker
        return None
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    return base58.b58encode(b"\x12\x20" + hashlib.sha256(encoded).digest()).decode()


def owner_key(subkey: bytes) -> bytes | None:
    match = _OWNER_KEY.search(subkey)
    return match.group(1) if match else None


def owner_name(subkey: bytes) -> str | None:
    """The peer/run id a protoswarm subkey names (None if the subkey is not ours)."""
    if not isinstance(subkey, bytes) or not subkey.startswith(SUBKEY_PREFIX):
        return None
    name = _OWNER.sub(b"", subkey[len(SUBKEY_PREFIX) :])
    try:
        return name.decode("ascii")
    except UnicodeDecodeError:
        return None


class SwarmRecordValidator(RSASignatureValidator):
    """hivemind record validator for protoswarm subkeys; counts what it refuses in ``rejected``.

    It signs this node's records (subkeys built with :meth:`subkey`) and verifies everyone else's,
    then checks the value's schema. Records without the ``psw1:`` prefix are left to other validators.
    """

    def __init__(self, private_key: RSAPrivateKey | None = None):
        super().__init__(private_key or RSAPrivateKey())
        self.rejected: Counter[str] = Counter()

    def subkey(self, name: str) -> bytes:
        """A subkey this node owns (and signs) for a peer id or run id."""
        return SUBKEY_PREFIX + name.encode("ascii") + self.local_public_key

    def validate(self, record: DHTRecord) -> bool:
        subkey = _unpack_subkey(record.subkey)
        if subkey is None or not subkey.startswith(SUBKEY_PREFIX):
            return super().validate(record)  # not ours: only the generic owner rule applies
        if not self._PUBLIC_KEY_RE.search(subkey):
            return self._reject("unsigned")
        if not super().validate(record):
            return self._reject("bad_signature")
        # Inside the DHT the value is still msgpack-serialized (the application sees the bytes it stored).
        try:
            value = msgpack.unpackb(self.strip_value(record), raw=False)
        except Exception:  # any garbage: msgpack raises several unrelated types
            return self._reject("malformed")
        if not isinstance(value, bytes):
            return self._reject("malformed")
        _, reason = check_record(owner_name(subkey), value, owner_key(subkey))
        return self._reject(reason) if reason else True

    def _reject(self, reason: str) -> bool:
        self.rejected[reason] += 1
        return False

    def merge_with(self, other) -> bool:
        # A second validator of ours (or hivemind's RSA one) would only duplicate the signature step.
        return isinstance(other, RSASignatureValidator)


def _unpack_subkey(raw: bytes | None) -> bytes | None:
    """Inside the DHT, subkeys arrive msgpack-serialized; the application passes raw bytes."""
    if raw is None:
        return None
    try:
        subkey = msgpack.unpackb(raw, raw=False)
    except Exception:  # not msgpack: cannot be one of ours
        return None
    return subkey if isinstance(subkey, bytes) else None


def is_signed(subkey: bytes) -> bool:
    return bool(_OWNER.search(subkey))


def check_record(owner: str | None, value: bytes, key: bytes | None = None) -> tuple[object, str | None]:
    """(decoded record, None) if a protoswarm record value is acceptable, else (None, a REJECT_REASONS entry).

    The signing key must be the identity key of the peer the record speaks for: a peer can only
    announce itself, and one identity is one vote.
    """
    if owner is None:
        return None, "foreign"
    signer = peer_id_of(key) if key is not None else None
    try:
        msg = decode_message(value, RECORD_LIMITS)
    except VersionMismatch:
        return None, "version"
    except ProtocolError:
        return None, "malformed"
    if isinstance(msg, StageRecord):
        ok = msg.peer_id == owner == signer
    elif isinstance(msg, RunRecord):
        ok = f"{msg.run_id}/{msg.publisher}" == owner and msg.publisher == signer
    else:
        return None, "wrong_kind"
    return (msg, None) if ok else (None, "wrong_owner")


def run_subkey_name(run_id: str, publisher: str) -> str:
    return f"{run_id}/{publisher}"


MAX_CLOCK_SKEW_S = 120.0  # records "from the future" beyond this are refused (they would win "newest")


@dataclasses.dataclass
class ParsedEntries:
    """Valid records from one DHT key, newest per peer, plus what was skipped and why.

    ``owners[i]`` is the signing key (the subkey's ``[owner:…]`` part) of ``records[i]``.
    """

    records: list
    rejected: Counter
    owners: list = dataclasses.field(default_factory=list)


def parse_entries(entries: dict | None, kind: type) -> ParsedEntries:
    """Decode the ``{subkey: ValueWithExpiration}`` map of one key into records of ``kind``.

    Entries that are not valid protoswarm records of that kind are skipped and counted; for stage
    records only the newest (by timestamp) per peer id is kept (a restarted peer signs with a new key).
    """
    rejected: Counter[str] = Counter()
    newest: dict[str, tuple[object, bytes]] = {}
    horizon = time.time() + MAX_CLOCK_SKEW_S
    for subkey, item in (entries or {}).items():
        value = getattr(item, "value", None)
        owner = owner_name(subkey)
        msg, reason = None, None
        if owner is not None and not is_signed(subkey):
            reason = "unsigned"
        elif not isinstance(value, bytes):
            reason = "malformed"
        else:
            msg, reason = check_record(owner, value, owner_key(subkey))
        if reason is None and not isinstance(msg, kind):
            reason = "wrong_kind"
        if reason is None and getattr(msg, "timestamp", getattr(msg, "created", 0.0)) > horizon:
            reason = "future"
        if reason:
            rejected[reason] += 1
            continue
        key = msg.peer_id if isinstance(msg, StageRecord) else owner
        old = newest.get(key)
        if old is None or getattr(msg, "timestamp", 0.0) >= getattr(old[0], "timestamp", 0.0):
            newest[key] = (msg, _OWNER.search(subkey).group(0))
    return ParsedEntries(
        records=[m for m, _ in newest.values()], rejected=rejected, owners=[o for _, o in newest.values()]
    )


def choose_run(records: list[RunRecord], owners: list[bytes], run_id: str | None) -> RunRecord | str | None:
    """The run to join: the parameters published by the most distinct signing keys (ties: earliest
    created); an error string if several runs exist and none was named; None if nothing is published.

    Votes are counted per key, not per record, so one key publishing many copies under invented
    publisher names counts once.
    """
    pairs = [(r, o) for r, o in zip(records, owners, strict=True) if run_id is None or r.run_id == run_id]
    if not pairs:
        return None
    runs = sorted({r.run_id for r, _ in pairs})
    if len(runs) > 1:
        return f"this swarm has several runs ({', '.join(runs)}); choose one with --run-id"
    votes: dict[bytes, set[bytes]] = {}
    for r, owner in pairs:
        votes.setdefault(r.config, set()).add(owner)
    best = max(votes, key=lambda cfg: (len(votes[cfg]), -min(r.created for r, _ in pairs if r.config == cfg)))
    return min((r for r, _ in pairs if r.config == best), key=lambda r: r.created)
