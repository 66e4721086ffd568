"""The machinery behind :mod:`protocol.messages`: typed fields, body layout, strict decoding.

A message body is ``u32 header length | msgpack header | payloads``. The header is a map::

    {"v": [major, minor], "kind": "activation", <scalar fields>...,
     "payloads": [[field, descriptor], ...]}

where each descriptor is a tensor descriptor (:mod:`protocol.tensors`) or ``{"bytes": n}`` for a
raw blob, and the payloads follow the header back to back in that order. Scalar fields are plain
msgpack values checked against the dataclass annotations (``int`` ≥ 0, finite ``float``, bounded
``str`` and ``list``); unknown header keys are ignored so a minor version can add fields with
defaults. Decoding runs every check that needs no allocation first, then materialises payloads,
then the message's own cross-field ``check``.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar

import msgpack
import torch

from protocol.errors import (
    MalformedMessage,
    OversizeError,
    ProtocolError,
    TensorError,
    VersionMismatch,
    short_repr,
)
from protocol.tensors import (
    DEFAULT_LIMITS,
    INT_WIRE_TYPES,
    WireLimits,
    decoded_nbytes,
    describe,
    materialise,
    payload_nbytes,
    split_header,
)

# 1.1: StageRecord.tokens_per_s, .loss; access proofs in records. 1.2: StageRecord.reachable, dial-back.
# 1.3: GroupRoster (the balanced exchange agrees on its group first; handler protoswarm.diloco.balanced.v2).
# 1.4: EvalResult and the evaluation handler protoswarm.pipeline.eval.v1; StageRecord.val_loss.
PROTOCOL_VERSION: tuple[int, int] = (1, 4)
ERROR_KIND = "error"  # its layout is frozen across major versions so any peer can read the refusal

_U32 = struct.Struct("<I")
_MAX_INT = (1 << 63) - 1


def tensor_field(*, ndim: int, integer: bool = False, codec_attr: str | None = None) -> Any:
    """A tensor-valued field of ``ndim`` dimensions; ``codec_attr`` names the field holding its codec."""
    return dataclasses.field(metadata={"ndim": ndim, "integer": integer, "codec_attr": codec_attr})


class Record:
    """A typed msgpack map (messages and their nested entries)."""

    _SPEC: ClassVar[dict[str, Any]]

    def check(self, limits: WireLimits) -> None:
        """Cross-field checks after decoding (and before encoding); raise a ProtocolError subclass."""


class Message(Record):
    KIND: ClassVar[str]


MESSAGE_KINDS: dict[str, type[Message]] = {}


def record(cls: type) -> type:
    """Make ``cls`` a kw-only dataclass and resolve its field types once."""
    cls = dataclasses.dataclass(kw_only=True)(cls)
    hints = typing.get_type_hints(cls)
    cls._SPEC = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    return cls


def message(kind: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        cls = record(cls)
        if kind in MESSAGE_KINDS:
            raise ValueError(f"message kind {kind!r} is registered twice")
        cls.KIND = kind
        MESSAGE_KINDS[kind] = cls
        return cls

    return wrap


def _is_blob(tp: Any) -> bool:
    return tp is torch.Tensor or tp is bytes


def _fail(what: str, expected: str, value: Any) -> MalformedMessage:
    return MalformedMessage(f"field {what!r} must be {expected}, got {type(value).__name__} {short_repr(value)}")


def _scalar(tp: Any, value: Any, what: str, limits: WireLimits) -> Any:
    """Validate one decoded header value against annotation ``tp``; returns the Python value."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _scalar(inner, value, what, limits)
    if tp is int:
        if type(value) is not int or not 0 <= value <= _MAX_INT:
            raise _fail(what, "an integer in 0..2^63-1", value)
        return value
    if tp is float:
        if type(value) not in (int, float) or not math.isfinite(value):
            raise _fail(what, "a finite number", value)
        return float(value)
    if tp is bool:
        if type(value) is not bool:
            raise _fail(what, "a boolean", value)
        return value
    if tp is str:
        if type(value) is not str:
            raise _fail(what, "a string", value)
        if len(value) > limits.max_str_len:
            raise OversizeError(f"field {what!r}: string of {len(value)} chars exceeds {limits.max_str_len}")
        return value
    if origin is list:
        if type(value) is not list:
            raise _fail(what, "a list", value)
        if len(value) > limits.max_list_len:
            raise OversizeError(f"field {what!r}: list of {len(value)} items exceeds {limits.max_list_len}")
        return [_scalar(args[0], v, f"{what}[{i}]", limits) for i, v in enumerate(value)]
    if isinstance(tp, type) and issubclass(tp, Record):
        if not isinstance(value, dict):
            raise _fail(what, "a map", value)
        entry = tp(**_decode_fields(tp, value, what, limits))
        entry.check(limits)
        return entry
    raise TypeError(f"unsupported field type {tp!r} for {what}")  # a bug in a message definition


def _decode_fields(cls: type[Record], header: dict[str, Any], what: str, limits: WireLimits) -> dict[str, Any]:
    """The validated scalar fields of ``cls`` found in ``header`` (blob fields are decoded elsewhere)."""
    values = {}
    for name, tp in cls._SPEC.items():
        if _is_blob(tp):
            continue
        if name in header:
            values[name] = _scalar(tp, header[name], f"{what}.{name}" if what else name, limits)
        elif not _has_default(cls, name):
            raise MalformedMessage(f"{cls.__name__} is missing required field {name!r}")
    return values


def _has_default(cls: type, name: str) -> bool:
    f = cls.__dataclass_fields__[name]
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _blob_fields(cls: type) -> list[str]:
    return [n for n, tp in cls._SPEC.items() if _is_blob(tp)]


def _encode_value(value: Any) -> Any:
    if isinstance(value, Record):
        return {n: _encode_value(getattr(value, n)) for n in value._SPEC}
    if isinstance(value, list):
        return [_encode_value(v) for v in value]
    return value


def encode_message(msg: Message, limits: WireLimits = DEFAULT_LIMITS) -> bytes:
    """Message → body bytes (not yet framed). Raises ValueError if the message itself is invalid."""
    cls = type(msg)
    header: dict[str, Any] = {"v": list(PROTOCOL_VERSION), "kind": cls.KIND}
    descriptors, payloads = [], []
    try:
        for name, tp in cls._SPEC.items():
            value = getattr(msg, name)
            if tp is bytes:
                if not isinstance(value, (bytes, bytearray, memoryview)):
                    raise MalformedMessage(f"{cls.__name__}.{name} must be bytes, got {type(value).__name__}")
                blob = bytes(value)
                descriptors.append([name, {"bytes": len(blob)}])
                payloads.append(blob)
            elif tp is torch.Tensor:
                meta = cls.__dataclass_fields__[name].metadata
                codec = getattr(msg, meta["codec_attr"]) if meta["codec_attr"] else None
                if not isinstance(value, torch.Tensor):
                    raise TensorError(f"{cls.__name__}.{name} must be a torch.Tensor, got {type(value).__name__}")
                if value.is_floating_point() == meta["integer"]:
                    kind = "an integer" if meta["integer"] else "a float"
                    raise TensorError(f"{cls.__name__}.{name} must be {kind} tensor, got {value.dtype}")
                descriptor, payload = describe(value, codec)
                payload_nbytes(descriptor, limits, f"{cls.__name__}.{name}")  # caps and codec allow-list
                _check_tensor_field(cls, name, descriptor)
                descriptors.append([name, descriptor])
                payloads.append(payload)
            else:
                _scalar(tp, _encode_value(value), name, limits)  # same checks a receiver will run
                header[name] = _encode_value(value)
        msg.check(limits)
    except ProtocolError as exc:
        raise ValueError(f"cannot send invalid {cls.__name__}: {exc}") from None
    header["payloads"] = descriptors
    packed = msgpack.packb(header, use_bin_type=True)
    if len(packed) > limits.max_header_bytes:
        raise ValueError(f"{cls.__name__} header is {len(packed)} bytes, over {limits.max_header_bytes}")
    body = b"".join([_U32.pack(len(packed)), packed, *payloads])
    if len(body) > limits.max_frame_bytes:
        raise ValueError(
            f"{cls.__name__} is {len(body)} bytes, over the {limits.max_frame_bytes}-byte frame limit; "
            "split it into parts"
        )
    return body


def _check_version(header: dict[str, Any]) -> tuple[int, int]:
    version = header.get("v")
    if (
        not isinstance(version, list)
        or len(version) != 2
        or not all(type(x) is int and 0 <= x < 1 << 16 for x in version)
    ):
        raise MalformedMessage(f"message has no valid protocol version 'v' (got {short_repr(version)})")
    return version[0], version[1]


def decode_message(body: bytes | bytearray | memoryview, limits: WireLimits = DEFAULT_LIMITS) -> Message:
    """Body bytes → message. Raises :class:`ProtocolError` (and nothing else) on any bad input."""
    header, payloads = split_header(body, limits, "message")
    if not isinstance(header, dict):
        raise MalformedMessage("message header must be a msgpack map")
    major, minor = _check_version(header)
    kind = header.get("kind")
    if major != PROTOCOL_VERSION[0] and kind != ERROR_KIND:
        raise VersionMismatch(
            f"peer speaks wire protocol {major}.{minor}, this node speaks "
            f"{PROTOCOL_VERSION[0]}.{PROTOCOL_VERSION[1]}; the major versions must match (upgrade one side)",
            peer_version=(major, minor),
        )
    cls = MESSAGE_KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise MalformedMessage(f"unknown message kind {short_repr(kind)}")
    values = _decode_fields(cls, header, "", limits)
    values.update(_decode_payloads(cls, header.get("payloads"), payloads, limits, values))
    try:
        msg = cls(**values)
    except TypeError as exc:  # a blob field missing from "payloads"
        raise MalformedMessage(f"{cls.__name__}: {exc}") from None
    msg.check(limits)
    return msg


def _check_tensor_field(cls: type[Message], name: str, descriptor: dict[str, Any]) -> None:
    """A tensor field's declared dimensions and kind (integer ids vs float values), both directions."""
    meta = cls.__dataclass_fields__[name].metadata
    if len(descriptor["shape"]) != meta["ndim"]:
        raise TensorError(
            f"{cls.__name__}.{name} must have {meta['ndim']} dimensions, got shape {descriptor['shape']}"
        )
    if (descriptor["codec"] in INT_WIRE_TYPES) != meta["integer"]:
        raise TensorError(
            f"{cls.__name__}.{name} must be {'an integer' if meta['integer'] else 'a float'} tensor, "
            f"got codec {descriptor['codec']!r}"
        )


def _decode_payloads(
    cls: type[Message], listing: Any, data: memoryview, limits: WireLimits, fields: dict[str, Any]
) -> dict[str, Any]:
    """Payload fields, after checking every size first; ``fields`` are the already-decoded scalars."""
    blob_types = {n: cls._SPEC[n] for n in _blob_fields(cls)}
    if listing is None and not blob_types:
        listing = []
    if not isinstance(listing, list):
        raise MalformedMessage(f"{cls.__name__}: 'payloads' must be a list")
    if len(listing) > limits.max_tensors:
        raise OversizeError(f"{cls.__name__}: {len(listing)} payloads exceed the limit of {limits.max_tensors}")
    plan, offset = [], 0
    for item in listing:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and item[0] in blob_types):
            raise MalformedMessage(f"{cls.__name__}: bad payload entry {short_repr(item)}")
        name, descriptor = item
        if any(name == p[0] for p in plan):
            raise MalformedMessage(f"{cls.__name__}: payload {name!r} listed twice")
        if blob_types[name] is bytes:
            if not (isinstance(descriptor, dict) and set(descriptor) == {"bytes"} and type(descriptor["bytes"]) is int):
                raise MalformedMessage(f"{cls.__name__}.{name}: blob descriptor must be {{'bytes': n}}")
            size = descriptor["bytes"]
            if size < 0:
                raise MalformedMessage(f"{cls.__name__}.{name}: negative blob size")
        else:
            size = payload_nbytes(descriptor, limits, f"{cls.__name__}.{name}")
            _check_tensor_field(cls, name, descriptor)
        plan.append((name, descriptor, offset, size))
        offset += size
    decoded = sum(decoded_nbytes(d) for n, d, _, _ in plan if blob_types[n] is torch.Tensor)
    if decoded > limits.max_decoded_bytes:
        raise OversizeError(f"{cls.__name__}: tensors decode to {decoded} bytes, over {limits.max_decoded_bytes}")
    if offset != len(data):
        raise TensorError(f"{cls.__name__}: payloads declare {offset} bytes but the message carries {len(data)}")
    values: dict[str, Any] = {}
    for name, descriptor, start, size in plan:  # all sizes known and bounded: now allocate
        chunk = data[start : start + size]
        if blob_types[name] is bytes:
            values[name] = bytes(chunk)
        else:
            values[name] = materialise(descriptor, chunk, limits, f"{cls.__name__}.{name}")
            codec_attr = cls.__dataclass_fields__[name].metadata["codec_attr"]
            if codec_attr:
                if codec_attr in fields and fields[codec_attr] != descriptor["codec"]:
                    raise MalformedMessage(
                        f"{cls.__name__}: header says {codec_attr}={short_repr(fields[codec_attr])} but "
                        f"{name} is encoded with {descriptor['codec']!r}"
                    )
                values[codec_attr] = descriptor["codec"]
    return values
