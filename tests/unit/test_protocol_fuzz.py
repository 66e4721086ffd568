"""Property and fuzz tests of the decoders (hypothesis, derandomized so every run is the same).

The contract under test: whatever bytes a peer sends, decoding raises a ``ProtocolError`` subclass
and nothing else, and a declared size is checked against the caps before anything of that size is
allocated. Inputs range from arbitrary bytes to valid messages that are truncated, bit-flipped
(with and without a recomputed CRC, so the parser behind the frame is reached) or have one header
slot replaced by a hostile value.
"""

from __future__ import annotations

import asyncio
import json
import math
import struct
import subprocess
import sys

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protocol.messages as pm
from protocol.codecs import CODECS, get_codec
from protocol.errors import (
    ERROR_CODES,
    ChecksumError,
    FrameError,
    MalformedMessage,
    OversizeError,
    ProtocolError,
)
from protocol.framing import FrameDecoder, decode_frame, encode_frame, read_frame
from protocol.hivemind_compat import HIVEMIND_CODECS
from protocol.messages import MESSAGE_KINDS, STAGE_STATES, STATE_DTYPES, decode_message, encode_message
from protocol.tensors import BUILTIN_CODECS, WireLimits, decode_tensor, encode_tensor

FUZZ = settings(max_examples=500, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
HIVEMIND = ["hivemind-float16", "hivemind-uniform8bit"]
ALL_CODECS = [*sorted(n for n in CODECS if not n.startswith("hivemind-")), *HIVEMIND]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")  # hivemind's own


def _protocol_errors_only(fn, *args):
    """Call ``fn``; a ProtocolError (with a known code) is returned, any other exception fails the test."""
    try:
        return fn(*args)
    except ProtocolError as exc:
        assert exc.code in ERROR_CODES
        return exc


# ---- a strategy over valid messages of every kind ------------------------------------------------

text = st.text(max_size=12)
u63 = st.integers(0, 2**63 - 1)
finite = st.floats(allow_nan=False, allow_infinity=False)
run_ids = st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}", fullmatch=True)
digest = st.binary(min_size=32, max_size=32).map(bytes.hex)
float_codec = st.sampled_from(["fp32", "bf16", "fp16", "int8", "e3m0"])


def _floats(draw, shape):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    return torch.randn(shape, generator=g) * draw(st.sampled_from([1e-6, 1.0, 1e4]))


def _activation(draw):
    b, t, k = draw(st.integers(0, 4)), draw(st.integers(0, 6)), draw(st.integers(1, 8))
    high = draw(st.sampled_from([256, 2**16, 2**31, 2**40]))
    ids = torch.randint(0, high, (b, t), generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    return pm.ActivationFrame(run_id=draw(text), microbatch_id=draw(u63), stage=draw(u63), step=draw(u63),
                              route=draw(st.lists(text, max_size=4)), token_ids=ids, basis=draw(text),
                              coefficients=_floats(draw, (b, t, k)), codec=draw(float_codec))


def _fragment_part(draw):
    n, offset = draw(st.integers(0, 600)), draw(st.integers(0, 2**40))
    num_parts = draw(st.integers(1, 1000))
    return pm.FragmentPart(run_id=draw(text), stage=draw(u63), round_id=draw(u63), fragment_id=draw(u63),
                           part=draw(st.integers(0, num_parts - 1)), num_parts=num_parts, offset=offset,
                           total_values=offset + n + draw(st.integers(0, 10)), codec=draw(float_codec),
                           weight=draw(st.floats(1e-6, 1e6)), values=_floats(draw, (n,)))


def _manifest(draw):
    entries, total = [], 0
    for _ in range(draw(st.integers(0, 3))):
        dtype, shape = draw(st.sampled_from(STATE_DTYPES)), draw(st.lists(st.integers(0, 40), max_size=3))
        nbytes = math.prod(shape) * getattr(torch, dtype).itemsize
        entries.append(pm.StateEntry(name=draw(text), dtype=dtype, shape=shape, offset=total, nbytes=nbytes,
                                     sha256=draw(digest)))
        total += nbytes
    chunk = draw(st.integers(max(1, -(-total // 20)), total + 10))
    return pm.StateManifest(run_id=draw(text), stage=draw(u63), step=draw(u63), round_id=draw(u63),
                            entries=entries, chunk_bytes=chunk, digest=draw(digest),
                            chunk_sha256=[draw(digest) for _ in range(-(-total // chunk))])


def _stage_record(draw):
    num_stages = draw(st.integers(1, 2**63 - 1))
    return pm.StageRecord(peer_id=draw(text), run_id=draw(run_ids), stage=draw(st.integers(0, num_stages - 1)),
                          num_stages=num_stages, state=draw(st.sampled_from(STAGE_STATES)),
                          throughput=draw(finite), progress=draw(u63), basis=draw(text), corpus=draw(text),
                          codecs=draw(st.lists(text, max_size=5)), timestamp=draw(finite),
                          reachable=draw(st.sampled_from(pm.REACHABILITY)),
                          val_loss=draw(st.floats(0.0, pm.MAX_LOSS)), val_loss_at=draw(finite))


BUILDERS = {
    "activation": _activation,
    "gradient": lambda draw: pm.GradientFrame(
        run_id=draw(text), microbatch_id=draw(u63), stage=draw(u63), step=draw(u63), codec=draw(float_codec),
        grad=_floats(draw, tuple(draw(st.lists(st.integers(0, 6), min_size=3, max_size=3)))),
        loss=draw(st.none() | finite)),
    "eval_result": lambda draw: pm.EvalResult(run_id=draw(run_ids), microbatch_id=draw(u63), stage=draw(u63),
                                              loss=draw(st.floats(0.0, pm.MAX_LOSS)), tokens=draw(u63)),
    "fragment_request": lambda draw: pm.FragmentRequest(run_id=draw(text), stage=draw(u63),
                                                        round_id=draw(u63), fragment_id=draw(u63)),
    "fragment_part": _fragment_part,
    "slice_summary": lambda draw: pm.SliceSummary(
        run_id=draw(text), stage=draw(u63), round_id=draw(u63), fragment_id=draw(u63), offset=draw(u63),
        length=draw(st.integers(1, 2**40)), peers=(peers := draw(st.lists(text, min_size=1, max_size=6))),
        part_sha256=[draw(digest) for _ in peers], mean_sha256=draw(digest)),
    "group_roster": lambda draw: pm.GroupRoster(
        run_id=draw(text), stage=draw(u63), round_id=draw(u63), fragment_id=draw(u63),
        peers=(peers := draw(st.lists(text, min_size=1, max_size=6, unique=True))),
        unable=draw(st.lists(st.sampled_from(peers), max_size=3, unique=True))),
    "state_request": lambda draw: pm.StateRequest(run_id=draw(text), stage=draw(u63)),
    "state_manifest": _manifest,
    "state_chunk_request": lambda draw: pm.StateChunkRequest(run_id=draw(text), stage=draw(u63),
                                                             digest=draw(digest), index=draw(u63)),
    "state_chunk": lambda draw: pm.StateChunk(run_id=draw(text), stage=draw(u63), digest=draw(digest),
                                              index=draw(u63), data=draw(st.binary(max_size=2000))),
    "stage_record": _stage_record,
    "run_record": lambda draw: pm.RunRecord(run_id=draw(run_ids), creator=draw(text), created=draw(finite),
                                            publisher=draw(text), config=draw(st.binary(max_size=500))),
    "dialback_request": lambda draw: pm.DialbackRequest(
        run_id=draw(run_ids), ports=draw(st.lists(st.integers(1, 65535), min_size=1, max_size=pm.MAX_DIALBACK_PORTS))),
    "dialback_reply": lambda draw: pm.DialbackReply(
        observed=draw(st.text(max_size=64)), open_ports=draw(st.lists(st.integers(1, 65535), max_size=4))),
    "error": lambda draw: pm.ErrorReply(code=draw(text), message=draw(text),
                                        retry_after=draw(st.none() | finite)),
}


@st.composite
def messages(draw, kinds):
    return BUILDERS[draw(st.sampled_from(kinds))](draw)


bodies = messages(sorted(BUILDERS)).map(encode_message)
bodies_with_payloads = messages(["activation", "fragment_part", "gradient", "state_chunk"])
bodies_with_payloads = bodies_with_payloads.map(encode_message)


def test_the_message_strategy_covers_every_kind():
    """A new message kind must be added to the fuzzer's strategy."""
    assert set(BUILDERS) == set(MESSAGE_KINDS)


@FUZZ
@given(messages(sorted(BUILDERS)))
def test_random_valid_messages_round_trip(msg):
    """Any valid message decodes to equal fields (float tensors as their codec reproduces them)."""
    got = decode_message(decode_frame(encode_frame(encode_message(msg))))
    assert type(got) is type(msg)
    for name in msg._SPEC:
        a, b = getattr(msg, name), getattr(got, name)
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            codec = get_codec(msg.codec)
            assert torch.equal(b, codec.decode(codec.encode(a), tuple(a.shape)))
        elif isinstance(a, torch.Tensor):
            assert b.dtype == torch.int64 and torch.equal(a, b)
        else:
            assert a == b


# ---- arbitrary bytes -----------------------------------------------------------------------------

garbage = st.binary(max_size=3000) | st.builds(lambda h, t: struct.pack("<I", len(h)) + h + t,
                                               st.binary(max_size=200), st.binary(max_size=200))


@FUZZ
@given(garbage)
def test_arbitrary_bytes_raise_only_protocol_errors(data):
    """Random bytes (also behind a plausible header length or frame prefix) never escape ProtocolError."""
    for fn in (decode_frame, decode_message, decode_tensor, FrameDecoder().feed):
        _protocol_errors_only(fn, data)
    framed = encode_frame(data)
    assert bytes(decode_frame(framed)) == data and FrameDecoder().feed(framed) == [data]
    _protocol_errors_only(decode_message, framed[12:])


shapes = st.lists(st.integers(-(2**65), 2**65) | st.integers(0, 300), max_size=5)


@FUZZ
@given(st.sampled_from(ALL_CODECS), shapes, st.data(), st.booleans())
def test_codec_decode_of_arbitrary_payloads(name, shape, data, check_finite):
    """Any payload and shape: a float32 tensor of that shape (finite if checked), or a ProtocolError."""
    codec = get_codec(name)
    numel = math.prod(shape)
    if 0 <= numel <= 5000 and min(shape, default=0) >= 0 and data.draw(st.booleans()):
        size = codec.payload_nbytes(numel)
        payload = data.draw(st.binary(min_size=size, max_size=size))
        if name == "hivemind-uniform8bit" and data.draw(st.booleans()):
            payload = struct.pack("<q", 256) + payload[8:]  # a plausible codebook size, random codebook
    else:
        payload = data.draw(st.binary(max_size=2000))
    out = _protocol_errors_only(lambda: codec.decode(payload, shape, check_finite=check_finite))
    if isinstance(out, torch.Tensor):
        assert out.dtype == torch.float32 and list(out.shape) == shape
        if check_finite or name in ("int8", "e3m0", "hivemind-uniform8bit"):
            assert torch.isfinite(out).all()
    if all(-(2**63) <= s < 2**64 for s in shape):  # what msgpack can carry
        header = msgpack.packb({"codec": name, "shape": shape})
        _protocol_errors_only(decode_tensor, struct.pack("<I", len(header)) + header + payload)


# ---- damaged valid messages ----------------------------------------------------------------------


@FUZZ
@given(bodies, st.data())
def test_truncated_frames_are_frame_errors(body, data):
    """A frame cut anywhere is a FrameError for decode_frame and only pending bytes for FrameDecoder."""
    frame = encode_frame(body)
    cut = data.draw(st.integers(0, len(frame) - 1))
    with pytest.raises(FrameError) as info:
        decode_frame(frame[:cut])
    assert type(info.value) is FrameError
    decoder = FrameDecoder()
    assert decoder.feed(frame[:cut]) == [] and decoder.pending == cut
    _protocol_errors_only(decode_message, body[: data.draw(st.integers(0, max(0, len(body) - 1)))])


def _flip(data: bytes, bits) -> bytes:
    out = bytearray(data)
    for bit in bits:
        out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


@FUZZ
@given(bodies, st.data())
def test_bit_flips_are_caught_by_the_frame(body, data):
    """1-3 flipped bits: in magic/format/length a FrameError (or OversizeError), elsewhere a CRC error."""
    frame = encode_frame(body)
    assert len(frame) * 8 < 91_607  # CRC-32 detects every error of up to 3 bits in frames this short
    bits = data.draw(st.sets(st.integers(0, len(frame) * 8 - 1), min_size=1, max_size=3))
    with pytest.raises(ProtocolError) as info:
        decode_frame(_flip(frame, bits))
    where = min(bits) // 8
    if where < 4:
        assert type(info.value) is FrameError
    elif where < 8:
        assert type(info.value) in (FrameError, OversizeError)
    else:
        assert type(info.value) is ChecksumError


@FUZZ
@given(bodies, st.data())
def test_damaged_bodies_behind_a_valid_crc(body, data):
    """Flipped bits and overwritten bytes in header or payloads, CRC recomputed: decodes or ProtocolError."""
    start = 4 + struct.unpack_from("<I", body)[0]
    lo, hi = data.draw(st.sampled_from([(0, start), (start, len(body)), (0, len(body))]))
    if hi <= lo:
        return
    bits = data.draw(st.lists(st.integers(lo * 8, hi * 8 - 1), min_size=1, max_size=8))
    damaged = bytearray(_flip(body, bits))
    if data.draw(st.booleans()):
        at = data.draw(st.integers(lo, hi - 1))
        damaged[at : at + 4] = data.draw(st.binary(min_size=1, max_size=4))
    out = _protocol_errors_only(decode_message, decode_frame(encode_frame(bytes(damaged))))
    if not isinstance(out, ProtocolError):  # whatever a receiver accepts, it could also have sent
        again = decode_message(encode_message(out))
        assert type(again) is type(out)


# ---- hostile values in one header slot -----------------------------------------------------------

HOSTILE = st.one_of(
    st.sampled_from([2**40, [2**40], [2**31, 2**31], [-1], [0, 2**63], [2**64 - 1], [1, 1, 1, 1, 1], -1,
                     2**63, 2**64 - 1, -(2**63), "e9m9", "u16", "i64", "fp32", "", None, True, False, 1.5,
                     float("nan"), float("inf"), b"\x00", [], {}, {"bytes": 2**40}, {"bytes": -1},
                     {"codec": "e3m0", "shape": [2**40]}, {"codec": "fp32", "shape": [1 << 31, 1 << 31]},
                     {"codec": "u8", "shape": [3, -3]}, [[1]], ["x"] * 5000, "x" * 600]),
    st.integers(-(2**63), 2**64 - 1),
    st.text(max_size=8),
    st.floats(),
    st.recursive(st.integers(-5, 5) | st.text(max_size=3) | st.none(), max_leaves=6,
                 extend=lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner)),
)


def _slots(obj, path=()):
    """Paths to every value inside a header (map keys and list indices), depth first."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        yield (*path, key)
        yield from _slots(value, (*path, key))


def _is_payload_name(path):
    return len(path) == 3 and path[0] == "payloads" and path[2] == 0


def _mutated(body, data, choose):
    (hlen,) = struct.unpack_from("<I", body)
    header = msgpack.unpackb(body[4 : 4 + hlen])
    slots = [p for p in _slots(header) if choose(p)]
    if not slots:
        return None
    if data.draw(st.booleans()):  # half the time aim at the payload listing, where the sizes are
        slots = [p for p in slots if p[0] == "payloads"] or slots
    path = data.draw(st.sampled_from(slots))
    parent = header
    for key in path[:-1]:
        parent = parent[key]
    if data.draw(st.integers(0, 4)) == 0:
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(HOSTILE)
    if isinstance(parent, dict) and data.draw(st.booleans()):
        parent[data.draw(st.text(max_size=8))] = data.draw(HOSTILE)
    packed = msgpack.packb(header, use_bin_type=True)
    return struct.pack("<I", len(packed)) + packed + body[4 + hlen :]



@FUZZ
@given(bodies, st.data())
def test_hostile_header_values_raise_only_protocol_errors(body, data):
    """One header value replaced (huge or negative shapes, wrong codecs, wrong types) or deleted."""
    mutated = _mutated(body, data, lambda p: not _is_payload_name(p))
    if mutated is not None:
        _protocol_errors_only(decode_message, mutated)


@FUZZ
@given(bodies_with_payloads, st.data())
def test_hostile_payload_names_raise_only_protocol_errors(body, data):
    """The same, aimed at the field names in the payload listing."""
    mutated = _mutated(body, data, _is_payload_name)
    if mutated is not None:
        _protocol_errors_only(decode_message, mutated)


def _body(header: dict, payload: bytes = b"") -> bytes:
    packed = msgpack.packb(header, use_bin_type=True)
    return struct.pack("<I", len(packed)) + packed + payload


def test_unhashable_payload_name_is_malformed():
    """Minimal repro: a payload listing whose field name is a list."""
    header = {"v": [1, 0], "kind": "state_chunk", "run_id": "r", "stage": 0, "digest": "d", "index": 0,
              "payloads": [[["data"], {"bytes": 0}]]}
    with pytest.raises(MalformedMessage):
        decode_message(_body(header))


def test_deeply_nested_header_value_is_malformed():
    """Minimal repro: a string field holding a list nested 1020 deep (msgpack's limit is 1024 levels)."""
    nested = b"\x91" * 1020 + msgpack.packb("x")  # built by hand: msgpack's packer stops at 512 levels
    header = b"\x84\xa1v\x92\x01\x00\xa4kind\xadstate_request\xa6run_id" + nested + b"\xa5stage\x00"
    with pytest.raises(MalformedMessage):
        decode_message(struct.pack("<I", len(header)) + header)


# ---- caps: refused before allocating -------------------------------------------------------------

SMALL = WireLimits(max_frame_bytes=1 << 20, max_tensor_values=1000, codecs=BUILTIN_CODECS | HIVEMIND_CODECS)


def _read_frame(data: bytes, limits: WireLimits):
    async def main():
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await asyncio.wait_for(read_frame(reader, limits), 10)

    return asyncio.run(main())


@pytest.mark.parametrize("read", [decode_frame, lambda f, lim: FrameDecoder(lim).feed(f)[0], _read_frame])
def test_frame_cap_is_exact(read):
    """A body of exactly max_frame_bytes is accepted by every reader; one byte more is OversizeError."""
    assert len(read(encode_frame(bytes(1 << 20)), SMALL)) == 1 << 20
    with pytest.raises(OversizeError):
        read(encode_frame(bytes((1 << 20) + 1)), SMALL)
    with pytest.raises(OversizeError):
        decode_message(bytes((1 << 20) + 1), SMALL)


@pytest.mark.parametrize("codec", [*ALL_CODECS, "u8", "u16", "i32", "i64"])
def test_tensor_value_cap_is_exact(codec):
    """max_tensor_values values decode; one more, or an empty tensor with a huge dimension, is oversize."""
    for shape, ok in (((10, 100), True), ((1000,), True), ((7, 143), False), ((1001,), False)):
        x = torch.randn(shape) if codec in ALL_CODECS else torch.randint(0, 200, shape)
        if ok:
            assert decode_tensor(encode_tensor(x, codec), SMALL).shape == shape
        else:
            with pytest.raises(OversizeError):
                decode_tensor(encode_tensor(x, codec), SMALL)
    header = msgpack.packb({"codec": codec, "shape": [0, 2**40]})
    with pytest.raises(OversizeError):
        decode_tensor(struct.pack("<I", len(header)) + header, SMALL)


def test_message_caps_are_exact():
    """Tensors in messages, header bytes, strings and lists: at the cap accepted, one past it refused."""
    part = pm.FragmentPart(run_id="r", stage=0, round_id=0, fragment_id=0, part=0, num_parts=1, offset=0,
                           total_values=5000, values=torch.randn(1000))
    assert decode_message(encode_message(part), SMALL).values.shape == (1000,)
    with pytest.raises(OversizeError):
        decode_message(encode_message(pm.FragmentPart(**{**vars(part), "values": torch.randn(1001)})), SMALL)
    limits = WireLimits(max_header_bytes=4096)
    for extra in (0, 1):
        header = {"v": [1, 0], "kind": "state_request", "run_id": "r", "stage": 0, "pad": "x" * 4000}
        header["pad"] += "x" * (4096 - len(msgpack.packb(header)) + extra)
        body = _body(header)
        assert struct.unpack_from("<I", body)[0] == 4096 + extra
        if extra:
            with pytest.raises(OversizeError):
                decode_message(body, limits)
        else:
            assert decode_message(body, limits).run_id == "r"
    record = {"v": [1, 0], "kind": "stage_record", "run_id": "r", "stage": 0, "num_stages": 1,
              "state": "online"}
    at_cap = decode_message(_body({**record, "peer_id": "p" * 512, "codecs": ["c"] * 4096}))
    assert at_cap.peer_id == "p" * 512 and len(at_cap.codecs) == 4096
    for bad in ({"peer_id": "p" * 513, "codecs": []}, {"peer_id": "p", "codecs": ["c"] * 4097}):
        with pytest.raises(OversizeError):
            decode_message(_body({**record, **bad}))


MEMORY_PROBE = r"""
import asyncio, json, resource, struct, time
import msgpack, torch
from protocol.codecs import get_codec
from protocol.errors import ProtocolError
from protocol.framing import FrameDecoder, decode_frame, read_frame
from protocol.messages import decode_message
from protocol.hivemind_compat import HIVEMIND_CODECS
from protocol.tensors import BUILTIN_CODECS, WireLimits, decode_tensor, encode_tensor
DEFAULT_LIMITS = WireLimits(codecs=BUILTIN_CODECS | HIVEMIND_CODECS)

def tensor(codec, shape):
    h = msgpack.packb({"codec": codec, "shape": shape})
    return struct.pack("<I", len(h)) + h + bytes(64)

def message(kind, payloads, **fields):
    h = msgpack.packb({"v": [1, 0], "kind": kind, "run_id": "r", "stage": 0, **fields, "payloads": payloads})
    return struct.pack("<I", len(h)) + h + bytes(64)

async def read(data):
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    return await asyncio.wait_for(read_frame(reader), 5)

n = DEFAULT_LIMITS.max_tensor_values  # at the cap: a real decode would need 0.5-1.1 GB
codecs = ["fp32", "bf16", "fp16", "int8", "e3m0", "hivemind-float16", "hivemind-uniform8bit"]
prefix = b"PSW\x01" + struct.pack("<II", 2**32 - 1, 0)
calls = [
    lambda: decode_frame(prefix + bytes(100)),
    lambda: FrameDecoder().feed(prefix + bytes(100)),
    lambda: asyncio.run(read(prefix)),
    lambda: decode_message(message("state_chunk", [["data", {"bytes": 2**40}]], digest="d", index=0)),
    lambda: decode_message(message("fragment_part", [["values", {"codec": "e3m0", "shape": [n]}]], round_id=0,
                                   fragment_id=0, part=0, num_parts=1, offset=0, total_values=n)),
]
for c in codecs + ["u8", "u16", "i32", "i64"]:
    calls += [lambda c=c: decode_tensor(tensor(c, [n]), DEFAULT_LIMITS),
              lambda c=c: decode_tensor(tensor(c, [2**40]), DEFAULT_LIMITS),
              lambda c=c: decode_tensor(tensor(c, [2**20, 2**20]), DEFAULT_LIMITS)]
for c in codecs:
    calls.append(lambda c=c: get_codec(c).decode(bytes(64), (n,)))
for c in codecs:  # warm up every code path with small, valid input
    decode_tensor(encode_tensor(torch.randn(300), c), DEFAULT_LIMITS)
base, start, results = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic(), []
for call in calls:
    try:
        call()
        results.append("accepted")
    except ProtocolError as exc:
        results.append(type(exc).__name__)
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
print(json.dumps({"grew_kib": grew, "seconds": time.monotonic() - start, "results": results}))
"""


@pytest.mark.slow
def test_huge_declared_sizes_allocate_nothing():
    """In a fresh process, 2^32-1-byte frames, 2^27..2^40-value tensors and 2^40-byte blobs with tiny payloads
    are refused fast and peak RSS grows by < 100 MB. A real decode would need 0.5-1.1 GB; the check was seen
    to catch a planted allocate-before-check (+512 MB)."""
    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report["results"]) == 45, report
    assert set(report["results"]) <= {"OversizeError", "TensorError", "FrameError"}, report["results"]
    assert report["grew_kib"] < 100 * 1024 and report["seconds"] < 20, report


# ---- FrameDecoder buffering ----------------------------------------------------------------------

TINY = WireLimits(max_frame_bytes=4096)


@pytest.mark.slow
@FUZZ
@given(st.lists(st.binary(max_size=4096) | st.binary(min_size=4090, max_size=4096), max_size=6),
       st.binary(max_size=64), st.lists(st.integers(1, 9000), min_size=1, max_size=20), st.booleans())
def test_frame_decoder_buffers_at_most_one_frame(payloads, garbage, chunks, corrupt):
    """Whatever the chunking, the decoder returns the frames in order and holds at most cap + 12 bytes."""
    stream = b"".join(encode_frame(p) for p in payloads) + (garbage if corrupt else b"")
    decoder, got, pos, i = FrameDecoder(TINY), [], 0, 0
    while pos < len(stream):
        chunk = stream[pos : pos + chunks[i % len(chunks)]]
        pos, i = pos + len(chunk), i + 1
        out = _protocol_errors_only(decoder.feed, chunk)
        if isinstance(out, ProtocolError):
            assert corrupt
            break
        got += out
        assert decoder.pending <= TINY.max_frame_bytes + 12
    assert got == payloads[: len(got)]
    if not corrupt:
        assert got == payloads and decoder.pending == 0


@pytest.mark.parametrize("bad", [
    b"XSW\x01" + bytes(8),
    b"PSW\x02" + bytes(8),
    encode_frame(b"abc")[:-1] + b"x",
    b"PSW\x01" + struct.pack("<II", 4097, 0),
])
def test_frame_decoder_stays_failed_without_buffering(bad):
    """After any error, every later feed raises and the decoder stops buffering what it is fed."""
    decoder = FrameDecoder(TINY)
    with pytest.raises(ProtocolError):
        decoder.feed(bad)
    for _ in range(3):
        with pytest.raises(ProtocolError):
            decoder.feed(bytes(10_000))
        assert decoder.pending <= TINY.max_frame_bytes + 12
