"""Messages over asyncio byte streams: send, receive, request/reply, and a serving loop.

These are transport-agnostic; the swarm hands them the reader/writer pairs of hivemind P2P binary
streams. The serving loop is where "never crash from the outside" is enforced for a stream: a frame
that cannot be decoded is answered with an :class:`ErrorReply` naming the problem, counted through
``on_error``, and the loop goes on (or closes the stream when its byte position is lost, when the
peer stops reading, or after too many refusals on the same stream).

Every wait has a deadline by default: a frame must arrive within ``frame_timeout`` of its first byte,
a reply must be taken by the peer within ``write_timeout``, and an idle stream is closed after
``idle_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from protocol.errors import ChecksumError, ConnectionLost, ProtocolError, RemoteError, StreamIdle
from protocol.framing import PREFIX_BYTES, read_frame, write_frame
from protocol.messages import ErrorReply, Message, decode_message, encode_message
from protocol.tensors import DEFAULT_LIMITS, WireLimits

logger = logging.getLogger(__name__)

Handler = Callable[[Message], Awaitable[Message | None]]
ErrorHook = Callable[[ProtocolError], None]

FRAME_TIMEOUT = 60.0  # seconds from a frame's first byte to its last
WRITE_TIMEOUT = 60.0  # seconds for the peer to take one frame we send
IDLE_TIMEOUT = 600.0  # seconds a served stream may sit idle between requests
MAX_REFUSALS = 16  # refused requests on one stream before it is closed


async def send_message(
    writer: asyncio.StreamWriter,
    msg: Message,
    limits: WireLimits = DEFAULT_LIMITS,
    *,
    timeout: float | None = WRITE_TIMEOUT,
) -> None:
    await write_frame(writer, encode_message(msg, limits), timeout=timeout)


async def receive_message(
    reader: asyncio.StreamReader,
    limits: WireLimits = DEFAULT_LIMITS,
    *,
    timeout: float | None = FRAME_TIMEOUT,
    idle_timeout: float | None = None,
) -> Message | None:
    """Next message, or None when the peer closed the stream between frames."""
    body = await read_frame(reader, limits, timeout=timeout, idle_timeout=idle_timeout)
    return None if body is None else decode_message(body, limits)


async def request(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    msg: Message,
    limits: WireLimits = DEFAULT_LIMITS,
    *,
    timeout: float | None = FRAME_TIMEOUT,
) -> Message:
    """Send ``msg`` and return the reply; an :class:`ErrorReply` is raised as :class:`RemoteError`.

    ``timeout`` bounds sending and the whole wait for the reply. On any failure other than an error
    reply the stream is closed: a late reply would otherwise be taken as the answer to the next request.
    """
    try:
        await send_message(writer, msg, limits, timeout=timeout)
        reply = await receive_message(reader, limits, timeout=timeout, idle_timeout=timeout)
    except BaseException:
        writer.close()
        raise
    if reply is None:
        writer.close()
        raise RemoteError("peer closed the stream without replying", remote_code="closed")
    if isinstance(reply, ErrorReply):
        raise RemoteError(
            f"peer refused {type(msg).__name__}: [{reply.code}] {reply.message}",
            remote_code=reply.code,
            retry_after=reply.retry_after,
        )
    return reply


async def serve_stream(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    handle: Handler,
    limits: WireLimits = DEFAULT_LIMITS,
    *,
    frame_timeout: float | None = FRAME_TIMEOUT,
    write_timeout: float | None = WRITE_TIMEOUT,
    idle_timeout: float | None = IDLE_TIMEOUT,
    max_refusals: int = MAX_REFUSALS,
    on_error: ErrorHook | None = None,
    on_frame: Callable[[int], None] | None = None,
    on_sent: Callable[[Message, int], None] | None = None,
    peer: str = "?",
) -> None:
    """Answer each request on one stream with ``await handle(msg)`` until the peer closes it.

    Bad input never escapes: a message that fails to decode (or that the handler refuses by raising
    a :class:`ProtocolError`) gets an error reply and the loop continues; an error in the framing
    itself (bad prefix, oversize, timeout, truncation) gets a reply and closes the stream, whose byte
    position is then unknown. Any other handler failure, including a reply that cannot be encoded,
    is logged and answered with ``internal``. The stream is closed after ``max_refusals`` refusals,
    when the peer does not take a reply within ``write_timeout``, or after ``idle_timeout`` of silence.

    ``on_frame(nbytes)`` sees the size of each request frame before it is decoded; ``on_sent(reply,
    nbytes)`` each handler reply once it was written (error replies excluded). Both count bytes.
    """
    refusals = 0

    async def refuse(exc: ProtocolError) -> bool:
        """Reply with the error; False when the stream should be closed."""
        nonlocal refusals
        refusals += 1
        logger.info("peer %s: refused input [%s] %s", peer, exc.code, exc)
        if on_error is not None:
            on_error(exc)
        reply = ErrorReply.from_error(exc, max_len=min(500, limits.max_str_len))
        return await _reply(writer, reply, limits, write_timeout, peer) and refusals < max_refusals

    try:
        while True:
            try:
                body = await read_frame(reader, limits, timeout=frame_timeout, idle_timeout=idle_timeout)
            except ChecksumError as exc:  # the whole frame was consumed: still in sync
                if not await refuse(exc):
                    return
                continue
            except (ConnectionLost, StreamIdle) as exc:  # not offences: the stream just ends
                logger.debug("peer %s: closing the stream (%s)", peer, exc)
                return
            except ProtocolError as exc:
                await refuse(exc)
                return
            if body is None:
                return
            if on_frame is not None:
                on_frame(len(body) + PREFIX_BYTES)
            try:
                reply = await handle(decode_message(body, limits))
                encoded = None if reply is None else encode_message(reply, limits)
            except ProtocolError as exc:
                if not await refuse(exc):
                    return
                continue
            except Exception:
                logger.exception("peer %s: handler failed", peer)
                internal = ErrorReply(code="internal", message="the handler failed")
                if not await _reply(writer, internal, limits, write_timeout, peer):
                    return
                continue
            if encoded is not None:
                if not await _send_encoded(writer, encoded, write_timeout, peer):
                    return
                if on_sent is not None and not isinstance(reply, ErrorReply):
                    on_sent(reply, len(encoded) + PREFIX_BYTES)
    finally:
        writer.close()


async def _reply(
    writer: asyncio.StreamWriter, reply: Message, limits: WireLimits, timeout: float | None, peer: str
) -> bool:
    return await _send_encoded(writer, encode_message(reply, limits), timeout, peer)


async def _send_encoded(writer: asyncio.StreamWriter, body: bytes, timeout: float | None, peer: str) -> bool:
    """Send one already-encoded reply; False (close the stream) if the peer does not take it."""
    try:
        await write_frame(writer, body, timeout=timeout)
        return True
    except ProtocolError as exc:  # FrameTimeout (peer not reading) or ConnectionLost
        logger.info("peer %s: cannot deliver a reply (%s); closing the stream", peer, exc)
        return False
