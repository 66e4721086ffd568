"""Every record that crosses between peers, in one place.

==========================  =====================================================================
message (kind)              what it carries
==========================  =====================================================================
``ActivationFrame``         stage s → s+1: token ids and the k subspace coefficients per token
``GradientFrame``           stage s+1 → s: ∂L/∂c for a microbatch (and the loss, from the last stage)
``EvalResult``              the loss of an evaluation microbatch (forward only), back along its route
``FragmentRequest``         ask a replica for its contribution to (round, fragment)
``FragmentPart``            one part of a replica's 4-bit pseudo-gradient for (round, fragment)
``SliceSummary``            what a balanced-exchange reducer (or checker) averaged for one slice
``GroupRoster``             a balanced-exchange round's group, as its leader closed it
``StateRequest``            a joiner asks for the current state manifest of a stage
``StateManifest``           what a stage's state consists of: entries with shapes and SHA-256s
``StateChunkRequest``       fetch chunk i of the state named by a manifest digest
``StateChunk``              the raw bytes of that chunk
``StageRecord``             announcement/heartbeat: a peer's stage, state, throughput, progress
``RunRecord``               a run's parameters (model, S, k, codecs, …) so joiners need no config
``DialbackRequest``         "dial me back": can a stranger open a connection to my listening ports?
``DialbackReply``           the address the asker was seen at, and which ports a fresh dial reached
``ErrorReply``              a refusal with a machine-readable ``code`` and a sentence for people
==========================  =====================================================================

Encode with :func:`encode_message`, decode with :func:`decode_message` (which raises only
:class:`~protocol.errors.ProtocolError` on bad input). Every header carries ``v = [major, minor]``;
another major version is refused with :class:`~protocol.errors.VersionMismatch`, and
:class:`ErrorReply` keeps the same layout in every version so the refusal itself is readable.
Integer fields are non-negative, floats finite, strings and lists bounded (:class:`WireLimits`).
"""

from __future__ import annotations

import dataclasses
import re

import torch

from protocol.errors import ERROR_CODES, MalformedMessage, TensorError, short_repr
from protocol.schema import (
    ERROR_KIND,
    MESSAGE_KINDS,
    PROTOCOL_VERSION,
    Message,
    Record,
    decode_message,
    encode_message,
    message,
    record,
    tensor_field,
)
from protocol.tensors import WireLimits

__all__ = [
    "MESSAGE_KINDS", "PROTOCOL_VERSION", "ActivationFrame", "DialbackReply", "DialbackRequest", "ErrorReply",
    "EvalResult", "FragmentPart", "FragmentRequest", "GradientFrame", "GroupRoster", "Message", "RunRecord",
    "SliceSummary", "StageRecord", "StateChunk", "StateChunkRequest", "StateEntry", "StateManifest",
    "StateRequest", "decode_message", "encode_message",
]

STAGE_STATES = ("joining", "online", "offline")
REACHABILITY = ("", "public", "private")  # "" = not known (yet, or a 1.0/1.1 peer)
MAX_DIALBACK_PORTS = 4
MAX_TOKENS_PER_S = 1e9  # a stage record's announced rate; larger ones are refused (not summed into views)
MAX_LOSS = 1e4
MAX_WEIGHT = 1e12  # a contribution's weight (e.g. tokens trained); larger ones are refused
MAX_STATE_NDIM, MAX_STATE_DIM = 8, 1 << 40  # a state entry's dimensions, and the size of each
STATE_PARTS = ("all", "consensus")
STATE_DTYPES = ("float32", "bfloat16", "float16", "int64", "int32", "uint8")
_HEX = re.compile(r"[0-9a-f]*")
# Run ids name directories on every peer (checkpoints): no separators, no "..", bounded.
RUN_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")


def check_run_id(run_id: str, what: str) -> None:
    if not RUN_ID.fullmatch(run_id):
        raise MalformedMessage(f"{what}: run id {short_repr(run_id)} must be 1-64 of [A-Za-z0-9_.-], not starting with '.'")


def _check_ids(ids: torch.Tensor, limits: WireLimits, what: str) -> None:
    if ids.numel() == 0:
        return
    if int(ids.min()) < 0:
        raise TensorError(f"{what}: token ids must be non-negative")
    if limits.max_token_id is not None and int(ids.max()) >= limits.max_token_id:
        raise TensorError(f"{what}: token id {int(ids.max())} is outside the vocabulary of {limits.max_token_id}")


@message("activation")
class ActivationFrame(Message):
    """Subspace coefficients ``c = (x − T_fixed[ids])·U`` of one microbatch, sent to the next stage."""

    run_id: str
    microbatch_id: int
    stage: int  # index of the sending stage; the receiver serves stage + 1
    route: list[str]  # peer ids that handled this microbatch so far, stage 0 first
    token_ids: torch.Tensor = tensor_field(ndim=2, integer=True)  # (batch, seq)
    coefficients: torch.Tensor = tensor_field(ndim=3, codec_attr="codec")  # (batch, seq, k)
    codec: str = "fp32"  # codec of the coefficients (any float codec)
    basis: str = ""  # basis_fingerprint(U, T_fixed) of the sender, compared by the receiver
    step: int = 0  # sender's training progress when it produced the frame
    budget_s: float = 0.0  # seconds the sender will wait for the reply (0: the receiver's own default)

    def check(self, limits: WireLimits) -> None:
        if self.coefficients.shape[2] == 0:
            raise TensorError("ActivationFrame: coefficients need k ≥ 1 values per token")
        if tuple(self.coefficients.shape[:2]) != tuple(self.token_ids.shape):
            raise TensorError(
                f"coefficients {list(self.coefficients.shape)} do not match token ids {list(self.token_ids.shape)}"
            )
        _check_ids(self.token_ids, limits, "ActivationFrame.token_ids")


@message("gradient")
class GradientFrame(Message):
    """``∂L/∂c`` for the coefficients a stage received, sent back to the stage that produced them."""

    run_id: str
    microbatch_id: int
    stage: int  # index of the sending stage; the receiver serves stage − 1
    grad: torch.Tensor = tensor_field(ndim=3, codec_attr="codec")  # (batch, seq, k)
    codec: str = "fp32"
    loss: float | None = None  # the microbatch's loss, filled in by the last stage
    step: int = 0
    queue: int = 0  # the sender's queued compute jobs when it replied (a routing hint)


@message("eval_result")
class EvalResult(Message):
    """The loss of an evaluation microbatch (an ActivationFrame on the evaluation handler: forward only, on
    each stage's agreed weights), back along its route; each stage puts its agreed-state tag in front."""

    run_id: str
    microbatch_id: int
    stage: int  # the scoring (last) stage
    loss: float  # mean next-token loss of the microbatch (nats per token)
    tokens: int  # tokens scored
    agreed: list[str] = dataclasses.field(default_factory=list)  # agreed-state tag of each stage, answerer first

    def check(self, limits: WireLimits) -> None:
        check_run_id(self.run_id, "EvalResult")
        if not 0.0 <= self.loss <= MAX_LOSS or len(self.agreed) > 1024 or any(len(t) > 64 for t in self.agreed):
            raise MalformedMessage(f"EvalResult: loss {self.loss!r} outside 0..{MAX_LOSS:g}, or over 1024 agreed-state "
                                   "tags, or one over 64 characters")


@message("fragment_request")
class FragmentRequest(Message):
    """Ask a replica for its pseudo-gradient of ``fragment_id`` in outer round ``round_id``."""

    run_id: str
    stage: int
    round_id: int
    fragment_id: int


@message("fragment_part")
class FragmentPart(Message):
    """Values ``[offset, offset + n)`` of one replica's flattened pseudo-gradient for a fragment."""

    run_id: str
    stage: int
    round_id: int
    fragment_id: int
    part: int
    num_parts: int
    offset: int  # index of the first value of this part within the flattened fragment
    total_values: int  # values in the whole fragment
    weight: float = 1.0  # how much this contribution counts in the average (e.g. tokens trained)
    values: torch.Tensor = tensor_field(ndim=1, codec_attr="codec")
    codec: str = "e3m0"

    def check(self, limits: WireLimits) -> None:
        if not 0 <= self.part < self.num_parts:
            raise MalformedMessage(f"FragmentPart: part {self.part} is not in 0..{self.num_parts - 1}")
        if self.offset + self.values.numel() > self.total_values:
            raise TensorError(
                f"FragmentPart: values [{self.offset}, {self.offset + self.values.numel()}) "
                f"run past the fragment's {self.total_values} values"
            )
        if not 0 < self.weight <= MAX_WEIGHT:
            raise MalformedMessage(f"FragmentPart: weight must be in (0, {MAX_WEIGHT:g}], got {self.weight}")


@message("slice_summary")
class SliceSummary(Message):
    """What a reducer, or its checker, made of one slice of a fragment in a balanced exchange round
    (swarm/exchange/balanced.py): the parts it averaged (each sender and the SHA-256 of the weight and
    values it received from it) and the SHA-256 of the mean. A member applies the round only when the
    reducer's and the checker's summaries of every slice are identical and the mean it got matches."""

    run_id: str
    stage: int
    round_id: int
    fragment_id: int
    offset: int  # the slice's first value within the flattened fragment
    length: int  # values in the slice
    peers: list[str]
    part_sha256: list[str]  # one per peer, in the same order
    mean_sha256: str

    def check(self, limits: WireLimits) -> None:
        if self.length < 1:
            raise MalformedMessage("SliceSummary: an empty slice")
        if len(self.peers) != len(self.part_sha256) or not self.peers:
            raise MalformedMessage(f"SliceSummary: {len(self.peers)} peers with {len(self.part_sha256)} part digests")
        for digest in [*self.part_sha256, self.mean_sha256]:
            _check_digest(digest, "SliceSummary")


@message("group_roster")
class GroupRoster(Message):
    """A balanced-exchange round's group as its leader closed it (swarm/exchange/roster.py): the members
    that joined, in the round's order, and those of them that reduce nothing (others cannot dial them).
    Every member slices the fragment by this one list, so members whose views of the stage differ
    still plan the same slices."""

    run_id: str
    stage: int
    round_id: int
    fragment_id: int
    peers: list[str]
    unable: list[str] = dataclasses.field(default_factory=list)

    def check(self, limits: WireLimits) -> None:
        if not self.peers or len(set(self.peers)) != len(self.peers):
            raise MalformedMessage(f"GroupRoster: {len(self.peers)} peers, empty or with repeats")
        if not set(self.unable) <= set(self.peers):
            raise MalformedMessage("GroupRoster: an unable peer that is not in the group")


@message("state_request")
class StateRequest(Message):
    """A joiner asks a replica for the manifest of its stage's current state.

    ``part``: ``all`` (the replica's weights, and its outer state when it has one) or ``consensus``
    (only what the stage's replicas agree on: the Streaming DiLoCo global copies, momenta and history,
    the same bytes on every replica that applied the same means, so it can come from several)."""

    run_id: str
    stage: int
    part: str = "all"

    def check(self, limits: WireLimits) -> None:
        if self.part not in STATE_PARTS:
            raise MalformedMessage(f"StateRequest: part {short_repr(self.part)} is not one of {STATE_PARTS}")


@record
class StateEntry(Record):
    """One named tensor of a stage's state, as laid out in the concatenated state bytes."""

    name: str
    dtype: str  # one of STATE_DTYPES
    shape: list[int]
    offset: int  # byte offset in the concatenated state
    nbytes: int
    sha256: str

    def check(self, limits: WireLimits) -> None:
        if self.dtype not in STATE_DTYPES:
            raise TensorError(f"state entry {self.name!r}: dtype {self.dtype!r} is not one of {STATE_DTYPES}")
        # Bounded before multiplying: 4096 dims of 2⁶³ would be slow big-integer arithmetic.
        if len(self.shape) > MAX_STATE_NDIM or any(s > MAX_STATE_DIM for s in self.shape):
            raise TensorError(f"state entry {self.name!r}: shape {short_repr(self.shape)} is out of range")
        numel = 1
        for s in self.shape:
            numel *= s
        if numel * getattr(torch, self.dtype).itemsize != self.nbytes:
            raise TensorError(f"state entry {self.name!r}: {self.nbytes} bytes do not fit shape {self.shape}")
        _check_digest(self.sha256, f"state entry {self.name!r}")


def _check_access(access: str, what: str) -> None:
    if access and (len(access) != 64 or not _HEX.fullmatch(access)):
        raise MalformedMessage(f"{what}: access must be empty or 64 lowercase hex characters")


def _check_digest(digest: str, what: str) -> None:
    if len(digest) != 64 or not _HEX.fullmatch(digest):
        raise MalformedMessage(f"{what}: sha256 must be 64 lowercase hex characters")


@message("state_manifest")
class StateManifest(Message):
    """What a joiner downloads: the entries of a stage's state, split into fixed-size chunks."""

    run_id: str
    stage: int
    step: int  # training progress the state belongs to
    round_id: int  # outer rounds completed (schedule position)
    entries: list[StateEntry]
    chunk_bytes: int  # every chunk but the last has exactly this many bytes
    chunk_sha256: list[str]  # one digest per chunk, in order
    digest: str  # sha256 naming this manifest's state; chunk requests quote it

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def check(self, limits: WireLimits) -> None:
        if self.chunk_bytes <= 0:
            raise MalformedMessage("StateManifest: chunk_bytes must be positive")
        expected_chunks = -(-self.total_bytes // self.chunk_bytes)
        if len(self.chunk_sha256) != expected_chunks:
            raise MalformedMessage(
                f"StateManifest: {self.total_bytes} bytes in {self.chunk_bytes}-byte chunks need "
                f"{expected_chunks} chunk digests, got {len(self.chunk_sha256)}"
            )
        end = 0
        for entry in self.entries:
            if entry.offset != end:
                raise MalformedMessage(f"StateManifest: entry {entry.name!r} does not start where the last ended")
            end += entry.nbytes
        for i, digest in enumerate(self.chunk_sha256):
            _check_digest(digest, f"StateManifest chunk {i}")
        _check_digest(self.digest, "StateManifest")


@message("state_chunk_request")
class StateChunkRequest(Message):
    run_id: str
    stage: int
    digest: str  # the manifest's digest, so a replica that moved on can refuse
    index: int


@message("state_chunk")
class StateChunk(Message):
    run_id: str
    stage: int
    digest: str
    index: int
    data: bytes


@message("stage_record")
class StageRecord(Message):
    """A peer's announcement (stored in the DHT) and heartbeat: who serves which stage, how fast."""

    peer_id: str
    run_id: str
    stage: int
    num_stages: int
    state: str  # joining | online | offline
    throughput: float = 0.0  # measured microbatches per second (EMA)
    progress: int = 0  # training progress counter (optimizer steps contributed)
    outer_epoch: int = 0  # Streaming DiLoCo: sync boundaries this replica has passed (swarm/diloco.py)
    epoch_steps: int = 0  # inner steps this replica took since its last boundary (summed by its stage)
    outer_history: list[str] = dataclasses.field(default_factory=list)  # per fragment "<round>:<chain>"
    basis: str = ""  # basis_fingerprint of the subspace tensors
    corpus: str = ""  # data fingerprint, so peers with another corpus are noticed at join
    codecs: list[str] = dataclasses.field(default_factory=list)  # codecs this peer can decode
    timestamp: float = 0.0  # sender's wall clock (seconds since the epoch)
    addrs: list[str] = dataclasses.field(default_factory=list)  # multiaddrs the peer can be dialled at
    # Live figures for the swarm summary (node/metrics.py): tokens trained per second over the last
    # half minute (S = 1 replicas, and stage-0 peers for the microbatches they complete; 0 otherwise),
    # and the mean recent training loss of a peer that scores it (0 = none yet). Added in 1.x: older
    # peers omit them (0) and ignore them.
    tokens_per_s: float = 0.0
    loss: float = 0.0
    access: str = ""  # proof of the swarm key for (run, peer id), hex HMAC-SHA256 (swarm/access.py); "" = none
    # 1.2: can peers open connections to this one? "public" (a peer's fresh dial reached its port),
    # "private" (peers answered, none reached it: behind NAT or a firewall), "" (not known).
    reachable: str = ""
    # 1.4: this stage-0 driver's latest validation loss on the agreed weights (0 = none yet), and its time.
    val_loss: float = 0.0
    val_loss_at: float = 0.0

    def check(self, limits: WireLimits) -> None:
        check_run_id(self.run_id, "StageRecord")
        _check_access(self.access, "StageRecord")
        if self.reachable not in REACHABILITY:
            raise MalformedMessage(f"StageRecord: reachable {short_repr(self.reachable)} is not one of {REACHABILITY}")
        if not (0.0 <= self.tokens_per_s <= MAX_TOKENS_PER_S and 0.0 <= self.loss <= MAX_LOSS
                and 0.0 <= self.val_loss <= MAX_LOSS):
            raise MalformedMessage(f"StageRecord: tokens_per_s {self.tokens_per_s}, loss {self.loss} or val_loss "
                                   f"{self.val_loss} out of range")
        if self.state not in STAGE_STATES:
            raise MalformedMessage(f"StageRecord: state {self.state!r} is not one of {STAGE_STATES}")
        if not self.stage < self.num_stages:
            raise MalformedMessage(f"StageRecord: stage {self.stage} is not below num_stages {self.num_stages}")
        if len(self.outer_history) > 256 or any(not isinstance(h, str) or len(h) > 40 for h in self.outer_history):
            raise MalformedMessage("StageRecord: outer_history must be at most 256 short strings")


@message("run_record")
class RunRecord(Message):
    """A run's own parameters, published in the DHT so a volunteer can join with no config.

    ``config`` is the run-level configuration (model, pipeline, data, train, wire tables) as a msgpack
    map; the node validates it with its config loader. Every online peer republishes the record it
    joined with (signed by itself), so the run outlives its creator; joiners take the majority.
    """

    run_id: str
    creator: str  # peer id of the peer that created the run
    created: float  # creator's wall clock at creation (seconds since the epoch)
    publisher: str  # peer id of the peer that signed this copy
    config: bytes
    access: str = ""  # proof of the swarm key for (run, publisher) (swarm/access.py); "" = none

    def check(self, limits: WireLimits) -> None:
        check_run_id(self.run_id, "RunRecord")
        _check_access(self.access, "RunRecord")


@message("dialback_request")
class DialbackRequest(Message):
    """Ask a peer to open a fresh TCP connection to the address it sees this stream come from, on
    ``ports`` (the asker's listening ports). Only that address is ever dialled: a peer cannot make
    another dial a third party."""

    run_id: str
    ports: list[int]

    def check(self, limits: WireLimits) -> None:
        check_run_id(self.run_id, "DialbackRequest")
        if not 1 <= len(self.ports) <= MAX_DIALBACK_PORTS or not all(1 <= p <= 65535 for p in self.ports):
            raise MalformedMessage(f"DialbackRequest: 1..{MAX_DIALBACK_PORTS} ports in 1..65535, got "
                                   f"{short_repr(self.ports)}")


@message("dialback_reply")
class DialbackReply(Message):
    """The asker's address as the answering peer saw it ("" when the stream came over a relay or an
    address it does not dial), and the ports its fresh connection reached."""

    observed: str
    open_ports: list[int]

    def check(self, limits: WireLimits) -> None:
        if len(self.observed) > 64 or len(self.open_ports) > MAX_DIALBACK_PORTS:
            raise MalformedMessage("DialbackReply: observed address or port list too long")
        if not all(1 <= p <= 65535 for p in self.open_ports):
            raise MalformedMessage(f"DialbackReply: ports must be in 1..65535, got {short_repr(self.open_ports)}")


@message(ERROR_KIND)
class ErrorReply(Message):
    """A refusal. ``code`` is one of :data:`protocol.errors.ERROR_CODES` or a swarm-level code."""

    code: str
    message: str
    retry_after: float | None = None  # seconds after which the same request may succeed

    @classmethod
    def from_error(cls, exc: BaseException, max_len: int = 500) -> ErrorReply:
        code, retry_after = getattr(exc, "code", "internal"), getattr(exc, "retry_after", None)
        return cls(code=code if code in ERROR_CODES else "protocol", message=str(exc)[:max_len], retry_after=retry_after)

