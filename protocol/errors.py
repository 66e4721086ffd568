"""The one error family for everything a peer sends.

Decoding never lets another exception type escape on bad input: anything malformed, oversize,
of another protocol version or numerically invalid raises a subclass of :class:`ProtocolError`.
Each subclass has a stable ``code`` (a short string) that goes into error replies and metric labels,
so operators can count *kinds* of bad input without parsing messages.

Programming mistakes on the sending side (encoding a tensor of an unsupported dtype, for instance)
are ``ValueError``/``TypeError``: they are ours to fix, not a peer's.
"""

from __future__ import annotations

import reprlib

_REPR = reprlib.Repr()  # keyword arguments arrive only in Python 3.12
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 3, 60, 60, 6, 6


def short_repr(value: object) -> str:
    """A bounded repr for error messages: peer values can be huge or nested 1000 levels deep."""
    return _REPR.repr(value)


class ProtocolError(Exception):
    """Input from a peer that this node will not accept. ``code`` names the kind of failure."""

    code = "protocol"


class FrameError(ProtocolError):
    """The byte stream is not a well-formed frame: bad magic, truncated, or trailing bytes."""

    code = "frame"


class ConnectionLost(FrameError):
    """The transport failed under the stream (reset, broken pipe): not the peer's data, but the end of it."""

    code = "connection"


class ChecksumError(FrameError):
    """The frame's checksum does not match its body: corrupted in transit or forged."""

    code = "checksum"


class OversizeError(ProtocolError):
    """A length, count or shape exceeds the configured cap; nothing of that size was allocated."""

    code = "oversize"


class FrameTimeout(ProtocolError):
    """A frame did not arrive completely within its deadline (a stalled or slow-loris peer)."""

    code = "timeout"


class StreamIdle(FrameTimeout):
    """No frame started within the idle deadline: a quiet stream, not an offence by the peer."""

    code = "idle"


class VersionMismatch(ProtocolError):
    """The peer speaks another major protocol version; upgrade one side."""

    code = "version"

    def __init__(self, message: str, *, peer_version: tuple[int, int] | None = None):
        super().__init__(message)
        self.peer_version = peer_version


class MalformedMessage(ProtocolError):
    """The message header is not valid msgpack, or a field is missing, mistyped or out of range."""

    code = "malformed"


class UnknownCodec(MalformedMessage):
    """A tensor names a codec this node does not implement."""

    code = "unknown_codec"


class TensorError(ProtocolError):
    """A tensor's dtype, shape or byte length disagrees with the allow-list, the limits or itself."""

    code = "tensor"


class NonFiniteError(TensorError):
    """A tensor holds NaN or ±inf (rejected so it never reaches model state)."""

    code = "non_finite"




class RateLimited(ProtocolError):
    """The peer asks more often than a handler serves one peer; ``retry_after``: seconds until it would."""

    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class RemoteError(ProtocolError):
    """The peer answered with an :class:`~protocol.messages.ErrorReply`; ``remote_code`` says why."""

    code = "remote"

    def __init__(self, message: str, *, remote_code: str, retry_after: float | None = None):
        super().__init__(message)
        self.remote_code = remote_code
        self.retry_after = retry_after


ERROR_CODES: tuple[str, ...] = tuple(
    cls.code
    for cls in (
        ProtocolError,
        FrameError,
        ConnectionLost,
        ChecksumError,
        OversizeError,
        FrameTimeout,
        StreamIdle,
        VersionMismatch,
        MalformedMessage,
        UnknownCodec,
        TensorError,
        NonFiniteError,
        RateLimited,
        RemoteError,
    )
)
