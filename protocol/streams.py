"""Messages over asyncio byte streams: send, receive, request/reply, and a serving loop.

These are transport-agnostic; the swarm hands them the reader/writer pairs of hivemind P2P binary
streams. The serving loop is where "never crash from the outside" is enforced for a stream: a frame
that cannot be decoded is answered with an :class:`ErrorReply` naming the problem, counted through
``on_error``, and the loop goes on (or closes the stream when its byte position is lost).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from protocol.errors import ChecksumError, ProtocolError, RemoteError
from protocol.framing import read_frame, write_frame
from protocol.messages import ErrorReply, Message, decode_message, encode_message
from protocol.tensors import DEFAULT_LIMITS, WireLimits

logger = logging.getLogger(__name__)

Handler = Callable[[Message], Awaitable[Message | None]]
ErrorHook = Callable[[ProtocolError], None]


async def send_message(writer: asyncio.StreamWriter, msg: Message, limits: WireLimits = DEFAULT_LIMITS) -> None:
    await write_frame(writer, encode_message(msg, limits))


async def receive_message(
    reader: asyncio.StreamReader, limits: WireLimits = DEFAULT_LIMITS, *, timeout: float | None = None
) -> Message | None:
    """Next message, or None when the peer closed the stream between frames."""
    body = await read_frame(reader, limits, timeout=timeout)
    return None if body is None else decode_message(body, limits)


async def request(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    msg: Message,
    limits: WireLimits = DEFAULT_LIMITS,
    *,
    timeout: float | None = None,
) -> Message:
    """Send ``msg`` and return the reply; an :class:`ErrorReply` is raised as :class:`RemoteError`."""
    await send_message(writer, msg, limits)
    reply = await receive_message(reader, limits, timeout=timeout)
    if reply is None:
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
    frame_timeout: float | None = None,
    on_error: ErrorHook | None = None,
    peer: str = "?",
) -> None:
    """Answer each request on one stream with ``await handle(msg)`` until the peer closes it.

    Bad input never escapes: a message that fails to decode (or that the handler refuses by raising
    a :class:`ProtocolError`) gets an error reply and the loop continues; an error in the framing
    itself (bad prefix, oversize, timeout, truncation) gets a reply and closes the stream, whose byte
    position is then unknown. Unexpected handler exceptions reply ``internal`` and are logged.
    """
    try:
        while True:
            try:
                body = await read_frame(reader, limits, timeout=frame_timeout)
            except ChecksumError as exc:  # the whole frame was consumed: still in sync
                await _refuse(writer, exc, on_error, peer, limits)
                continue
            except ProtocolError as exc:
                await _refuse(writer, exc, on_error, peer, limits)
                return
            if body is None:
                return
            try:
                msg = decode_message(body, limits)
                reply = await handle(msg)
            except ProtocolError as exc:
                await _refuse(writer, exc, on_error, peer, limits)
                continue
            except Exception:
                logger.exception("peer %s: handler failed", peer)
                await send_message(writer, ErrorReply(code="internal", message="the handler failed"), limits)
                continue
            if reply is not None:
                await send_message(writer, reply, limits)
    except (ConnectionError, asyncio.IncompleteReadError) as exc:
        logger.debug("peer %s: stream closed (%s)", peer, exc)
    finally:
        writer.close()


async def _refuse(
    writer: asyncio.StreamWriter, exc: ProtocolError, on_error: ErrorHook | None, peer: str, limits: WireLimits
) -> None:
    logger.info("peer %s: refused input [%s] %s", peer, exc.code, exc)
    if on_error is not None:
        on_error(exc)
    try:
        await send_message(writer, ErrorReply.from_error(exc), limits)
    except ConnectionError:
        pass
