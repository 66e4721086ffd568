"""Which replica of the next stage gets the next microbatch: earliest expected finish.

A stage server (or the stage-0 driver) sends every microbatch to one replica of the next stage and
waits for the reply, which only comes back once the rest of the pipeline has run. :class:`Router`
picks that replica. It is pure bookkeeping (no network, no torch, an injectable clock), fed by the
caller: :meth:`Router.update` with the replicas the DHT lists as online, :meth:`Router.started`
when a request goes out, :meth:`Router.succeeded` / :meth:`Router.failed` when it ends.

The policy:

- **Earliest expected finish.** For each replica the router keeps a *service time*: an exponential
  moving average of how long its replies took. A new request will wait behind the work already
  queued there, so its expected finish is ``service_s * (1 + backlog)``; the router picks the
  smallest. A fast replica gets more traffic, but only until its backlog makes a slower idle one
  the earlier finish, so load spreads in proportion to speed rather than piling onto the fastest.
- **Backlog is the larger of our in-flight count and the peer's reported queue.** Our own count is
  exact and current but blind to other senders; the queue depth the peer reports in each reply
  sees everyone but is a snapshot. The reported depth is therefore aged: it is taken to drain at
  one request per ``service_s`` since it was reported, so an old report does not repel traffic
  forever. The larger of the two is the best lower bound on the real backlog.
- **Hard failures ban with exponential backoff.** A lost connection, a timeout, a protocol error or
  an error reply means the peer is down or broken; it is skipped for ``ban_base_s``, doubling with
  each consecutive failure up to ``ban_max_s``, and one success clears the record. Failures that
  arrive while the peer is already banned are the same incident (the requests that were in flight
  when it went down) and add no strike, so one outage does not jump straight to the longest ban.
- **Busy is soft.** A peer that refuses with "busy" is healthy, just full: it is not banned, but its
  backlog estimate goes up by one, so the next choices prefer other replicas until that drains.
- **New peers are routable at once**, with an initial service time of ``1 / throughput`` from their
  announcement (or the median of the known peers when they announce none, else 1 s), taken at
  choice time as no slower than the fastest measured peer's: a joiner must get traffic as soon as
  it is ONLINE, not wait behind a peer whose measured round trips beat the joiner's announced rate. The first
  measured reply replaces that guess outright rather than being averaged in: the announcement is
  one stage's compute rate, the measurement a round trip through the rest of the pipeline, and the
  two are not on the same scale. Until then, a fresh announcement replaces the guess.
- **A stale estimate is measured again.** An estimate only moves when the peer gets work, so a peer
  measured slow once (a cold start, a GC pause, the backlog it worked through after a freeze) would
  never be chosen again while faster peers absorb the load, and never be measured again: starved for
  good. So a measured peer that got no request for ``reprobe_s`` is chosen for the next one (the
  stalest first), and that reply replaces its estimate instead of being averaged in. A peer that really
  is slow costs one request every ``reprobe_s``.

Peers that leave the list are no longer chosen but are remembered for ``forget_s`` (and at least
until their ban ends), with their service time, strikes and ban: a banned peer that reappears is
still banned, and one that returns soon keeps its measured service time. Calls about peers the
router does not know (or has forgotten) are ignored, and in-flight counts never go below zero.

Not thread-safe, and needs no locks: a router belongs to one asyncio event loop and is only touched
from that loop's thread.
"""

from __future__ import annotations

import logging
import math
import random
import statistics
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

_DEFAULT_SERVICE_S = 1.0
_TIE_REL_TOL = 1e-9
_MAX_BACKOFF_EXPONENT = 60  # 2**60 * any sane base is far past ban_max_s; keeps the float finite


@dataclass(kw_only=True)
class _PeerState:
    service_s: float
    measured: bool = False  # True once a reply was timed; announcements no longer move service_s
    inflight: int = 0
    queue: float = 0.0  # backlog the peer reported (or we inferred), as of queue_at
    queue_at: float = 0.0
    probed_at: float = 0.0  # when it was last sent a request or answered one
    probing: bool = False  # the request in flight was a reprobe: its reply replaces service_s
    strikes: int = 0
    banned_until: float | None = None
    dropped_at: float | None = None  # when it left the list; None while listed


def _announced_service_s(throughput: float) -> float | None:
    """1/throughput for a usable announcement (finite, > 0); None when the peer gave no usable rate."""
    if isinstance(throughput, int | float) and math.isfinite(throughput) and throughput > 0:
        service_s = 1.0 / throughput
        if math.isfinite(service_s):  # a denormal rate would make the peer unchoosable forever
            return service_s
    return None


class Router:
    """Next-hop replica chooser for one stage's outgoing traffic (see the module docstring).

    Used from a single asyncio event loop thread; it holds no locks and must not be shared across threads.
    """

    def __init__(
        self,
        *,
        ban_base_s: float = 2.0,
        ban_max_s: float = 60.0,
        ema: float = 0.3,
        forget_s: float = 600.0,
        reprobe_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        seed: int | None = None,
    ) -> None:
        """``ema``: weight of a new reply time in the service-time average. ``forget_s``: how long a
        peer that left the list is remembered (longer if its ban runs longer). ``clock``: seconds,
        monotonic. ``seed``: for the random tie-break."""
        if not (math.isfinite(ban_base_s) and ban_base_s > 0):
            raise ValueError(f"ban_base_s must be a positive number of seconds, got {ban_base_s!r}")
        if not (math.isfinite(ban_max_s) and ban_max_s >= ban_base_s):
            raise ValueError(f"ban_max_s must be finite and >= ban_base_s ({ban_base_s}), got {ban_max_s!r}")
        if not (0.0 < ema <= 1.0):
            raise ValueError(f"ema must be in (0, 1], got {ema!r}")
        if not (forget_s >= 0):
            raise ValueError(f"forget_s must be >= 0, got {forget_s!r}")
        if not (math.isfinite(reprobe_s) and reprobe_s > 0):
            raise ValueError(f"reprobe_s must be a positive number of seconds, got {reprobe_s!r}")
        self.ban_base_s = ban_base_s
        self.ban_max_s = ban_max_s
        self.ema = ema
        self.forget_s = forget_s
        self.reprobe_s = reprobe_s
        self._clock = clock
        self._rng = random.Random(seed)
        self._states: dict[str, _PeerState] = {}  # listed and remembered peers
        self._listed: list[str] = []
        self._suspended: set[str] = set()  # stopped answering: no new work until they answer again

    # ------------------------------------------------------------------ membership

    def update(self, replicas: Iterable[tuple[str, float]]) -> None:
        """Current ONLINE replicas of the next stage as (peer_id, announced throughput in microbatches/s).

        New peers become routable at once (initial service time: 1/throughput if > 0, else the median
        of the listed peers' estimates, else 1.0 s). An unmeasured peer's estimate follows its latest
        announcement; a measured one keeps its average. Peers no longer listed stop being chosen; their
        state (ban included) is remembered for ``forget_s`` or until the ban ends, whichever is later.
        """
        now = self._clock()
        announced: dict[str, float | None] = {}
        for peer_id, throughput in replicas:
            announced[peer_id] = _announced_service_s(throughput)

        for peer_id in self._listed:
            if peer_id not in announced:
                self._states[peer_id].dropped_at = now

        pending: list[str] = []  # new (or forgotten-and-back) peers with no usable announcement
        for peer_id, service_s in announced.items():
            state = self._states.get(peer_id)
            if state is None:
                if service_s is None:
                    pending.append(peer_id)
                    continue
                state = self._states[peer_id] = _PeerState(service_s=service_s, queue_at=now)
            elif service_s is not None and not state.measured:
                state.service_s = service_s
            state.dropped_at = None

        if pending:
            known = [self._states[p].service_s for p in announced if p in self._states]
            fallback = statistics.median(known) if known else _DEFAULT_SERVICE_S
            for peer_id in pending:
                self._states[peer_id] = _PeerState(service_s=fallback, queue_at=now)

        self._listed = list(announced)
        self._forget_stale(now)

    def _forget_stale(self, now: float) -> None:
        for peer_id in [p for p, s in self._states.items() if s.dropped_at is not None]:
            state = self._states[peer_id]
            still_banned = state.banned_until is not None and now < state.banned_until
            if not still_banned and now - state.dropped_at >= self.forget_s:
                del self._states[peer_id]
                self._suspended.discard(peer_id)

    @property
    def peers(self) -> list[str]:
        """The listed peers, in the order of the last :meth:`update` (banned ones included)."""
        return list(self._listed)

    # ------------------------------------------------------------------ choosing

    def choose(self, exclude: Collection[str] = ()) -> str | None:
        """Earliest expected finish among listed, not banned, not excluded peers; None when there is none.

        Ties are broken at random (the router's own seeded generator), so senders with identical views
        do not all pick the same replica. A measured peer idle for ``reprobe_s`` comes first (module docstring).
        Choosing changes nothing: :meth:`started` records the request.
        """
        now = self._clock()
        fastest = self._fastest_measured()
        best: list[str] = []
        best_s = math.inf
        stalest, stalest_at = None, math.inf
        for peer_id in sorted(self._listed):  # sorted: same seed, same choices, whatever the update order
            state = self._states[peer_id]
            if peer_id in exclude or peer_id in self._suspended or self._is_banned(state, now):
                continue
            if self._stale(state, now) and state.probed_at < stalest_at:
                stalest, stalest_at = peer_id, state.probed_at
            finish_s = self._expected_finish(state, now, fastest)
            if best and math.isclose(finish_s, best_s, rel_tol=_TIE_REL_TOL):
                best.append(peer_id)
            elif finish_s < best_s:
                best, best_s = [peer_id], finish_s
        if not best:
            return None
        if stalest is not None and stalest not in best:
            return stalest
        return best[0] if len(best) == 1 else self._rng.choice(best)

    def _stale(self, state: _PeerState, now: float) -> bool:
        return state.measured and not state.inflight and now - state.probed_at >= self.reprobe_s

    def expected_finish(self, peer_id: str) -> float:
        """Seconds until a new request to ``peer_id`` would finish: ``service_s * (1 + backlog)``.

        The backlog is ``max(our in-flight requests, reported queue aged by the time since)``. Bans
        are not counted (see :meth:`banned`); an unknown peer gives ``math.inf``.
        """
        state = self._states.get(peer_id)
        if state is None:
            return math.inf
        return self._expected_finish(state, self._clock(), self._fastest_measured())

    def _fastest_measured(self) -> float:
        return min((self._states[p].service_s for p in self._listed if self._states[p].measured), default=math.inf)

    @staticmethod
    def _effective_service_s(state: _PeerState, fastest_measured: float) -> float:
        # Optimism for the unmeasured: a joiner is tried as soon as it is as good a bet as the fastest
        # measured peer, not starved behind round trips that beat its announced rate; its first reply
        # then sets its real estimate. Applied at choice time, so it tracks the measured peers' averages.
        return state.service_s if state.measured else min(state.service_s, fastest_measured)

    def _expected_finish(self, state: _PeerState, now: float, fastest_measured: float) -> float:
        service_s = self._effective_service_s(state, fastest_measured)
        return service_s * (1.0 + max(state.inflight, self._queue_now(state, now)))

    @staticmethod
    def _queue_now(state: _PeerState, now: float) -> float:
        # The peer works through its queue at about one request per service time since it reported it.
        if state.queue <= 0:
            return 0.0
        drained = max(0.0, now - state.queue_at) / state.service_s if state.service_s > 0 else math.inf
        return max(0.0, state.queue - drained)

    # ------------------------------------------------------------------ outcomes

    def started(self, peer_id: str) -> None:
        """A request was sent to ``peer_id`` (ignored for a peer the router does not know)."""
        state = self._states.get(peer_id)
        if state is not None:
            now = self._clock()
            state.probing = self._stale(state, now)
            state.inflight += 1
            state.probed_at = now

    def succeeded(self, peer_id: str, seconds: float, queue: int = 0) -> None:
        """The reply from ``peer_id`` came after ``seconds``; ``queue`` is the backlog the peer reported.

        Updates the service-time average (the first measurement replaces the announced guess), takes
        the reported queue as the peer's backlog, ends one in-flight request and clears its strikes.
        """
        if not (isinstance(seconds, int | float) and math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"seconds must be a finite duration >= 0, got {seconds!r}")
        state = self._states.get(peer_id)
        if state is None:
            logger.debug("reply from unknown peer %s ignored", peer_id)
            return
        if state.measured and not state.probing:
            state.service_s = (1.0 - self.ema) * state.service_s + self.ema * seconds
        else:  # the first measurement, or a reprobe of a stale estimate: the new one is all we know
            state.service_s, state.measured = seconds, True
        # Peer-reported: anything that is not a sane count means "no information", never a crash.
        reported = queue if isinstance(queue, int | float) and math.isfinite(queue) else 0
        state.queue = float(max(0, reported))
        state.queue_at = state.probed_at = self._clock()
        state.inflight = max(0, state.inflight - 1)
        state.probing = False
        state.strikes = 0

    def failed(self, peer_id: str, *, hard: bool) -> None:
        """A request to ``peer_id`` ended without a reply.

        ``hard=True`` (connection lost, timeout, protocol error, error reply): one more strike and a
        ban of ``min(ban_max_s, ban_base_s * 2**(strikes-1))`` seconds; a failure while already banned
        adds no strike. ``hard=False`` (the peer said busy): no ban, its backlog estimate goes up by
        one and its service time is left alone.
        """
        state = self._states.get(peer_id)
        if state is None:
            logger.debug("failure of unknown peer %s ignored", peer_id)
            return
        now = self._clock()
        state.inflight = max(0, state.inflight - 1)
        state.probing = False
        if not hard:
            state.queue = self._queue_now(state, now) + 1.0
            state.queue_at = now
            return
        if self._is_banned(state, now):
            return
        state.strikes += 1
        ban_s = min(self.ban_max_s, self.ban_base_s * 2.0 ** min(state.strikes - 1, _MAX_BACKOFF_EXPONENT))
        state.banned_until = now + ban_s
        logger.info("peer %s banned for %.1f s after %d consecutive failure(s)", peer_id, ban_s, state.strikes)

    # ------------------------------------------------------------------ bans and status

    @staticmethod
    def _is_banned(state: _PeerState, now: float) -> bool:
        return state.banned_until is not None and now < state.banned_until

    def routable(self) -> bool:
        """Whether :meth:`choose` would find a peer now (a listed one not banned); it draws no random number."""
        now = self._clock()
        return any(not self._is_banned(self._states[p], now) for p in self._listed if p not in self._suspended)

    def suspend(self, peer_id: str) -> None:
        """Send ``peer_id`` no new work until :meth:`revive`: it stopped answering (a frozen process). Unlike a
        ban this does not escalate, and it ends when the peer answers again, not after a time."""
        self._suspended.add(peer_id)

    def revive(self, peer_id: str) -> None:
        self._suspended.discard(peer_id)

    def suspended(self) -> set[str]:
        return set(self._suspended)

    def banned(self, peer_id: str) -> bool:
        """Whether ``peer_id`` is banned now (False for an unknown peer)."""
        state = self._states.get(peer_id)
        return state is not None and self._is_banned(state, self._clock())

    def banned_until(self, peer_id: str) -> float | None:
        """Clock time at which the ban on ``peer_id`` ends; None when it is not banned now."""
        state = self._states.get(peer_id)
        if state is None or not self._is_banned(state, self._clock()):
            return None
        return state.banned_until

    def snapshot(self) -> list[dict]:
        """One dict per listed peer, earliest expected finish first, for status pages and logs.

        Keys: ``peer_id``, ``expected_s``, ``service_s``, ``inflight``, ``queue`` (the aged reported
        backlog, a float), ``banned_for_s`` (0.0 when not banned), ``strikes``.
        """
        now = self._clock()
        fastest = self._fastest_measured()
        rows = []
        for peer_id in self._listed:
            state = self._states[peer_id]
            rows.append({
                "peer_id": peer_id,
                "expected_s": self._expected_finish(state, now, fastest),
                "service_s": self._effective_service_s(state, fastest),
                "inflight": state.inflight,
                "queue": self._queue_now(state, now),
                "banned_for_s": max(0.0, state.banned_until - now) if self._is_banned(state, now) else 0.0,
                "suspended": peer_id in self._suspended,
                "strikes": state.strikes,
            })
        rows.sort(key=lambda row: (row["expected_s"], row["peer_id"]))
        return rows
