"""Messages (protocol/messages.py, protocol/schema.py) and framing (protocol/framing.py).

Every message kind has a realistic example that must survive encode → frame → decode unchanged;
malformed headers are built by rewriting a valid header, so each case breaks exactly one thing and
the decoder must name it with the right ``ProtocolError`` subclass. Stream tests use a real socket
pair through asyncio and bound every wait with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import struct
import time
from dataclasses import fields, replace

import msgpack
import pytest
import torch

from protocol.codecs import get_codec
from protocol.errors import (
    ChecksumError,
    FrameError,
    FrameTimeout,
    MalformedMessage,
    OversizeError,
    ProtocolError,
    TensorError,
    UnknownCodec,
    VersionMismatch,
)
from protocol.framing import FrameDecoder, decode_frame, encode_frame, read_frame, write_frame
from protocol.messages import (
    MESSAGE_KINDS,
    PROTOCOL_VERSION,
    ActivationFrame,
    DialbackReply,
    DialbackRequest,
    ErrorReply,
    EvalResult,
    FragmentPart,
    FragmentRequest,
    GradientFrame,
    GroupRoster,
    RunRecord,
    SliceSummary,
    StageRecord,
    StateChunk,
    StateChunkRequest,
    StateEntry,
    StateManifest,
    StateRequest,
    decode_message,
    encode_message,
)
from protocol.tensors import INT_WIRE_TYPES, WireLimits

PEERS = ["12D3KooWPjceQrSwdWXPyLLeABRXmuqt69Rg3sBYbU1Nft9HyQ6X", "12D3KooWEuMBZrsLmCPx5Ln4FkZ3CNEYMWD"]
DIGEST = hashlib.sha256(b"state").hexdigest()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _manifest() -> StateManifest:
    """A manifest computed from real tensors: entries back to back, 300-byte chunks with their digests."""
    tensors = {"embed.weight": torch.randn(16, 8, generator=_gen(1)), "blocks.0.ln.bias": torch.zeros(8),
               "step": torch.tensor([7], dtype=torch.int64)}
    entries, blobs, offset = [], [], 0
    for name, t in tensors.items():
        raw = t.numpy().tobytes()
        entries.append(StateEntry(name=name, dtype=str(t.dtype).removeprefix("torch."), shape=list(t.shape),
                                  offset=offset, nbytes=len(raw), sha256=hashlib.sha256(raw).hexdigest()))
        blobs.append(raw)
        offset += len(raw)
    data = b"".join(blobs)
    chunks = [hashlib.sha256(data[i : i + 300]).hexdigest() for i in range(0, len(data), 300)]
    return StateManifest(run_id="run-7", stage=2, step=1200, round_id=12, entries=entries, chunk_bytes=300,
                         chunk_sha256=chunks, digest=hashlib.sha256(data).hexdigest())


EXAMPLES = {
    "activation": lambda: ActivationFrame(
        run_id="run-7", microbatch_id=123_456, stage=1, route=PEERS, step=99, codec="bf16", basis="ab" * 32,
        token_ids=torch.randint(0, 50_000, (2, 5), generator=_gen(2)),
        coefficients=torch.randn(2, 5, 16, generator=_gen(3))),
    "gradient": lambda: GradientFrame(
        run_id="run-7", microbatch_id=123_456, stage=2, grad=torch.randn(2, 5, 16, generator=_gen(4)) * 1e-3,
        codec="fp32", loss=2.53125, step=99),
    "eval_result": lambda: EvalResult(run_id="run-7", microbatch_id=123_456, stage=3, loss=2.25, tokens=640),
    "fragment_request": lambda: FragmentRequest(run_id="run-7", stage=1, round_id=12, fragment_id=3),
    "fragment_part": lambda: FragmentPart(
        run_id="run-7", stage=1, round_id=12, fragment_id=3, part=1, num_parts=3, offset=2000,
        total_values=5000, weight=128.0, values=torch.randn(1000, generator=_gen(5)) * 1e-2, codec="e3m0"),
    "slice_summary": lambda: SliceSummary(
        run_id="run-7", stage=1, round_id=12, fragment_id=3, offset=2500, length=1250, peers=["QmA", "QmB"],
        part_sha256=[DIGEST, DIGEST], mean_sha256=DIGEST),
    "group_roster": lambda: GroupRoster(run_id="run-7", stage=1, round_id=12, fragment_id=3,
                                        peers=["QmA", "QmB", "QmC"], unable=["QmC"]),
    "state_request": lambda: StateRequest(run_id="run-7", stage=2),
    "state_manifest": _manifest,
    "state_chunk_request": lambda: StateChunkRequest(run_id="run-7", stage=2, digest=DIGEST, index=1),
    "state_chunk": lambda: StateChunk(run_id="run-7", stage=2, digest=DIGEST, index=1,
                                      data=bytes(range(256)) * 3),
    "stage_record": lambda: StageRecord(
        peer_id=PEERS[0], run_id="run-7", stage=1, num_stages=4, state="online", throughput=3.25,
        progress=1200, outer_epoch=7, epoch_steps=13, basis="cd" * 32, corpus="ef" * 32,
        codecs=["fp32", "bf16", "e3m0"], timestamp=1_763_790_000.5),
    "run_record": lambda: RunRecord(
        run_id="run-7", creator=PEERS[0], created=1_763_790_000.25, publisher=PEERS[1],
        config=msgpack.packb({"model": {"name": "tiny"}, "pipeline": {"num_stages": 2}})),
    "dialback_request": lambda: DialbackRequest(run_id="run-7", ports=[31337]),
    "dialback_reply": lambda: DialbackReply(observed="203.0.113.7", open_ports=[31337]),
    "error": lambda: ErrorReply(code="tensor", message="ActivationFrame.coefficients: bad shape",
                                retry_after=2.0),
}


def _header(body: bytes) -> dict:
    (hlen,) = struct.unpack_from("<I", body)
    return msgpack.unpackb(body[4 : 4 + hlen])


def _rewrite(body: bytes, mutate, payloads: bytes | None = None) -> bytes:
    """The body with ``mutate(header)`` applied to its header (and the payload bytes replaced, if given)."""
    (hlen,) = struct.unpack_from("<I", body)
    header = msgpack.unpackb(body[4 : 4 + hlen])
    mutate(header)
    packed = msgpack.packb(header, use_bin_type=True)
    return struct.pack("<I", len(packed)) + packed + (body[4 + hlen :] if payloads is None else payloads)


def _payload(header, name):
    return next(d for n, d in header["payloads"] if n == name)


def _assert_same(sent, got):
    """Every field equal; float tensors equal to what their codec itself reproduces (exact for fp32)."""
    assert type(got) is type(sent)
    for f in fields(sent):
        a, b = getattr(sent, f.name), getattr(got, f.name)
        if isinstance(a, torch.Tensor):
            assert b.shape == a.shape
            if f.metadata["integer"]:
                assert b.dtype == torch.int64 and torch.equal(b, a.long())
            else:
                codec = get_codec(getattr(sent, f.metadata["codec_attr"]))
                assert b.dtype == torch.float32
                assert torch.equal(b, codec.decode(codec.encode(a), tuple(a.shape)))
                if codec.lossless:
                    assert torch.equal(b, a.float())
        else:
            assert b == a and type(b) is type(a), f.name


def test_every_message_kind_has_an_example():
    """A new message kind must come with an example here, so it is round-trip tested."""
    assert set(EXAMPLES) == set(MESSAGE_KINDS)


@pytest.mark.parametrize("kind", sorted(MESSAGE_KINDS))
def test_message_round_trips_through_a_frame(kind):
    """encode → frame → decode_frame → decode gives the same message; it re-encodes to the same values."""
    msg = EXAMPLES[kind]()
    body = encode_message(msg)
    header = _header(body)
    assert header["v"] == list(PROTOCOL_VERSION) and header["kind"] == kind == msg.KIND
    got = decode_message(decode_frame(encode_frame(body)))
    _assert_same(msg, got)
    _assert_same(got, decode_message(encode_message(got)))  # a second trip changes nothing


@pytest.mark.parametrize("codec", ["fp32", "bf16", "fp16", "int8", "e3m0"])
def test_activation_coefficients_in_every_codec(codec):
    """Coefficients arrive in the codec the sender named, with that codec's accuracy."""
    msg = replace(EXAMPLES["activation"](), codec=codec)
    body = encode_message(msg)
    assert _payload(_header(body), "coefficients")["codec"] == codec
    got = decode_message(body)
    assert got.codec == codec
    _assert_same(msg, got)
    tolerance = {"fp32": 0, "bf16": 2**-8, "fp16": 2**-11, "int8": 1 / 254, "e3m0": 0.5}[codec]
    err = (got.coefficients - msg.coefficients).abs()
    assert (err <= tolerance * msg.coefficients.abs().amax() + 1e-30).all()
    if codec == "e3m0":
        assert len(body) < len(encode_message(replace(msg, codec="bf16")))


@pytest.mark.parametrize(("high", "wire"), [
    (255, "u8"), (256, "u16"), (65_535, "u16"), (65_536, "i32"), (2**31 - 1, "i32"), (2**31, "i64")
])
def test_token_ids_use_the_narrowest_integer_type(high, wire):
    """Ids travel as the narrowest integer type holding them and always decode to int64."""
    ids = torch.tensor([[0, 1, high]], dtype=torch.int64)
    msg = ActivationFrame(run_id="r", microbatch_id=1, stage=0, route=[], token_ids=ids,
                          coefficients=torch.zeros(1, 3, 2))
    body = encode_message(msg)
    assert _payload(_header(body), "token_ids") == {"codec": wire, "shape": [1, 3]}
    got = decode_message(body)
    assert got.token_ids.dtype == torch.int64 and torch.equal(got.token_ids, ids)
    payload_bytes = len(body) - 4 - struct.unpack_from("<I", body)[0]
    assert payload_bytes == 3 * INT_WIRE_TYPES[wire].itemsize + 3 * 2 * 4  # ids, then fp32 coefficients


def test_another_major_version_is_refused():
    """A message of another major version raises VersionMismatch naming the peer's version."""
    body = encode_message(EXAMPLES["fragment_part"]())
    for version in ([2, 0], [0, 9]):
        with pytest.raises(VersionMismatch) as info:
            decode_message(_rewrite(body, lambda h, v=version: h.update(v=v)))
        assert info.value.peer_version == tuple(version) and info.value.code == "version"


def test_newer_minor_version_with_unknown_fields_decodes():
    """Within a major version, unknown header keys are ignored (how minor versions add fields)."""
    msg = EXAMPLES["activation"]()
    body = _rewrite(encode_message(msg), lambda h: h.update(v=[1, 7], priority=3, hints={"a": [1, 2]}))
    _assert_same(msg, decode_message(body))


def test_header_codec_must_match_the_tensor_descriptor():
    """The codec named in the header and the one the tensor was encoded with cannot disagree."""
    body = encode_message(EXAMPLES["activation"]())
    assert decode_message(body).codec == _header(body)["codec"]
    with pytest.raises(MalformedMessage, match="encoded with"):
        decode_message(_rewrite(body, lambda h: h.update(codec="e3m0" if h["codec"] != "e3m0" else "fp32")))


def test_error_reply_decodes_from_any_major_version():
    """An ErrorReply keeps its layout across versions, so a refusal from a 2.x peer is still readable."""
    reply = ErrorReply(code="version", message="peer speaks 2.3", retry_after=None)
    body = _rewrite(encode_message(reply), lambda h: h.update(v=[2, 3], detail={"min": [2, 0]}, trace=["x"]))
    _assert_same(reply, decode_message(body))
    assert ErrorReply.from_error(TensorError("bad")).code == "tensor"
    assert ErrorReply.from_error(RuntimeError("boom")).code == "protocol"


def _set(**changes):
    return lambda h: h.update(changes)


def _set_payload(name, **changes):
    return lambda h: _payload(h, name).update(changes)


BAD_HEADERS = [  # (example kind, header mutation, expected error)
    ("state_request", _set(kind="no_such_kind"), MalformedMessage),
    ("dialback_request", _set(ports=[]), MalformedMessage),
    ("dialback_request", _set(ports=[0]), MalformedMessage),
    ("dialback_request", _set(ports=[1, 2, 3, 4, 5]), MalformedMessage),
    ("dialback_reply", _set(open_ports=[70000]), MalformedMessage),
    ("stage_record", _set(reachable="maybe"), MalformedMessage),
    ("state_request", _set(kind=7), MalformedMessage),
    ("state_request", lambda h: h.pop("run_id"), MalformedMessage),
    ("state_request", lambda h: h.pop("v"), MalformedMessage),
    ("state_request", _set(v="1.0"), MalformedMessage),
    ("state_request", _set(v=[1, 0, 0]), MalformedMessage),
    ("state_request", _set(stage=True), MalformedMessage),
    ("state_request", _set(stage=-1), MalformedMessage),
    ("state_request", _set(stage=2**63), MalformedMessage),
    ("state_request", _set(stage=1.0), MalformedMessage),
    ("state_request", _set(stage=None), MalformedMessage),
    ("state_request", _set(run_id=b"run-7"), MalformedMessage),
    ("state_request", _set(run_id="r" * 513), OversizeError),
    ("fragment_part", _set(weight=float("nan")), MalformedMessage),
    ("fragment_part", _set(weight=float("inf")), MalformedMessage),
    ("fragment_part", _set(weight="1.0"), MalformedMessage),
    ("gradient", _set(loss=float("nan")), MalformedMessage),
    ("activation", _set(route=["p"] * 4097), OversizeError),
    ("activation", _set(route=[1]), MalformedMessage),
    ("activation", _set(route="p"), MalformedMessage),
    ("stage_record", _set(codecs=["x" * 600]), OversizeError),
    ("state_manifest", lambda h: h["entries"][0].pop("sha256"), MalformedMessage),
    ("state_manifest", lambda h: h["entries"].append(5), MalformedMessage),
    ("activation", _set(payloads={"token_ids": 1}), MalformedMessage),
    ("activation", lambda h: h["payloads"].append(h["payloads"][0]), MalformedMessage),
    ("activation", lambda h: h["payloads"].extend([h["payloads"][0]] * 8), OversizeError),
    ("activation", lambda h: h["payloads"].pop(), TensorError),  # its bytes are still there
    ("activation", lambda h: h["payloads"][0].__setitem__(0, "route"), MalformedMessage),
    ("activation", _set_payload("coefficients", codec="e5m2"), UnknownCodec),
    ("activation", _set_payload("coefficients", codec="i32"), TensorError),
    ("activation", _set_payload("token_ids", codec="fp32"), TensorError),
    ("activation", _set_payload("coefficients", shape=[10, 16]), TensorError),
    ("activation", _set_payload("coefficients", shape=[2, 5, 15]), TensorError),
    ("activation", _set_payload("coefficients", shape=[2, 5, -16]), TensorError),
    ("activation", _set_payload("coefficients", shape=[2, 5, 16.0]), MalformedMessage),
    ("activation", _set_payload("coefficients", shape=[1, 1, 1, 1, 1]), OversizeError),
    ("activation", _set_payload("coefficients", stride=[1]), MalformedMessage),
    ("state_chunk", _set_payload("data", bytes=-1), MalformedMessage),
    ("state_chunk", _set_payload("data", bytes=2**40), TensorError),
    ("state_chunk", _set_payload("data", bytes="768"), MalformedMessage),
]


@pytest.mark.parametrize(("kind", "mutate", "error"), BAD_HEADERS,
                         ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(BAD_HEADERS)])
def test_malformed_header_is_named(kind, mutate, error):
    """Each single defect in a header raises its specific ProtocolError subclass."""
    body = _rewrite(encode_message(EXAMPLES[kind]()), mutate)
    with pytest.raises(error):
        decode_message(body)


def test_malformed_body_layout():
    """Short bodies, bad header lengths, non-map or non-msgpack headers, extension types, missing payloads."""
    body = encode_message(EXAMPLES["activation"]())
    hlen = struct.unpack_from("<I", body)[0]
    chunk = encode_message(EXAMPLES["state_chunk"]())
    ext = msgpack.packb({"v": [1, 0], "kind": "state_request", "run_id": msgpack.ExtType(5, b"x"),
                         "stage": 0})
    cases = [
        (b"\x01\x00", MalformedMessage),
        (struct.pack("<I", len(body)) + body[4:], MalformedMessage),
        (struct.pack("<I", 2**20 + 1) + body[4:], OversizeError),
        (struct.pack("<I", 3) + msgpack.packb([1, 0, 0]), MalformedMessage),
        (struct.pack("<I", 4) + b"\xc1\xc1\xc1\xc1", MalformedMessage),
        (struct.pack("<I", len(ext)) + ext, MalformedMessage),
        (body[:-1], TensorError),
        (body + b"\0", TensorError),
        (body[: 4 + hlen], TensorError),
        (_rewrite(chunk, _set(payloads=[]), b""), MalformedMessage),
        (_rewrite(chunk, lambda h: h.pop("payloads"), b""), MalformedMessage),
        # coefficients neither listed nor present (their bf16 bytes are the last 2·5·16·2 bytes)
        (_rewrite(body, lambda h: h["payloads"].pop(), body[4 + hlen : -2 * 5 * 16 * 2]), MalformedMessage),
    ]
    for bad, error in cases:
        with pytest.raises(error):
            decode_message(bad)


def test_token_ids_outside_the_vocabulary():
    """With max_token_id set, an id ≥ it is a TensorError on decode and a ValueError on encode."""
    msg = EXAMPLES["activation"]()
    vocab = int(msg.token_ids.max()) + 1
    body = encode_message(msg)
    _assert_same(msg, decode_message(body, WireLimits(max_token_id=vocab)))
    with pytest.raises(TensorError):
        decode_message(body, WireLimits(max_token_id=vocab - 1))
    with pytest.raises(ValueError):
        encode_message(msg, WireLimits(max_token_id=vocab - 1))
    with pytest.raises(TensorError):  # an i64 payload can carry negative ids
        decode_message(_negative_ids(msg))

def _negative_ids(msg):
    ids = msg.token_ids.clone()
    ids[0, 0] = 2**40  # forces i64; the payload is then patched to hold -1
    body = bytearray(encode_message(replace(msg, token_ids=ids)))
    start = 4 + struct.unpack_from("<I", body)[0]
    body[start : start + 8] = struct.pack("<q", -1)
    return bytes(body)


def _entry0(**changes):
    return lambda m: replace(m, entries=[replace(m.entries[0], **changes), *m.entries[1:]])


def _set_entry0(**changes):
    return lambda h: h["entries"][0].update(changes)


CROSS_FIELD = [  # (kind, make the message invalid, the same defect in a header, expected error)
    ("activation", lambda m: replace(m, coefficients=m.coefficients.reshape(5, 2, 16)),
     _set_payload("coefficients", shape=[5, 2, 16]), TensorError),
    ("fragment_part", lambda m: replace(m, part=3), _set(part=3), MalformedMessage),
    ("fragment_part", lambda m: replace(m, num_parts=0, part=0), _set(num_parts=0, part=0), MalformedMessage),
    ("fragment_part", lambda m: replace(m, total_values=2999), _set(total_values=2999), TensorError),
    ("fragment_part", lambda m: replace(m, offset=4001), _set(offset=4001), TensorError),
    ("fragment_part", lambda m: replace(m, weight=0.0), _set(weight=0.0), MalformedMessage),
    ("slice_summary", lambda m: replace(m, part_sha256=m.part_sha256[:1]), lambda h: h["part_sha256"].pop(),
     MalformedMessage),
    ("slice_summary", lambda m: replace(m, length=0), _set(length=0), MalformedMessage),
    ("group_roster", lambda m: replace(m, peers=["QmA", "QmA"]), _set(peers=["QmA", "QmA"]), MalformedMessage),
    ("group_roster", lambda m: replace(m, unable=["QmZ"]), _set(unable=["QmZ"]), MalformedMessage),
    ("slice_summary", lambda m: replace(m, mean_sha256="0" * 63), _set(mean_sha256="0" * 63), MalformedMessage),
    ("state_manifest", lambda m: replace(m, chunk_sha256=m.chunk_sha256[:-1]),
     lambda h: h["chunk_sha256"].pop(), MalformedMessage),
    ("state_manifest", lambda m: replace(m, chunk_bytes=0), _set(chunk_bytes=0), MalformedMessage),
    ("state_manifest", lambda m: replace(m, digest=m.digest.upper()),
     lambda h: h.update(digest=h["digest"].upper()), MalformedMessage),
    ("state_manifest", _entry0(offset=4), _set_entry0(offset=4), MalformedMessage),
    ("state_manifest", _entry0(dtype="float8"), _set_entry0(dtype="float8"), TensorError),
    ("state_manifest", _entry0(shape=[16, 9]), _set_entry0(shape=[16, 9]), TensorError),
    ("state_manifest", _entry0(sha256="0" * 63), _set_entry0(sha256="0" * 63), MalformedMessage),
    ("stage_record", lambda m: replace(m, state="dead"), _set(state="dead"), MalformedMessage),
    ("stage_record", lambda m: replace(m, stage=4), _set(stage=4), MalformedMessage),
]


@pytest.mark.parametrize(("kind", "break_msg", "break_header", "error"), CROSS_FIELD,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CROSS_FIELD)])
def test_cross_field_rules_on_both_sides(kind, break_msg, break_header, error):
    """A receiver refuses the defect with a ProtocolError; a sender with ValueError (the sender's own bug)."""
    msg = EXAMPLES[kind]()
    with pytest.raises(error):
        decode_message(_rewrite(encode_message(msg), break_header))
    with pytest.raises(ValueError) as info:
        encode_message(break_msg(msg))
    assert not isinstance(info.value, ProtocolError)


SENDER_BUGS = [  # messages a sender must refuse to encode: (name, make the message, expected exception)
    ("negative int", lambda: StateRequest(run_id="r", stage=-1)),
    ("bool as int", lambda: StateRequest(run_id="r", stage=True)),
    ("bytes as str", lambda: StateRequest(run_id=b"r", stage=0)),
    ("str too long", lambda: StateRequest(run_id="r" * 513, stage=0)),
    ("list too long", lambda: replace(EXAMPLES["activation"](), route=["p"] * 4097)),
    ("nan float", lambda: replace(EXAMPLES["gradient"](), loss=float("nan"))),
    ("unknown codec", lambda: replace(EXAMPLES["fragment_part"](), codec="e5m2")),
    ("integer codec for floats", lambda: replace(EXAMPLES["fragment_part"](), codec="u16")),
    ("negative token id", lambda: replace(EXAMPLES["activation"](), token_ids=torch.full((2, 5), -1))),
    ("float token ids", lambda: replace(EXAMPLES["activation"](), token_ids=torch.zeros(2, 5))),
    ("2-d gradient", lambda: replace(EXAMPLES["gradient"](), grad=torch.zeros(5, 16))),
    ("2-d fragment values", lambda: replace(EXAMPLES["fragment_part"](), values=torch.zeros(10, 100))),
]

@pytest.mark.parametrize("make", [pytest.param(make, id=name) for name, make in SENDER_BUGS])
def test_encode_refuses_invalid_messages_with_value_error(make):
    """Encoding runs the receiver's checks and reports a failure as ValueError, never as ProtocolError."""
    with pytest.raises(ValueError) as info:
        encode_message(make())
    assert not isinstance(info.value, ProtocolError)


def test_encode_refuses_oversized_messages():
    """A message over max_frame_bytes is a ValueError on the sender; one that fits is sent and decoded."""
    msg = EXAMPLES["state_chunk"]()
    size = len(encode_message(msg))
    fits = WireLimits(max_frame_bytes=size)
    assert decode_message(encode_message(msg, fits), fits)
    with pytest.raises(ValueError) as info:
        encode_message(msg, WireLimits(max_frame_bytes=size - 1))
    assert not isinstance(info.value, ProtocolError)
    with pytest.raises(OversizeError):
        decode_message(encode_message(msg), WireLimits(max_frame_bytes=size - 1))


def _all_bodies():
    return [encode_message(EXAMPLES[kind]()) for kind in sorted(EXAMPLES)]


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_frame_decoder_splits_a_stream_fed_in_chunks(chunk):
    """Frames fed one byte (or 7, or 4096) at a time come out whole and in order, nothing left pending."""
    bodies = [*_all_bodies(), b""]
    stream = b"".join(encode_frame(b) for b in bodies)
    decoder, got = FrameDecoder(), []
    for i in range(0, len(stream), chunk):
        got += decoder.feed(stream[i : i + chunk])
        assert decoder.pending < 12 + max(map(len, bodies))
    assert got == bodies and decoder.pending == 0
    assert [type(decode_message(b)).KIND for b in got[:-1]] == sorted(EXAMPLES)


def test_frame_errors():
    """Bad magic or format, truncation, trailing bytes and CRC mismatches raise FrameError subclasses."""
    frame = encode_frame(encode_message(EXAMPLES["state_request"]()))
    flipped = bytearray(frame)
    flipped[-1] ^= 0x01
    for bad, error in [(b"XSW" + frame[3:], FrameError), (frame[:3] + b"\x02" + frame[4:], FrameError),
                       (frame[:11], FrameError), (frame[:-1], FrameError), (frame + b"\0", FrameError),
                       (bytes(flipped), ChecksumError), (frame[:8] + bytes(4) + frame[12:], ChecksumError)]:
        with pytest.raises(error):
            decode_frame(bad)
        decoder = FrameDecoder()
        try:
            decoder.feed(bad)
        except ProtocolError:
            continue
        assert decoder.pending > 0  # truncation or trailing bytes: an incomplete frame is left at EOF


@contextlib.asynccontextmanager
async def _pipe():
    """(reader, writer): bytes written on ``writer`` arrive at ``reader`` through a local socketpair."""
    left, right = socket.socketpair()
    _, writer = await asyncio.open_connection(sock=left)
    reader, other = await asyncio.open_connection(sock=right)
    try:
        yield reader, writer
    finally:
        writer.close()
        other.close()


def _run(coro, deadline=20.0):
    return asyncio.run(asyncio.wait_for(coro, deadline))


def test_read_and_write_frames_over_a_socket():
    """Frames written with write_frame are read back in order; a clean close between frames reads as None."""
    bodies = _all_bodies()

    async def main():
        async with _pipe() as (reader, writer):
            for body in bodies:
                await write_frame(writer, body)
            writer.close()
            await writer.wait_closed()
            got = [await read_frame(reader, timeout=5) for _ in bodies]
            assert await read_frame(reader, timeout=5) is None
            return got

    assert _run(main()) == bodies


@pytest.mark.parametrize("cut", [1, 5, 11, 12, 13, -1])
def test_end_of_stream_inside_a_frame_is_a_frame_error(cut):
    """A stream that ends inside a prefix or body raises FrameError (not None, not a timeout)."""
    frame = encode_frame(encode_message(EXAMPLES["fragment_request"]()))

    async def main():
        async with _pipe() as (reader, writer):
            writer.write(frame[:cut])
            writer.close()
            await writer.wait_closed()
            with pytest.raises(FrameError) as info:
                await read_frame(reader, timeout=5)
            assert type(info.value) is FrameError

    _run(main())


@pytest.mark.parametrize("trickle", [False, True])
def test_stalled_or_trickling_peer_times_out(trickle):
    """A peer that stops mid-frame, or sends a byte every 20 ms, gets FrameTimeout at the frame's deadline."""
    frame = encode_frame(encode_message(EXAMPLES["state_chunk"]()))

    async def drip(writer):
        for i in range(20, len(frame)):
            writer.write(frame[i : i + 1])
            await asyncio.sleep(0.02)  # the slow-loris behaviour under test, not synchronisation

    async def main():
        async with _pipe() as (reader, writer):
            writer.write(frame[:20])
            dripper = asyncio.ensure_future(drip(writer)) if trickle else None
            start = time.monotonic()
            with pytest.raises(FrameTimeout):
                await read_frame(reader, timeout=0.5)
            elapsed = time.monotonic() - start
            if dripper:
                dripper.cancel()
            return elapsed

    assert 0.45 <= _run(main()) < 5.0


def test_stream_refuses_bad_prefix_before_reading_the_body():
    """A prefix declaring 2^32-1 bytes is refused at once (no timeout set, no body sent); so is a bad CRC."""
    async def main():
        async with _pipe() as (reader, writer):
            writer.write(b"PSW\x01" + struct.pack("<II", 2**32 - 1, 0))
            await writer.drain()
            with pytest.raises(OversizeError):
                await asyncio.wait_for(read_frame(reader), 5)
        async with _pipe() as (reader, writer):
            frame = bytearray(encode_frame(b"payload"))
            frame[8] ^= 0xFF
            writer.write(bytes(frame))
            await writer.drain()
            with pytest.raises(ChecksumError):
                await read_frame(reader, timeout=5)

    _run(main())


def test_stage_record_refuses_a_negative_schedule_position():
    good = EXAMPLES["stage_record"]()
    for field in ("outer_epoch", "epoch_steps"):
        body = _rewrite(encode_message(good), lambda h, f=field: h.__setitem__(f, -1))
        with pytest.raises(MalformedMessage, match=r"integer in 0\.\.2\^63-1"):
            decode_message(body)
