"""An emulated access link ("home link") for this process: a rate limit and a one-way delay.

The real emulation is a Linux network namespace per node with ``tc tbf`` shaping its veth
(swarm/sim/netns.py). This module does two jobs: it is the fallback when namespaces are not possible (no
root), and it adds the link's one-way *delay* in both cases, because this machine's kernel has no
``netem``. It slows down protoswarm's *own* streams at the framing layer: :func:`install` an emulator
(it becomes framing's :class:`~protocol.framing.FrameHook`) and every frame that
:func:`protocol.framing.write_frame` sends or :func:`protocol.framing.read_frame` receives in this
process pays for the link. Only those streams are emulated: pipeline activation/gradient
frames, DiLoCo fragment exchanges, state transfer. hivemind's DHT RPCs, the libp2p handshake and any
other traffic run at the real speed of the underlying transport.

The model, per process (one node = one access link):

- **Uplink** (frames sent). The link is busy until ``up_free``. A frame of n bytes (prefix included)
  starts at ``max(now, up_free)`` and occupies the link for ``n * 8 / rate`` seconds; the sender waits
  until its frame has fully left, which is the back-pressure a slow real uplink gives. The slot is
  reserved before waiting, so concurrent senders (other streams, other event loops) are served in the
  order they asked, each at its share of the rate. A sender that wakes up a little late (timer
  granularity: epoll rounds up to 1 ms) keeps its place: up to ``slack_s`` of idle link is
  forgiven, which is a token bucket with a burst of ``slack_s * rate`` bits, like tbf's ``burst``.
- **Downlink** (frames received). The same, with ``down_free``, after a whole frame was read and before
  ``read_frame`` returns it: the reader waits until the frame "has arrived" at the emulated rate.
  A frame between two emulated nodes pays both serializations (store and forward), pipelined across
  frames, so a bulk transfer runs at the slower of the two rates.
- **Delay** (sends only, paid once per direction of a stream). Over a real link with one-way delay D,
  a frame arrives D after it has left. Here the sender is held for D before the *first* frame it sends
  on a stream, which shifts its clock by D: the frames it then sends back to back on that stream pay
  no further delay and still arrive when they would over the real link, so a bulk transfer takes
  D + its serialization, not ``frames × D``. Once the stream has *received* a frame (the direction
  turned: a reply), its next send pays D again, so a request/reply round trip between two emulated
  nodes pays 2 × D. The receiving side adds nothing. The stream is framing's key for it (the asyncio
  transport, shared by the stream's reader and writer); state is held per stream in a
  ``WeakKeyDictionary``, dropped when the transport is freed and as soon as the stream receives.
  Limits: a frame on a stream framing cannot name (``stream=None``: a reader or writer without a
  transport) pays D every time, the old per-frame model; a stream that carries independent traffic
  both ways at once is charged D on its first send after every receive, an over-estimate (a real link
  would overlap those delays); a long-lived stream whose later sends are set off by something other
  than its own earlier ones (spaced out, nothing received between) pays D only once, an
  under-estimate. protoswarm's streams are a request or a burst of frames, then the reply, where the
  model is exact. A frame sent while an earlier one on its stream still waits out D waits with it
  (it does not overtake it), then pays nothing more.
- A ``None`` rate is an unlimited link (only the delay applies). A frame cancelled while it waits
  (the frame timeout) gives back the rest of its slot if no later frame reserved after it.

Timeouts: the waits happen inside framing's per-frame timeout, so a link too slow for a frame ends in
:class:`~protocol.errors.FrameTimeout` exactly as a slow real peer would.

Cost when nothing is installed: one global lookup and an ``is None`` test per frame, no await.

:class:`LinkSpec` is also what the ``swarm.link`` setting of ``node start`` and ``node sim --link``
parse to. Spec text (:meth:`LinkSpec.parse`) follows ``tc``: ``80mbit``, ``1.5gbit``, ``500kbit``, ``9600bit``
(k/m/g = 10^3/10^6/10^9 bits per second; ``bps`` is not accepted because tc reads it as *bytes*),
``80mbit,delay=30ms``, ``delay=30ms`` (units ``s``, ``ms``, ``us``); ``""`` or ``"none"`` means no
emulation and parses to ``None``.
"""

from __future__ import annotations

import asyncio
import math
import re
import threading
import time
import weakref
from dataclasses import dataclass

from protocol import framing
from protocol.framing import FrameHook

__all__ = ["LinkEmulator", "LinkSpec", "current", "install"]

_RATE_UNITS = (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0))  # multipliers to bit/s
_DELAY_UNITS = (("s", 1.0), ("ms", 1e3), ("us", 1e6))  # divisors to seconds
_QUANTITY = re.compile(r"(?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?)\s*(?P<unit>[a-z]*)")
_RATE_HELP = "e.g. 80mbit; units bit, kbit, mbit, gbit (powers of 10, bits per second)"
_DELAY_HELP = "e.g. delay=30ms; units s, ms, us"


def _number(value: float) -> str:
    """Shortest text that float() reads back as ``value``; integers without a trailing .0."""
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def _quantity(piece: str) -> tuple[float, str] | None:
    match = _QUANTITY.fullmatch(piece.strip().lower())
    return None if match is None else (float(match["num"]), match["unit"])


@dataclass(frozen=True)
class LinkSpec:
    """One node's access link: ``rate_bps`` bits per second each way (None: unlimited) and a one-way
    ``delay_s`` that this process's sends pay once per direction of a stream (module docstring)."""

    rate_bps: float | None = None
    delay_s: float = 0.0

    def __post_init__(self) -> None:
        if self.rate_bps is not None:
            rate = float(self.rate_bps)
            if not (math.isfinite(rate) and rate > 0):
                raise ValueError(f"a link rate must be a positive number of bits/s, got {self.rate_bps!r}")
            object.__setattr__(self, "rate_bps", rate)
        delay = float(self.delay_s)
        if not (math.isfinite(delay) and delay >= 0):
            raise ValueError(f"a link delay must be a finite number of seconds >= 0, got {self.delay_s!r}")
        object.__setattr__(self, "delay_s", delay)

    @property
    def emulates_anything(self) -> bool:
        return self.rate_bps is not None or self.delay_s > 0

    @classmethod
    def parse(cls, text: str) -> LinkSpec | None:
        """``"80mbit"``, ``"80mbit,delay=30ms"``, ``"delay=30ms"``; None for ``""``, ``"none"`` or a spec
        that sets nothing (``"delay=0ms"``). Raises ValueError naming the piece it cannot read."""
        stripped = text.strip()
        if stripped.lower() in ("", "none"):
            return None
        rate: float | None = None
        delay: float | None = None
        for piece in stripped.split(","):
            if not piece.strip():
                raise ValueError(f"link spec {text!r}: an empty item (a stray comma?)")
            key, sep, value = piece.partition("=")
            key = key.strip().lower()
            if not sep:
                if rate is not None:
                    raise ValueError(f"link spec {text!r}: a second rate {piece.strip()!r}")
                rate = _parse_rate(text, piece)
            elif key == "delay":
                if delay is not None:
                    raise ValueError(f"link spec {text!r}: a second delay {piece.strip()!r}")
                delay = _parse_delay(text, piece, value)
            elif not key:
                raise ValueError(f"link spec {text!r}: {piece.strip()!r} has no setting name ({_DELAY_HELP})")
            else:
                raise ValueError(
                    f"link spec {text!r}: unknown setting {key!r} in {piece.strip()!r} (only delay=)"
                )
        spec = cls(rate_bps=rate, delay_s=delay or 0.0)
        return spec if spec.emulates_anything else None

    def __str__(self) -> str:
        """Canonical text that :meth:`parse` reads back to an equal spec; ``"none"`` if nothing is set."""
        parts = []
        if self.rate_bps is not None:
            parts.append(_format_rate(self.rate_bps))
        if self.delay_s > 0:
            parts.append("delay=" + _format_delay(self.delay_s))
        return ",".join(parts) or "none"


def _parse_rate(text: str, piece: str) -> float:
    quantity = _quantity(piece)
    units = dict(_RATE_UNITS)
    if quantity is None or quantity[1] not in units:
        raise ValueError(f"link spec {text!r}: {piece.strip()!r} is not a rate ({_RATE_HELP})")
    value = quantity[0] * units[quantity[1]]
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"link spec {text!r}: rate {piece.strip()!r} must be positive (leave it out for no rate limit)"
        )
    return value


def _parse_delay(text: str, piece: str, value: str) -> float:
    quantity = _quantity(value)
    units = dict(_DELAY_UNITS)
    if quantity is None or quantity[1] not in units:
        raise ValueError(f"link spec {text!r}: {piece.strip()!r} is not a delay ({_DELAY_HELP})")
    seconds = quantity[0] / units[quantity[1]]
    if not math.isfinite(seconds):
        raise ValueError(f"link spec {text!r}: delay {piece.strip()!r} is not finite")
    return seconds


def _format_rate(rate: float) -> str:
    for unit, mult in _RATE_UNITS:  # the largest unit with a value >= 1 that reads back exactly
        value = rate / mult
        if value >= 1 or unit == "bit":
            text = _number(value)
            if float(text) * mult == rate:
                return text + unit
    return repr(rate) + "bit"


def _format_delay(delay: float) -> str:
    for unit, div in _DELAY_UNITS:
        value = delay * div
        if value >= 1 or unit == "us":
            text = _number(value)
            if float(text) / div == delay:
                return text + unit
    return repr(delay) + "s"


class LinkEmulator:
    """The access link of this process (see the module docstring for the model).

    ``before_send(nbytes, stream)`` / ``after_receive(nbytes, stream)`` (framing's ``FrameHook``) are
    awaited by framing for each frame once the emulator is :func:`install`-ed. Counters:
    ``bytes_sent``/``bytes_received`` and ``frames_sent``/``frames_received`` (frames that got through
    the link), ``wait_s_up``/``wait_s_down`` (seconds callers spent waiting for the link, queueing
    included, the fixed delay excluded), ``delays_paid`` (sends that got through after waiting the whole
    one-way delay). Safe to share between event loops in different threads.
    """

    def __init__(self, spec: LinkSpec, *, slack_s: float = 0.002):
        if slack_s < 0:
            raise ValueError(f"slack_s must be >= 0, got {slack_s}")
        self.spec = spec
        self.slack_s = slack_s
        self._seconds_per_byte = None if spec.rate_bps is None else 8.0 / spec.rate_bps
        self._lock = threading.Lock()
        self._free = [0.0, 0.0]  # time.monotonic() at which the uplink [0] / downlink [1] is next idle
        # stream -> time.monotonic() at which the delay its current run of sends paid ends; a stream
        # is here only while its last event was a send (a receive removes it). Weak: no leak.
        self._sending: weakref.WeakKeyDictionary[object, float] = weakref.WeakKeyDictionary()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.frames_sent = 0
        self.frames_received = 0
        self.wait_s_up = 0.0
        self.wait_s_down = 0.0
        self.delays_paid = 0

    def __repr__(self) -> str:
        return f"LinkEmulator({str(self.spec)!r})"

    async def before_send(self, nbytes: int, stream: object | None = None) -> None:
        """Wait the one-way delay if this send on ``stream`` owes it (the first send, or the first since
        the stream received; always when ``stream`` is None), then until a frame of ``nbytes`` has left
        through the uplink."""
        paid = self.spec.delay_s > 0 and await self._delay(stream)
        waited = await self._through(0, nbytes)
        with self._lock:
            self.bytes_sent += nbytes
            self.frames_sent += 1
            self.wait_s_up += waited
            self.delays_paid += int(paid)

    async def after_receive(self, nbytes: int, stream: object | None = None) -> None:
        """Wait until a frame of ``nbytes`` that was just read has come in through the downlink; the
        next send on ``stream`` pays the delay again (the direction turned)."""
        if stream is not None and self.spec.delay_s > 0:
            with self._lock:
                try:
                    self._sending.pop(stream, None)
                except TypeError:  # cannot be weakly referenced, so never remembered
                    pass
        waited = await self._through(1, nbytes)
        with self._lock:
            self.bytes_received += nbytes
            self.frames_received += 1
            self.wait_s_down += waited

    async def _delay(self, stream: object | None) -> bool:
        """Hold a send until its stream's delay has passed; True if this send paid the whole delay."""
        with self._lock:
            now = time.monotonic()
            try:
                ends = None if stream is None else self._sending.get(stream)
            except TypeError:  # a key that cannot be weakly referenced: an unknown stream
                stream = ends = None
            paid = ends is None
            if paid:
                ends = now + self.spec.delay_s
                if stream is not None:
                    self._sending[stream] = ends
        try:
            remaining = ends - time.monotonic()  # > 0 for a later send only while an earlier one waits
            if remaining > 0:
                await asyncio.sleep(remaining)
        except BaseException:  # cancelled: this frame never left, the next send pays the delay again
            if paid and stream is not None:
                with self._lock:
                    if self._sending.get(stream) == ends:
                        del self._sending[stream]
            raise
        return paid

    async def _through(self, direction: int, nbytes: int) -> float:
        """Reserve the frame's slot on one direction of the link (FIFO) and wait for its end; the wait."""
        if self._seconds_per_byte is None:
            return 0.0
        with self._lock:  # reserved before any await: the order of arrival is the order of service
            now = time.monotonic()
            start = max(now - self.slack_s, self._free[direction])
            done = start + nbytes * self._seconds_per_byte
            self._free[direction] = done
        try:
            remaining = done - time.monotonic()
            if remaining > 0:
                await asyncio.sleep(remaining)
        except BaseException:  # cancelled (frame timeout): give back the unused rest of the slot
            with self._lock:
                if self._free[direction] == done:  # no later reservation depends on it
                    self._free[direction] = max(start, time.monotonic())
            raise
        return max(0.0, time.monotonic() - now)

    def stats(self) -> dict[str, float | int | str]:
        with self._lock:
            return {
                "spec": str(self.spec),
                "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received,
                "frames_sent": self.frames_sent,
                "frames_received": self.frames_received,
                "wait_s_up": self.wait_s_up,
                "wait_s_down": self.wait_s_down,
                "delays_paid": self.delays_paid,
                "streams_sending": len(self._sending),
            }


def install(emulator: LinkEmulator | None) -> FrameHook | None:
    """Make ``emulator`` this process's link for every frame read or written from now on (None: no
    emulation); returns the frame hook it replaces, so callers can restore it."""
    return framing.set_frame_hook(emulator)


def current() -> FrameHook | None:
    """The installed emulator (framing's frame hook), or None."""
    return framing.frame_hook()
