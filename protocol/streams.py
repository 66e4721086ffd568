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
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

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
MAX_TRACKED_PEERS = 4096  # peers a PeerStrikes table remembers at most
REFUSAL_LOG_EVERY_S = 10.0  # one log line per refusal code at most this often (the counts stay in metrics)


class LogLimiter:
    """At most one log line per key every ``every`` seconds: a flood of hostile frames must not write a line
    each. The line that is written says how many of that key were not logged since the previous one."""

    def __init__(self, log: logging.Logger, every: float = REFUSAL_LOG_EVERY_S, max_keys: int = 256,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log, self.every, self.max_keys, self.clock = log, every, max_keys, clock
        self._last: dict[str, float] = {}
        self._quiet: collections.Counter[str] = collections.Counter()

    def info(self, key: str, msg: str, *args: object) -> bool:
        """Log ``msg % args`` at INFO unless ``key`` was logged within ``every``; True when it was written."""
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.every:
            self._quiet[key] += 1
            return False
        if key not in self._last and len(self._last) >= self.max_keys:  # keys are codes: bounded anyway
            self._last.pop(next(iter(self._last)))
        self._last[key] = now
        quiet = self._quiet.pop(key, 0)
        self.log.info(msg + (" (and %d more like it in the last %.0f s, not logged)" if quiet else ""),
                      *args, *((quiet, now - last) if quiet else ()))
        return True


_refusal_log = LogLimiter(logger)


class PeerStrikes:
    """Offences per peer within a sliding window, and the bans they earn; bounded in memory.

    :meth:`strike` records one offence; the ``limit``-th within ``window_s`` bans the peer for ``ban_s``
    and clears its offences, so a peer that keeps offending while banned is banned again. Each peer
    holds at most ``limit`` timestamps, and at most ``max_peers`` peers are remembered: the one struck
    least recently is forgotten first. A flood of fresh identities therefore costs a fixed amount of
    memory; at worst it makes the node forget an old offender (or lift its ban) early.
    """

    def __init__(self, limit: int, window_s: float, ban_s: float, *, max_peers: int = MAX_TRACKED_PEERS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if limit < 1 or max_peers < 1 or not window_s > 0 or not ban_s > 0:
            raise ValueError("PeerStrikes needs limit >= 1, max_peers >= 1 and positive window_s and ban_s")
        self.limit, self.window_s, self.ban_s, self.max_peers = int(limit), window_s, ban_s, int(max_peers)
        self._clock = clock
        # peer -> (offence times within the window, end of its ban or 0.0); least recently struck first
        self._peers: collections.OrderedDict[str, tuple[collections.deque[float], float]] = collections.OrderedDict()
        self.bans = 0  # bans imposed so far

    def strike(self, peer: str) -> bool:
        """Count one offence by ``peer``; True when it earned a ban just now."""
        now = self._clock()
        times, until = self._peers.pop(peer, None) or (collections.deque(maxlen=self.limit), 0.0)
        while times and now - times[0] >= self.window_s:
            times.popleft()
        times.append(now)
        banned = len(times) >= self.limit
        if banned:
            times.clear()
            until = now + self.ban_s
            self.bans += 1
        self._peers[peer] = (times, until)
        while len(self._peers) > self.max_peers:
            self._peers.popitem(last=False)
        return banned

    def banned_for(self, peer: str) -> float:
        """Seconds ``peer``'s ban still lasts (0.0: not banned)."""
        entry = self._peers.get(peer)
        if entry is None or not entry[1]:
            return 0.0
        times, until = entry
        left = until - self._clock()
        if left > 0:
            return left
        if times:
            self._peers[peer] = (times, 0.0)
        else:
            del self._peers[peer]  # nothing left to remember
        return 0.0

    def banned(self) -> dict[str, float]:
        """Every peer banned now → seconds its ban still lasts (at most ``max_peers`` entries)."""
        now = self._clock()
        return {peer: until - now for peer, (_, until) in list(self._peers.items()) if until > now}

    def __len__(self) -> int:
        return len(self._peers)


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
    replies = _Replies(writer=writer, limits=limits, write_timeout=write_timeout, peer=peer,
                       max_refusals=max_refusals, on_error=on_error, on_sent=on_sent)
    try:
        while True:
            try:
                body = await read_frame(reader, limits, timeout=frame_timeout, idle_timeout=idle_timeout)
            except ChecksumError as exc:  # the whole frame was consumed: still in sync
                if not await replies.refuse(exc):
                    return
                continue
            except (ConnectionLost, StreamIdle) as exc:  # not offences: the stream just ends
                logger.debug("peer %s: closing the stream (%s)", peer, exc)
                return
            except ProtocolError as exc:
                await replies.refuse(exc)
                return
            if body is None:
                return
            if on_frame is not None:
                on_frame(len(body) + PREFIX_BYTES)
            if not await replies.answer(body, handle):
                return
    finally:
        writer.close()


@dataclass(kw_only=True)
class _Replies:
    """The reply side of one stream :func:`serve_stream` serves: handler replies and counted refusals."""

    writer: asyncio.StreamWriter
    limits: WireLimits
    write_timeout: float | None
    peer: str
    max_refusals: int
    on_error: ErrorHook | None
    on_sent: Callable[[Message, int], None] | None
    refusals: int = 0

    async def refuse(self, exc: ProtocolError) -> bool:
        """Reply with the error; False when the stream should be closed."""
        self.refusals += 1
        _refusal_log.info(exc.code, "peer %s: refused input [%s] %s", self.peer, exc.code, exc)
        if self.on_error is not None:
            self.on_error(exc)
        reply = ErrorReply.from_error(exc, max_len=min(500, self.limits.max_str_len))
        delivered = await _reply(self.writer, reply, self.limits, self.write_timeout, self.peer)
        return delivered and self.refusals < self.max_refusals

    async def answer(self, body: bytes, handle: Handler) -> bool:
        """Decode one request, run ``handle`` on it and send its reply; False when the stream should close."""
        try:
            reply = await handle(decode_message(body, self.limits))
            encoded = None if reply is None else encode_message(reply, self.limits)
        except ProtocolError as exc:
            return await self.refuse(exc)
        except Exception:
            logger.exception("peer %s: handler failed", self.peer)
            internal = ErrorReply(code="internal", message="the handler failed")
            return await _reply(self.writer, internal, self.limits, self.write_timeout, self.peer)
        if encoded is None:
            return True
        if not await _send_encoded(self.writer, encoded, self.write_timeout, self.peer):
            return False
        if self.on_sent is not None and not isinstance(reply, ErrorReply):
            self.on_sent(reply, len(encoded) + PREFIX_BYTES)
        return True


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


async def linger(reader: asyncio.StreamReader, seconds: float) -> None:
    """Discard what the peer still sends until it closes (at most ``seconds``). Closing a stream with
    unread input can reset it and lose the reply just written, e.g. an error sent before the parts."""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(1 << 16):
                pass
    except (TimeoutError, OSError, ConnectionError):
        pass
