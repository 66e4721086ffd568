"""`node start`'s live status: one line redrawn in place on a terminal, a plain log line otherwise.

The line reads, for example::

    online · stage 1/3 · 5 peers · 2,310 tok/s · loss 2.41 · cuda:0 3.1/24.0 GB (peak 3.4) · ↑ 1.2 MB/s ↓ 0.9 MB/s (84 MB / 61 MB)

and while the node downloads its stage's state (docs/node.md, "Downloading a stage")::

    joining · stage 1/3 · state 3.2 GB/8.1 GB (40%) at 9.8 MB/s, ETA 8 min · 5 peers · 0 tok/s · …

``tok/s`` is this node's own training rate over the last 10 s (local steps with S = 1; on stage 0 the
tokens of the microbatches it completed), ``loss`` its recent mean loss when it scores one, then the
compute device's memory (on CUDA torch's allocated bytes now out of the card's total, and the peak; on
the CPU the process's resident memory now and at the peak), and last its pipeline and fragment-exchange
traffic (frames, framing included). On a terminal the line is redrawn
every second at the bottom; anything else written to the terminal (logs, the banner) clears it first
and the next tick redraws it. When the output is not a terminal (a service, a container, a pipe),
the same text goes to the log every ``log_every_s`` seconds instead.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from swarm.transfer_pace import format_duration

logger = logging.getLogger("node.status")

MODES = ("auto", "line", "log", "off")
CLEAR = "\r\x1b[K"  # carriage return, erase to the end of the line


class RateWindow:
    """Rate of a growing total over the last ``window_s`` seconds (from samples fed by the caller)."""

    def __init__(self, window_s: float = 30.0):
        self.window_s = window_s
        self._samples: collections.deque[tuple[float, float]] = collections.deque()

    def update(self, total: float, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self._samples.append((now, total))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()  # keep one sample at or beyond the window's start
        t0, v0 = self._samples[0]
        return (total - v0) / (now - t0) if now > t0 else 0.0


def _bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def format_status(snap: dict[str, Any]) -> str:
    """The status text from a daemon snapshot (see ``NodeDaemon.status_snapshot``)."""
    parts = [str(snap.get("state", "?"))]
    stage, num_stages = snap.get("stage"), snap.get("num_stages")
    if num_stages and num_stages > 1:
        parts.append(f"stage {stage}/{num_stages}" if stage is not None else f"no stage/{num_stages}")
    elif stage is not None:
        parts.append("replica")
    if download := snap.get("download"):
        parts.append(_download(download))
    peers = snap.get("peers")
    if peers is not None:
        parts.append(f"{peers} peer{'s' if peers != 1 else ''}")
    parts.append(f"{snap.get('tokens_per_s', 0.0):,.0f} tok/s")
    loss = snap.get("loss")
    if loss is not None and math.isfinite(loss):
        parts.append(f"loss {loss:.3f}")
    memory = snap.get("memory")
    if memory:
        used, peak = memory.get("allocated_bytes", 0), memory.get("peak_bytes", 0)
        if memory.get("device", "cpu") == "cpu":
            parts.append(f"cpu {_gb(used)} GB (peak {_gb(peak)})")
        else:
            parts.append(f"{memory['device']} {_gb(used)}/{_gb(memory.get('total_bytes', 0))} GB (peak {_gb(peak)})")
    parts.append(f"↑ {_bytes(snap.get('sent_per_s', 0.0))}/s ↓ {_bytes(snap.get('received_per_s', 0.0))}/s "
                 f"({_bytes(snap.get('bytes_sent', 0))} / {_bytes(snap.get('bytes_received', 0))})")
    return " · ".join(parts)


def _download(d: dict[str, Any]) -> str:
    """``state 3.2 GB/8.1 GB (40%) at 9.8 MB/s, ETA 8 min``: a stage-state download in progress."""
    done, total, eta = d.get("done_bytes", 0), d.get("total_bytes", 0), d.get("eta_s")
    share = 100.0 * done / total if total else 0.0
    text = f"state {_bytes(done)}/{_bytes(total)} ({share:.0f}%) at {_bytes(d.get('bytes_per_s', 0.0))}/s"
    return text + (f", ETA {format_duration(eta)}" if eta is not None else "")


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f}"


class _ClearingStream:
    """Wraps a terminal stream: whatever is written first erases the status line (redrawn next tick)."""

    def __init__(self, stream: TextIO, owner: StatusLine):
        self._stream, self._owner = stream, owner

    def write(self, text: str) -> int:
        with self._owner.lock:
            self._owner.erase()
            return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


class StatusLine:
    """Draws ``format_status(snapshot())`` every ``interval_s`` on a terminal, or logs it every ``log_every_s``.

    ``mode``: ``auto`` (a line when ``stream`` is a terminal, else logs), ``line``, ``log`` or ``off``.
    In line mode :meth:`start` wraps ``sys.stdout``/``sys.stderr`` and the logging handlers writing to
    them, so other output never lands in the middle of the line; :meth:`stop` restores them.
    """

    def __init__(self, snapshot: Callable[[], dict[str, Any]], *, mode: str = "auto", stream: TextIO | None = None,
                 interval_s: float = 1.0, log_every_s: float = 60.0):
        if mode not in MODES:
            raise ValueError(f"status mode {mode!r} is not one of {MODES}")
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "line" if self._is_tty(self.stream) else "log"
        self.mode = mode
        self.snapshot = snapshot
        self.interval_s = interval_s if mode == "line" else log_every_s
        self.lock = threading.RLock()
        self._drawn = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._restore: list[Callable[[], None]] = []

    @staticmethod
    def _is_tty(stream: TextIO) -> bool:
        try:
            return stream.isatty() and os.environ.get("TERM") != "dumb"
        except (AttributeError, ValueError):
            return False

    def start(self) -> StatusLine:
        if self.mode == "off":
            return self
        if self.mode == "line":
            self._wrap_outputs()
        self._thread = threading.Thread(target=self._run, name="status-line", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        with self.lock:
            self.erase()
            for undo in reversed(self._restore):
                undo()
            self._restore.clear()

    def erase(self) -> None:
        """Remove the drawn line (callers hold ``lock``)."""
        if self._drawn:
            self.stream.write(CLEAR)
            self._drawn = False

    def _wrap_outputs(self) -> None:
        raw = self.stream
        for name in ("stdout", "stderr"):
            original = getattr(sys, name)
            if original is raw or self._is_tty(original):
                setattr(sys, name, _ClearingStream(original, self))
                self._restore.append(lambda name=name, original=original: setattr(sys, name, original))
        for handler in logging.getLogger().handlers:
            stream = getattr(handler, "stream", None)
            if isinstance(handler, logging.StreamHandler) and stream is not None and not isinstance(stream, _ClearingStream):
                if stream is raw or self._is_tty(stream):
                    handler.setStream(_ClearingStream(stream, self))
                    self._restore.append(lambda handler=handler, stream=stream: handler.setStream(stream))

    def _text(self) -> str | None:
        try:
            return format_status(self.snapshot())
        except Exception as exc:  # a status line must never take the daemon down
            logger.debug("status snapshot failed: %s", exc)
            return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            text = self._text()
            if text is None:
                continue
            if self.mode == "log":
                logger.info("status: %s", text)
                continue
            width = shutil.get_terminal_size((120, 24)).columns
            with self.lock:
                if self._stop.is_set():
                    return
                self.stream.write(CLEAR + text[: max(20, width - 1)])
                self.stream.flush()
                self._drawn = True
