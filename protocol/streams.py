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

from protocol.errors import ChecksumError, ConnectionLost, ProtocolError, RateLimited, RemoteError, StreamIdle
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
MAX_TRACKED_PEERS = 4096  # peers a PeerStrikes (offences) or RateLimiter table remembers at most
MAX_BANS = 4096  # bans a PeerStrikes table holds at once
REFUSED_LINGER_S = 0.5  # a request refused unread: how long the rest of its input is discarded before closing
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
        return self.log_at(logging.INFO, key, msg, *args)

    def warning(self, key: str, msg: str, *args: object) -> bool:
        """The same at WARNING (a ban: one identity of a flood each, so bounded by nothing but the flood)."""
        return self.log_at(logging.WARNING, key, msg, *args)

    def log_at(self, level: int, key: str, msg: str, *args: object) -> bool:
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.every:
            self._quiet[key] += 1
            return False
        if key not in self._last and len(self._last) >= self.max_keys:  # keys are codes: bounded anyway
            self._last.pop(next(iter(self._last)))
        self._last[key] = now
        quiet = self._quiet.pop(key, 0)
        self.log.log(level, msg + (" (and %d more like it in the last %.0f s, not logged)" if quiet else ""),
                     *args, *((quiet, now - last) if quiet else ()))
        return True


_refusal_log = LogLimiter(logger)


class PeerStrikes:
    """Offences per peer within a sliding window, and the bans they earn; bounded in memory.

    :meth:`strike` records one offence; the ``limit``-th within ``window_s`` bans the peer for ``ban_s``
    and clears its offences, so a peer that keeps offending while banned is banned again.

    Two bounded tables. Offences: each peer holds at most ``limit`` timestamps and at most ``max_peers``
    peers are remembered, the one struck least recently forgotten first. Bans: at most ``max_bans``
    peers, kept apart from the offences, so a flood of fresh identities that each offend once washes
    out only offences (never a ban). When ``max_bans`` bans are in force at once, a new one displaces
    the ban that ends soonest (``displaced`` counts them). The bound: to lift a ban early, a flood has
    to earn ``max_bans`` bans of its own, ``limit`` offences from each of as many identities, within
    that ban's remaining time, and every identity it used is banned in turn.
    """

    def __init__(self, limit: int, window_s: float, ban_s: float, *, max_peers: int = MAX_TRACKED_PEERS,
                 max_bans: int = MAX_BANS, clock: Callable[[], float] = time.monotonic) -> None:
        if limit < 1 or max_peers < 1 or max_bans < 1 or not window_s > 0 or not ban_s > 0:
            raise ValueError("PeerStrikes needs limit, max_peers and max_bans >= 1 and positive window_s and ban_s")
        self.limit, self.window_s, self.ban_s = int(limit), window_s, ban_s
        self.max_peers, self.max_bans = int(max_peers), int(max_bans)
        self._clock = clock
        # peer -> its offence times within the window; least recently struck first
        self._offences: collections.OrderedDict[str, collections.deque[float]] = collections.OrderedDict()
        self._bans: dict[str, float] = {}  # peer -> the end of its ban
        self.bans = 0  # bans imposed so far
        self.displaced = 0  # bans ended early to make room for a newer one (max_bans in force)

    def strike(self, peer: str) -> bool:
        """Count one offence by ``peer``; True when it earned a ban just now."""
        now = self._clock()
        times = self._offences.pop(peer, None) or collections.deque(maxlen=self.limit)
        while times and now - times[0] >= self.window_s:
            times.popleft()
        times.append(now)
        if len(times) >= self.limit:
            self._ban(peer, now)
            return True
        self._offences[peer] = times
        while len(self._offences) > self.max_peers:
            self._offences.popitem(last=False)
        return False

    def _ban(self, peer: str, now: float) -> None:
        self.bans += 1
        if peer not in self._bans and len(self._bans) >= self.max_bans:
            for other in [p for p, until in self._bans.items() if until <= now]:
                del self._bans[other]
            if len(self._bans) >= self.max_bans:
                del self._bans[min(self._bans, key=self._bans.__getitem__)]
                self.displaced += 1
        self._bans[peer] = now + self.ban_s

    def banned_for(self, peer: str) -> float:
        """Seconds ``peer``'s ban still lasts (0.0: not banned)."""
        until = self._bans.get(peer)
        if until is None:
            return 0.0
        left = until - self._clock()
        if left > 0:
            return left
        del self._bans[peer]  # served
        return 0.0

    def banned(self) -> dict[str, float]:
        """Every peer banned now → seconds its ban still lasts (at most ``max_bans`` entries)."""
        now = self._clock()
        return {peer: until - now for peer, until in list(self._bans.items()) if until > now}

    def __len__(self) -> int:
        """Entries held: peers with offences in the window plus peers with a ban (expired ones included
        until they are looked up)."""
        return len(self._offences) + len(self._bans)


class RateLimiter:
    """A token bucket per key: ``rate`` tokens a second, at most ``burst`` saved up; bounded in memory.

    At most ``max_keys`` keys are held, the one used least recently forgotten first: at worst a flood of
    fresh identities hands an old key a full bucket again (``burst`` requests), never more.
    """

    def __init__(self, rate: float, burst: float, *, max_keys: int = MAX_TRACKED_PEERS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not rate > 0 or not burst >= 1 or max_keys < 1:
            raise ValueError("RateLimiter needs rate > 0, burst >= 1 and max_keys >= 1")
        self.rate, self.burst, self.max_keys, self._clock = float(rate), float(burst), int(max_keys), clock
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def take(self, key: str, cost: float = 1.0) -> float:
        """Take ``cost`` tokens from ``key``'s bucket: 0.0 when they were there, else the seconds until they
        will be (nothing is taken then)."""
        now = self._clock()
        tokens, at = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        wait = 0.0 if tokens >= cost else (cost - tokens) / self.rate
        self._buckets[key] = (tokens - cost if not wait else tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait

    def __len__(self) -> int:
        return len(self._buckets)


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
    admit: Callable[[], None] | None = None,
) -> None:
    """Answer each request on one stream with ``await handle(msg)`` until the peer closes it.

    Bad input never escapes: a message that fails to decode (or that the handler refuses by raising
    a :class:`ProtocolError`) gets an error reply and the loop continues; an error in the framing
    itself (bad prefix, oversize, timeout, truncation) gets a reply and closes the stream, whose byte
    position is then unknown. Any other handler failure, including a reply that cannot be encoded,
    is logged and answered with ``internal``. The stream is closed after ``max_refusals`` refusals,
    when the peer does not take a reply within ``write_timeout``, or after ``idle_timeout`` of silence.

    ``on_frame(nbytes)`` sees each request frame's size before it is decoded; ``on_sent(reply, nbytes)``
    each handler reply once written (not error replies). ``admit()`` runs as each request after the
    first begins to arrive: raising :class:`RateLimited` refuses it unread and closes the stream.
    """
    replies = _Replies(writer=writer, limits=limits, write_timeout=write_timeout, peer=peer,
                       max_refusals=max_refusals, on_error=on_error, on_sent=on_sent)
    on_start = None
    try:
        while True:
            try:
                body = await read_frame(reader, limits, timeout=frame_timeout, idle_timeout=idle_timeout,
                                        on_start=on_start)
            except ChecksumError as exc:  # the whole frame was consumed: still in sync
                if not await replies.refuse(exc):
                    return
                continue
            except (ConnectionLost, StreamIdle) as exc:  # not offences: the stream just ends
                logger.debug("peer %s: closing the stream (%s)", peer, exc)
                return
            except RateLimited as exc:  # the request is left unread; the reply must not be reset away
                if await replies.refuse(exc):
                    await linger(reader, REFUSED_LINGER_S)
                return
            except ProtocolError as exc:
                await replies.refuse(exc)
                return
            on_start = admit
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
