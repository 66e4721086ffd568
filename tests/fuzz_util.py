"""A seeded fuzz harness for the node's P2P stream handlers (tests/swarm/test_fuzz_handlers.py and
test_fuzz_live.py); the cases for each handler are built in tests/fuzz_corpus.py.

Each handler gets a list of :class:`Case` objects: the bytes a hostile peer writes on one fresh
stream. The families are random bytes; framing damage (bad magic or format, a wrong CRC, a length
prefix over the cap, truncation); msgpack headers of the right message kind with another major
version, wrong field types, absurd integers, wrong dtypes, shapes and codecs; non-finite tensors
(byte-patched, since every encoder refuses to send them); out-of-range token ids; other message
kinds; and valid messages that are bit-flipped or truncated behind a recomputed CRC, so the
decoder is reached. Everything is built from this repository's own encoders (``encode_message``
and ``encode_frame``) and damaged at the byte or header level; only our own bytes are unpacked.

An *oracle* says what the node must answer to each case: it reads the case the way the node does
(frame, then ``decode_message`` with the node's :class:`WireLimits`, then the handler's own rules)
and returns an :class:`Expect`: the ErrorReply codes allowed, the reply types that count as
service, the protocol error the node must count, and whether a reply can be read at all.
"""

from __future__ import annotations

import asyncio
import random
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack

from protocol.errors import ConnectionLost, ProtocolError
from protocol.framing import FRAME_FORMAT, MAGIC, PREFIX_BYTES, encode_frame, parse_prefix, read_frame
from protocol.messages import (
    ActivationFrame,
    ErrorReply,
    EvalResult,
    FragmentPart,
    GradientFrame,
    Message,
    StateChunk,
    StateChunkRequest,
    StateManifest,
    StateRequest,
    decode_message,
    encode_message,
)
from protocol.tensors import BUILTIN_CODECS, WireLimits, payload_nbytes

SEED = 20240  # the fuzz corpora are drawn from random.Random(SEED + k)
MAX_INT = (1 << 63) - 1
# Values that replace one header field: wrong types, out of range, non-finite, oversize.
HOSTILE: tuple[Any, ...] = (
    -1, -(1 << 63), 1 << 63, (1 << 64) - 1, True, 1.5, float("nan"), float("inf"), "x", "", None, [], {},
    b"\x00\xff", "é" * 600, list(range(5000)), {"nested": [[[]]]},
)
# Replies (from our own node) are decoded with generous limits: a StateChunk or a gradient is fine.
REPLY_LIMITS = WireLimits(codecs=BUILTIN_CODECS)


@dataclass(frozen=True)
class Case:
    family: str  # the kind of damage, e.g. "oversize", "version", "non_finite"
    data: bytes  # written on one fresh stream
    close: bool = False  # close the stream right after writing: the node sees it end (truncations)


@dataclass(frozen=True)
class Expect:
    """What the node must do with one case."""

    codes: frozenset[str] = frozenset()  # ErrorReply codes it may answer
    ok: tuple[type, ...] = ()  # reply types that are proper service
    counted: str | None = None  # the protocol error code it counts (on_error → protoswarm_protocol_errors_total)
    reply: str = "required"  # "required" | "optional" (stream position lost) | "none" | "held" (answers late)
    refusal: str | None = None  # a handler-level refusal code (protoswarm_pipeline_refused_total)


# ----------------------------------------------------------------------------------------- bytes


def unpack_body(body: bytes) -> tuple[dict, bytes]:
    """(header, payload bytes) of a body this process encoded itself."""
    (hlen,) = struct.unpack_from("<I", body)
    return msgpack.unpackb(body[4 : 4 + hlen], raw=False, strict_map_key=False), body[4 + hlen :]


def pack_body(header: Any, payload: bytes = b"") -> bytes:
    packed = msgpack.packb(header, use_bin_type=True)
    return struct.pack("<I", len(packed)) + packed + payload


def payload_spans(header: dict, payload: bytes) -> dict[str, tuple[int, int]]:
    """Where each payload of a valid body lies: name -> (start, end) within the payload bytes."""
    spans, offset = {}, 0
    for name, descriptor in header["payloads"]:
        size = descriptor["bytes"] if "bytes" in descriptor else payload_nbytes(descriptor, WireLimits())
        spans[name] = (offset, offset + size)
        offset += size
    assert offset == len(payload)
    return spans


def with_payload(body: bytes, name: str, descriptor: dict | None = None, data: bytes | None = None,
                 patch: tuple[int, bytes] | None = None) -> bytes:
    """``body`` with payload ``name`` given a new descriptor and/or bytes (or bytes patched at an offset)."""
    header, payload = unpack_body(body)
    spans = payload_spans(header, payload)
    start, end = spans[name]
    chunk = payload[start:end] if data is None else data
    if patch is not None:
        at, raw = patch
        chunk = chunk[:at] + raw + chunk[at + len(raw) :]
    if descriptor is not None:
        header["payloads"] = [[n, descriptor if n == name else d] for n, d in header["payloads"]]
    return pack_body(header, payload[:start] + chunk + payload[end:])


def with_header(body: bytes, change: Callable[[dict], None]) -> bytes:
    header, payload = unpack_body(body)
    change(header)
    return pack_body(header, payload)


def bad_crc(body: bytes) -> bytes:
    frame = bytearray(encode_frame(body))
    frame[8] ^= 0x01  # the CRC's low byte
    return bytes(frame)


def prefix(length: int, crc: int = 0, magic: bytes = MAGIC, fmt: int = FRAME_FORMAT) -> bytes:
    return struct.pack("<3sBII", magic, fmt, length, crc)


def flip(data: bytes, rng: random.Random, count: int) -> bytes:
    out = bytearray(data)
    for _ in range(count):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


# ----------------------------------------------------------------------------------------- cases


def framing_cases(rng: random.Random, valid: list[bytes], limits: WireLimits) -> list[Case]:
    """Damage at the frame level, the same for every handler."""
    body = rng.choice(valid)
    cap = limits.max_frame_bytes
    cases = [
        Case("random_bytes", rng.randbytes(rng.randint(PREFIX_BYTES, 2048))) for _ in range(6)
    ] + [
        Case("random_bytes_short", rng.randbytes(rng.randint(1, PREFIX_BYTES - 1)), close=True) for _ in range(2)
    ] + [
        Case("bad_magic", prefix(len(body), zlib.crc32(body), magic=b"PSX")),
        Case("bad_format", prefix(len(body), zlib.crc32(body), fmt=FRAME_FORMAT + 1)),
        Case("oversize", prefix(cap + 1)),
        Case("oversize", prefix((1 << 32) - 1)),
        Case("oversize_then_junk", prefix(rng.randint(cap + 1, (1 << 32) - 1)) + rng.randbytes(512)),
        Case("checksum", bad_crc(body)),
        Case("checksum", bad_crc(rng.choice(valid))),
        Case("empty_stream", b"", close=True),
        Case("empty_body", encode_frame(b"")),
        Case("garbage_body", encode_frame(rng.randbytes(rng.randint(1, 4096)))),
        Case("garbage_body", encode_frame(rng.randbytes(rng.randint(1, 64)))),
    ]
    for _ in range(4):  # a valid frame cut anywhere, then the stream ends
        frame = encode_frame(rng.choice(valid))
        cases.append(Case("truncated_frame", frame[: rng.randrange(1, len(frame))], close=True))
    return cases


def mutation_cases(rng: random.Random, valid: list[bytes], n: int) -> list[Case]:
    """Valid bodies bit-flipped, truncated or extended behind a recomputed CRC (the decoder is reached)."""
    cases = []
    for i in range(n):
        body = rng.choice(valid)
        kind = i % 4
        if kind == 0:
            cases.append(Case("flipped_body", encode_frame(flip(body, rng, rng.randint(1, 8)))))
        elif kind == 1:
            header_len = struct.unpack_from("<I", body)[0] + 4  # aim at the header half of the time
            end = header_len if rng.random() < 0.5 else len(body)
            cases.append(Case("flipped_header", encode_frame(flip(body[:end], rng, rng.randint(1, 4)) + body[end:])))
        elif kind == 2:
            cases.append(Case("truncated_body", encode_frame(body[: rng.randrange(0, len(body))])))
        else:
            cases.append(Case("extended_body", encode_frame(body + rng.randbytes(rng.randint(1, 64)))))
    return cases


def header_cases(rng: random.Random, valid: list[bytes], n: int) -> list[Case]:
    """One header slot replaced by a hostile value, deleted, or joined by unknown keys."""
    cases = []
    for i in range(n):
        body = rng.choice(valid)
        header, _ = unpack_body(body)
        scalar = [k for k in header if k not in ("v", "kind", "payloads")]

        def change(h: dict, i=i, scalar=scalar) -> None:
            key = rng.choice(scalar)
            if i % 5 == 0:
                del h[key]
            elif i % 5 == 1:
                h[f"unknown_{rng.randrange(100)}"] = rng.choice(HOSTILE)  # ignored: a later minor version
            else:
                h[key] = rng.choice(HOSTILE)

        cases.append(Case("header_value", encode_frame(with_header(body, change))))
    structural = [
        ("version_major", lambda h: h.__setitem__("v", [2, 0])),
        ("version_major", lambda h: h.__setitem__("v", [0, 9])),
        ("version_major", lambda h: h.__setitem__("v", [255, 255])),
        ("version_minor", lambda h: h.__setitem__("v", [1, 999])),  # a later minor version: accepted
        ("version_bad", lambda h: h.__setitem__("v", "1.1")),
        ("version_bad", lambda h: h.__setitem__("v", [1])),
        ("version_bad", lambda h: h.pop("v")),
        ("kind", lambda h: h.__setitem__("kind", "no_such_kind")),
        ("kind", lambda h: h.__setitem__("kind", 7)),
        ("kind", lambda h: h.pop("kind")),
        ("payloads", lambda h: h.__setitem__("payloads", "not a list")),
        ("payloads", lambda h: h.__setitem__("payloads", h["payloads"] * 5)),  # listed twice; too many
        ("payloads", lambda h: h.__setitem__("payloads", [])),
        ("payloads", lambda h: h["payloads"].append(["extra", {"bytes": 0}])),
    ]
    for family, change in structural:
        cases.append(Case(family, encode_frame(with_header(rng.choice(valid), change))))
    body = rng.choice(valid)
    hlen = struct.unpack_from("<I", body)[0]
    cases += [
        Case("header_length", encode_frame(struct.pack("<I", len(body)) + body[4:])),  # runs past the end
        Case("header_length", encode_frame(struct.pack("<I", (1 << 32) - 1) + body[4:])),  # over the cap
        Case("header_length", encode_frame(struct.pack("<I", hlen - 1) + body[4:])),  # header cut short
        Case("header_length", encode_frame(b"\x01\x00")),  # no room for the length
        Case("header_not_map", encode_frame(pack_body([1, 2, 3]))),
        Case("header_ext", encode_frame(pack_body(msgpack.ExtType(5, b"boom")))),
        Case("header_nested", encode_frame(struct.pack("<I", 1022) + b"\x91" * 1021 + b"\xc0")),
    ]
    return cases


def tensor_cases(body: bytes, name: str, *, integer: bool) -> list[Case]:
    """Wrong dtype, ndim, shape and payload length for payload ``name`` of ``body``."""
    header, payload = unpack_body(body)
    descriptor = dict(next(d for n, d in header["payloads"] if n == name))
    shape = list(descriptor["shape"])
    numel = 1
    for s in shape:
        numel *= s
    out = []

    def add(family: str, desc: dict, data: bytes | None = None) -> None:
        out.append(Case(family, encode_frame(with_payload(body, name, desc, data))))

    if integer:
        add("wrong_dtype", {"codec": "bf16", "shape": shape}, bytes(2 * numel))
        add("wrong_dtype", {"codec": "fp32", "shape": shape}, bytes(4 * numel))
    else:
        add("wrong_dtype", {"codec": "u8", "shape": shape}, bytes(numel))
        add("wrong_dtype", {"codec": "i64", "shape": shape}, bytes(8 * numel))
        add("wrong_dtype", {"codec": "fp64", "shape": shape}, bytes(8 * numel))
        add("wrong_dtype", {"codec": "hivemind-float16", "shape": shape}, bytes(2 * numel))
    add("wrong_dtype", {"codec": ["u8"], "shape": shape})
    add("wrong_ndim", {**descriptor, "shape": [numel]})
    add("wrong_ndim", {**descriptor, "shape": [1, *shape]})
    add("wrong_ndim", {**descriptor, "shape": [1] * 5})
    add("bad_shape", {**descriptor, "shape": [-1, *shape[1:]]})
    add("bad_shape", {**descriptor, "shape": [str(s) for s in shape]})
    add("bad_shape", {**descriptor, "shape": [1 << 40] * len(shape)})  # refused from the header alone
    add("bad_shape", {**descriptor, "shape": [0] * (len(shape) - 1) + [1 << 40]})
    add("bad_shape", {**descriptor, "shape": [1 << 20] * len(shape)})
    add("bad_descriptor", {**descriptor, "extra": 1})
    add("bad_descriptor", {"bytes": len(payload)})
    start, end = payload_spans(header, payload)[name]
    add("payload_length", descriptor, payload[start : end - 1] if end > start else b"\x00")
    add("payload_length", descriptor, payload[start:end] + b"\x00\x00")
    return out


def _f32(value: float) -> bytes:
    return struct.pack("<f", value)


def non_finite_cases(message: Callable[[str], Message], name: str) -> list[Case]:
    """``message(codec)`` encoded, then payload ``name`` patched to hold NaN, inf or a poisoned scale."""
    patches = [
        ("fp32", 0, _f32(float("nan"))), ("fp32", 4, _f32(float("-inf"))),
        ("bf16", 0, b"\xc0\x7f"), ("bf16", 2, b"\x80\xff"),  # NaN, -inf
        ("fp16", 0, b"\x00\x7c"), ("fp16", 0, b"\x00\x7e"),  # inf, NaN
        ("int8", 0, _f32(float("nan"))), ("int8", 0, _f32(float("inf"))), ("int8", 0, _f32(-1.0)),
        ("e3m0", 0, _f32(float("nan"))), ("e3m0", 0, _f32(float("inf"))), ("e3m0", 0, _f32(-2.0)),
    ]
    return [Case("non_finite", encode_frame(with_payload(encode_message(message(codec)), name, patch=(at, raw))))
            for codec, at, raw in patches]


# ----------------------------------------------------------------------------------------- oracle


def first_frame(data: bytes, limits: WireLimits, eof: bool) -> tuple[str, Any, int]:
    """What a reader meets first in ``data``: ("body", body, bytes left), ("error", code, bytes left),
    ("end", None, 0) (clean end of stream) or ("wait", None, 0) (it needs more bytes)."""
    if not data:
        return ("end", None, 0) if eof else ("wait", None, 0)
    if len(data) < PREFIX_BYTES:
        return ("error", "frame", 0) if eof else ("wait", None, 0)
    try:
        length, crc = parse_prefix(data[:PREFIX_BYTES], limits)
    except ProtocolError as exc:
        return "error", exc.code, len(data) - PREFIX_BYTES
    if len(data) - PREFIX_BYTES < length:
        return ("error", "frame", 0) if eof else ("wait", None, 0)
    body = data[PREFIX_BYTES : PREFIX_BYTES + length]
    rest = len(data) - PREFIX_BYTES - length
    if zlib.crc32(body) != crc:
        return "error", "checksum", rest
    return "body", body, rest


HandlerRule = Callable[[Message], Expect]


def serve_oracle(case: Case, limits: WireLimits, rule: HandlerRule) -> Expect:
    """The answer of a handler behind ``protocol.streams.serve_stream`` (pipeline, state) to ``case``."""
    what, value, rest = first_frame(case.data, limits, case.close)
    assert what != "wait", f"{case.family}: the node would wait for more bytes"
    if what == "end":
        return Expect(reply="none")
    if what == "error":
        # After a framing error the node replies and closes; unread bytes may reset the stream first.
        lost = value != "checksum" and rest > 0
        return Expect(codes=frozenset({value}), counted=value,
                      reply="none" if case.close else "optional" if lost else "required")
    try:
        msg = decode_message(value, limits)
    except ProtocolError as exc:
        return Expect(codes=frozenset({exc.code}), counted=exc.code, reply="none" if case.close else "required")
    expect = rule(msg)
    return replace(expect, reply="none") if case.close else expect


@dataclass
class PipelineTarget:
    """What a pipeline stage accepts (swarm/dataplane/serve.py ``HopServer._check``; docs/pipeline.md)."""

    run_id: str
    stage: int  # the stage served; requests come from stage - 1
    basis: str
    width: int
    max_seq_len: int
    max_batch: int = 4096
    evaluate: bool = False  # the evaluation handler: same checks, an EvalResult for what it serves

    def rule(self, msg: Message) -> Expect:
        def refused(code: str) -> Expect:
            return Expect(codes=frozenset({code}), refusal=code)

        if isinstance(msg, GradientFrame):
            return refused("unknown_microbatch")
        if not isinstance(msg, ActivationFrame):
            return refused("route")
        if msg.run_id != self.run_id:
            return refused("wrong_run")
        if msg.stage != self.stage - 1:
            return refused("wrong_stage")
        if msg.basis != self.basis:
            return refused("basis")
        batch, seq, width = msg.coefficients.shape
        if width != self.width or not (1 <= batch <= self.max_batch and 2 <= seq <= self.max_seq_len):
            return refused("shape")
        if len(msg.route) != msg.stage + 1:
            return refused("route")
        # Served: a gradient, or a refusal for load (busy, expired) or a non-finite loss of our own.
        if self.evaluate:  # nothing is stashed, so no duplicate
            return Expect(codes=frozenset({"busy", "expired", "loss"}), ok=(EvalResult,))
        return Expect(codes=frozenset({"busy", "expired", "loss", "duplicate"}), ok=(GradientFrame,))


@dataclass
class StateTarget:
    """What a state server accepts (swarm/state_transfer.py ``StageStateServer.handle``)."""

    run_id: str
    stage: int
    chunks: dict[str, int] = field(default_factory=dict)  # digests it holds -> number of chunks
    parts: tuple[str, ...] = ("all",)  # the StateRequest parts it has a state for
    volatile: bool = False  # it trains: a held state can go stale (evicted by a newer one) at any time

    def rule(self, msg: Message) -> Expect:
        if isinstance(msg, StateRequest):
            if msg.run_id != self.run_id:
                return Expect(codes=frozenset({"wrong_run"}))
            if msg.part not in self.parts:
                return Expect(codes=frozenset({"no_state"}))
            if msg.stage != self.stage:
                return Expect(codes=frozenset({"wrong_stage"}))
            return Expect(ok=(StateManifest,))
        if isinstance(msg, StateChunkRequest):
            if msg.run_id != self.run_id:
                return Expect(codes=frozenset({"wrong_run"}))
            if msg.digest not in self.chunks:
                return Expect(codes=frozenset({"stale"}))
            stale = frozenset({"stale"} if self.volatile else ())
            if msg.stage != self.stage or msg.index >= self.chunks[msg.digest]:
                return Expect(codes=frozenset({"malformed"}) | stale, counted="malformed")
            return Expect(codes=stale, ok=(StateChunk,))
        return Expect(codes=frozenset({"malformed"}), counted="malformed")


@dataclass
class ExchangeTarget:
    """What a fragment-exchange leader accepts (swarm/exchange/star.py ``FragmentExchange._serve``).

    ``check`` is the exchange's own part check (``FragmentExchange._check_part``), ``leader(key)``
    the leader of the group the fuzzing peer is in for a round."""

    limits: WireLimits
    check: Callable[[FragmentPart, tuple[int, int, int], int | None, int], None]
    leads: Callable[[tuple[int, int, int]], bool]  # whether the node leads the sender's group in that round

    def oracle(self, case: Case) -> Expect:
        data, key, expected_parts, got = case.data, None, None, 0
        while True:
            what, value, _ = first_frame(data, self.limits, case.close)
            assert what != "wait", f"{case.family}: the node would wait for more bytes"
            if what == "end":
                return Expect(reply="none")  # the member left mid-fragment: no reply, no strike
            if what == "error":
                return Expect(codes=frozenset({value}), counted=value, reply="none" if case.close else "required")
            data = data[PREFIX_BYTES + len(value) :]
            try:
                msg = decode_message(value, self.limits)
            except ProtocolError as exc:
                return self._refused(exc.code, case)
            if isinstance(msg, ErrorReply):
                return Expect(reply="none")  # a member's refusal ends its stream quietly
            if not isinstance(msg, FragmentPart):
                return self._refused("malformed", case)
            if key is None:
                key = (msg.stage, msg.fragment_id, msg.round_id)
            try:
                self.check(msg, key, expected_parts, got)
            except ProtocolError as exc:
                return self._refused(exc.code, case)
            expected_parts = expected_parts or msg.num_parts
            got += 1
            if got == expected_parts:
                break
        if case.close:
            return Expect(reply="none")
        if not self.leads(key):
            return Expect(codes=frozenset({"not_leader"}))
        # Held for the node's own round: answered once it averaged, or at exchange.timeout_s.
        return Expect(codes=frozenset({"timeout", "late", "busy", "rejected", "skipped"}), reply="held")

    @staticmethod
    def _refused(code: str, case: Case) -> Expect:
        return Expect(codes=frozenset({code}), counted=code, reply="none" if case.close else "required")


# ----------------------------------------------------------------------------------------- client


@dataclass
class Outcome:
    """What the fuzzing peer saw: a decoded reply, or how the stream ended."""

    reply: Message | None = None
    ended: str = ""  # "eof", "lost" (reset, broken), "timeout", "closed" (we closed first), "unreadable"

    @property
    def code(self) -> str | None:
        return self.reply.code if isinstance(self.reply, ErrorReply) else None

    def __str__(self) -> str:
        if self.reply is None:
            return self.ended
        return f"ErrorReply[{self.code}]" if self.code else type(self.reply).__name__


async def send_case(p2p: Any, peer_id: Any, handler: str, case: Case, timeout: float, *,
                    wait: bool = True) -> Outcome:
    """Open a stream to ``handler`` on ``peer_id``, write the case and read one reply (or how it ended)."""
    _, reader, writer = await asyncio.wait_for(p2p.call_binary_stream_handler(peer_id, handler), timeout)
    try:
        try:
            async with asyncio.timeout(timeout):
                writer.write(case.data)
                await writer.drain()
        except (OSError, TimeoutError):  # the node closed early (e.g. after an oversize prefix)
            pass
        if case.close or not wait:
            return Outcome(ended="closed")
        try:
            raw = await read_frame(reader, REPLY_LIMITS, timeout=timeout, idle_timeout=timeout)
        except ConnectionLost:
            return Outcome(ended="lost")
        except ProtocolError as exc:
            return Outcome(ended="timeout" if exc.code in ("timeout", "idle") else f"unreadable ({exc})")
        if raw is None:
            return Outcome(ended="eof")
        return Outcome(reply=decode_message(raw, REPLY_LIMITS))
    finally:
        writer.close()


def check(case: Case, expect: Expect, got: Outcome) -> str | None:
    """None if ``got`` is an answer ``expect`` allows, else what is wrong."""
    if expect.reply in ("none", "held") and got.reply is None:
        return None
    if got.reply is None:
        if expect.reply == "optional" and got.ended in ("eof", "lost"):
            return None
        return f"{case.family}: no reply ({got.ended}), expected {sorted(expect.codes)} {expect.ok}"
    if got.code is not None:
        return None if got.code in expect.codes else (
            f"{case.family}: answered [{got.code}] {got.reply.message!r}, expected {sorted(expect.codes)} {expect.ok}")
    return None if isinstance(got.reply, expect.ok) else f"{case.family}: answered {got}, expected {expect}"


async def run_cases(client, server_id, handler, cases, oracle, timeout, *, held_timeout=None, banned=False):
    """Send every case; returns (problems, [(case, expect, outcome)])."""
    problems, seen = [], []
    for case in cases:
        expect: Expect = oracle(case)
        if banned:  # a banned peer may be answered "banned" wherever the handler decides (not while framing)
            expect = Expect(codes=expect.codes | {"banned"}, ok=expect.ok, counted=expect.counted,
                            reply=expect.reply, refusal=expect.refusal)
        wait = expect.reply in ("required", "optional") or (expect.reply == "held" and held_timeout is not None)
        got = await send_case(client, server_id, handler, case, held_timeout if expect.reply == "held" else timeout,
                              wait=wait)
        problem = check(case, expect, got)
        if problem:
            problems.append(problem)
        seen.append((case, expect, got))
    return problems, seen


def tally(items: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return dict(sorted(out.items()))


async def assert_counted_once(seen: dict[str, list], counted: Callable[[], dict[str, dict[str, int]]],
                              timeout: float = 15.0) -> None:
    """Every protocol error the oracle expects (``seen``: per handler, ``run_cases``' triples) was counted
    once, and nothing else; ``counted()`` gives each handler's counts by code (polled: streams end late).

    One allowance: a case that writes its bytes and closes at once (``Case.close``: a truncated frame)
    is counted only if the server's side of the stream gets those bytes and the end. p2pd closes both
    directions of a stream when its client does, and now and then the server's side sees the stream end
    without those bytes (rare: seen twice in loops of tests/swarm/test_fuzz_handlers.py and once in CI,
    each time one ``frame`` short on the state server; a reset overtaking the bytes is the likely way, not
    proven), which is no offence: a stream that just ends. Such cases may go uncounted; every other count
    must be exact, and nothing extra may be counted."""
    want = {name: tally(e.counted for _, e, _ in seen[name] if e.counted) for name in seen}
    closing = {name: tally(e.counted for c, e, _ in seen[name] if e.counted and c.close) for name in seen}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (now := counted()) != want and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if now == want:
        return
    diff = {n: {c: (want[n].get(c, 0), now[n].get(c, 0)) for c in set(want[n]) | set(now[n])
                if want[n].get(c, 0) != now[n].get(c, 0)} for n in want}
    allowed = all(0 <= w - g <= closing[n].get(c, 0) for n, d in diff.items() for c, (w, g) in d.items())
    assert allowed, f"not every protocol error counted once in {timeout} s; (wanted, counted) where they " \
                    f"differ: {diff}; closing cases: {closing}"
