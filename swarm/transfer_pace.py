"""How long a stage-state download may take, and what it reports while it runs.

A state is sized in gigabytes (a 1b stage's consensus state is ~8 GB: ~14 minutes at 80 Mbit/s), so
no fixed timeout fits both a datacenter and a home link. :class:`TransferPace` sizes an attempt's
limits from the state instead:

- **Stall**: a chunk must arrive within ``stall_s`` of being asked for (every request and every frame
  of its reply), so an attempt that receives no verified bytes for that long is cut (reason
  ``timeout``).
- **Deadline**: an attempt that must fetch B bytes may run ``stall_s + B / max(rate, floor) × margin``
  seconds in all, where ``rate`` is the rate measured over its verified chunks so far and ``floor``
  is the slowest link planned for (``floor_bytes_s``; 1 Mbit/s by default). While the measured rate
  stays above the floor the deadline follows it and is never reached; a transfer that trickles below
  the floor is cut once it has run as long as its bytes need at the floor rate (reason ``too_slow``).

:class:`TransferProgress` follows one attempt: verified bytes (taken from chunks kept on disk, and
fetched), the measured rate and the ETA. It logs a line every ``report_every_s`` and hands itself to
``on_progress`` after every chunk (the node's status line, ``/health`` and gauges). Nothing here
sleeps or reads a clock it was not given, so tests drive it with a fake one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

MBIT = 125_000  # bytes per second in one Mbit/s


class TransferTooSlow(Exception):
    """An attempt ran past its deadline (``reason``: ``too_slow``) or stalled (``timeout``)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass(kw_only=True)
class TransferPace:
    """The limits and reporting of state downloads (see the module docstring)."""

    stall_s: float = 60.0  # longest wait for the next verified chunk
    floor_bytes_s: float = float(MBIT)  # the slowest link a deadline is sized for
    margin: float = 3.0  # the deadline is this many times the expected transfer time
    report_every_s: float = 5.0  # a progress log line at most this often
    on_progress: Callable[[TransferProgress], None] | None = None
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        if self.stall_s <= 0 or self.floor_bytes_s <= 0 or self.margin < 1:
            raise ValueError(f"bad transfer pace: stall_s={self.stall_s}, floor_bytes_s={self.floor_bytes_s}, "
                             f"margin={self.margin} (positive; margin >= 1)")

    def deadline_s(self, to_fetch: int, fetched: int, elapsed: float) -> float:
        """Seconds an attempt that must fetch ``to_fetch`` bytes may run in all, having fetched
        ``fetched`` of them in ``elapsed`` seconds."""
        rate = fetched / elapsed if fetched > 0 and elapsed > 0 else 0.0
        return self.stall_s + to_fetch / max(rate, self.floor_bytes_s) * self.margin

    def start(self, *, stage: int, part: str, total: int, source: str) -> TransferProgress:
        """The progress of a new attempt at ``total`` bytes of ``stage``'s ``part`` state from ``source``."""
        return TransferProgress(self, stage=stage, part=part, total=total, source=source)


class TransferProgress:
    """One download attempt's verified bytes, rate, ETA and deadline (see the module docstring)."""

    def __init__(self, pace: TransferPace, *, stage: int, part: str, total: int, source: str):
        self.pace, self.stage, self.part, self.total, self.source = pace, stage, part, total, source
        self.what = "whole" if part == "all" else part  # for the log: the whole state, or the consensus
        self.kept = 0  # verified bytes taken from chunks kept on disk
        self.kept_chunks = 0
        self.fetched = 0  # verified bytes received in this attempt
        self.fetched_chunks = 0
        self.started = self._reported = pace.clock()

    @property
    def done(self) -> int:
        return self.kept + self.fetched

    def elapsed(self) -> float:
        return max(0.0, self.pace.clock() - self.started)

    def rate(self) -> float:
        """Bytes per second received in this attempt (0 before the first chunk)."""
        elapsed = self.elapsed()
        return self.fetched / elapsed if elapsed > 0 else 0.0

    def eta_s(self) -> float | None:
        """Seconds to the end at the measured rate (None before a rate is known)."""
        rate = self.rate()
        return (self.total - self.done) / rate if rate > 0 else None

    def deadline_s(self) -> float:
        return self.pace.deadline_s(self.total - self.kept, self.fetched, self.elapsed())

    def overdue(self) -> bool:
        return self.done < self.total and self.elapsed() > self.deadline_s()

    def too_slow(self) -> TransferTooSlow:
        text = (f"too slow: {_mb(self.fetched):.1f} MB in {self.elapsed():.0f} s ({_mb(self.rate()):.2f} MB/s), "
                f"{_mb(self.total - self.done):.1f} MB to go; the deadline for this state at the "
                f"{self.pace.floor_bytes_s / MBIT:g} Mbit/s floor is {self.deadline_s():.0f} s")
        return TransferTooSlow(text, "too_slow")

    def resumed(self, nbytes: int, chunks: int) -> None:
        """``chunks`` verified chunks (``nbytes``) were taken from disk instead of the network."""
        self.kept, self.kept_chunks = nbytes, chunks
        if chunks:
            logger.info("stage %d: resuming the %s state download: %d chunk(s), %.1f of %.1f MB, verified on disk",
                        self.stage, self.what, chunks, _mb(nbytes), _mb(self.total))
        self._tell()

    def add(self, nbytes: int) -> None:
        """A chunk of ``nbytes`` arrived and was verified."""
        self.fetched += nbytes
        self.fetched_chunks += 1
        now = self.pace.clock()
        if now - self._reported >= self.pace.report_every_s:
            self._reported = now
            logger.info("stage %d: downloading the %s state from %s: %s", self.stage, self.what, self.source,
                        self.describe())
        self._tell()

    def describe(self) -> str:
        """``12.6/25.2 MB (50%), 2.00 MB/s, ETA 6 s`` (and what came from disk)."""
        eta = self.eta_s()
        share = 100.0 * self.done / self.total if self.total else 100.0
        text = f"{_mb(self.done):.1f}/{_mb(self.total):.1f} MB ({share:.0f}%), {_mb(self.rate()):.2f} MB/s, ETA "
        text += format_duration(eta) if eta is not None else "?"
        return text + (f" ({_mb(self.kept):.1f} MB from disk)" if self.kept else "")

    def view(self) -> dict[str, Any]:
        """For /health and the status line."""
        eta = self.eta_s()
        return {"stage": self.stage, "part": self.part, "source": self.source, "done_bytes": self.done,
                "total_bytes": self.total, "kept_bytes": self.kept, "fetched_bytes": self.fetched,
                "bytes_per_s": round(self.rate(), 1), "eta_s": None if eta is None else round(eta, 1)}

    def _tell(self) -> None:
        if self.pace.on_progress is not None:
            try:
                self.pace.on_progress(self)
            except Exception:  # reporting must never break a download
                logger.debug("download progress callback failed", exc_info=True)


def _mb(n: float) -> float:
    return n / 1e6


def format_duration(seconds: float) -> str:
    """``42 s``, ``14 min``, ``3.5 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
