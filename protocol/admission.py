"""Admission: whether one peer's stream or request on one handler is served, decided before a byte of it is read.

Every protoswarm stream handler is wrapped by an :class:`Admission` (``admission.wrap(handler)``), which
refuses a new stream, with an :class:`~protocol.messages.ErrorReply` and without reading or decoding
anything the peer sent, when:

- ``banned``: the peer is banned, by the handler's own strike table (the ``banned`` callable: bad
  messages it decoded earlier) or by the admission's (repeated floods, below);
- ``flood``: the peer already holds ``max_streams`` streams open on the handler;
- ``rate_limited``: the peer opened streams or sent requests faster than ``rate`` a second, after a
  burst of ``burst`` (a token bucket per peer: :class:`~protocol.streams.RateLimiter`).

Requests after the first on one stream are charged to the same bucket when their first byte arrives
(``protocol.streams.serve_stream``'s ``admit``), and refused unread. Each ``flood`` or
``rate_limited`` refusal is a strike in the admission's own :class:`~protocol.streams.PeerStrikes`:
``flood_strikes`` of them within ``ban_s`` ban the peer for ``ban_s``. Refusals are counted per handler
and code in :data:`REFUSED` (a metric), logged at most once per code every 10 s, and the refused
stream's input is discarded for up to half a second before it is closed, so the reply is not reset
away. Every table is bounded (protocol/streams.py): a flood of fresh identities costs fixed memory.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from protocol.errors import RateLimited
from protocol.framing import write_frame
from protocol.messages import ErrorReply, encode_message
from protocol.streams import REFUSED_LINGER_S, LogLimiter, PeerStrikes, RateLimiter, linger
from protocol.tensors import DEFAULT_LIMITS, WireLimits

logger = logging.getLogger(__name__)
_log = LogLimiter(logger)

StreamHandler = Callable[[Any, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

# (handler, code) -> streams and requests refused at admission, every Admission in this process (a metric)
CODES = ("banned", "flood", "rate_limited")
REFUSED: collections.Counter[tuple[str, str]] = collections.Counter()


@dataclass(frozen=True)
class StreamLimits:
    """What one peer may ask of one handler. The defaults suit a handler an honest peer calls a few times
    a minute; handlers with busier honest peers set their own (docs/security.md lists them)."""

    max_streams: int = 8  # streams one peer may hold open on the handler at once
    rate: float = 8.0  # streams opened and requests sent a second, sustained
    burst: float = 32.0  # ... and at once after a quiet spell
    flood_strikes: int = 16  # flood / rate_limited refusals within ban_s before the peer is banned
    ban_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_streams < 1 or self.flood_strikes < 1 or not self.rate > 0 or not self.burst >= 1 \
                or not self.ban_s > 0:
            raise ValueError(f"invalid stream limits {self}")


class Admission:
    """The admission of one handler's streams (or of several handlers that share the limits)."""

    def __init__(self, handler: str, limits: StreamLimits = StreamLimits(), *,
                 banned: Callable[[str], float] | None = None,
                 on_refused: Callable[[str, str], None] | None = None,
                 wire_limits: WireLimits = DEFAULT_LIMITS, clock: Callable[[], float] = time.monotonic) -> None:
        """``banned(peer)``: seconds the handler's own ban of ``peer`` still lasts (0: none);
        ``on_refused(peer, code)``: sees every refusal (the handler's counters)."""
        self.handler, self.limits, self.wire_limits = handler, limits, wire_limits
        self._banned, self._on_refused = banned, on_refused
        self.rates = RateLimiter(limits.rate, limits.burst, clock=clock)
        self.strikes = PeerStrikes(limits.flood_strikes, limits.ban_s, limits.ban_s, clock=clock)
        self._open: collections.Counter[str] = collections.Counter()  # streams open per peer (none kept at 0)
        self.refused: collections.Counter[str] = collections.Counter()  # code -> refusals
        for code in CODES:  # the handler's series start at 0, so a rate over them sees the first refusal
            REFUSED[(handler, code)] += 0

    def open_streams(self, peer: str) -> int:
        return self._open[peer]

    def admit(self, peer: str) -> ErrorReply | None:
        """A new stream from ``peer``: None when it is served (it counts as open until :meth:`release`),
        else the refusal to send."""
        left = max(self._banned(peer) if self._banned is not None else 0.0, self.strikes.banned_for(peer))
        if left > 0:
            return self._refuse(peer, "banned", f"refused for {left:.0f} s more (too many bad or excess requests)",
                                left)
        if self._open[peer] >= self.limits.max_streams:
            return self._refuse(peer, "flood", f"{self._open[peer]} streams from this peer are open on "
                                f"{self.handler} already (at most {self.limits.max_streams})", None)
        if (wait := self.rates.take(peer)) > 0:
            return self._refuse(peer, "rate_limited", f"more than {self.limits.rate:g} streams or requests a "
                                f"second on {self.handler}", wait)
        self._open[peer] += 1
        return None

    def request(self, peer: str) -> None:
        """One more request on an admitted stream (called as it begins to arrive); raises
        :class:`RateLimited` when ``peer`` is over its rate (counted and struck like a refused stream)."""
        if (wait := self.rates.take(peer)) > 0:
            reply = self._refuse(peer, "rate_limited", f"more than {self.limits.rate:g} requests a second on "
                                 f"{self.handler}", wait, log=False)
            raise RateLimited(reply.message, retry_after=wait)

    def release(self, peer: str) -> None:
        self._open[peer] -= 1
        if self._open[peer] <= 0:
            del self._open[peer]

    def _refuse(self, peer: str, code: str, message: str, retry_after: float | None, log: bool = True) -> ErrorReply:
        self.refused[code] += 1
        REFUSED[(self.handler, code)] += 1
        if code != "banned" and self.strikes.strike(peer):
            _log.warning(f"{self.handler}:ban", "peer %s: %d floods of %s within %.0f s; refusing it for %.0f s", peer,
                         self.strikes.limit, self.handler, self.limits.ban_s, self.limits.ban_s)
        if log:  # (a refused request is logged by serve_stream's refusal)
            _log.info(f"{self.handler}:{code}", "peer %s: stream on %s refused [%s] %s", peer, self.handler, code,
                      message)
        if self._on_refused is not None:
            self._on_refused(peer, code)
        return ErrorReply(code=code, message=message[:500], retry_after=retry_after)

    def wrap(self, handler: StreamHandler) -> StreamHandler:
        """``handler`` behind this admission: a refused stream gets its reply, its input is discarded for
        up to half a second (closing a stream with unread input can reset it and lose the reply), and it
        is closed; the handler never sees it."""

        async def admitted(info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peer = str(info.peer_id)
            refusal = self.admit(peer)
            if refusal is not None:
                await refuse_stream(reader, writer, refusal, self.wire_limits)
                return
            try:
                await handler(info, reader, writer)
            finally:
                self.release(peer)

        return admitted


async def refuse_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reply: ErrorReply,
                        limits: WireLimits = DEFAULT_LIMITS) -> None:
    """Send ``reply`` on a stream whose input is never read, discard that input briefly, and close it."""
    try:
        await write_frame(writer, encode_message(reply, limits), timeout=5.0)
        await linger(reader, REFUSED_LINGER_S)
    except Exception:  # the peer went away
        pass
    finally:
        writer.close()
