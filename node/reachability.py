"""This node's reachability: asks connected peers to dial it back (swarm/reachability.py), keeps the verdict.

:class:`ReachabilityProbe` runs on the P2P loop from the moment the services start. Every
``retry_s`` until it has a verdict, then every ``recheck_s``, it asks up to three connected peers
(those answering the dial-back protocol: other nodes, not `node status` readers) to dial its
listening ports. The verdict (``public`` / ``private`` / ``""`` not known) goes into the node's stage
record, /health, the join banner (the address peers saw, when they could dial it) and the plan:

- ``private`` in a pipeline: the node claims stage 0 only (it drives; every other stage receives
  connections), is not counted as a stage's server, not asked for downloads, never leads an exchange
  group (swarm/exchange/star.py ``plan_groups``), and turns its DHT into a client (peers cannot dial it).
- ``""`` (nobody answered, e.g. the founder alone): treated as reachable, and asked again.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections.abc import Callable

from protocol.tensors import WireLimits
from swarm.reachability import ask_dialback, tcp_ports, verdict

logger = logging.getLogger(__name__)


class ReachabilityProbe:
    def __init__(self, p2p, peer_id: str, run_id: str, maddrs: Callable[[], list[str]], limits: WireLimits,
                 retry_s: float = 5.0, recheck_s: float = 300.0, ask: int = 3) -> None:
        self.p2p, self.peer_id, self.run_id, self._maddrs, self.limits = p2p, peer_id, run_id, maddrs, limits
        self.retry_s, self.recheck_s, self.ask = retry_s, recheck_s, ask
        self.state = ""  # "public" | "private" | "" (not known)
        self.observed = ""  # this node's IP as the last answering peers saw it
        self.port: int | None = None  # a listening port a peer's dial reached
        self.known = threading.Event()  # set at the first verdict
        self.on_change: list[Callable[[str], None]] = []  # called on the loop with the new state
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """On the loop: start probing (idempotent)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="reachability")

    def wait(self, timeout: float) -> str:
        """The verdict, waiting up to ``timeout`` s for the first one ("" if none by then)."""
        self.known.wait(timeout)
        return self.state

    def address(self) -> str | None:
        """A multiaddr peers reached this node at (the observed IP and a port they dialled), if any."""
        if self.state != "public" or not self.observed or self.port is None:
            return None
        proto = "ip6" if ":" in self.observed else "ip4"
        return f"/{proto}/{self.observed}/tcp/{self.port}/p2p/{self.peer_id}"

    async def _run(self) -> None:
        while True:
            try:
                found = await self.check_once()
            except Exception as exc:  # never let the probe die: a failed round is retried
                logger.debug("reachability check failed: %s", exc)
                found = False
            await asyncio.sleep(self.recheck_s if found else self.retry_s)

    async def check_once(self) -> bool:
        """Ask up to ``ask`` connected peers; True when one answered (the verdict is updated then)."""
        ports = tcp_ports(self._maddrs())
        if not ports:
            return False
        peers = [p.peer_id for p in await self.p2p.list_peers() if str(p.peer_id) != self.peer_id]
        random.shuffle(peers)
        answers = await asyncio.gather(*(self._ask(peer, ports) for peer in peers[:self.ask]))
        replies = [r for r in answers if r is not None]
        state = verdict(replies)
        if not state:
            return False
        reached = [r for r in replies if r.open_ports]
        best = reached[0] if reached else next(r for r in replies if r.observed)
        self.observed, self.port = best.observed, (best.open_ports[0] if best.open_ports else None)
        changed, self.state = state != self.state, state
        self.known.set()
        if changed:
            logger.info("reachability: %s (%d peer(s) answered; seen at %s)", state, len(replies), self.observed)
            for callback in self.on_change:
                callback(state)
        return True

    async def _ask(self, peer, ports: list[int]):
        try:
            return await ask_dialback(self.p2p, peer, self.run_id, ports, self.limits)
        except Exception as exc:  # a peer without the handler (a reader), a refusal, a timeout
            logger.debug("dial-back from %s: %s", peer, exc)
            return None


def stages_for(probe: ReachabilityProbe | None, fit: list[int], num_stages: int, forced: int | None,
               wait_s: float) -> tuple[list[int], str | None]:
    """The stages this node may claim given its reachability (waiting up to ``wait_s`` for a verdict),
    and the reason it can serve none. Behind NAT a pipeline node drives stage 0 only: every other stage
    is dialled by its upstream neighbours."""
    if num_stages == 1 or probe is None or wait_s <= 0:
        return fit, None
    if probe.wait(wait_s) != "private":
        return fit, None
    if forced is not None:
        if forced != 0:
            logger.warning("peers cannot dial this node, yet it was told to serve stage %d: its upstream "
                           "neighbours will fail to reach it (forward its port, or serve stage 0)", forced)
        return fit, None
    if 0 not in fit:
        return [], ("peers cannot dial this node (behind NAT or a firewall) and stage 0, the only stage such a "
                    "node can serve, does not fit this device: forward its port (docs/networking.md) or use a larger device")
    logger.info("peers cannot dial this node (behind NAT or a firewall): it serves stage 0 only")
    return [0], None
