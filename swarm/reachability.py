"""Can other peers open connections to this node? A dial-back check, answered by peers.

A node behind a home router can dial out, but nobody can dial in. libp2p's own AutoNAT runs inside
the daemon and offers no way to read its verdict, and a stream to a peer that is already connected
proves nothing (it reuses the connection this node opened). So a node asks peers to try:

    asker  ──DialbackRequest(ports)──▶  peer      (handler protoswarm.dialback.v1)
                                          │ a fresh TCP connection to <address the stream came from>:port
    asker  ◀──DialbackReply(observed, open_ports)─┘

The peer dials only the address it sees the asker's connection come from (never an address the
asker names, so a peer cannot make another one dial a third party), on at most four ports, at most
once per ``min_interval_s`` per asker. A stream that arrived over a relay has no address to dial: the
reply says so (``observed == ""``). Refusals and malformed requests get an ErrorReply and strikes,
``peer_strikes`` of them a ban, like every other handler.

:func:`verdict` turns the answers into what the node publishes in its :class:`StageRecord`
(``reachable``): ``"public"`` when any answering peer's dial reached one of its ports, ``"private"``
when peers answered and none did, ``""`` (not known) when nobody answered. A peer on the asker's
own LAN reaches it where the internet cannot; that peer's "public" is wrong, and accepted: swarms
where several nodes share one home network are rare, and the cost is the pre-1.2 behaviour.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

from protocol.admission import Admission, StreamLimits
from protocol.errors import MalformedMessage, ProtocolError
from protocol.messages import MAX_DIALBACK_PORTS, DialbackReply, DialbackRequest, ErrorReply, Message
from protocol.streams import PeerStrikes, request, serve_stream
from protocol.tensors import DEFAULT_LIMITS, WireLimits

logger = logging.getLogger(__name__)

HANDLER = "protoswarm.dialback.v1"
_IP_TCP = re.compile(r"^/(ip4|ip6)/([^/]+)/tcp/(\d+)")


def observed_ip(addr: Any) -> str:
    """The IP address of a connection's remote multiaddr; "" for a relayed or non-TCP one."""
    text = str(addr or "")
    match = _IP_TCP.match(text)
    return "" if match is None or "p2p-circuit" in text else match.group(2)


def tcp_ports(maddrs: Iterable[str]) -> list[int]:
    """The TCP ports of this node's own listen addresses (relayed ones skipped), at most four."""
    ports = []
    for m in maddrs:
        match = _IP_TCP.match(str(m))
        if match and "p2p-circuit" not in str(m) and int(match.group(3)) not in ports:
            ports.append(int(match.group(3)))
    return ports[:MAX_DIALBACK_PORTS]


def verdict(replies: Iterable[DialbackReply]) -> str:
    """``public`` / ``private`` / ``""`` from the peers' answers (see the module docstring)."""
    replies = [r for r in replies if r.observed]
    if not replies:
        return ""
    return "public" if any(r.open_ports for r in replies) else "private"


class DialbackServer:
    """Answers :class:`DialbackRequest`: dials the asker back, once per ``min_interval_s`` at most."""

    def __init__(self, run_id: str, limits: WireLimits = DEFAULT_LIMITS, dial_timeout_s: float = 3.0,
                 min_interval_s: float = 10.0, on_error: Callable[[ProtocolError], None] | None = None,
                 peer_strikes: int = 8, ban_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.run_id, self.limits, self.dial_timeout_s = run_id, limits, dial_timeout_s
        self.min_interval_s, self._on_error, self._clock = min_interval_s, on_error, clock
        self.strikes = PeerStrikes(peer_strikes, ban_s, ban_s, clock=clock)
        self._last: collections.OrderedDict[str, float] = collections.OrderedDict()  # peer -> last dial (bounded)
        self.stats: collections.Counter[str] = collections.Counter()
        # streams and requests per peer, checked before a byte is read (an honest peer asks a few times a run)
        self.admission = Admission(HANDLER, StreamLimits(max_streams=2, rate=1.0, burst=8.0),
                                   banned=self.strikes.banned_for, wire_limits=limits, clock=clock)

    async def register(self, p2p: Any) -> None:
        await p2p.add_binary_stream_handler(HANDLER, self.admission.wrap(self._on_stream))

    async def _on_stream(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer, ip = str(info.peer_id), observed_ip(getattr(info, "addr", ""))

        async def handle(msg: Message) -> Message:
            return await self.handle(msg, peer, ip)

        def on_error(exc: ProtocolError) -> None:
            if self._on_error is not None:
                self._on_error(exc)
            self.strikes.strike(peer)

        await serve_stream(reader, writer, handle, self.limits, on_error=on_error, peer=peer,
                           admit=lambda: self.admission.request(peer))

    async def handle(self, msg: Message, peer: str, ip: str) -> Message:
        """The reply to one request from ``peer`` whose stream came from ``ip`` ("" when relayed)."""
        if (left := self.strikes.banned_for(peer)) > 0:
            return self._refuse("banned", f"too many bad requests; refused for {left:.0f} s more", left)
        if not isinstance(msg, DialbackRequest):
            raise MalformedMessage(f"{HANDLER} does not answer {type(msg).__name__}")
        if msg.run_id != self.run_id:
            raise MalformedMessage(f"DialbackRequest for run {msg.run_id!r}; this node serves {self.run_id!r}")
        now = self._clock()
        if (wait := self._last.get(peer, -1e18) + self.min_interval_s - now) > 0:
            return self._refuse("busy", f"one dial-back per {self.min_interval_s:.0f} s", wait)
        self._last[peer] = now
        self._last.move_to_end(peer)
        while len(self._last) > self.strikes.max_peers:
            self._last.popitem(last=False)
        if not ip:
            self.stats["relayed"] += 1
            return DialbackReply(observed="", open_ports=[])
        results = await asyncio.gather(*(self._dial(ip, port) for port in msg.ports))
        open_ports = [port for port, ok in zip(msg.ports, results, strict=True) if ok]
        self.stats["reached" if open_ports else "unreached"] += 1
        logger.debug("dial-back to %s at %s:%s: open %s", peer, ip, msg.ports, open_ports)
        return DialbackReply(observed=ip, open_ports=open_ports)

    async def _dial(self, ip: str, port: int) -> bool:
        try:
            async with asyncio.timeout(self.dial_timeout_s):
                _, writer = await asyncio.open_connection(ip, port)
        except (OSError, TimeoutError):
            return False
        writer.close()
        return True

    def _refuse(self, code: str, message: str, retry_after: float | None = None) -> ErrorReply:
        self.stats[f"refused_{code}"] += 1
        return ErrorReply(code=code, message=message, retry_after=retry_after)


async def ask_dialback(p2p: Any, peer_id: Any, run_id: str, ports: list[int],
                       limits: WireLimits = DEFAULT_LIMITS, timeout: float = 10.0) -> DialbackReply:
    """Ask ``peer_id`` to dial this node back on ``ports``; raises ProtocolError/OSError/TimeoutError."""
    async with asyncio.timeout(timeout):
        _, reader, writer = await p2p.call_binary_stream_handler(peer_id, HANDLER)
        try:
            reply = await request(reader, writer, DialbackRequest(run_id=run_id, ports=ports), limits, timeout=timeout)
        finally:
            writer.close()
    if not isinstance(reply, DialbackReply):
        raise MalformedMessage(f"expected a DialbackReply, got {type(reply).__name__}")
    return reply
