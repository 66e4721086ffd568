"""Frames: how message bodies are delimited on a byte stream (a hivemind P2P binary stream, TCP, …).

A frame is a 12-byte prefix and the body::

    b"PSW" | format (u8, = 1) | body length (u32 LE) | CRC-32 of the body (u32 LE) | body

The length is checked against the cap *before* the body is read, so a peer cannot make a node
allocate more than ``max_frame_bytes``; the CRC (zlib's, ~6 GB/s here) catches corruption and
truncation that TCP's weak checksum lets through. Authenticity is the transport's job (libp2p
Noise). After a framing error the stream's position is unknown, so the stream should be closed.

:func:`read_frame`/:func:`write_frame` work on asyncio streams (which is what hivemind's
``add_binary_stream_handler``/``call_binary_stream_handler`` hand out); :class:`FrameDecoder`
splits frames out of bytes fed to it, for transports that deliver chunks. A :class:`FrameHook`
installed with :func:`set_frame_hook` is awaited around every frame they read or write (the
simulator's emulated access link), told which stream the frame is on; framing knows nothing else
about it.
"""

from __future__ import annotations

import asyncio
import struct
import zlib
from collections.abc import Callable
from typing import Protocol

from protocol.errors import (
    ChecksumError,
    ConnectionLost,
    FrameError,
    FrameTimeout,
    OversizeError,
    ProtocolError,
    StreamIdle,
)
from protocol.tensors import DEFAULT_LIMITS, WireLimits

MAGIC = b"PSW"
FRAME_FORMAT = 1
_PREFIX = struct.Struct("<3sBII")
PREFIX_BYTES = _PREFIX.size  # 12


class FrameHook(Protocol):
    """What every frame read or written in this process passes through once :func:`set_frame_hook`
    installs it; ``nbytes`` counts the whole frame, prefix included. Both waits happen inside the
    frame's timeout. The simulator's emulated access link (swarm/sim/link.py) is one.

    ``stream`` identifies the bidirectional stream the frame is on, the same object for frames read
    and frames written on it: the stream's asyncio transport (``writer.transport``, and the reader's
    ``_transport``, which asyncio sets to that same transport; :func:`stream_key`). It is None where
    the reader or writer has none (a bare ``StreamReader`` fed by hand, a stand-in writer): the hook
    must then treat the frame as on a stream it knows nothing about. Hooks only use it as a key and
    hold it weakly; framing passes it by keyword, a hook called without it gets None."""

    async def before_send(self, nbytes: int, stream: object | None = None) -> None:
        """A frame of ``nbytes`` is about to be written on ``stream``: return when it may go."""

    async def after_receive(self, nbytes: int, stream: object | None = None) -> None:
        """A frame of ``nbytes`` was read whole from ``stream``: return when it may be handed on."""


# None, the normal case, costs one global lookup and an ``is None`` test per frame.
_frame_hook: FrameHook | None = None


def set_frame_hook(hook: FrameHook | None) -> FrameHook | None:
    """Make ``hook`` this process's frame hook from now on (None: none); returns the one it replaces."""
    global _frame_hook
    previous, _frame_hook = _frame_hook, hook
    return previous


def frame_hook() -> FrameHook | None:
    """The installed frame hook, or None."""
    return _frame_hook


def stream_key(end: asyncio.StreamReader | asyncio.StreamWriter) -> object | None:
    """The object a :class:`FrameHook` is told a frame's stream is: the transport under ``end``, which
    is the same for the reader and the writer of one stream (asyncio's ``StreamReader`` keeps it in
    ``_transport``, its only accessor, set by the ``StreamReaderProtocol`` that feeds it), or None."""
    transport = getattr(end, "transport", None)
    return getattr(end, "_transport", None) if transport is None else transport


def frame_prefix(body: bytes | bytearray | memoryview) -> bytes:
    """The 12 bytes that go in front of ``body``."""
    if len(body) >= 1 << 32:
        raise ValueError(f"a frame body must be under 4 GiB, got {len(body)} bytes")
    return _PREFIX.pack(MAGIC, FRAME_FORMAT, len(body), zlib.crc32(body))


def encode_frame(body: bytes | bytearray | memoryview) -> bytes:
    return frame_prefix(body) + bytes(body)


def parse_prefix(prefix: bytes | memoryview, limits: WireLimits = DEFAULT_LIMITS) -> tuple[int, int]:
    """(body length, crc) from a prefix; raises FrameError/OversizeError before any body is read."""
    magic, fmt, length, crc = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise FrameError(f"not a protoswarm frame (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if fmt != FRAME_FORMAT:
        raise FrameError(f"frame format {fmt} is not supported (this node reads format {FRAME_FORMAT})")
    if length > limits.max_frame_bytes:
        raise OversizeError(f"frame declares {length} bytes, over the {limits.max_frame_bytes}-byte cap")
    return length, crc


def _check_crc(body: bytes | memoryview, crc: int) -> None:
    actual = zlib.crc32(body)
    if actual != crc:
        raise ChecksumError(f"frame checksum mismatch (got {actual:08x}, header says {crc:08x})")


def decode_frame(data: bytes | bytearray | memoryview, limits: WireLimits = DEFAULT_LIMITS) -> memoryview:
    """The body of exactly one frame in ``data`` (no bytes before or after it)."""
    view = memoryview(data).cast("B")
    if len(view) < PREFIX_BYTES:
        raise FrameError(f"truncated frame: {len(view)} bytes, the prefix alone is {PREFIX_BYTES}")
    length, crc = parse_prefix(view[:PREFIX_BYTES], limits)
    if len(view) != PREFIX_BYTES + length:
        raise FrameError(f"frame declares a {length}-byte body but {len(view) - PREFIX_BYTES} bytes follow")
    body = view[PREFIX_BYTES:]
    _check_crc(body, crc)
    return body


class FrameDecoder:
    """Incremental splitter: ``feed(bytes)`` returns the complete frame bodies seen so far.

    Between calls it holds at most one incomplete frame (``max_frame_bytes`` + prefix); within a call
    the whole chunk given is buffered. After any error (checksum included) it stays broken.
    """

    def __init__(self, limits: WireLimits = DEFAULT_LIMITS):
        self.limits = limits
        self._buffer = bytearray()
        self._need: tuple[int, int] | None = None  # (length, crc) of the frame being read
        self._error: Exception | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        if self._error is not None:
            raise FrameError(f"stream already failed: {self._error}")
        self._buffer += data
        bodies = []
        try:
            while True:
                if self._need is None:
                    if len(self._buffer) < PREFIX_BYTES:
                        break
                    self._need = parse_prefix(bytes(self._buffer[:PREFIX_BYTES]), self.limits)
                    del self._buffer[:PREFIX_BYTES]
                length, crc = self._need
                if len(self._buffer) < length:
                    break
                body = bytes(self._buffer[:length])
                del self._buffer[:length]
                self._need = None
                _check_crc(body, crc)
                bodies.append(body)
        except ProtocolError as exc:  # oversize too: the stream position is lost either way
            self._error = exc
            self._buffer.clear()
            raise
        return bodies

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held in the buffer (non-zero at EOF means truncation)."""
        return len(self._buffer) + (PREFIX_BYTES if self._need else 0)


async def read_frame(
    reader: asyncio.StreamReader,
    limits: WireLimits = DEFAULT_LIMITS,
    *,
    timeout: float | None = None,
    idle_timeout: float | None = None,
    on_start: Callable[[], None] | None = None,
) -> bytes | None:
    """Next frame body from ``reader``, or None on a clean end of stream between frames.

    ``on_start()`` runs when the frame's first byte has arrived, before the rest of it is read: an
    admission check that raises (e.g. :class:`~protocol.errors.RateLimited`) leaves the body unread.

    ``idle_timeout`` bounds the wait for a frame's first byte (None: wait as long as the peer keeps
    the stream open); ``timeout`` then bounds the rest of the frame, so a peer that trickles bytes
    cannot hold the reader: they raise :class:`StreamIdle` and :class:`FrameTimeout`. A transport failure (reset, broken
    pipe) raises :class:`ConnectionLost`.
    """
    whole = None
    try:
        async with asyncio.timeout(idle_timeout) as idle:
            first = await reader.read(1)
        if not first:
            return None
        if on_start is not None:
            on_start()
        async with asyncio.timeout(timeout) as whole:
            prefix = first + await reader.readexactly(PREFIX_BYTES - 1)
            length, crc = parse_prefix(prefix, limits)
            body = await reader.readexactly(length)
            if (hook := _frame_hook) is not None:
                await hook.after_receive(PREFIX_BYTES + length, stream=stream_key(reader))
    except TimeoutError:
        if idle.expired():
            raise StreamIdle(f"no frame started within {idle_timeout} s") from None
        if whole is not None and whole.expired():
            raise FrameTimeout(f"frame not received within {timeout} s") from None
        raise ConnectionLost("stream timed out at the transport level") from None
    except asyncio.IncompleteReadError as exc:
        raise FrameError(
            f"stream ended inside a frame ({len(exc.partial)} of {exc.expected} bytes of a frame part)"
        ) from None
    except OSError as exc:
        raise ConnectionLost(f"stream broken while reading: {exc}") from None
    _check_crc(body, crc)
    return body


async def write_frame(
    writer: asyncio.StreamWriter, body: bytes | bytearray | memoryview, *, timeout: float | None = None
) -> None:
    """Write one frame and wait until the transport has taken it (back-pressure).

    ``timeout`` bounds that wait, so a peer that never reads cannot block the writer forever: it
    raises :class:`FrameTimeout`, after which the stream should be closed.
    """
    try:
        async with asyncio.timeout(timeout) as deadline:
            prefix = frame_prefix(body)
            if (hook := _frame_hook) is not None:
                await hook.before_send(len(prefix) + len(body), stream=stream_key(writer))
            writer.write(prefix)
            writer.write(body)
            await writer.drain()
    except TimeoutError:
        if deadline.expired():
            raise FrameTimeout(f"peer did not take a {len(body)}-byte frame within {timeout} s") from None
        raise ConnectionLost("stream timed out at the transport level") from None
    except OSError as exc:
        raise ConnectionLost(f"stream broken while writing: {exc}") from None
